"""What travels between the stages (`sdworker/stages/`): each endpoint's body (its schema is in schema.py), and the
tensors, as base64 of a safetensors file whose header carries JSON metadata, checked by name, dtype and values
on arrival (each stage checks their shapes against its model). A field that does not fit is a 422 naming it."""

from __future__ import annotations

import base64
import json
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from ..errors import WorkerError
from ..schema import GenerateInput

IMAGE = ("image_moments",)
MASKED = ("image_moments", "masked_image_moments", "mask")
POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds")
MAX_BODY_TENSOR_BYTES = 256 * 1024 * 1024
MAX_METADATA_CHARS = 64 * 1024  # a stage's metadata: the generation's fields, a few hundred characters


def parse(model_type: type[BaseModel], payload: Any) -> Any:
    """`payload` checked by `model_type`: a bad field is a 422 naming it."""
    try:
        return model_type.model_validate(payload)
    except ValidationError as err:
        problem = err.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "body"
        raise WorkerError("INVALID_INPUTS", f"{field}: {problem['msg']}", field) from None


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Tensors as base64 of a safetensors file; `metadata` rides in its header as JSON."""
    from safetensors.torch import save

    data = save(
        {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
        {"sdworker": json.dumps(metadata)},
    )
    return base64.b64encode(data).decode("ascii")


def unpack(data: str, field: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of `pack`'s answer; anything else is a 422 naming `field`."""
    from safetensors.torch import load

    try:
        raw = base64.b64decode(data, validate=True)
        if len(raw) > MAX_BODY_TENSOR_BYTES:
            raise ValueError("too large")
        tensors = load(raw)
    except Exception:
        raise WorkerError("INVALID_INPUTS", f"{field}: not base64 of a safetensors file", field) from None
    # The header (8 bytes of length, then JSON that safetensors has read) holds the metadata as a string of JSON,
    # which nothing has parsed yet: bounded in size before it is, and any failure of it a 422 too.
    try:
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        text = (header.get("__metadata__") or {}).get("sdworker", "{}")
        if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
            raise ValueError("too large")
        metadata = json.loads(text)
    except (ValueError, AttributeError, RecursionError):
        raise WorkerError(
            "INVALID_INPUTS",
            f"{field}: its metadata is not what a stage writes (JSON of at most {MAX_METADATA_CHARS} characters)",
            field,
        ) from None
    return tensors, metadata if isinstance(metadata, dict) else {}


def as_generation(**fields: Any) -> GenerateInput:
    """A generation's fields, checked by the one schema."""
    return parse(GenerateInput, fields)


def check_tensors(
    tensors: dict[str, torch.Tensor], names: tuple[str, ...], field: str, uint8: tuple[str, ...] = ()
) -> None:
    """Exactly `names`, each a finite float tensor (those in `uint8`: uint8)."""
    missing = [name for name in names if name not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise WorkerError(
            "INVALID_INPUTS",
            f"{field}: this model's {field} are {', '.join(names)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not {', '.join(extra)}" if extra else ""),
            field,
        )
    for name, tensor in tensors.items():
        if name in uint8:
            if tensor.dtype != torch.uint8:
                raise WorkerError("INVALID_INPUTS", f"{field}.{name}: uint8, not {tensor.dtype}", f"{field}.{name}")
            continue
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise WorkerError(
                "INVALID_INPUTS", f"{field}.{name}: float16, bfloat16 or float32, not {tensor.dtype}", f"{field}.{name}"
            )
        if not torch.isfinite(tensor).all():
            raise WorkerError("INVALID_INPUTS", f"{field}.{name}: has NaN or infinite values", f"{field}.{name}")
