"""Baking: write a pipeline into MODEL_DIR at build time, staged and swapped in whole, with a manifest; and the
LoRAs and embeddings baked beside it by name."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import WorkerError
from ..manifest import MANIFEST, read_manifest
from .load import load_pipeline
from .loras import INDEX, KINDS, NAME, baked
from .recipes import NAMED_RECIPES, RECIPES, name_seed
from .single_file import _sha256, bake_single_file, fetch_file, is_single_file
from .sources import _copy_local, _fetch_hub, _fetch_s3, _variant_of


@dataclass
class BakeResult:
    """What `bake_model` did."""

    model_dir: Path
    manifest: dict
    skipped: bool
    seconds: float


def _make_readable(root: Path) -> None:
    """Folders 755 and files 644: mkdtemp makes the staging folder private and safetensors writes its files 600,
    and the image bakes as root while the worker runs as another user."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _store_as(folder: Path, dtype: str) -> None:
    """Rewrite every float32 tensor of the safetensors files in `folder` as `dtype`, in place."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata()
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
        if any(tensor.dtype == torch.float32 for tensor in tensors.values()):
            converted = {k: v.to(target) if v.dtype == torch.float32 else v for k, v in tensors.items()}
            save_file(converted, str(path), metadata=metadata)


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _source(model_id: str, revision: str | None, variant: str | None, dtype: str | None) -> dict:
    """What a manifest records of where a bake came from; the same four, the same bake. A recipe has no weight
    variants: build_args.env's MODEL_VARIANT=fp16 does not make another bake of it."""
    variant = None if model_id in RECIPES else variant
    return {"model_id": model_id, "revision": revision, "variant": variant, "bake_dtype": dtype}


def _holds(manifest: dict | None, source: dict) -> bool:
    """Whether a baked model's manifest is of `source` (`_source`)."""
    return manifest is not None and all(manifest.get(key) == value for key, value in source.items())


def nothing_to_bake(settings: Settings) -> bool:
    """Whether MODEL_DIR already holds everything `settings` name: the model, its refiner, each LoRA and embedding,
    from the same sources. download.py then says so without importing torch (half a second, not ten)."""
    wanted = [(settings.model_dir, settings.model_id, settings.model_revision)]
    if settings.refiner_id:
        wanted.append((settings.model_dir / "refiner", settings.refiner_id, None))
    for model_dir, model_id, revision in wanted:
        source = _source(model_id, revision, settings.model_variant, settings.bake_dtype)
        if not _holds(read_manifest(model_dir), source):
            return False
    for kind, value in (("loras", settings.loras), ("embeddings", settings.embeddings)):
        try:
            named = parse_named_sources(value, kind.upper())
        except WorkerError:  # said by the bake itself, as every other entry that cannot be baked
            return False
        if _unbaked(baked(settings.model_dir, kind), named):
            return False
    return True


def _unbaked(index: dict[str, dict], named: dict[str, str]) -> dict[str, str]:
    """Of the `named` LoRAs or embeddings, those not in the baked `index` from the same source."""
    return {name: source for name, source in named.items() if index.get(name, {}).get("source") != source}


def bake_model(
    model_id: str,
    model_dir: Path,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
    force: bool = False,
    verify: bool = True,
    refiner: bool = False,
    config: str | None = None,
    sha256: str | None = None,
    allow_pickle: bool = False,
    dtype: str | None = None,
) -> BakeResult:
    """Write the pipeline `model_id` into `model_dir`, ready for `load_model`.

    `model_id` is a built-in recipe, an `s3://bucket/prefix`, a local directory or a hub id. Idempotent: when
    `model_dir` already holds the same id, revision and variant, nothing is done. The new pipeline is staged
    beside `model_dir` and swapped in only once it is complete (and, with `verify`, loads), so a failed bake
    never leaves a half-written model behind. A non-empty `model_dir` that holds no baked model is refused.
    With `refiner`, `model_id` is a refiner (baked into the base's `refiner/` folder). A single checkpoint file
    (local, http(s), s3:// or a hub repo's file) is read against `config` (MODEL_CONFIG), pinned by `sha256`
    when given; a pickled one needs `allow_pickle`. With `dtype` (float16, bfloat16), float32 weights are stored
    in that dtype: half the bytes in the image, the same values the GPU would run anyway.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    source = _source(model_id, revision, variant, dtype)
    existing = read_manifest(model_dir)
    if existing and not force and _holds(existing, source):
        return BakeResult(model_dir, existing, skipped=True, seconds=time.perf_counter() - started)
    if model_dir.exists() and not existing and any(model_dir.iterdir()):
        raise WorkerError(
            "MODEL_DIR_NOT_EMPTY",
            f"{model_dir} holds other files and no baked model; refusing to overwrite it",
            "MODEL_DIR",
        )

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    extra: dict = {}
    try:
        if model_id in RECIPES:
            kind = "recipe"
            RECIPES[model_id](staging)
        elif is_single_file(model_id):
            kind = "single-file"
            extra = bake_single_file(model_id, staging, config, token, sha256, allow_pickle)
        elif model_id.startswith("s3://"):
            kind = "s3"
            _fetch_s3(model_id, staging, variant)
        elif Path(model_id).expanduser().is_dir():
            kind = "local"
            _copy_local(Path(model_id).expanduser(), staging, variant)
        elif model_id.count("/") == 1 and not model_id.startswith((".", "/")):
            kind = "hub"
            _fetch_hub(model_id, staging, revision, variant, token)
        else:
            raise WorkerError(
                "NO_SUCH_MODEL",
                f"MODEL_ID {model_id!r} is no recipe ({', '.join(RECIPES)}), s3:// URL, directory, hub id or "
                "checkpoint file (.safetensors)",
                "MODEL_ID",
            )
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        if dtype:
            _store_as(staging, dtype)
        files, size = _dir_size(staging)
        # The variant the weights on disk carry (None where the source had no such variant), for the loader.
        on_disk = variant if variant and any(_variant_of(p.name) == variant for p in staging.rglob("*")) else None
        manifest = {
            **source,
            "weights_variant": on_disk,
            "source": kind,
            **extra,
            "files": files,
            "bytes": size,
            "baked_at": int(time.time()),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            load_pipeline(staging, device="cpu", refiner=refiner)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        _make_readable(staging)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BakeResult(model_dir, manifest, skipped=False, seconds=time.perf_counter() - started)


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
                f"{setting}: {entry.strip()!r} is not name=source (name: letters, digits, _.<>-)",
                setting,
            )
        named[name] = source.strip()
    return named


def bake_named(model_dir: Path, kind: str, named: dict[str, str], token: str | None, verify: bool = True) -> list[str]:
    """Fetch the LoRAs or embeddings (`kind`) not yet baked in `model_dir` (the ones there are kept); answers the
    names added; a named recipe (`tiny-lora`, `tiny-embedding`) is made for the baked model instead. With `verify`,
    each is loaded into the baked model first, so a file that is not one for this model stops the build with its
    name."""
    setting = KINDS[kind][0]
    folder = Path(model_dir) / kind
    folder.mkdir(exist_ok=True)
    index = baked(model_dir, kind)
    added = []
    for name, source in _unbaked(index, named).items():
        suffix = Path(source.split("?")[0]).suffix.lower()
        if suffix and suffix != ".safetensors":
            raise WorkerError("NOT_SAFETENSORS", f"{setting}: {name}: only .safetensors files are baked", setting)
        scratch = Path(tempfile.mkdtemp(prefix=f".{kind}.", dir=folder))
        try:
            if source in NAMED_RECIPES[kind]:
                path = scratch / f"{name}.safetensors"
                _make_named(model_dir, kind, name, source, path)
            else:
                path = fetch_file(source, scratch, token, setting)
            if verify:
                _check_loads(model_dir, kind, name, path)
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


def _check_loads(model_dir: Path, kind: str, name: str, path: Path) -> None:
    """Load the file into the baked model as what it claims to be; a WorkerError naming the setting if it is not."""
    setting, code, what, load = KINDS[kind]
    pipe = load_pipeline(model_dir, device="cpu")
    try:
        load(pipe, name, path)
    except Exception as err:
        raise WorkerError(
            code, f"{setting}: {name} does not load as {what} of this model: {type(err).__name__}: {err}"[:400], setting
        ) from None


def _make_named(model_dir: Path, kind: str, name: str, source: str, path: Path) -> None:
    """Make the named recipe `source` for the model in `model_dir` into `path`, seeded by `name`. A named recipe is
    random weights for the tiny recipes' models only: on a real model it would load the whole pipeline in fp32 on
    the CPU to draw noise."""
    setting, code, what, _ = KINDS[kind]
    manifest = read_manifest(model_dir) or {}
    if manifest.get("source") != "recipe":
        raise WorkerError(
            code,
            f"{setting}: {name}: {source} is {what} of random weights for the tiny recipes ({', '.join(RECIPES)}), "
            f"not for {manifest.get('model_id')}",
            setting,
        )
    try:
        NAMED_RECIPES[kind][source](Path(model_dir), path, name_seed(name))
    except Exception as err:
        raise WorkerError(
            code, f"{setting}: {name}: cannot make {source} for this model: {type(err).__name__}: {err}"[:400], setting
        ) from None
