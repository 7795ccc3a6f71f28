"""Single-file checkpoints: the one `.safetensors` file a community model ships as (A1111's layout), from a local
path, an http(s) URL, `s3://bucket/key` or a file in a hub repo (`owner/repo/path/file.safetensors`).

The file is fetched, checked (pickles refused unless ALLOW_PICKLE; MODEL_SHA256 pinned when given), read with
diffusers' `from_single_file` against the configuration of its family (MODEL_CONFIG: a diffusers repo or
folder, such as `stable-diffusion-v1-5/stable-diffusion-v1-5`), and saved as a diffusers folder in the family's
GPU dtype, so it is baked and loaded exactly as a hub model is, at half the bytes of an fp32 file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import WorkerError
from .families import Family, family_of

SAFE = (".safetensors",)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")


def is_single_file(model_id: str) -> bool:
    """Whether MODEL_ID names one checkpoint file rather than a pipeline."""
    return model_id.lower().endswith(SAFE + PICKLED) and not Path(model_id).expanduser().is_dir()


def bake_single_file(
    model_id: str,
    dest: Path,
    config: str | None,
    token: str | None,
    sha256: str | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Fetch, check and convert the checkpoint `model_id` into the diffusers folder `dest`; answers what the
    manifest records of it (its sha256 and the config used)."""
    if model_id.lower().endswith(PICKLED) and not allow_pickle:
        raise WorkerError(
            "PICKLE_REFUSED",
            f"{Path(model_id).name} is a pickled checkpoint, which can run code when read: use a .safetensors "
            "file, or set ALLOW_PICKLE=1 if you trust its source",
            "MODEL_ID",
        )
    if not config:
        raise WorkerError(
            "NO_MODEL_CONFIG",
            "a single-file MODEL_ID needs MODEL_CONFIG: the diffusers repo or folder of its family, such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0",
            "MODEL_CONFIG",
        )
    scratch = Path(tempfile.mkdtemp(prefix=".single-file.", dir=dest.parent))
    try:
        path = fetch_file(model_id, scratch, token)
        digest = _sha256(path)
        if sha256 and digest != sha256.strip().lower():
            raise WorkerError(
                "SHA256_MISMATCH", f"{path.name} has sha256 {digest}, not MODEL_SHA256 {sha256}", "MODEL_SHA256"
            )
        family, class_name = _family_of_config(config, scratch, token)
        _convert(path, config, family, class_name, dest, token)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"sha256": digest, "config": config}


def fetch_file(model_id: str, scratch: Path, token: str | None, field: str = "MODEL_ID") -> Path:
    """One weights file as a local file: a local path as it is; an http(s) URL, `s3://bucket/key`, a hub repo's
    file (`owner/repo/path`) or a hub repo holding one .safetensors file (`owner/repo`) downloaded into
    `scratch`. Errors name `field`."""
    local = Path(model_id).expanduser()
    if local.is_file():
        return local
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    target = scratch / name
    try:
        if model_id.startswith(("https://", "http://")):
            import requests

            with requests.get(model_id, stream=True, timeout=(10, 60)) as response:
                response.raise_for_status()
                with target.open("wb") as file:
                    for chunk in response.iter_content(1 << 20):
                        file.write(chunk)
        elif model_id.startswith("s3://"):
            import boto3

            bucket, _, key = model_id[len("s3://") :].partition("/")
            boto3.client("s3").download_file(bucket, key, str(target))
        elif model_id.count("/") >= 1 and not model_id.startswith((".", "/", "~")):
            from huggingface_hub import HfApi, hf_hub_download

            owner, repo, *rest = model_id.split("/", 2)
            filename = rest[0] if rest else _only_safetensors(HfApi().list_repo_files(f"{owner}/{repo}", token=token))
            return Path(hf_hub_download(f"{owner}/{repo}", filename, token=token, local_dir=scratch))
        else:
            raise WorkerError("NO_SUCH_MODEL", f"no file {model_id!r}", field)
    except WorkerError:
        raise
    except Exception as err:  # HTTP errors, S3 errors, the hub: one line naming the file and the reason
        raise WorkerError("DOWNLOAD_FAILED", f"cannot fetch {name}: {type(err).__name__}: {err}"[:400], field) from None
    return target


def _only_safetensors(files: list[str]) -> str:
    """The one .safetensors file of a repo (a LoRA's), preferring diffusers' own name."""
    weights = [name for name in files if name.endswith(".safetensors")]
    if "pytorch_lora_weights.safetensors" in weights:
        return "pytorch_lora_weights.safetensors"
    if len(weights) == 1:
        return weights[0]
    raise ValueError(f"the repo holds {len(weights)} .safetensors files; name one: owner/repo/file.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _family_of_config(config: str, scratch: Path, token: str | None) -> tuple[Family, str]:
    """The family and pipeline class of MODEL_CONFIG, from its model_index.json (fetched alone from the hub)."""
    folder = Path(config).expanduser()
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download

        folder = scratch / "config"
        try:
            hf_hub_download(config, "model_index.json", token=token, local_dir=folder)
            index = json.loads((folder / "model_index.json").read_text())
            if index.get("_class_name") == "StableDiffusionPipeline":  # SD 1.x or 2.x: the UNet says which
                hf_hub_download(config, "unet/config.json", token=token, local_dir=folder)
        except Exception as err:
            raise WorkerError(
                "NO_MODEL_CONFIG", f"cannot read MODEL_CONFIG {config!r}: {type(err).__name__}", "MODEL_CONFIG"
            ) from None
    if not (folder / "model_index.json").is_file():
        raise WorkerError("NO_MODEL_CONFIG", f"MODEL_CONFIG {config!r} has no model_index.json", "MODEL_CONFIG")
    family = family_of(folder)
    return family, json.loads((folder / "model_index.json").read_text())["_class_name"]


def _convert(path: Path, config: str, family: Family, class_name: str, dest: Path, token: str | None) -> None:
    import diffusers
    import torch

    pipeline_class = getattr(diffusers, class_name)
    extra: dict[str, Any] = {}
    if "safety_checker" in getattr(pipeline_class, "_optional_components", []):
        extra["safety_checker"] = None  # from_single_file never loads one: say so rather than be warned
    local = Path(config).expanduser().is_dir()
    try:
        pipe = pipeline_class.from_single_file(
            str(path),
            config=str(Path(config).expanduser()) if local else config,
            torch_dtype=getattr(torch, family.gpu_dtype),
            local_files_only=local,
            token=token,
            **extra,
        )
    except Exception as err:
        raise WorkerError(
            "NOT_A_CHECKPOINT",
            f"{path.name} does not load as a {family.name} checkpoint with MODEL_CONFIG {config!r}: "
            f"{type(err).__name__}: {err}"[:500],
            "MODEL_ID",
        ) from None
    pipe.save_pretrained(dest, safe_serialization=True)
