"""The manifest of a baked model, `MODEL_DIR/sdworker.json`: what download.py baked, read by the loader and by
the settings (the model key a deployment answers to is the baked model's)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "sdworker.json"


def read_manifest(model_dir: Path) -> dict | None:
    """The manifest of a baked directory, or None when nothing was baked there."""
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
