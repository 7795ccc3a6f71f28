"""Run one generation (txt2img, img2img or inpaint) on a loaded model."""

from __future__ import annotations

import gc
import logging
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import WorkerError
from .images import decode_image
from .model import LoadedModel
from .schedulers import make_scheduler
from .schema import MAX_SEED, GenerateInput, check_size

log = logging.getLogger("sdworker")

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total). Raise from it to stop the generation."""

step_hook: ContextVar[StepCallback | None] = ContextVar("step_hook", default=None)
"""The step callback of the job being run, set by whatever runs app.py's handler (progress and cancellation),
so that the handler itself needs no parameter for it."""

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


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


def _seeds(seed: int | None, count: int) -> list[int]:
    # Random seeds stay below 2**53 so JavaScript clients can send them back exactly.
    first = secrets.randbelow(2**53) if seed is None else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


def _check_safety(model: LoadedModel, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
    """Run the model's safety checker; flagged images come back black."""
    inputs = model.feature_extractor(images, return_tensors="pt").to(model.device)
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    checked, flags = model.safety_checker(images=arrays, clip_input=inputs.pixel_values.to(model.dtype))
    return [Image.fromarray((array * 255).round().astype(np.uint8)) for array in checked], [bool(f) for f in flags]


def generate(model: LoadedModel, request: GenerateInput, on_step: StepCallback | None = None) -> Generation:
    """Make the images `request` asks for. Raises WorkerError for bad input and for failures in the pipeline."""
    settings, task, timings = model.settings, request.task, {}
    on_step = on_step or step_hook.get()
    on_latents = preview_hook.get()
    started = time.perf_counter()
    init = decode_image(request.image, "image", settings) if request.image else None
    mask = decode_image(request.mask_image, "mask_image", settings) if request.mask_image else None
    width = request.width or (init.width // 8 * 8 if init else model.default_size)
    height = request.height or (init.height // 8 * 8 if init else model.default_size)
    check_size(width, height, settings)
    kwargs: dict[str, Any] = {}
    if init is not None:
        kwargs.update(image=init.resize((width, height), Image.LANCZOS), strength=request.strength)
    if mask is not None:
        kwargs["mask_image"] = mask.resize((width, height), Image.NEAREST)
    if task != "img2img":  # img2img takes its size from the image
        kwargs.update(width=width, height=height)
    timings["decode"] = _ms(started)

    seeds = _seeds(request.seed, request.num_images_per_prompt)
    pipe = model.pipes[task]
    scheduler, scheduler_name = make_scheduler(request.scheduler, model.baked_scheduler)

    def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if on_latents is not None:
            on_latents(step + 1, pipeline.num_timesteps, tensors["latents"])
        return tensors

    out_of_memory = False
    with model.lock:
        pipe.scheduler = scheduler
        cuda = model.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                images = pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=len(seeds),
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    callback_on_step_end=step_end,
                    **kwargs,
                ).images
        except WorkerError:
            raise
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as err:
            log.exception("generation failed")
            raise WorkerError("PIPELINE_ERROR", f"generation failed: {err}"[:500], status=500) from None
        if out_of_memory:  # outside the except block, so the traceback no longer pins the tensors
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            raise WorkerError(
                "OUT_OF_MEMORY",
                f"out of GPU memory at {width}x{height} x {len(seeds)}; ask for fewer or smaller images",
                "num_images_per_prompt",
                status=500,
            )
        timings["inference"] = _ms(started)
        nsfw = None
        if request.safety_checker and model.safety_checker is not None:
            started = time.perf_counter()
            with torch.inference_mode():
                images, nsfw = _check_safety(model, images)
            timings["safety"] = _ms(started)
        mem_usage = None
        if cuda:
            total = torch.cuda.get_device_properties(torch.device(model.device)).total_memory
            mem_usage = round(torch.cuda.max_memory_allocated() / total, 4)
    return Generation(
        images=images,
        seeds=seeds,
        nsfw=nsfw,
        pipeline=type(pipe).__name__,
        scheduler=scheduler_name,
        width=width,
        height=height,
        timings=timings,
        mem_usage=mem_usage,
    )
