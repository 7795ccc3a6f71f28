"""Write a tiny SD 1.x pipeline as one checkpoint in the original (CompVis/LDM) key layout, the single
`model.safetensors` file that A1111 and most model sites share, so that tests can load a single-file model offline.

diffusers reads such files with `StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>,
local_files_only=True)`; this module is the way back. The key maps are adapted from the diffusers repository's
`scripts/convert_diffusers_to_original_stable_diffusion.py` (Copyright The HuggingFace Team, Apache License 2.0),
with the script's fixed loops (4 UNet levels, 2 layers a block) replaced by ones that follow the saved configs.
Only the UNet, the VAE and the CLIP text encoder go in, as in that script.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

# (original, diffusers) pairs, as in the script.
_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def _unet_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(original, diffusers) block prefixes for a UNet2DConditionModel of any depth and layers per block."""
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0.")]
    pairs.append(("middle_block.2.", "mid_block.resnets.1."))
    for i in range(levels):
        for j in range(per_block):  # down blocks: a resnet and maybe an attention per input block
            pairs.append((f"input_blocks.{(per_block + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{(per_block + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per_block + 1):  # up blocks have one layer more
            pairs.append((f"output_blocks.{(per_block + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{(per_block + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:  # no resampling at the bottom level
            pairs.append((f"input_blocks.{(per_block + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            pairs.append((f"output_blocks.{(per_block + 1) * i + per_block}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


def _vae_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(original, diffusers) block prefixes for an AutoencoderKL; the original numbers decoder levels bottom-up."""
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("mid.attn_1.", "mid_block.attentions.0."), ("norm_out.", "conv_norm_out.")]
    pairs += [(f"mid.block_{j + 1}.", f"mid_block.resnets.{j}.") for j in range(2)]
    for i in range(levels):
        pairs += [(f"down.{i}.block.{j}.", f"down_blocks.{i}.resnets.{j}.") for j in range(per_block)]
        pairs += [(f"up.{levels - 1 - i}.block.{j}.", f"up_blocks.{i}.resnets.{j}.") for j in range(per_block + 1)]
        pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        pairs.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


def _rename(key: str, prefixes: list[tuple[str, str]]) -> str:
    """`key` with the first diffusers prefix it starts with (after an optional encoder./decoder.) swapped."""
    head, _, rest = key.partition(".") if key.startswith(("encoder.", "decoder.")) else ("", "", key)
    for original, diffusers in prefixes:
        if rest.startswith(diffusers):
            rest = original + rest[len(diffusers) :]
            break
    return f"{head}.{rest}" if head else rest


def _convert_unet(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    prefixes = _UNET_TOP + _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        if ".resnets." in key:
            for original, diffusers in _UNET_RESNET:
                key = key.replace(diffusers, original)
        out[_rename(key, prefixes)] = value
    return out


def _convert_vae(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    prefixes = _vae_prefixes(config)
    out = {}
    for key, value in state.items():
        key = key.replace("conv_shortcut", "nin_shortcut") if ".resnets." in key else key
        if ".attentions." in key:
            for original, diffusers in _VAE_ATTENTION:
                key = key.replace(f".{diffusers}", f".{original}")
            if key.endswith("weight") and value.ndim == 2:  # the original's attention projections are 1x1 convs
                value = value.reshape(*value.shape, 1, 1)
        out[_rename(key, prefixes)] = value
    return out


def write_original_checkpoint(pipeline_dir: Path, path: Path) -> None:
    """Write the SD 1.x pipeline saved in `pipeline_dir` (diffusers layout) as one original-layout .safetensors file."""
    pipeline_dir, path = Path(pipeline_dir), Path(path)

    def part(name: str, weights: str) -> tuple[dict[str, Any], dict[str, Any]]:
        config = json.loads((pipeline_dir / name / "config.json").read_text())
        return load_file(str(pipeline_dir / name / weights)), config

    unet, unet_config = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = part("vae", "diffusion_pytorch_model.safetensors")
    text, _ = part("text_encoder", "model.safetensors")
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in _convert_unet(unet, unet_config).items()}
    checkpoint |= {f"first_stage_model.{k}": v for k, v in _convert_vae(vae, vae_config).items()}
    # SD 1.x's text encoder is HF CLIP under the original's own names; transformers >= 5.6 saves it without
    # the `text_model.` level, which the original layout (and diffusers' detection of it) has.
    checkpoint |= {
        f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in text.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path), metadata={"format": "pt"})
