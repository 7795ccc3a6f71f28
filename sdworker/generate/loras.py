"""The LoRAs one request names: checked and fetched while it is prepared, switched on in its turn on the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import WorkerError
from ..model import LoadedModel
from ..model.loras import UrlLoras, apply_loras
from ..schema import GenerateInput


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
    wanted = list(lora_set(request))
    for name, path, where in files:
        model.url_loras.ensure_loaded(pipe, name, path, where, keep={name for name, _ in wanted})
    apply_loras(pipe, wanted, bool(model.loras or model.url_loras.loaded))


def lora_set(request: GenerateInput) -> tuple[tuple[str, float], ...]:
    """The request's LoRAs as (adapter name, scale): a baked one's name, a URL's digest."""
    return tuple(
        (choice.name or UrlLoras.adapter_name(choice.url or ""), choice.scale) for choice in request.loras or []
    )
