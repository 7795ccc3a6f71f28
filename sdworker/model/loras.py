"""LoRAs baked beside the model (`LORAS=name=source,...`) and chosen per request by name and scale.

Each LoRA is fetched at build time into `MODEL_DIR/loras/<name>.safetensors` (safetensors only) and listed in
`MODEL_DIR/loras/loras.json`. At start every baked LoRA is loaded once as a named adapter (peft, through
diffusers) on the shared UNet or transformer and text encoders, then disabled. A request's set is switched on
just before its pipeline call and off again for a request without one: a plain request's pixels are exactly a
fresh worker's, and scale 0 is exactly the plain model.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import WorkerError
from .single_file import _sha256, fetch_file

LORA_DIR = "loras"
INDEX = "loras.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_named_sources(value: str | None, setting: str) -> dict[str, str]:
    """`name=source,name=source` as a dict; a bad entry is an error naming the setting."""
    named: dict[str, str] = {}
    for entry in (value or "").split(","):
        if not entry.strip():
            continue
        name, _, source = entry.strip().partition("=")
        if not NAME.match(name) or not source:
            raise WorkerError(
                "INVALID_SETTINGS",
                f"{setting}: {entry.strip()!r} is not name=source (name: letters, digits, _.-)",
                setting,
            )
        named[name] = source.strip()
    return named


def baked_loras(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The LoRAs baked in `model_dir`: name -> {source, sha256, bytes}."""
    index = Path(model_dir) / LORA_DIR / INDEX
    return json.loads(index.read_text()) if index.is_file() else {}


def bake_loras(model_dir: Path, loras: dict[str, str], token: str | None, verify: bool = True) -> list[str]:
    """Fetch the LoRAs not yet baked in `model_dir` (the ones there are kept); answers the names added. With
    `verify`, each is loaded into the baked model first, so one that is not a LoRA of its family stops the build."""
    folder = Path(model_dir) / LORA_DIR
    folder.mkdir(exist_ok=True)
    index = baked_loras(model_dir)
    added = []
    for name, source in loras.items():
        if name in index and index[name]["source"] == source:
            continue
        suffix = Path(source.split("?")[0]).suffix.lower()
        if suffix and suffix != ".safetensors":
            raise WorkerError("NOT_SAFETENSORS", f"LORAS: {name}: only .safetensors files are baked", "LORAS")
        scratch = Path(tempfile.mkdtemp(prefix=".lora.", dir=folder))
        try:
            path = fetch_file(source, scratch, token, "LORAS")
            if verify:
                _check_loads(model_dir, name, path)
            shutil.copyfile(path, folder / f"{name}.safetensors")
            (folder / f"{name}.safetensors").chmod(0o644)
            index[name] = {"source": source, "sha256": _sha256(path), "bytes": path.stat().st_size}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        added.append(name)
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / INDEX).chmod(0o644)
    folder.chmod(0o755)
    return added


def _check_loads(model_dir: Path, name: str, path: Path) -> None:
    from .load import load_pipeline

    pipe = load_pipeline(model_dir, device="cpu")
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as err:
        raise WorkerError(
            "NOT_A_LORA",
            f"LORAS: {name} does not load as a LoRA of this model: {type(err).__name__}: {err}"[:400],
            "LORAS",
        ) from None


def load_loras(pipe: Any, model_dir: Path) -> list[str]:
    """Load every baked LoRA into `pipe` as a named adapter, all off; answers their names."""
    names = list(baked_loras(model_dir))
    for name in names:
        pipe.load_lora_weights(str(Path(model_dir) / LORA_DIR / f"{name}.safetensors"), adapter_name=name)
    if names:
        pipe.disable_lora()
    return names


def apply_loras(pipe: Any, loras: list[tuple[str, float]], loaded: list[str]) -> None:
    """Switch on exactly `loras` (name, scale) for the next call, or every adapter off when there are none."""
    if not loaded:
        return
    if not loras:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in loras], adapter_weights=[scale for _, scale in loras])
