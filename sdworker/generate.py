"""Run one generation (txt2img, img2img or inpaint) on a loaded model."""

from __future__ import annotations

import gc
import json
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import metrics
from .encoded import Encoded, vae_stand_in
from .errors import WorkerError
from .images import decode_image
from .model import LoadedModel, fit_request
from .model.loras import UrlLoras, apply_loras
from .schedulers import make_scheduler
from .schema import MAX_SEED, GenerateInput, check_size

if TYPE_CHECKING:
    from .prompts import PromptPlan

log = logging.getLogger("sdworker")

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total). Raise from it to stop the generation."""

step_hook: ContextVar[StepCallback | None] = ContextVar("step_hook", default=None)
"""The step callback of the job being run, set by whatever runs app.py's handler (progress and cancellation),
so that the handler itself needs no parameter for it."""

FetchHook = Callable[[], AbstractContextManager[Callable[[], None]]]
fetch_hook: ContextVar[FetchHook | None] = ContextVar("fetch_hook", default=None)
"""Set by whatever runs jobs: entered around the download of a request's image URLs, before the job waits for
the model. It yields a check that raises when the job must stop (cancelled, past its execution timeout), and
lets the runner count a downloading job as not yet on the model, so that a slow URL never delays another job."""

LatentsCallback = Callable[[int, int, torch.Tensor], None]
preview_hook: ContextVar[LatentsCallback | None] = ContextVar("preview_hook", default=None)
"""Like `step_hook`, but also given the step's latents (for previews); set only by platforms that stream."""


@dataclass
class Generation:
    """The images of one request and how they were made."""

    images: list[Image.Image]
    seeds: list[int]
    nsfw: list[bool] | None
    pipeline: str
    scheduler: str
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    mem_usage: float | None = None
    batch: int = 1
    prompt_syntax: str = "plain"
    prompt_tokens: int = 0
    truncated: bool = False
    latents: torch.Tensor | None = None  # with `latent`: the denoised latents, not decoded (images is empty)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


def _seeds(seed: int | None, count: int) -> list[int]:
    # Random seeds stay below 2**53 so JavaScript clients can send them back exactly.
    first = secrets.randbelow(2**53) if seed is None else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def _check_safety(model: LoadedModel, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
    """Run the model's safety checker; flagged images come back black."""
    inputs = model.feature_extractor(images, return_tensors="pt").to(model.safety_checker.device)  # offload: cpu
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    checked, flags = model.safety_checker(images=arrays, clip_input=inputs.pixel_values.to(model.dtype))
    return [Image.fromarray((array * 255).round().astype(np.uint8)) for array in checked], [bool(f) for f in flags]


@dataclass(eq=False)
class _Job:
    """One request, prepared and waiting for its turn on the model, then its outcome."""

    request: GenerateInput
    prompts: PromptPlan | None  # None: the inputs came encoded (seed 001's split stages)
    kwargs: dict[str, Any]
    seeds: list[int]
    scheduler: Any
    key: Any  # requests with equal keys may run as one batch
    on_step: StepCallback | None
    on_latents: LatentsCallback | None
    lora_files: list[tuple[str, Path, str]] = field(default_factory=list)  # URL LoRAs: adapter, file, field
    encoded: Encoded | None = None
    images: list[Image.Image] | None = None
    nsfw: list[bool] | None = None
    error: WorkerError | None = None
    timings: dict[str, float] = field(default_factory=dict)
    mem_usage: float | None = None
    batch: int = 1
    done: bool = False

    @property
    def size(self) -> int:
        """Images this job makes."""
        return len(self.seeds)


def generate(
    model: LoadedModel, request: GenerateInput, on_step: StepCallback | None = None, encoded: Encoded | None = None
) -> Generation:
    """Make the images `request` asks for. Raises WorkerError for bad input and for failures in the pipeline.
    `encoded`: the prompt (and image) already encoded, read instead of the request's; the generation answers
    the denoised latents instead of images (the split stages of seed 001).

    Calls from several threads take turns on the model; with MAX_BATCH > 1, text-to-image calls waiting whose
    shapes agree run together as one batch, each image with its own generator, so each gets the image it would
    alone, up to float rounding (a batch's kernels may add up in another order)."""
    request = fit_request(request, model.row, model.distilled, model.refiner is not None)
    check_loras(request, model)
    settings, task = model.settings, request.task
    from .prompts import plan  # compel imports diffusers' pipelines: only a process that generates pays for it

    prompts = None
    if encoded is None:
        prompts = plan(model.pipes[task], model.family, request, settings.prompt_syntax, request.max_sequence_length)
    started = time.perf_counter()
    with fetching(request) as check:  # downloads hold no model slot
        lora_files = fetch_loras(model, request, check)
        if encoded is not None and encoded.image is not None:
            init, mask, width, height = None, None, encoded.image.width, encoded.image.height
        else:
            init, mask, width, height = prepare_images(model, request, check)
    kwargs: dict[str, Any] = {}
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    if request.eta is not None:
        kwargs["eta"] = request.eta
    if request.clip_skip and prompts and not prompts.embeds:  # SDXL and SD3 pipelines skip layers themselves
        kwargs["clip_skip"] = request.clip_skip
    if init is not None:
        kwargs.update(image=init, strength=request.strength)
    if mask is not None:
        kwargs["mask_image"] = mask
    if encoded is not None:
        kwargs["output_type"] = "latent"
        if encoded.image is not None:
            kwargs.update(encoded.image.pipeline_inputs(), strength=request.strength)
    if task != "img2img" or model.row.sized_img2img:  # SD's img2img takes its size from the image
        kwargs.update(width=width, height=height)
    scheduler, scheduler_name = make_scheduler(request.scheduler, model.baked_scheduler)
    _check_steps(request, scheduler)
    job = _Job(
        request=request,
        prompts=prompts,
        kwargs=kwargs,
        seeds=_seeds(request.seed, request.num_images_per_prompt),
        scheduler=scheduler,
        key=object() if prompts is None else _batch_key(request, prompts, kwargs, scheduler),
        on_step=on_step or step_hook.get(),
        on_latents=preview_hook.get(),
        lora_files=lora_files,
        encoded=encoded,
        timings={"decode": _ms(started)},
    )
    model.batcher.run(job, lambda batch: _run_batch(model, batch))
    if job.error is not None:
        raise job.error
    if job.images is None:  # never expected: _run_batch sets images or an error for every job
        raise WorkerError("INTERNAL_ERROR", "internal error; the worker's log has the details", status=500)
    return Generation(
        images=[] if encoded else job.images,
        latents=job.images if encoded else None,
        seeds=job.seeds,
        nsfw=job.nsfw,
        pipeline=type(model.pipes[task]).__name__,
        scheduler=scheduler_name,
        width=width,
        height=height,
        timings=job.timings,
        mem_usage=job.mem_usage,
        batch=job.batch,
        prompt_syntax=prompts.syntax if prompts else "plain",
        prompt_tokens=prompts.tokens if prompts else 0,
        truncated=prompts.truncated if prompts else False,
    )


def _check_steps(request: GenerateInput, scheduler: Any) -> None:
    """A scheduler takes at most as many steps as the model's training timesteps; PNDM one fewer (its last
    step would look one past them)."""
    limit = scheduler.config.get("num_train_timesteps", 1000)
    limit -= type(scheduler).__name__ == "PNDMScheduler"
    if (request.num_inference_steps or 0) > limit:
        raise WorkerError(
            "INVALID_INPUTS",
            f"num_inference_steps must be at most {limit} with {type(scheduler).__name__} (got "
            f"{request.num_inference_steps})",
            "num_inference_steps",
        )


def fetching(request: GenerateInput) -> AbstractContextManager[Callable[[], None] | None]:
    """The runner's `fetch_hook` around the downloads of a request's image and LoRA URLs (nothing without any);
    it yields the check to pass to each download."""
    urls = [value for value in (request.image, request.mask_image) if value and value.startswith("http")]
    hook = fetch_hook.get() if urls or any(choice.url for choice in request.loras or []) else None
    return hook() if hook else nullcontext(None)


def prepare_images(
    model: LoadedModel, request: GenerateInput, check: Callable[[], None] | None = None
) -> tuple[Image.Image | None, Image.Image | None, int, int]:
    """The request's image and mask (fetched or decoded, each checked), resized to the generation's width and
    height, and those: the request's, else the image's rounded down to the size multiple, else the model's
    native size. `check` raises when the job must stop (see `fetch_hook`)."""
    settings = model.settings
    init = decode_image(request.image, "image", settings, check) if request.image else None
    mask = decode_image(request.mask_image, "mask_image", settings, check) if request.mask_image else None
    multiple = model.size_multiple
    width = request.width or (init.width // multiple * multiple if init else model.default_size)
    height = request.height or (init.height // multiple * multiple if init else model.default_size)
    for name, side in (("width", width), ("height", height)):
        if side % multiple:
            raise WorkerError(
                "INVALID_INPUTS", f"{name} must be a multiple of {multiple} for {model.family} (got {side})", name
            )
    check_size(width, height, settings)
    if init is not None:
        init = init.resize((width, height), Image.LANCZOS)
    if mask is not None:
        mask = mask.resize((width, height), Image.NEAREST)
    return init, mask, width, height


def check_loras(request: GenerateInput, model: LoadedModel) -> None:
    """Each LoRA asked for is baked (or named by a URL, where ALLOW_LORA_URLS), and asked for once."""
    seen: set[str] = set()
    for index, choice in enumerate(request.loras or []):
        if choice.url is not None:
            if not model.settings.allow_lora_urls:
                raise WorkerError(
                    "INVALID_INPUTS",
                    f"loras[{index}].url: this worker takes baked LoRAs only (ALLOW_LORA_URLS is off)",
                    f"loras[{index}].url",
                )
            name = model.url_loras.adapter_name(choice.url)
            if name in seen:
                raise WorkerError("INVALID_INPUTS", f"loras[{index}].url is asked twice", f"loras[{index}].url")
            seen.add(name)
            continue
        if choice.name not in model.loras:
            baked = ", ".join(model.loras) or "none (bake them with LORAS)"
            raise WorkerError(
                "INVALID_INPUTS",
                f"loras[{index}].name: no LoRA named {choice.name!r}; baked: {baked}",
                f"loras[{index}].name",
            )
        if choice.name in seen:
            raise WorkerError(
                "INVALID_INPUTS", f"loras[{index}].name: {choice.name!r} is asked twice", f"loras[{index}].name"
            )
        seen.add(choice.name)


def fetch_loras(
    model: LoadedModel, request: GenerateInput, check: Callable[[], None] | None = None
) -> list[tuple[str, Path, str]]:
    """The LoRAs `request` names by URL, on disk (fetched once, before the job waits for the model): each as
    (adapter name, file, the request's field)."""
    return [
        (
            model.url_loras.adapter_name(choice.url),
            model.url_loras.fetch(choice.url, f"loras[{index}].url", check),
            f"loras[{index}].url",
        )
        for index, choice in enumerate(request.loras or [])
        if choice.url
    ]


def switch_loras(model: LoadedModel, pipe: Any, request: GenerateInput, files: list[tuple[str, Path, str]]) -> None:
    """In the model's turn: load the request's URL LoRAs (`files`) if they are not, and switch on exactly its
    LoRAs at their scales, or every adapter off when it names none."""
    wanted = list(_lora_set(request))
    for name, path, where in files:
        model.url_loras.ensure_loaded(pipe, name, path, where, keep={name for name, _ in wanted})
    apply_loras(pipe, wanted, bool(model.loras or model.url_loras.loaded))


def _lora_set(request: GenerateInput) -> tuple[tuple[str, float], ...]:
    """The request's LoRAs as (adapter name, scale): a baked one's name, a URL's digest."""
    return tuple(
        (choice.name or UrlLoras.adapter_name(choice.url or ""), choice.scale) for choice in request.loras or []
    )


def _batch_key(request: GenerateInput, prompts: PromptPlan, kwargs: dict[str, Any], scheduler: Any) -> Any:
    """What must agree for requests to share one pipeline call: only text-to-image runs batched. Whether a negative
    prompt was given is part of it: SDXL zeroes a missing negative prompt's embedding, which "" is not."""
    if request.task != "text2img" or request.refiner:
        return object()  # equal to nothing else
    config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    return (
        kwargs["width"],
        kwargs["height"],
        request.num_inference_steps,
        request.guidance_scale,
        request.negative_prompt is None,
        request.max_sequence_length,
        request.eta,
        prompts.key,  # text, or embeddings of one length
        _lora_set(request),  # jobs with other LoRAs (or none) never share a batch
        type(scheduler).__name__,
        config,
    )


class _AllStoppedError(Exception):
    """Every job in the batch was cancelled or timed out: stop the pipeline."""


STOPPED = frozenset({"CANCELLED", "TIMED_OUT"})


def _run_batch(model: LoadedModel, batch: list[_Job]) -> None:
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
                    _run_batch(model, [job])
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
        return
    for job in batch:
        if job.error is None and job.request.safety_checker and model.safety_checker is not None:
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    job.images, job.nsfw = _check_safety(model, job.images or [])
            except Exception as err:  # no image goes out unchecked when the check was asked for
                log.exception("safety checker failed")
                job.error = WorkerError("PIPELINE_ERROR", f"the safety checker failed: {err}"[:500], status=500)
            job.timings["safety"] = _ms(started)
    metrics.IMAGES.inc(sum(len(job.images or []) for job in batch if job.error is None and job.encoded is None))


def _conditioning(model: LoadedModel, pipe: Any, batch: list[_Job], counts: list[int]) -> dict[str, Any]:
    """The batch's prompts for `pipe`: as text, or as compel's embeddings (one row per image)."""
    first = batch[0]
    if first.encoded is not None:
        return first.encoded.conditioning
    assert first.prompts is not None
    if not first.prompts.embeds:
        if len(batch) == 1:
            return {"prompt": first.prompts.text, "negative_prompt": first.prompts.negative_text}
        texts = [job.prompts.text for job, n in zip(batch, counts, strict=True) for _ in range(n)]
        negatives = None
        if first.prompts.negative_text is not None:
            negatives = [job.prompts.negative_text for job, n in zip(batch, counts, strict=True) for _ in range(n)]
        return {"prompt": texts, "negative_prompt": negatives}
    from .prompts import encode

    length = first.request.max_sequence_length
    encoded = [encode(pipe, model.family, job.prompts, length) for job in batch]
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


def _pipeline_call(model: LoadedModel, batch: list[_Job]) -> None:
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
                "guidance_scale": first.request.guidance_scale,
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
    inference = _ms(started)
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
