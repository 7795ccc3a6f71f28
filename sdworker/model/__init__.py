"""Bake a pipeline into a directory at build time, and load it from there at start: one loader for both.

A baked directory is a diffusers pipeline saved the way the hub stores it (model_index.json plus one folder a
component, safetensors weights only) and a small manifest, `sdworker.json`, that says what was baked.

- `sources`: which files to bake, fetched from the hub, S3 or a folder.
- `recipes`: tiny random-weight pipelines, built offline, for tests.
- `families`: what differs per model family.
- `bake`: staging, the manifest, the swap into MODEL_DIR.
- `load`: from disk onto the device, speed options, a pipeline per task.
"""

from ..manifest import read_manifest
from .bake import BakeResult, bake_model
from .families import FAMILIES, TASKS, Family, family_of, fit_request
from .load import LoadedModel, apply_speed_options, load_model, load_pipeline, weight_bytes, weight_files
from .recipes import RECIPES
from .sources import select_files

__all__ = [
    "FAMILIES",
    "RECIPES",
    "TASKS",
    "BakeResult",
    "Family",
    "LoadedModel",
    "apply_speed_options",
    "bake_model",
    "family_of",
    "fit_request",
    "load_model",
    "load_pipeline",
    "read_manifest",
    "select_files",
    "weight_bytes",
    "weight_files",
]
