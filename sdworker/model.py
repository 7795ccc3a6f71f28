"""Bake a pipeline into a directory at build time, and load it from there at start: one loader for both.

A baked directory is a diffusers pipeline saved the way the hub stores it (model_index.json plus one folder a
component, safetensors weights only) and a small manifest, `sdworker.json`, that says what was baked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .batching import Batcher
from .config import Settings
from .errors import WorkerError
from .manifest import MANIFEST, read_manifest

log = logging.getLogger("sdworker")

TASKS = ("text2img", "img2img", "inpaint")
# Small text files a pipeline folder needs besides its weights: configs, tokenizer vocabularies and merges.
_SMALL_FILES = (".json", ".txt", ".model")
_WEIGHT_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb")


# --------------------------------------------------------------------------------------------------------------
# Which files of a pipeline repository to bake
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Sources: the hub, S3, a local directory, and the built-in recipes
# --------------------------------------------------------------------------------------------------------------
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


def _tiny_tokenizer() -> Any:
    """A CLIP tokenizer over a byte-level vocabulary of 256 symbols, written on the fly (no download)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77
        )


def _tiny_text_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=77,
        **extra,
    )


def _tiny_vae(**extra: Any) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the real models' 8x downsampling, so sizes behave as they do on a full model.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **extra,
    )


def _tiny_unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    # Two levels at 8x8 latents by default (64 px images): real blocks, a few milliseconds a step on a CPU.
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **extra,
    )


def _bake_tiny_sd(dest: Path) -> None:
    """SD 1.x layout with random weights: UNet, VAE, CLIP text encoder, tokenizer, PNDM, safety checker."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(0)
    unet = _tiny_unet(
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    checker_config = CLIPConfig(
        text_config=_tiny_text_config().to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=4,
        ).to_dict(),
        projection_dim=32,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        tokenizer=_tiny_tokenizer(),
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=StableDiffusionSafetyChecker(checker_config),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_sdxl(dest: Path) -> None:
    """SDXL layout with random weights: two text encoders, text-time conditioning, Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(force_upcast=True),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


RECIPES: dict[str, Callable[[Path], None]] = {"tiny-sd": _bake_tiny_sd, "tiny-sdxl": _bake_tiny_sdxl}
"""Small random-weight pipelines built offline with diffusers' own classes, for tests and CI: they run the real
loading and inference code in seconds on a CPU, and draw noise, not pictures."""


# --------------------------------------------------------------------------------------------------------------
# Baking
# --------------------------------------------------------------------------------------------------------------
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


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def bake_model(
    model_id: str,
    model_dir: Path,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
    force: bool = False,
    verify: bool = True,
) -> BakeResult:
    """Write the pipeline `model_id` into `model_dir`, ready for `load_model`.

    `model_id` is a built-in recipe, an `s3://bucket/prefix`, a local directory or a hub id. Idempotent: when
    `model_dir` already holds the same id, revision and variant, nothing is done. The new pipeline is staged
    beside `model_dir` and swapped in only once it is complete (and, with `verify`, loads), so a failed bake
    never leaves a half-written model behind. A non-empty `model_dir` that holds no baked model is refused.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    source = {"model_id": model_id, "revision": revision, "variant": variant}
    existing = read_manifest(model_dir)
    if existing and not force and all(existing.get(k) == v for k, v in source.items()):
        return BakeResult(model_dir, existing, skipped=True, seconds=time.perf_counter() - started)
    if model_dir.exists() and not existing and any(model_dir.iterdir()):
        raise WorkerError(
            "MODEL_DIR_NOT_EMPTY",
            f"{model_dir} holds other files and no baked model; refusing to overwrite it",
            "MODEL_DIR",
        )

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        if model_id in RECIPES:
            kind = "recipe"
            RECIPES[model_id](staging)
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
                f"MODEL_ID {model_id!r} is no recipe ({', '.join(RECIPES)}), s3:// URL, directory or hub id",
                "MODEL_ID",
            )
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        files, size = _dir_size(staging)
        # The variant the weights on disk carry (None where the source had no such variant), for the loader.
        on_disk = variant if variant and any(_variant_of(p.name) == variant for p in staging.rglob("*")) else None
        manifest = {
            **source,
            "weights_variant": on_disk,
            "source": kind,
            "files": files,
            "bytes": size,
            "baked_at": int(time.time()),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            load_pipeline(staging, device="cpu")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        _make_readable(staging)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BakeResult(model_dir, manifest, skipped=False, seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def load_pipeline(model_dir: Path, device: str, attention: str = "sdpa") -> Any:
    """Load a baked pipeline from disk only: fp16 on CUDA, fp32 elsewhere."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    manifest = read_manifest(model_dir)
    if manifest is None:
        raise WorkerError(
            "NO_MODEL", f"no baked model in {model_dir}: run `python download.py` first", "MODEL_DIR", status=500
        )
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # device_map puts each tensor on the device as it is read from the safetensors file, in `dtype`: no copy of
    # the weights in host memory first, and no fp32 copy when the files hold fp16.
    mapped = device in ("cpu", "cuda")
    pipe = DiffusionPipeline.from_pretrained(
        model_dir,
        dtype=dtype,
        variant=manifest.get("weights_variant"),
        use_safetensors=True,
        local_files_only=True,
        device_map=device if mapped else None,
    )
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # raises if xformers is not installed
    return pipe if mapped else pipe.to(device)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files `load_pipeline` reads from a baked directory."""
    variant = (read_manifest(model_dir) or {}).get("weights_variant")
    files = [p for p in Path(model_dir).glob("*/*.safetensors") if _variant_of(p.name) == variant]
    return sum(p.stat().st_size for p in files)


def _require_compiler(device: str) -> None:
    """torch.compile builds native code at run time: Triton compiles its CUDA launcher with a C compiler, Inductor
    its CPU kernels with a C++ one. Without one the compile fails deep in the warm-up; say so before loading."""
    gpu = device.startswith("cuda")
    variable, names = ("CC", ("gcc", "clang")) if gpu else ("CXX", ("g++", "clang++"))
    if not any(shutil.which(name) for name in (os.environ.get(variable), *names) if name):
        kind = "a C compiler (gcc) for Triton" if gpu else "a C++ compiler (g++) for Inductor's CPU kernels"
        raise WorkerError(
            "INVALID_SETTINGS",
            f"TORCH_COMPILE needs {kind}, and none is installed: build the image with "
            "--build-arg COMPILE_TOOLS=1, or set TORCH_COMPILE=false",
            "TORCH_COMPILE",
        )


def apply_speed_options(pipe: Any, settings: Settings, device: str) -> None:
    """Apply the speed settings to a freshly loaded pipeline (its components are shared by every task)."""
    import torch

    if settings.tf32 and device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.fuse_qkv:
        if settings.attention == "xformers" and device.startswith("cuda"):
            raise WorkerError(
                "INVALID_SETTINGS",
                "FUSE_QKV replaces xformers' attention with SDPA's: set one or the other",
                "FUSE_QKV",
            )
        pipe.fuse_qkv_projections()
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.torch_compile:
        # Inductor's caches in DATA_DIR: a restart on the same volume traces the model again but reuses the
        # compiled kernels. Assigned, not defaulted: torch writes its own default into the environment the first
        # time it looks, which may already have happened.
        cache = Path(settings.data_dir, "torch-compile").resolve()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        pipe.unet.compile(mode=settings.compile_mode, fullgraph=True)
        pipe.vae.decoder.compile(mode=settings.compile_mode, fullgraph=True)


_SD = {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"}
TASK_PIPELINES = {
    "sd1": {**_SD, "inpaint": "StableDiffusionInpaintPipeline"},
    "sd2": {**_SD, "inpaint": "StableDiffusionInpaintPipeline"},
    "sdxl": {
        "text2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
}
"""Each family's pipeline class per task, all sharing the loaded weights. Named rather than found through
diffusers' AutoPipeline classes, whose import pulls in every pipeline family (half a second of cold start)."""


def detect_family(pipe: Any) -> str:
    """sdxl, sd2 or sd1, from the loaded components."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


@dataclass
class LoadedModel:
    """A baked pipeline on its device, with one pipeline object per task sharing the same weights."""

    settings: Settings
    manifest: dict
    family: str
    device: str
    pipes: dict[str, Any]
    baked_scheduler: Any
    safety_checker: Any
    feature_extractor: Any
    load_ms: float
    load_bytes: int = 0
    init_reported: bool = False
    batcher: Batcher = field(default_factory=lambda: Batcher(1, 1))

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (512 for SD 1.x, 1024 for SDXL)."""
        pipe = self.pipes["text2img"]
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    @property
    def dtype(self) -> Any:
        return self.pipes["text2img"].unet.dtype


def load_model(settings: Settings) -> LoadedModel:
    """Load the model baked in `settings.model_dir` once, ready to serve every task."""
    import diffusers
    import torch

    started = time.perf_counter()
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        log.warning("no GPU: running on %s in fp32, which is slow; fine for tests and the tiny recipes", device)
    attention = settings.attention if device.startswith("cuda") else "sdpa"
    if settings.torch_compile:
        _require_compiler(device)
    base = load_pipeline(settings.model_dir, device, attention)
    apply_speed_options(base, settings, device)
    # The safety checker runs on its own after generation, so each request can turn it on or off.
    checker, extractor = getattr(base, "safety_checker", None), getattr(base, "feature_extractor", None)
    pipes = {
        task: getattr(diffusers, name).from_pipe(base) for task, name in TASK_PIPELINES[detect_family(base)].items()
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
    model = LoadedModel(
        settings=settings,
        manifest=read_manifest(settings.model_dir) or {},
        family=detect_family(base),
        device=device,
        pipes=pipes,
        baked_scheduler=base.scheduler,
        safety_checker=checker,
        feature_extractor=extractor,
        load_ms=0.0,
        load_bytes=weight_bytes(settings.model_dir),
        # A batch holds MAX_BATCH jobs, and as many images as MAX_BATCH or one request's MAX_IMAGES, whichever is more.
        batcher=Batcher(settings.max_batch, max(settings.max_batch, settings.max_images)),
    )
    if settings.torch_compile:  # compile now, at the model's own size, rather than in the first request
        warm_started = time.perf_counter()
        with torch.inference_mode():
            pipes["text2img"](prompt="warm-up", num_inference_steps=2, output_type="pil")
        log.info("torch.compile warm-up took %.0f ms", (time.perf_counter() - warm_started) * 1000)
    model.load_ms = (time.perf_counter() - started) * 1000
    log.info(
        "loaded %s (%s) on %s in %s with %s attention in %.0f ms",
        model.manifest.get("model_id"),
        model.family,
        device,
        model.dtype,
        attention,
        model.load_ms,
    )
    return model
