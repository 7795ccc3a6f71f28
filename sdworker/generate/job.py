"""The job a generation passes along: one request prepared, waiting for its turn on the model, then its outcome;
and the hooks through which whatever runs jobs follows one (progress, previews) and stops it."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..encoded import Encoded
from ..errors import WorkerError
from ..schema import GenerateInput

if TYPE_CHECKING:
    from ..prompts import PromptPlan

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


@dataclass(eq=False)
class Job:
    """One request, prepared and waiting for its turn on the model, then its outcome."""

    request: GenerateInput
    prompts: PromptPlan | None  # None: the inputs came encoded (seed 001's split stages)
    kwargs: dict[str, Any]
    seeds: list[int]
    scheduler: Any
    scheduler_name: str
    width: int
    height: int
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


def elapsed_ms(since: float) -> float:
    """Milliseconds since `since` (a `time.perf_counter()`), as the timings report them."""
    return round((time.perf_counter() - since) * 1000, 1)
