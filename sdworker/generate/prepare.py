"""A request made into a job, before it waits for the model: fitted to the model and checked, its prompt
planned, its seeds drawn, its images and LoRAs fetched, its pipeline arguments and scheduler chosen."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..encoded import Encoded
from ..errors import WorkerError
from ..images import decode_image
from ..model import LoadedModel, fit_request
from ..schedulers import make_scheduler
from ..schema import MAX_SEED, GenerateInput, check_size
from .job import Job, StepCallback, elapsed_ms, fetch_hook, preview_hook, step_hook
from .loras import check_loras, fetch_loras, lora_set

if TYPE_CHECKING:
    from ..prompts import PromptPlan


def prepare(
    model: LoadedModel, request: GenerateInput, on_step: StepCallback | None = None, encoded: Encoded | None = None
) -> Job:
    """`request` as a job ready for its turn on the model (see `generate`). Raises WorkerError for bad input."""
    request = fit_request(request, model.row, model.distilled, model.refiner is not None)
    check_loras(request, model)
    settings, task = model.settings, request.task
    from ..prompts import plan  # compel imports diffusers' pipelines: only a process that generates pays for it

    prompts = None
    if encoded is None:
        length = request.max_sequence_length or model.row.sequence_length
        prompts = plan(model.pipes[task], model.row.kin, request, settings.prompt_syntax, length)
    started = time.perf_counter()
    with fetching(request) as check:  # downloads hold no model slot
        lora_files = fetch_loras(model, request, check)
        if encoded is not None and encoded.image is not None:
            init, mask, width, height = None, None, encoded.image.width, encoded.image.height
        else:
            init, mask, width, height = prepare_images(model, request, check)
        references = [
            decode_image(value, f"images[{index}]", settings, check) for index, value in enumerate(request.images or [])
        ]
    kwargs: dict[str, Any] = {}
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    if request.eta is not None:
        kwargs["eta"] = request.eta
    if request.clip_skip and prompts and not prompts.embeds:  # SDXL and SD3 pipelines skip layers themselves
        kwargs["clip_skip"] = request.clip_skip
    if init is not None:
        kwargs.update(image=init, strength=request.strength)
    if references:  # the pipelines resize and place the references themselves
        kwargs["image"] = references if model.row.references > 1 else references[0]
        width, height = _reference_size(model, request, references[0])
    if model.row.area_sized:  # its width and height say only the shape; max_area, the size
        kwargs["max_area"] = width * height
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
    return Job(
        request=request,
        prompts=prompts,
        kwargs=kwargs,
        seeds=_seeds(request.seed, request.num_images_per_prompt),
        scheduler=scheduler,
        scheduler_name=scheduler_name,
        width=width,
        height=height,
        key=object() if prompts is None else _batch_key(request, prompts, kwargs, scheduler),
        on_step=on_step or step_hook.get(),
        on_latents=preview_hook.get(),
        lora_files=lora_files,
        encoded=encoded,
        timings={"decode": elapsed_ms(started)},
    )


def _reference_size(model: LoadedModel, request: GenerateInput, reference: Image.Image) -> tuple[int, int]:
    """An edit's size: the request's, else its first reference image's rounded down to the size multiple."""
    multiple = model.size_multiple
    width = request.width or max(multiple, reference.width // multiple * multiple)
    height = request.height or max(multiple, reference.height // multiple * multiple)
    check_size(width, height, model.settings)
    return width, height


def _seeds(seed: int | None, count: int) -> list[int]:
    # Random seeds stay below 2**53 so JavaScript clients can send them back exactly.
    first = secrets.randbelow(2**53) if seed is None else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]


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
    given = (request.image, request.mask_image, *(request.images or []))
    urls = [value for value in given if value and value.startswith("http")]
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
        lora_set(request),  # jobs with other LoRAs (or none) never share a batch
        type(scheduler).__name__,
        config,
    )
