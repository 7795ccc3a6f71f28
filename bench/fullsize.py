"""Full-size SD 1.5, SDXL, SD3.5 Medium and FLUX.1-schnell pipelines with random weights, built offline and baked.

    python bench/fullsize.py [--models sd15 sdxl sd35m flux] [--cache DIR] [--rebuild] [--smoke]

The architectures are the published ones (the configs of stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-3.5-medium and
black-forest-labs/FLUX.1-schnell, embedded below), built with diffusers' and transformers' own classes,
so every layer has the real model's shape and a GPU spends the same time on it as on the real weights; only the
pictures are noise. Each model is initialised in fp32 (on the GPU when there is one: much faster), cast to
fp16, saved as a diffusers pipeline with `variant="fp16"` safetensors, and baked by the project's own
`bake_model`, so the benchmark reads it through the worker's real loader. The tokenizers are the byte-level
CLIP tokenizer of the tiny recipes (no download); prompts still pad to 77 tokens, as with the real vocabulary.
SD3.5 Medium and FLUX.1-schnell carry T5-XXL's encoder at its full width but cut to T5_LAYERS of its 24 blocks
(see T5_XXL below: the transformer sees the same text tokens; load time and peak memory leave out most of T5).

With `--smoke` it builds SD 1.5 only, loads it with `load_model` and makes one 64x64 image in 2 steps (CPU is
fine). Built models are kept in `--cache` (default: a folder in the system's temp dir) and reused.

On 2 CPU cores (no GPU) a build took: SD 1.5 (1.07B parameters, 2.1 GB of fp16 files) 15 to 30 s and 3 s to
bake; SDXL (3.47B parameters, 6.9 GB) 72 s and 8 s to bake, 10.5 GB of RAM at most. On a GPU the init runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "sdworker-bench-models"

# stable-diffusion-v1-5/stable-diffusion-v1-5 (unet, vae, text_encoder, scheduler config.json).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
# CLIP ViT-L/14 text tower. The token ids follow the byte-level tokenizer used here (end of text is 1, not the
# real vocabulary's 49407), so the pooled output is read at the right position; the size is the real one.
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "time_embedding_type": "positional",
}
SDXL_VAE: dict[str, Any] = {
    **SD15_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# OpenCLIP ViT-bigG/14 text tower with its projection (text_encoder_2).
CLIP_BIGG_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# stabilityai/stable-diffusion-3.5-medium: the MMDiT with dual attention in its first 13 blocks, 16-channel VAE.
SD35M_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
DIT_VAE: dict[str, Any] = {
    **SD15_VAE,
    "sample_size": 1024,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_VAE = {**DIT_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD35M_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-schnell: 19 double-stream and 38 single-stream blocks, no guidance embedding.
FLUX_SCHNELL_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {**DIT_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# T5-XXL's encoder (google/t5-v1_1-xxl) at its full width, cut to T5_LAYERS of its 24 blocks. It runs once per
# prompt (about 1% of a 4-step FLUX.1-schnell image's arithmetic at 1024 px), but its 4.76B parameters would add
# 9.5 GB to each model's files, to be written, baked and read again within the check's minutes; cut, it gives the
# transformer the same 4096-wide text tokens, while the load time and the peak memory leave out 8.7 GB of it.
T5_LAYERS = 2
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": T5_LAYERS,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}

# Parameter counts of the published checkpoints, to check the builds against (T5 is cut: not compared).
PUBLISHED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sd35m": {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840},
    "flux": {"transformer": 11_891_178_560, "text_encoder": 123_060_480},  # FLUX.1-dev less its guidance embedder
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' warnings about building and casting random models, and their bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])
        if bars:
            transformers_logging.enable_progress_bar()


def _fp16(make: Callable[[], Any], device: str) -> Any:
    """Build one component on `device` with its classes' own random init (fp32), then cast it to fp16 on the CPU.

    Initialising in fp32 and casting keeps every weight a finite, ordinarily scaled number."""
    import torch

    with torch.device(device):
        module = make()
    module = module.to(device="cpu", dtype=torch.float16).eval()
    if device != "cpu":
        torch.cuda.empty_cache()
    return module


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _components_params(pipe: Any) -> dict[str, int]:
    return {name: _count(part) for name, part in pipe.components.items() if hasattr(part, "parameters")}


def build_sd15(dest: Path, device: str = "cpu", seed: int = 0) -> dict[str, int]:
    """Save a full-size SD 1.5 pipeline with random fp16 weights in `dest` (no safety checker).

    Returns the parameter count of each component."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdworker.model.recipes import _tiny_tokenizer

    torch.manual_seed(seed)
    with _quiet():
        pipe = StableDiffusionPipeline(
            unet=_fp16(lambda: UNet2DConditionModel(**SD15_UNET), device),
            vae=_fp16(lambda: AutoencoderKL(**SD15_VAE), device),
            text_encoder=_fp16(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), device),
            tokenizer=_tiny_tokenizer(),
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(dest, safe_serialization=True, variant="fp16")
    return _components_params(pipe)


def build_sdxl(dest: Path, device: str = "cpu", seed: int = 0) -> dict[str, int]:
    """Save a full-size SDXL base 1.0 pipeline with random fp16 weights in `dest`.

    Returns the parameter count of each component."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdworker.model.recipes import _tiny_tokenizer

    torch.manual_seed(seed)
    with _quiet():
        pipe = StableDiffusionXLPipeline(
            unet=_fp16(lambda: UNet2DConditionModel(**SDXL_UNET), device),
            vae=_fp16(lambda: AutoencoderKL(**SDXL_VAE), device),
            text_encoder=_fp16(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), device),
            text_encoder_2=_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)), device),
            tokenizer=_tiny_tokenizer(),
            tokenizer_2=_tiny_tokenizer(),
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        )
        pipe.save_pretrained(dest, safe_serialization=True, variant="fp16")
    return _components_params(pipe)


def _t5_xxl(device: str) -> Any:
    from transformers import T5Config, T5EncoderModel

    return _fp16(lambda: T5EncoderModel(T5Config(**T5_XXL)), device)


def build_sd35m(dest: Path, device: str = "cpu", seed: int = 0) -> dict[str, int]:
    """Save a full-size Stable Diffusion 3.5 Medium pipeline (T5 cut to T5_LAYERS blocks) with random fp16 weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdworker.model.recipes import _tiny_t5, _tiny_tokenizer

    torch.manual_seed(seed)
    with _quiet():
        pipe = StableDiffusion3Pipeline(
            transformer=_fp16(lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER), device),
            vae=_fp16(lambda: AutoencoderKL(**SD3_VAE), device),
            text_encoder=_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT)), device),
            text_encoder_2=_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)), device),
            text_encoder_3=_t5_xxl(device),
            tokenizer=_tiny_tokenizer(),
            tokenizer_2=_tiny_tokenizer(),
            tokenizer_3=_tiny_t5(8)[1],
            scheduler=FlowMatchEulerDiscreteScheduler(**SD35M_SCHEDULER),
        )
        pipe.save_pretrained(dest, safe_serialization=True, variant="fp16")
    return _components_params(pipe)


def build_flux(dest: Path, device: str = "cpu", seed: int = 0) -> dict[str, int]:
    """Save a full-size FLUX.1-schnell pipeline (T5 cut to T5_LAYERS blocks) with random fp16 weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdworker.model.recipes import _tiny_t5, _tiny_tokenizer

    torch.manual_seed(seed)
    with _quiet():
        pipe = FluxPipeline(
            transformer=_fp16(lambda: FluxTransformer2DModel(**FLUX_SCHNELL_TRANSFORMER), device),
            vae=_fp16(lambda: AutoencoderKL(**FLUX_VAE), device),
            text_encoder=_fp16(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), device),
            text_encoder_2=_t5_xxl(device),
            tokenizer=_tiny_tokenizer(),
            tokenizer_2=_tiny_t5(8)[1],
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
        )
        pipe.save_pretrained(dest, safe_serialization=True, variant="fp16")
    return _components_params(pipe)


BUILDERS: dict[str, Callable[..., dict[str, int]]] = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "sd35m": build_sd35m,
    "flux": build_flux,
}
# Each model's denoiser folder, and the config keys that tell the full-size one from a tiny recipe's.
DENOISERS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "sd15": ("unet", SD15_UNET, ("block_out_channels", "cross_attention_dim")),
    "sdxl": ("unet", SDXL_UNET, ("block_out_channels", "cross_attention_dim")),
    "sd35m": ("transformer", SD35M_TRANSFORMER, ("num_layers", "caption_projection_dim", "dual_attention_layers")),
    "flux": ("transformer", FLUX_SCHNELL_TRANSFORMER, ("num_layers", "num_single_layers", "guidance_embeds")),
}
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024, "sd35m": 1024, "flux": 1024}
FILES_GB = {"sd15": 2.2, "sdxl": 7.0, "sd35m": 7.3, "flux": 25.2}  # each build's fp16 files


def _is_built(name: str, model_dir: Path) -> bool:
    """Whether `model_dir` holds a baked pipeline whose denoiser is the full-size `name` one."""
    from sdworker.model import read_manifest

    folder, wanted, keys = DENOISERS[name]
    config_path = model_dir / folder / "config.json"
    if read_manifest(model_dir) is None or not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    return all(config.get(key) == wanted[key] for key in keys)


def ensure_model(name: str, cache: Path, device: str | None = None, rebuild: bool = False) -> dict[str, Any]:
    """The baked full-size model `name` (sd15, sdxl, sd35m, flux) in `cache/name`, built and baked there unless already.

    `device` is where the random init runs (default: cuda when available). Returns `model_dir`, `built` (False
    when reused), and for a build its `build_s`, `bake_s` and `params`."""
    import torch

    from sdworker.model import bake_model

    model_dir = Path(cache) / name
    if not rebuild and _is_built(name, model_dir):
        return {"model_dir": model_dir, "built": False}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    free, need = shutil.disk_usage(model_dir.parent).free / 1e9, 2 * FILES_GB[name] + 2
    if free < need:  # the build is saved, then baked (copied): its files twice, for a moment
        raise RuntimeError(f"{name} needs about {need:.0f} GB free to build and bake, and {cache} has {free:.0f} GB")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=model_dir.parent))
    try:
        started = time.perf_counter()
        params = BUILDERS[name](staging, device=device)
        built = time.perf_counter()
        bake_model(str(staging), model_dir, variant="fp16", verify=False)
        baked = time.perf_counter()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    published = PUBLISHED_PARAMS[name]
    mismatched = {
        part: (count, published[part]) for part, count in params.items() if published.get(part, count) != count
    }
    if mismatched:
        print(f"warning: {name} parameter counts differ from the published model: {mismatched}", file=sys.stderr)
    return {
        "model_dir": model_dir,
        "built": True,
        "build_device": device,
        "build_s": round(built - started, 1),
        "bake_s": round(baked - built, 1),
        "params": params,
    }


def describe(name: str, info: dict[str, Any]) -> str:
    """One line saying what `ensure_model` did."""
    if not info["built"]:
        return f"{name}: reusing {info['model_dir']}"
    params = ", ".join(f"{part} {count / 1e6:,.1f}M" for part, count in info["params"].items())
    total = sum(info["params"].values()) / 1e9
    return (
        f"{name}: built on {info['build_device']} in {info['build_s']:.1f} s, baked in {info['bake_s']:.1f} s; "
        f"{total:.2f}B parameters ({params})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["sd15", "sdxl"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the baked models are kept")
    parser.add_argument("--device", help="where to run the random init (default: cuda when available)")
    parser.add_argument("--rebuild", action="store_true", help="build even when the cache holds the model")
    parser.add_argument("--smoke", action="store_true", help="SD 1.5 only, then one 64x64 image in 2 steps")
    args = parser.parse_args()

    models = ["sd15"] if args.smoke else args.models
    for name in models:
        info = ensure_model(name, args.cache, args.device, args.rebuild)
        print(describe(name, info), flush=True)
    if args.smoke:
        from sdworker.config import Settings
        from sdworker.generate import generate
        from sdworker.model import load_model
        from sdworker.schema import GenerateInput

        model = load_model(Settings(model_dir=args.cache / "sd15"))
        request = GenerateInput(prompt="a lighthouse", num_inference_steps=2, width=64, height=64, seed=1)
        started = time.perf_counter()
        result = generate(model, request)
        seconds = time.perf_counter() - started
        print(f"sd15 on {model.device}: one {result.width}x{result.height} image in {seconds:.2f} s")


if __name__ == "__main__":
    main()
