"""Small random-weight pipelines built offline with diffusers' and transformers' own classes, for tests and CI:
they run the real loading and inference code in seconds on a CPU, and draw noise, not pictures. A recipe is a
function that saves a pipeline into a folder; RECIPES names them.

NAMED_RECIPES are the same for what is baked beside a model by name (LORAS, EMBEDDINGS): `tiny-lora`, a random
LoRA, and `tiny-embedding`, a random textual-inversion embedding, each made for the tiny model baked in
MODEL_DIR and seeded by the name it is baked under (`LORAS=ink=tiny-lora,fog=tiny-lora`: two LoRAs)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .tiny_text import (
    tiny_mistral3,
    tiny_pixtral_processor,
    tiny_qwen3_config,
    tiny_qwen_tokenizer,
    tiny_qwen_vl,
    tiny_qwen_vl_processor,
)


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


def _tiny_vae(latent_channels: int = 4, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the real models' 8x downsampling, so sizes behave as they do on a full model.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **extra,
    )


def _tiny_t5(d_model: int) -> tuple[Any, Any]:
    """A T5 encoder of width `d_model` and a T5 tokenizer over printable ASCII characters, built offline."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # Unigram pieces: T5's <pad>=0, </s>=1, <unk>=2, the word-start marker, then one piece per character.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(code), -5.0) for code in range(33, 127)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=128,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config), tokenizer


def _tiny_unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    # Two levels at 8x8 latents by default (64 px images): real blocks, a few milliseconds a step on a CPU.
    config: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    return UNet2DConditionModel(**{**config, **extra})


def _bake_tiny_sd(dest: Path, pipeline: str = "StableDiffusionPipeline", in_channels: int = 4) -> None:
    """SD 1.x layout with random weights: UNet, VAE, CLIP text encoder, tokenizer, PNDM, safety checker. As
    `StableDiffusionInpaintPipeline` with 9 input channels (4 noise, 1 mask, 4 masked-image latents), the
    inpainting checkpoints' (sd-v1-5-inpainting)."""
    import diffusers
    import torch
    from diffusers import PNDMScheduler
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(0)
    unet = _tiny_unet(in_channels=in_channels, cross_attention_dim=32, attention_head_dim=8)
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
    pipe = getattr(diffusers, pipeline)(
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


def _tiny_sdxl_unet(time_ids: int, cross_attention_dim: int, in_channels: int = 4) -> Any:
    """SDXL's UNet layout: text-time conditioning over `time_ids` ids (6 for the base; 5, with the aesthetic
    score, for the refiner) and the pooled text embedding (32)."""
    return _tiny_unet(
        in_channels=in_channels,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * 8 + 32,
        cross_attention_dim=cross_attention_dim,
    )


def _sdxl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )


def _bake_tiny_sdxl(dest: Path, inpaint: bool = False) -> None:
    """SDXL layout with random weights: two text encoders, text-time conditioning, Euler. With `inpaint`, the
    inpainting checkpoint's (stable-diffusion-xl-1.0-inpainting-0.1): a 9-channel UNet, 6 time ids (no aesthetic
    score)."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = _tiny_sdxl_unet(time_ids=6, cross_attention_dim=64, in_channels=9 if inpaint else 4)
    extra = {"requires_aesthetics_score": False} if inpaint else {}
    pipe = (StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline)(
        **extra,
        unet=unet,
        vae=_tiny_vae(force_upcast=True),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        scheduler=_sdxl_scheduler(),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_sdxl_refiner(dest: Path) -> None:
    """The SDXL refiner's layout with random weights: img2img only, the second text encoder alone, and an
    aesthetic score in its time conditioning (5 time ids, not 6). Its text encoder and VAE have tiny-sdxl's
    shapes, so a worker shares tiny-sdxl's, as it does the real base's with the real refiner."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(1)
    unet = _tiny_sdxl_unet(time_ids=5, cross_attention_dim=32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=unet,
        vae=_tiny_vae(force_upcast=True),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
        tokenizer=None,
        tokenizer_2=_tiny_tokenizer(),
        scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_sd3(dest: Path) -> None:
    """SD3 layout with random weights: MMDiT transformer, two CLIP encoders and T5, 16-channel VAE, flow match."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    # As in SD3, the two CLIP encoders' hidden states (32 + 32) are padded up to T5's width (64) and joined;
    # their pooled outputs (32 + 32) make the pooled projection. 8x8 latents in 2x2 patches: 64 px natively.
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
    )
    text_encoder_3, tokenizer_3 = _tiny_t5(d_model=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_tiny_vae(
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        text_encoder=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32)),
        text_encoder_3=text_encoder_3,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_flux(dest: Path, pipeline: str = "FluxPipeline", **transformer: Any) -> None:
    """FLUX.1-dev layout with random weights: MMDiT transformer with guidance embedding, CLIP and T5, 16-channel
    VAE, as `pipeline` (FluxPipeline; FluxFillPipeline, FluxKontextPipeline), `transformer` overriding its
    transformer's config. Without the guidance embedding it is laid out as FLUX.1-schnell, the few-step
    distillation."""
    import diffusers
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    # Flux packs 2x2 patches of the 16 latent channels into 64 input channels; the rope axes add up to the
    # head width. FluxPipeline's default size is fixed in code at 128 latents (1024 px), not read from here.
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),
    }
    denoiser = FluxTransformer2DModel(**{**config, **transformer})
    text_encoder_2, tokenizer_2 = _tiny_t5(d_model=32)
    pipe = getattr(diffusers, pipeline)(
        transformer=denoiser,
        vae=_tiny_flux_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        text_encoder_2=text_encoder_2,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=tokenizer_2,
        scheduler=_flow_scheduler(),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _flow_scheduler(**extra: Any) -> Any:
    """FLUX's flow-matching schedule: resolution-dependent shift (`mu`, which these pipelines always pass)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    config.update(extra)
    return FlowMatchEulerDiscreteScheduler(**config)


def _tiny_flux_vae() -> Any:
    """FLUX.1's VAE layout (16 channels, no quant convs, its shift and scale), 8x: Chroma, Z-Image, Kontext, Fill."""
    return _tiny_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def _tiny_flux2_vae() -> Any:
    """FLUX.2's VAE: 32 latent channels, 8x, patchified 2x2 into 128 channels that its batch-norm statistics
    normalise."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _tiny_flux2_transformer(text_width: int, guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    # 128 input channels: 32 latent channels in 2x2 patches. Its text input is three of the text encoder's hidden
    # states side by side (the pipelines' `text_encoder_out_layers`), so 3 x the encoder's width. The four rope
    # axes (time, height, width, layer) add up to the head width.
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_width,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _bake_tiny_flux2_klein(dest: Path, distilled: bool = True) -> None:
    """FLUX.2 [klein] layout with random weights: a Qwen3 causal LM as text encoder, the FLUX.2 DiT without
    guidance embedding, the FLUX.2 VAE. `distilled` (FLUX.2-klein-4B/9B, a few steps, no CFG) sets the pipeline's
    `is_distilled`; without it, laid out as the klein base models, which run real CFG against an empty prompt."""
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = tiny_qwen_tokenizer()
    # 27 layers, so the pipeline's default text_encoder_out_layers (9, 18, 27) exist (Qwen3-4B has 36).
    pipe = Flux2KleinPipeline(
        transformer=_tiny_flux2_transformer(text_width=16, guidance_embeds=False),
        vae=_tiny_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(tiny_qwen3_config(tokenizer, num_hidden_layers=27)).eval(),
        tokenizer=tokenizer,
        scheduler=_flow_scheduler(),
        is_distilled=distilled,
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_flux2(dest: Path) -> None:
    """FLUX.2 [dev] layout with random weights: Mistral Small 3 (with its vision tower) as text encoder and its
    processor as tokenizer, the FLUX.2 DiT with guidance embedding (guidance-distilled), the FLUX.2 VAE. 30 text
    layers, so the pipeline's default text_encoder_out_layers (10, 20, 30) exist (Mistral Small 3 has 40)."""
    import torch
    from diffusers import Flux2Pipeline

    torch.manual_seed(0)
    processor = tiny_pixtral_processor()
    pipe = Flux2Pipeline(
        transformer=_tiny_flux2_transformer(text_width=16, guidance_embeds=True),
        vae=_tiny_flux2_vae(),
        text_encoder=tiny_mistral3(processor.tokenizer, num_hidden_layers=30),
        tokenizer=processor,
        scheduler=_flow_scheduler(),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _tiny_qwen_parts() -> dict[str, Any]:
    """Qwen-Image's components: Qwen2.5-VL and its tokenizer, the Qwen-Image VAE (a causal 3D VAE, 16 channels, 8x,
    its latents' mean and std), the MMDiT with 2x2 patches (64 channels in, 16 out), Qwen-Image's schedule."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_qwen_vl(tokenizer)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    # Qwen-Image's own schedule: exponential time shift, growing from 0.5 to 0.9 with the image's length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _bake_tiny_qwenimage(dest: Path) -> None:
    """Qwen-Image layout with random weights: Qwen2.5-VL text encoder, Qwen-Image VAE and MMDiT."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**_tiny_qwen_parts())
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_qwenimage_edit(dest: Path, pipeline: str) -> None:
    """Qwen-Image-Edit layout (`QwenImageEditPipeline`; `QwenImageEditPlusPipeline` for Edit-2509 and later): Qwen-
    Image's components, and Qwen2-VL's processor, through which the text encoder also sees the reference images."""
    import diffusers

    parts = _tiny_qwen_parts()
    pipe = getattr(diffusers, pipeline)(processor=tiny_qwen_vl_processor(parts["tokenizer"]), **parts)
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_zimage(dest: Path) -> None:
    """Z-Image(-Turbo) layout with random weights: Qwen3 base model as text encoder (its second-to-last hidden
    state), the single-stream S3-DiT, FLUX.1's 16-channel VAE, a fixed shift-3 flow schedule."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(0)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3Model(tiny_qwen3_config(tokenizer, num_hidden_layers=2)).eval()
    # 2x2 patches of 16 channels; head width 16 = rope axes 8 + 4 + 4.
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
    )
    # Its pad tokens are made with torch.empty: give them values, or they may be NaN.
    with torch.no_grad():
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    pipe = ZImagePipeline(
        transformer=transformer,
        vae=_tiny_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


def _bake_tiny_chroma(dest: Path) -> None:
    """Chroma layout with random weights: FLUX.1-schnell's DiT with a distilled modulation approximator instead of
    per-block modulation, T5 alone (masked), FLUX.1's VAE; real CFG with a negative prompt."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    text_encoder, tokenizer = _tiny_t5(d_model=32)
    pipe = ChromaPipeline(
        transformer=transformer,
        vae=_tiny_flux_vae(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=_flow_scheduler(),
    )
    pipe.save_pretrained(dest, safe_serialization=True)


RECIPES: dict[str, Callable[[Path], None]] = {
    "tiny-sd": _bake_tiny_sd,
    "tiny-sdxl": _bake_tiny_sdxl,
    "tiny-sdxl-refiner": _bake_tiny_sdxl_refiner,
    "tiny-sd3": _bake_tiny_sd3,
    "tiny-flux": _bake_tiny_flux,
    "tiny-flux-schnell": lambda dest: _bake_tiny_flux(dest, guidance_embeds=False),
    # FLUX.1 Fill [dev]: the packed noise (64 channels), the packed masked image's latents (64) and the mask at
    # pixel resolution folded into the latent grid (8 x 8 x 2 x 2 = 256) in, 64 out, as in the real model.
    "tiny-flux-fill": lambda dest: _bake_tiny_flux(dest, "FluxFillPipeline", in_channels=384, out_channels=64),
    # FLUX.1 Kontext [dev]: FLUX.1-dev's layout; the reference image's latents join the noise as more tokens.
    "tiny-flux-kontext": lambda dest: _bake_tiny_flux(dest, "FluxKontextPipeline"),
    "tiny-sd-inpaint": lambda dest: _bake_tiny_sd(dest, "StableDiffusionInpaintPipeline", in_channels=9),
    "tiny-sdxl-inpaint": lambda dest: _bake_tiny_sdxl(dest, inpaint=True),
    "tiny-flux2": _bake_tiny_flux2,
    "tiny-flux2-klein": _bake_tiny_flux2_klein,
    "tiny-flux2-klein-base": lambda dest: _bake_tiny_flux2_klein(dest, distilled=False),
    "tiny-qwenimage": _bake_tiny_qwenimage,
    "tiny-qwenimage-edit": lambda dest: _bake_tiny_qwenimage_edit(dest, "QwenImageEditPipeline"),
    "tiny-qwenimage-edit-plus": lambda dest: _bake_tiny_qwenimage_edit(dest, "QwenImageEditPlusPipeline"),
    "tiny-zimage": _bake_tiny_zimage,
    "tiny-chroma": _bake_tiny_chroma,
}
"""The built-in recipes by MODEL_ID."""


# The attention projections a LoRA adapts in a UNet or a DiT (diffusers' names), as diffusers' training scripts do.
DENOISER_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def name_seed(name: str) -> int:
    """The seed a named recipe is made with when baked as `name`: the same name, the same weights."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def make_tiny_lora(
    model_dir: Path,
    dest: Path,
    seed: int,
    text_encoders: bool = True,
    clip_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A random rank-4 LoRA for the pipeline baked in `model_dir`, written to `dest`: peft adapters on its UNet's
    or transformer's attention projections and, with `text_encoders`, on its CLIP text encoders' `clip_modules`
    (other text encoders are left as they are),
    saved with the pipeline class's own `save_lora_weights`, as diffusers saves a trained one. The same model and
    seed give the same bytes. Answers `dest`."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    layers = {}
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for part in pipe._lora_loadable_modules:
            module = getattr(pipe, part, None)
            denoiser = part in ("unet", "transformer")
            clip = type(module).__name__.startswith("CLIP")  # T5 or a language model: its own module names
            if module is None or not (denoiser or (text_encoders and clip)):
                continue
            targets = list(DENOISER_MODULES if denoiser else clip_modules)
            module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
            layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
    type(pipe).save_lora_weights(dest.parent, weight_name=dest.name, safe_serialization=True, **layers)
    return dest


def make_tiny_embedding(model_dir: Path, dest: Path, seed: int, vectors: int = 2) -> None:
    """A random textual-inversion embedding of `vectors` tokens for the pipeline baked in `model_dir`, written to
    `dest`: A1111's one-file form (`emb_params`) for one CLIP text encoder, SDXL's `clip_l`/`clip_g` pair for
    two. The same model and seed give the same bytes."""
    import torch
    from safetensors.torch import save_file

    widths = []
    for part in ("text_encoder", "text_encoder_2"):
        path = Path(model_dir) / part / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        if config.get("model_type", "").startswith("clip"):
            widths.append(config["hidden_size"])
    if not widths:
        raise ValueError("the model has no CLIP text encoder to make an embedding for")
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(vectors, width, generator=generator) for width in widths]
    state = {"emb_params": tensors[0]} if len(tensors) == 1 else {"clip_l": tensors[0], "clip_g": tensors[1]}
    save_file(state, str(dest))


NAMED_RECIPES: dict[str, dict[str, Callable[[Path, Path, int], None]]] = {
    "loras": {"tiny-lora": make_tiny_lora},
    "embeddings": {"tiny-embedding": make_tiny_embedding},
}
"""The built-in sources of LORAS and EMBEDDINGS: (the baked model's folder, the file to write, the seed)."""
