"""The pipeline call, in the model's turn: one call for a batch of jobs (the refiner after the base where asked),
the request's LoRAs and scheduler switched on, progress reported and stops honoured at each step, and an
out-of-memory or failed call answered as each job's error, a failed batch run again one job at a time."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import nullcontext
from typing import Any

import torch

from .. import metrics
from ..encoded import vae_stand_in
from ..errors import WorkerError
from ..model import LoadedModel
from .job import Job, elapsed_ms
from .loras import switch_loras

log = logging.getLogger("sdworker")


class _AllStoppedError(Exception):
    """Every job in the batch was cancelled or timed out: stop the pipeline."""


STOPPED = frozenset({"CANCELLED", "TIMED_OUT"})


def run_batch(model: LoadedModel, batch: list[Job]) -> None:
    """Run `batch` as one pipeline call and set each job's images or error; never raises. If the call fails with
    more than one job in it, each job still running is run again alone, so that one job's failure (or a batch
    too big for the GPU) never fails the others."""
    try:
        _pipeline_call(model, batch)
    except WorkerError as err:
        if len(batch) > 1 and err.code in ("OUT_OF_MEMORY", "PIPELINE_ERROR"):
            log.warning("a batch of %d failed (%s); running its jobs one by one", len(batch), err.code)
            for job in batch:
                if job.error is None or job.error.code not in STOPPED:
                    job.error = None
                    run_batch(model, [job])
            return
        for job in batch:
            job.error = job.error or err
        return
    except Exception:
        log.exception("generation failed")
        for job in batch:
            job.error = job.error or WorkerError(
                "INTERNAL_ERROR", "internal error; the worker's log has the details", status=500
            )


def _conditioning(model: LoadedModel, pipe: Any, batch: list[Job], counts: list[int]) -> dict[str, Any]:
    """The batch's prompts for `pipe`: as text, or as compel's embeddings (one row per image)."""
    first = batch[0]
    if first.encoded is not None:
        return first.encoded.conditioning
    assert first.prompts is not None
    if not first.prompts.embeds:  # no negative prompt: none passed (FLUX.2's pipelines take none)
        if len(batch) == 1:
            negative = first.prompts.negative_text
            return {"prompt": first.prompts.text, **({} if negative is None else {"negative_prompt": negative})}
        texts = [job.prompts.text for job, n in zip(batch, counts, strict=True) for _ in range(n)]
        if first.prompts.negative_text is None:
            return {"prompt": texts}
        negatives = [job.prompts.negative_text for job, n in zip(batch, counts, strict=True) for _ in range(n)]
        return {"prompt": texts, "negative_prompt": negatives}
    from ..prompts import encode

    length = first.request.max_sequence_length or model.row.sequence_length
    encoded = [encode(pipe, model.row.kin, job.prompts, length) for job in batch]
    if len(batch) == 1:
        return encoded[0]
    return {
        name: torch.cat([part[name].repeat_interleave(n, dim=0) for part, n in zip(encoded, counts, strict=True)])
        for name in encoded[0]
    }


def _progress(pipeline: Any, step: int, distinct: int) -> tuple[int, int]:
    """(steps done, steps in all) after the pipeline's loop index `step`, in the steps a client asked for: some
    schedulers visit a timestep twice (PNDM its first, Heun and other second-order ones each but the last), and
    the count of `distinct` timesteps is what was asked (times strength for img2img)."""
    calls = pipeline.num_timesteps
    if not distinct or step + 1 >= calls:  # the last call: all done (whatever the count said before)
        return (distinct, distinct) if distinct else (step + 1, step + 1)
    return min(-(-(step + 1) * distinct // calls), distinct - 1), distinct


def _cast_back(module: Any, dtype: Any) -> None:
    """`module` in `dtype` again, where a failed pipeline call left it in another."""
    if module is not None and module.dtype != dtype:
        module.to(dtype)


def _pipeline_call(model: LoadedModel, batch: list[Job]) -> None:
    """One pipeline call for every image of `batch`; fills in each job's images, or its error."""
    first = batch[0]
    pipe = model.pipes[first.request.task]
    counts = [len(job.seeds) for job in batch]

    reported, distinct = [0], {}  # distinct timesteps: counted once per pipeline (base, refiner), not per step

    def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if id(pipeline) not in distinct:
            calls = pipeline.num_timesteps
            distinct[id(pipeline)] = len(set(pipeline.scheduler.timesteps[-calls:].tolist())) if calls else 0
        done, total = _progress(pipeline, step, distinct[id(pipeline)])
        if done == reported[0]:  # a timestep visited twice: nothing new to say
            return tensors
        reported[0] = done
        offset = 0
        for job, count in zip(batch, counts, strict=True):
            if job.error is None:
                try:
                    if job.on_step is not None:
                        job.on_step(done, total)
                    if job.on_latents is not None:
                        job.on_latents(done, total, tensors["latents"][offset : offset + count])
                except WorkerError as err:  # this job was cancelled or timed out; the others go on
                    job.error = err
            offset += count
        if all(job.error is not None for job in batch):
            raise _AllStoppedError
        return tensors

    cuda = model.device.startswith("cuda")
    out_of_memory = False
    pipe.scheduler = first.scheduler
    switch_loras(model, pipe, first.request, first.lora_files)  # the batch's LoRAs: its jobs all name the same
    image = first.encoded.image if first.encoded else None  # the image encoded by the VAE's worker (split stages)
    stand_in = vae_stand_in(pipe, model.config_of("vae"), image, model.device) if image else nullcontext()
    # SDXL's pipelines upcast a float16 VAE to float32 around decoding and cast it back only when the decode
    # succeeds: after an out-of-memory error there, every later request would meet a float32 VAE.
    vae = getattr(pipe, "vae", None)
    vae_dtype = vae.dtype if vae is not None else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with torch.inference_mode(), stand_in:
            common = {
                **_conditioning(model, pipe, batch, counts),
                "num_inference_steps": first.request.num_inference_steps,
                model.row.guidance_kwarg: first.request.guidance_scale,
                "num_images_per_prompt": 1 if len(batch) > 1 else counts[0],
                "generator": [torch.Generator("cpu").manual_seed(s) for job in batch for s in job.seeds],
                "callback_on_step_end": step_end,
            }
            if first.request.refiner:  # ensemble of experts: the base takes the high-noise steps, the refiner the rest
                split = first.request.high_noise_frac
                latents = pipe(**common, **first.kwargs, denoising_end=split, output_type="latent").images
                model.refiner.scheduler = type(first.scheduler).from_config(first.scheduler.config)
                common.update(_conditioning(model, model.refiner, batch, counts))  # its own text encoder's
                images = model.refiner(**common, image=latents, denoising_start=split).images
            else:
                images = pipe(**common, **first.kwargs).images
    except _AllStoppedError:
        return
    except WorkerError:
        raise
    except torch.OutOfMemoryError:
        out_of_memory = True
    except Exception as err:
        log.exception("generation failed")
        _cast_back(vae, vae_dtype)
        raise WorkerError("PIPELINE_ERROR", f"generation failed: {err}"[:500], status=500) from None
    if out_of_memory:  # outside the except block, so the traceback no longer pins the tensors
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        _cast_back(vae, vae_dtype)  # once the memory is free: the cast makes a copy of the VAE
        size = f"{first.kwargs.get('width')}x{first.kwargs.get('height')}"
        raise WorkerError(
            "OUT_OF_MEMORY",
            f"out of GPU memory at {size} x {sum(counts)}; ask for fewer or smaller images",
            "num_images_per_prompt",
            status=500,
        )
    inference = elapsed_ms(started)
    metrics.INFERENCE.observe(inference / 1000)
    metrics.BATCH_JOBS.observe(len(batch))
    mem_usage = None
    if cuda:
        total = torch.cuda.get_device_properties(torch.device(model.device)).total_memory
        mem_usage = round(torch.cuda.max_memory_allocated() / total, 4)
    offset = 0
    for job, count in zip(batch, counts, strict=True):
        job.images, offset = images[offset : offset + count], offset + count
        job.timings["inference"], job.mem_usage, job.batch = inference, mem_usage, len(batch)
