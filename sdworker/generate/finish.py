"""After the pipeline call: the safety checker on each job's images (still in the model's turn), the images
counted, and the job's outcome answered as a `Generation` or raised as its error."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .. import metrics
from ..errors import WorkerError
from ..model import LoadedModel
from .job import Job, elapsed_ms

log = logging.getLogger("sdworker")


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
    task: str = "text2img"  # as run: an edit model's `image` alone is an edit
    references: int = 0  # an edit's reference images


def check_safety(model: LoadedModel, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
    """Run the model's safety checker; flagged images come back black."""
    inputs = model.feature_extractor(images, return_tensors="pt").to(model.safety_checker.device)  # offload: cpu
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    checked, flags = model.safety_checker(images=arrays, clip_input=inputs.pixel_values.to(model.dtype))
    return [Image.fromarray((array * 255).round().astype(np.uint8)) for array in checked], [bool(f) for f in flags]


def finish_batch(model: LoadedModel, batch: list[Job]) -> None:
    """In the model's turn, after `run_batch`: each job that asked for it and has images gets them checked
    (an image flagged comes back black; a checker that fails is the job's error); never raises."""
    for job in batch:
        if job.error is None and job.request.safety_checker and model.safety_checker is not None:
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    job.images, job.nsfw = check_safety(model, job.images or [])
            except Exception as err:  # no image goes out unchecked when the check was asked for
                log.exception("safety checker failed")
                job.error = WorkerError("PIPELINE_ERROR", f"the safety checker failed: {err}"[:500], status=500)
            job.timings["safety"] = elapsed_ms(started)
    metrics.IMAGES.inc(sum(len(job.images or []) for job in batch if job.error is None and job.encoded is None))


def outcome(model: LoadedModel, job: Job) -> Generation:
    """The images `job` made and how, once its turn is over; its error, raised, where it failed."""
    if job.error is not None:
        raise job.error
    if job.images is None:  # never expected: run_batch sets images or an error for every job
        raise WorkerError("INTERNAL_ERROR", "internal error; the worker's log has the details", status=500)
    prompts, encoded = job.prompts, job.encoded
    return Generation(
        images=[] if encoded else job.images,
        latents=job.images if encoded else None,
        seeds=job.seeds,
        nsfw=job.nsfw,
        pipeline=type(model.pipes[job.request.task]).__name__,
        task=job.request.task,
        references=len(job.request.images or []),
        scheduler=job.scheduler_name,
        width=job.width,
        height=job.height,
        timings=job.timings,
        mem_usage=job.mem_usage,
        batch=job.batch,
        prompt_syntax=prompts.syntax if prompts else "plain",
        prompt_tokens=prompts.tokens if prompts else 0,
        truncated=prompts.truncated if prompts else False,
    )
