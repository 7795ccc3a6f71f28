"""Where a model comes from: which files of a pipeline repository to bake, and fetching them from the hub, S3
or a local folder into a staging folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

from ..errors import WorkerError

# Small text files a pipeline folder needs besides its weights: configs, tokenizer vocabularies and merges.
_SMALL_FILES = (".json", ".txt", ".model")
_WEIGHT_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb")


def _variant_of(name: str) -> str | None:
    """The weight variant in a file name: `model.fp16.safetensors` -> fp16, `model.safetensors` -> None.

    Sharded weights (`model.fp16-00001-of-00002.safetensors`) and their indexes
    (`model.safetensors.index.fp16.json`) carry the variant too.
    """
    parts = name.split(".")
    if ".index." in name:
        return parts[-2] if len(parts) >= 5 else None
    if len(parts) < 3:
        return None
    return parts[-2].split("-")[0]


def select_files(files: list[str], variant: str | None) -> list[str]:
    """Pick what to bake from a listing of a pipeline repository (paths relative to its root).

    Keeps model_index.json and, in each component folder it names, the configs, tokenizer files and
    safetensors weights: the `variant` ones where the folder has them, else the plain ones. Drops .bin, .ckpt
    and other duplicate formats, root-level single-file checkpoints and folders no component uses.
    """
    if "model_index.json" not in files:
        raise WorkerError("NOT_A_PIPELINE", "no model_index.json: this is not a diffusers pipeline", "MODEL_ID")
    by_folder: dict[str, list[str]] = {}
    for path in files:
        parts = PurePosixPath(path).parts
        if len(parts) == 2:
            by_folder.setdefault(parts[0], []).append(path)
    chosen = ["model_index.json"]
    for folder, paths in sorted(by_folder.items()):
        small = [p for p in paths if p.endswith(_SMALL_FILES) and ".index." not in p]
        weights = [p for p in paths if p.endswith(".safetensors") or (".safetensors.index." in p)]
        if not weights and any(p.endswith(_WEIGHT_FILES) for p in paths):
            raise WorkerError(
                "NO_SAFETENSORS", f"{folder}/ has no .safetensors weights; only safetensors are baked", "MODEL_ID"
            )
        wanted = variant if variant and any(_variant_of(PurePosixPath(p).name) == variant for p in weights) else None
        chosen += small + [p for p in weights if _variant_of(PurePosixPath(p).name) == wanted]
    return chosen


def _component_folders(model_index: dict) -> set[str]:
    """The folders model_index.json names as components (those with a library and class)."""
    return {k for k, v in model_index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}


def _only_components(files: list[str], model_index: dict) -> list[str]:
    folders = _component_folders(model_index)
    return [f for f in files if f == "model_index.json" or PurePosixPath(f).parts[0] in folders]


def _fetch_hub(model_id: str, dest: Path, revision: str | None, variant: str | None, token: str | None) -> None:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        files = HfApi().list_repo_files(model_id, revision=revision, token=token)
        index_path = hf_hub_download(model_id, "model_index.json", revision=revision, token=token, local_dir=dest)
        model_index = json.loads(Path(index_path).read_text())
        wanted = _only_components(select_files(files, variant), model_index)
        snapshot_download(model_id, revision=revision, token=token, local_dir=dest, allow_patterns=wanted)
    except GatedRepoError:
        hint = "HF_TOKEN is not set" if not token else "the account of HF_TOKEN has not accepted its licence"
        raise WorkerError("GATED_MODEL", f"{model_id} is gated on the hub and {hint}", "HF_TOKEN") from None
    except RevisionNotFoundError:
        raise WorkerError("NO_SUCH_REVISION", f"{model_id} has no revision {revision!r}", "MODEL_REVISION") from None
    except RepositoryNotFoundError:
        hint = "" if token else " (if it is private, set HF_TOKEN)"
        raise WorkerError("NO_SUCH_MODEL", f"no model {model_id!r} on the hub{hint}", "MODEL_ID") from None
    except OfflineModeIsEnabled:
        raise WorkerError("OFFLINE", f"cannot fetch {model_id}: HF_HUB_OFFLINE is set", "MODEL_ID") from None
    except HfHubHTTPError as err:
        raise WorkerError("HUB_ERROR", f"the hub refused {model_id}: {err.__class__.__name__}", "MODEL_ID") from None
    except (httpx2.TransportError, OSError) as err:  # DNS, refused connections, timeouts: no network
        raise WorkerError("NO_NETWORK", f"cannot reach the hub for {model_id}: {err.__class__.__name__}") from None


def _fetch_s3(url: str, dest: Path, variant: str | None) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    try:
        s3 = boto3.client("s3")
        keys = [
            obj["Key"][len(prefix) :]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]
        if "model_index.json" not in keys:
            raise WorkerError("NO_SUCH_MODEL", f"no model_index.json under {url}", "MODEL_ID")
        model_index = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "model_index.json")["Body"].read())
        for key in _only_components(select_files(keys, variant), model_index):
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, prefix + key, str(target))
    except (BotoCoreError, ClientError) as err:
        raise WorkerError("S3_ERROR", f"cannot read {url}: {err}", "MODEL_ID") from None


def _copy_local(source: Path, dest: Path, variant: str | None) -> None:
    files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    if "model_index.json" not in files:
        raise WorkerError("NOT_A_PIPELINE", f"no model_index.json in {source}", "MODEL_ID")
    model_index = json.loads((source / "model_index.json").read_text())
    for rel in _only_components(select_files(files, variant), model_index):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)
