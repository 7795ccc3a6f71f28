"""Loading: a baked pipeline from disk onto its device, the speed options, and one pipeline per task sharing
the weights."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..batching import Batcher
from ..config import Settings
from ..errors import WorkerError
from ..logs import adopt_library_logs
from ..manifest import check_model_id, read_manifest
from .families import FAMILIES, Family, family_of
from .loras import UrlLoras, load_baked
from .sources import _variant_of

log = logging.getLogger("sdworker")


def resolve_dtype(setting: str, family: Family, device: str) -> Any:
    """DTYPE as a torch dtype: `auto` is the family's GPU dtype on CUDA (float16, bfloat16 for sd3 and flux) and
    float32 elsewhere, where half precision is slow or unsupported."""
    import torch

    if setting == "auto":
        setting = family.gpu_dtype if device.startswith("cuda") else "float32"
    return getattr(torch, setting)


def load_pipeline(
    model_dir: Path, device: str, attention: str = "sdpa", dtype: str = "auto", refiner: bool = False, **shared: Any
) -> Any:
    """Load a baked pipeline from disk only, in DTYPE (`auto`: the family's GPU dtype on CUDA, fp32 elsewhere).
    With `refiner`, the refiner baked in `model_dir`; `shared` are components already loaded to use instead of
    its own (a refiner shares the base's VAE and second text encoder)."""
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    manifest = read_manifest(model_dir)
    if manifest is None:
        raise WorkerError(
            "NO_MODEL", f"no baked model in {model_dir}: run `python download.py` first", "MODEL_DIR", status=500
        )
    family = family_of(model_dir, refiner)
    torch_dtype = resolve_dtype(dtype, family, device)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    adopt_library_logs()
    # device_map puts each tensor on the device as it is read from the safetensors file, in `dtype`: no copy of
    # the weights in host memory first, and no fp32 copy when the files hold fp16.
    mapped = device in ("cpu", "cuda")
    pipeline_class = getattr(diffusers, family.refiner) if refiner and family.refiner else DiffusionPipeline
    pipe = pipeline_class.from_pretrained(
        model_dir,
        dtype=torch_dtype,
        variant=manifest.get("weights_variant"),
        use_safetensors=True,
        local_files_only=True,
        device_map=device if mapped else None,
        **shared,
    )
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # raises if xformers is not installed
    return pipe if mapped else pipe.to(device)


def _unserved(settings: Settings, family: Family) -> dict[str, None]:
    """The components a STAGES worker leaves unloaded: text encoders without `encode`, the UNet without
    `denoise`, the VAE (and safety checker) without `decode`."""
    stages = settings.served_stages()
    skip: dict[str, None] = {}
    if "encode" not in stages:
        skip.update(text_encoder=None, tokenizer=None)
        if family.name == "sdxl":
            skip.update(text_encoder_2=None, tokenizer_2=None)
    if "denoise" not in stages:
        skip[family.denoiser] = None
    if "decode" not in stages:
        skip.update(vae=None)
        if family.name in ("sd1", "sd2"):
            skip.update(safety_checker=None, feature_extractor=None)
    return skip


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files `load_pipeline` reads from a baked directory."""
    variant = (read_manifest(model_dir) or {}).get("weights_variant")
    return sorted(p for p in Path(model_dir).glob("*/*.safetensors") if _variant_of(p.name) == variant)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files `load_pipeline` reads from a baked directory."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


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

    # A STAGES worker may lack the denoiser or the VAE: each option applies to what is loaded.
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    vae = getattr(pipe, "vae", None)
    if settings.quantize != "none" and denoiser is not None:  # first: what is compiled below is the quantized model
        _quantize(denoiser, settings.quantize, "QUANTIZE")
    if settings.quantize_text_encoders != "none":
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if (encoder := getattr(pipe, name, None)) is not None:
                _quantize(encoder, settings.quantize_text_encoders, "QUANTIZE_TEXT_ENCODERS")
    if settings.layerwise_casting != "none" and denoiser is not None:
        if settings.quantize != "none":
            raise WorkerError(
                "INVALID_SETTINGS",
                "LAYERWISE_CASTING and QUANTIZE both store the denoiser in 8 bits: set one",
                "LAYERWISE_CASTING",
            )
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=denoiser.dtype)

    if settings.tf32 and device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.fuse_qkv and denoiser is not None and vae is not None:
        if settings.attention == "xformers" and device.startswith("cuda"):
            raise WorkerError(
                "INVALID_SETTINGS",
                "FUSE_QKV replaces xformers' attention with SDPA's: set one or the other",
                "FUSE_QKV",
            )
        if not hasattr(pipe, "fuse_qkv_projections"):
            raise WorkerError("INVALID_SETTINGS", f"FUSE_QKV: {type(pipe).__name__} cannot fuse them", "FUSE_QKV")
        pipe.fuse_qkv_projections()
    if settings.channels_last:
        for part in (denoiser, vae):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    if settings.vae_slicing and vae is not None:
        vae.enable_slicing()
    if settings.vae_tiling and vae is not None:
        vae.enable_tiling()
    if settings.torch_compile:
        # Inductor's caches in DATA_DIR: a restart on the same volume traces the model again but reuses the
        # compiled kernels. Assigned, not defaulted: torch writes its own default into the environment the first
        # time it looks, which may already have happened.
        cache = Path(settings.data_dir, "torch-compile").resolve()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        for part in (denoiser, vae.decoder if vae is not None else None):
            if part is not None:
                part.compile(mode=settings.compile_mode, fullgraph=True)


def _quantize(module: Any, kind: str, setting: str) -> None:
    """Weight-only quantization with torchao, in place: int8 or float8 weights, dequantized as each layer runs.
    About half the module's memory at bf16/fp16; a little slower, and pixels move slightly. A module shared with a
    pipeline loaded before (the refiner's text encoder is the base's) is quantized once."""
    if getattr(module, "_sdworker_quantized", False):
        return
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise WorkerError(
            "INVALID_SETTINGS",
            f"{setting} needs torchao, which the image installs (requirements-cuda.txt): pip install torchao==0.18.0",
            setting,
        ) from None

    quantize_(module, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    module._sdworker_quantized = True


@dataclass
class LoadedModel:
    """A baked pipeline on its device, with one pipeline object per task sharing the same weights."""

    settings: Settings
    manifest: dict
    family: str
    device: str
    distilled: bool  # a few-step model: its requests default to few steps and no guidance
    pipes: dict[str, Any]
    baked_scheduler: Any
    safety_checker: Any
    feature_extractor: Any
    load_ms: float
    load_bytes: int = 0
    init_reported: bool = False
    batcher: Batcher = field(default_factory=lambda: Batcher(1, 1))
    refiner: Any = None  # the refiner baked beside the base (REFINER_ID), sharing its VAE and text encoder
    loras: list[str] = field(default_factory=list)  # the baked LoRAs, loaded as adapters (all off between calls)
    url_loras: UrlLoras | None = None  # LoRAs requests name by URL (ALLOW_LORA_URLS), loaded when first used
    embeddings: list[str] = field(default_factory=list)  # baked textual-inversion tokens

    @property
    def row(self) -> Family:
        """The family's row of the table: defaults, fields, pipelines."""
        return FAMILIES[self.family]

    def config_of(self, part: str) -> Any:
        """The config of the pipeline's `part` (vae, unet, transformer), read from the baked model where this worker
        does not load that part (a STAGES worker): its config.json over its class's defaults, as loading it would
        make it (older hub configs leave out what has a default, such as the VAE's scaling_factor)."""
        module = getattr(self.pipe, part, None)
        if module is not None:
            return module.config
        import diffusers
        from diffusers.configuration_utils import FrozenDict

        index = json.loads((self.settings.model_dir / "model_index.json").read_text())
        signature = inspect.signature(getattr(diffusers, index[part][1]).__init__)
        defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
        return FrozenDict({**defaults, **json.loads((self.settings.model_dir / part / "config.json").read_text())})

    @property
    def pipe(self) -> Any:
        """The pipeline of its first task (text2img; an inpainting checkpoint's inpaint): for what they all share."""
        return next(iter(self.pipes.values()))

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (512 for SD 1.x, 1024 for SDXL, SD3 and the DiTs after it)."""
        pipe = self.pipe
        sample = self.config_of(self.row.denoiser).get("sample_size")
        if not isinstance(sample, int):  # FLUX.1's transformer and later ones have none: their pipeline's default
            sample = getattr(pipe, "default_sample_size", None)
        if sample is None:  # Z-Image's pipeline writes 1024 in its code
            return 1024
        return sample * pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What width and height must be multiples of: the VAE's downscaling times the transformer's patches
        (FLUX.1 and the DiTs after it pack 2x2 latents)."""
        pipe = self.pipe
        patch = self.config_of(self.row.denoiser).get("patch_size", 1)
        return pipe.vae_scale_factor * max(self.row.packed, patch if isinstance(patch, int) else 1)

    @property
    def dtype(self) -> Any:
        """The dtype the weights run in."""
        pipe = self.pipe
        parts = (self.row.denoiser, "vae", "text_encoder", "text_encoder_2")
        part = next(got for name in parts if (got := getattr(pipe, name, None)) is not None)
        return part.dtype  # a STAGES worker may lack the denoiser (decode only) or more


def set_threads(settings: Settings, device: str) -> int:
    """torch's CPU threads: TORCH_THREADS; else, on a CPU device and unless OMP_NUM_THREADS says, the cores less
    one, so that serving (HTTP, PNG encoding, the queue) keeps a core: with every core on torch a request took
    1.3-1.6x the bare pipeline call on 2 cores, and about 1.0x with one thread left free (bench/threads.py).
    Answers the number in use."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    elif not device.startswith("cuda") and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - 1))
    return torch.get_num_threads()


def load_model(settings: Settings) -> LoadedModel:
    """Load the model baked in `settings.model_dir` once, ready to serve every task."""
    import diffusers
    import torch

    started = time.perf_counter()
    check_model_id(settings.model_dir)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        log.warning("no GPU: running on %s in fp32, which is slow; fine for tests and the tiny recipes", device)
    set_threads(settings, device)
    attention = settings.attention if device.startswith("cuda") else "sdpa"
    if settings.torch_compile:
        _require_compiler(device)
    if settings.enable_model_cpu_offload and not device.startswith("cuda"):
        raise WorkerError(
            "INVALID_SETTINGS",
            f"ENABLE_MODEL_CPU_OFFLOAD moves components to a GPU as they run; this worker runs on {device}",
            "ENABLE_MODEL_CPU_OFFLOAD",
        )
    family = family_of(settings.model_dir)
    if not settings.whole() and not family.stages:
        split = ", ".join(name for name, row in FAMILIES.items() if row.stages)
        raise WorkerError(
            "INVALID_SETTINGS",
            f"STAGES={settings.stages}: the {family.name} family is not split into stages here ({split} are)",
            "STAGES",
        )
    if settings.group_offload != "none" and (settings.enable_model_cpu_offload or not device.startswith("cuda")):
        why = (
            "ENABLE_MODEL_CPU_OFFLOAD offloads too: set one"
            if device.startswith("cuda")
            else f"this worker runs on {device}"
        )
        raise WorkerError(
            "INVALID_SETTINGS", f"GROUP_OFFLOAD streams weights to a GPU as they run; {why}", "GROUP_OFFLOAD"
        )
    # With offload the weights stay in host memory; each component (or block) goes to the GPU only while it runs.
    offloaded = settings.enable_model_cpu_offload or settings.group_offload != "none"
    load_on = "cpu" if offloaded else device
    dtype = resolve_dtype(settings.dtype, family, device)  # the GPU's dtype, wherever the weights wait
    dtype_name = str(dtype).removeprefix("torch.")
    base = load_pipeline(settings.model_dir, load_on, attention, dtype_name, **_unserved(settings, family))
    # Before compiling or fusing: they change the layers. A STAGES worker loads them into the parts it holds.
    encodes = base.text_encoder is not None or getattr(base, "text_encoder_2", None) is not None
    loras = load_baked(base, settings.model_dir, "loras") if encodes or "denoise" in settings.served_stages() else []
    embeddings = load_baked(base, settings.model_dir, "embeddings") if encodes else []
    for part, values in family.config_fixes:
        if getattr(base, part, None) is not None:
            getattr(base, part).register_to_config(**values)
    # The safety checker runs on its own after generation, so each request can turn it on or off.
    checker, extractor = getattr(base, "safety_checker", None), getattr(base, "feature_extractor", None)
    # from_pipe casts every shared component to its `dtype` argument, float32 when none is given: pass the one
    # loaded, or a GPU model would silently run in float32. Before the speed options, which it would undo (the
    # float8 storage of LAYERWISE_CASTING); they change the shared components in place, for every task.
    pipes = {task: getattr(diffusers, name).from_pipe(base, dtype=dtype) for task, name in family.pipelines.items()}
    apply_speed_options(base, settings, device)
    refiner = None
    if family.refiner and settings.whole() and read_manifest(settings.model_dir / "refiner"):
        refiner = load_pipeline(
            settings.model_dir / "refiner",
            load_on,
            attention,
            dtype_name,
            refiner=True,
            vae=base.vae,
            text_encoder_2=base.text_encoder_2,
        )
        apply_speed_options(refiner, settings, device)
    if settings.group_offload != "none":  # hooks on the shared modules: every task's pipeline streams them
        offload = {
            "onload_device": torch.device(device),
            "offload_device": torch.device("cpu"),
            "offload_type": f"{settings.group_offload}_level",
            "num_blocks_per_group": 1 if settings.group_offload == "block" else None,
            "use_stream": True,
        }
        base.enable_group_offload(**offload)
        if refiner is not None:  # its VAE and second text encoder are the base's, offloaded already
            refiner.unet.enable_group_offload(**offload)
    for pipe in [*pipes.values(), *([refiner] if refiner else [])]:
        if settings.enable_model_cpu_offload:
            pipe.enable_model_cpu_offload(device=device)
        pipe.set_progress_bar_config(disable=True)
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
    manifest = read_manifest(settings.model_dir) or {}
    denoiser = getattr(base, family.denoiser, None)
    denoiser_config = {**base.config, **(dict(denoiser.config) if denoiser is not None else {})}
    model = LoadedModel(
        settings=settings,
        manifest=manifest,
        family=family.name,
        device=device,
        distilled=family.is_distilled(denoiser_config, str(manifest.get("model_id", ""))),
        refiner=refiner,
        loras=loras,
        url_loras=UrlLoras(settings),
        embeddings=embeddings,
        pipes=pipes,
        baked_scheduler=base.scheduler,
        safety_checker=checker,
        feature_extractor=extractor,
        load_ms=0.0,
        load_bytes=weight_bytes(settings.model_dir),
        # A batch holds MAX_BATCH jobs, and as many images as MAX_BATCH or one request's MAX_IMAGES, whichever is more.
        batcher=Batcher(settings.max_batch, max(settings.max_batch, settings.max_images)),
    )
    if settings.torch_compile and settings.whole():  # compile now, not in the first request
        warm_started = time.perf_counter()
        inputs: dict[str, Any] = {}
        if "text2img" not in pipes:  # an inpainting checkpoint: a blank picture, all of it to paint
            from PIL import Image

            side = model.default_size
            inputs = {"image": Image.new("RGB", (side, side)), "mask_image": Image.new("L", (side, side), 255)}
        with torch.inference_mode():
            model.pipe(prompt="warm-up", num_inference_steps=2, output_type="pil", **inputs)
        log.info("torch.compile warm-up took %.0f ms", (time.perf_counter() - warm_started) * 1000)
    from ..prompts.encode import planning_tokenizers  # compel imports more of diffusers: at load, not later

    for pipe in pipes.values():
        planning_tokenizers(pipe)

    model.load_ms = (time.perf_counter() - started) * 1000
    from .. import metrics  # here: the image's bake layer holds no metrics

    metrics.MODEL_LOAD.set(model.load_ms / 1000)
    log.info(
        "loaded %s (%s) on %s in %s with %s attention in %.0f ms%s",
        model.manifest.get("model_id"),
        model.family,
        device,
        model.dtype,
        attention,
        model.load_ms,
        "" if device.startswith("cuda") else f"; torch on {torch.get_num_threads()} CPU thread(s) (TORCH_THREADS)",
    )
    if loras or embeddings:
        log.info("baked LoRAs: %s; embeddings: %s", ", ".join(loras) or "none", ", ".join(embeddings) or "none")
    return model
