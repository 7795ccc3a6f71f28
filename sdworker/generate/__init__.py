"""Run one generation (txt2img, img2img or inpaint) on a loaded model, in three steps:

- `prepare`: the request made into a job (defaults, seeds, prompts, images and LoRAs fetched), holding no model;
- `run`: the job's turn on the model, batched with others of the same shape: the pipeline call;
- `finish`: the safety checker, then the job's images and how they were made, as a `Generation`.

`job` holds what passes between them, and the hooks through which a runner follows and stops a job; `loras` the
request's LoRAs, checked and fetched in `prepare` and switched on in `run`.
"""

from __future__ import annotations

from ..encoded import Encoded
from ..model import LoadedModel
from ..schema import GenerateInput
from .finish import Generation, check_safety, finish_batch, outcome
from .job import FetchHook, Job, LatentsCallback, StepCallback, fetch_hook, preview_hook, step_hook
from .loras import check_loras, fetch_loras, switch_loras
from .prepare import fetching, prepare, prepare_images
from .run import run_batch

__all__ = [
    "FetchHook",
    "Generation",
    "LatentsCallback",
    "StepCallback",
    "check_loras",
    "check_safety",
    "fetch_hook",
    "fetch_loras",
    "fetching",
    "generate",
    "prepare_images",
    "preview_hook",
    "step_hook",
    "switch_loras",
]


def generate(
    model: LoadedModel, request: GenerateInput, on_step: StepCallback | None = None, encoded: Encoded | None = None
) -> Generation:
    """Make the images `request` asks for. Raises WorkerError for bad input and for failures in the pipeline.
    `encoded`: the prompt (and image) already encoded, read instead of the request's; the generation answers
    the denoised latents instead of images (the split stages of seed 001).

    Calls from several threads take turns on the model; with MAX_BATCH > 1, text-to-image calls waiting whose
    shapes agree run together as one batch, each image with its own generator, so each gets the image it would
    alone, up to float rounding (a batch's kernels may add up in another order)."""
    job = prepare(model, request, on_step, encoded)
    model.batcher.run(job, lambda batch: _turn(model, batch))
    return outcome(model, job)


def _turn(model: LoadedModel, batch: list[Job]) -> None:
    """A batch's turn on the model: the pipeline call, then the safety checker (on the GPU too); never raises."""
    run_batch(model, batch)
    finish_batch(model, batch)
