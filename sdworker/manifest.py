"""The manifest of a baked model, `MODEL_DIR/sdworker.json`: what download.py baked, read by the loader and by
the settings (the model key a deployment answers to is the baked model's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import WorkerError

MANIFEST = "sdworker.json"


def read_manifest(model_dir: Path) -> dict | None:
    """The manifest of a baked directory, or None when nothing was baked there."""
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_model_id(model_dir: Path) -> None:
    """Refuse to serve when the environment names a MODEL_ID other than the model baked in `model_dir`: the
    worker would answer for one model with another. Only the environment is read: an image built with
    `--build-arg MODEL_ID=...` still holds build_args.env's default, which names nothing at run time."""
    asked = next((value.strip() for key, value in os.environ.items() if key.upper() == "MODEL_ID"), "")
    baked = (read_manifest(model_dir) or {}).get("model_id")
    if asked and baked and asked != baked:
        raise WorkerError(
            "INVALID_SETTINGS",
            f"MODEL_ID={asked} but the model baked in {model_dir} is {baked}: bake {asked} with `python download.py` "
            f"(or build the image with --build-arg MODEL_ID={asked}), or unset MODEL_ID to serve {baked}",
            "MODEL_ID",
        )
