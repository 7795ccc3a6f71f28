"""Each stage's work on the model (see `sdworker/stages/__init__.py`): its request checked as a generation's
would be, then its part of the pipeline run in the model's turn, and its answer packed for the next stage."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics
from ..encoded import Encoded, EncodedImage
from ..errors import WorkerError
from ..images import encode_image as encode_picture
from ..schema import DecodeInput, DenoiseInput, EncodeImageInput, EncodeInput, check_limits, check_size
from .wire import (
    EMBEDDINGS,
    IMAGE,
    MASKED,
    POOLED,
    as_generation,
    check_tensors,
    pack,
    parse,
    unpack,
)


@dataclass(eq=False)
class _Turn:
    """A stage's turn on the model, through the batcher that gives generations theirs (never batched)."""

    key: object
    done: bool = False
    size: int = 1


def _in_turn(model: Any, work: Any) -> Any:
    """Run `work()` in the model's turn: stages never overlap a generation on the same weights."""
    result: dict[str, Any] = {}

    def execute(batch: list[Any]) -> None:
        result["value"] = work()

    model.batcher.run(_Turn(key=object()), execute)
    return result["value"]


def encode(model: Any, payload: Any) -> dict:
    from ..generate import check_loras, fetch_loras, fetching, switch_loras
    from ..model import fit_request
    from ..prompts import encode, plan

    asked = parse(EncodeInput, payload)
    request = fit_request(as_generation(**asked.model_dump(exclude_none=True)), model.row, model.distilled)
    check_limits(request, model.settings)
    check_loras(request, model)
    pipe = model.pipes["text2img"]
    prompts = plan(pipe, model.family, request, model.settings.prompt_syntax, None)
    with fetching(request) as check:
        lora_files = fetch_loras(model, request, check)

    def work() -> dict[str, torch.Tensor]:
        switch_loras(model, pipe, request, lora_files)  # the request's LoRAs, or none: never the last call's
        with torch.inference_mode():
            if prompts.embeds:
                return encode(pipe, model.family, prompts, None)
            answer = pipe.encode_prompt(
                prompt=prompts.text,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=prompts.negative_text,
                **({"clip_skip": request.clip_skip} if request.clip_skip else {}),
            )
        return dict(zip((*EMBEDDINGS, *POOLED), answer, strict=False))

    tensors = _in_turn(model, work)
    meta = {"family": model.family, "model_key": model.settings.model_keys()[0], "dtype": str(model.dtype)}
    return {
        "embeddings": pack(tensors, meta),
        "$meta": {**meta, "prompt_tokens": prompts.tokens, "truncated": prompts.truncated, "syntax": prompts.syntax},
    }


def _encodes_in_float32(model: Any, config: Any) -> bool:
    """Whether the pipelines encode images with the VAE in float32: SDXL's do when its config says force_upcast,
    whatever the model's dtype (SD 1.x/2.x's never upcast)."""
    return model.family == "sdxl" and bool(getattr(config, "force_upcast", False))


@contextmanager
def _vae(model: Any, encoding: bool) -> Iterator[Any]:
    """The VAE, in float32 for the call where the pipelines run it so: to encode (see `_encodes_in_float32`),
    and to decode where it is float16 and its config says force_upcast (SDXL's). In the model's turn only. It is
    text2img's, which is never swapped (`vae_stand_in` replaces img2img's and inpaint's for a call)."""
    vae = model.pipes["text2img"].vae
    before = vae.dtype
    upcast = _encodes_in_float32(model, vae.config) and (encoding or before == torch.float16)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae
    finally:
        if upcast:
            vae.to(before)


def encode_image(model: Any, payload: Any) -> dict:
    """The VAE's encoder on img2img's or inpaint's image: its latent distribution, as the pipeline would have the
    VAE encode it (the same preprocessing, dtype and upcast), for denoise to sample with the request's seeds."""
    from ..generate import fetching, prepare_images
    from ..model import fit_request

    asked = parse(EncodeImageInput, payload)
    request = as_generation(prompt="(image)", **asked.model_dump(exclude_none=True))
    request = fit_request(request, model.row, model.distilled)
    check_limits(request, model.settings)
    with fetching(request) as check:
        init, mask, width, height = prepare_images(model, request, check)
    pipe = model.pipes[request.task]
    pixels = pipe.image_processor.preprocess(init, height=height, width=width).to(torch.float32)
    factor = pipe.vae_scale_factor
    masked = latent_mask = None
    if mask is not None:  # as the inpaint pipeline makes them: the masked image, and the mask at latent size
        condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
        masked = pixels * (condition < 0.5)
        latent_mask = torch.nn.functional.interpolate(condition, size=(height // factor, width // factor))

    def work() -> dict[str, torch.Tensor]:
        dtype = model.dtype  # read before the VAE is upcast: on a decode worker it is the VAE's
        with torch.inference_mode(), _vae(model, encoding=True) as vae:

            def moments(image: torch.Tensor) -> torch.Tensor:  # as the pipeline: to the model's dtype, then the VAE's
                image = image.to(model.device, dtype).to(vae.dtype)
                return vae.encode(image).latent_dist.parameters

            tensors = {"image_moments": moments(pixels)}
            if masked is not None and latent_mask is not None:
                tensors["masked_image_moments"] = moments(masked)
                tensors["mask"] = latent_mask.to(torch.uint8)
        return tensors

    tensors = _in_turn(model, work)
    meta = {"family": model.family, "task": request.task, "width": width, "height": height}
    return {"image_latents": pack(tensors, meta), "$meta": meta}


def _image_latents(model: Any, data: str) -> EncodedImage:
    """encode_image's answer, checked against this model: a 422 naming the tensor that does not fit."""
    if model.settings.enable_model_cpu_offload:  # the stand-in VAE and offload's hooks do not mix
        raise WorkerError(
            "INVALID_INPUTS",
            "image_latents: img2img and inpaint through the stages do not run on a worker with "
            "ENABLE_MODEL_CPU_OFFLOAD; send them to one without",
            "image_latents",
        )
    tensors, _ = unpack(data, "image_latents")
    names = MASKED if len(tensors) > 1 else IMAGE
    check_tensors(tensors, names, "image_latents", uint8=("mask",))
    config = model.config_of("vae")
    channels = 2 * config.latent_channels
    moments = tensors["image_moments"]
    shape = list(moments.shape)
    if len(shape) != 4 or shape[:2] != [1, channels] or min(shape[2:]) < 8:
        raise WorkerError(
            "INVALID_INPUTS",
            f"image_latents.image_moments: this model takes [1, {channels}, h, w] (h and w at least 8), not {shape}",
            "image_latents.image_moments",
        )
    expected = {"masked_image_moments": shape, "mask": [1, 1, *shape[2:]]}
    for name in names[1:]:
        if list(tensors[name].shape) != expected[name]:
            raise WorkerError(
                "INVALID_INPUTS",
                f"image_latents.{name}: {expected[name]} for these image moments, not {list(tensors[name].shape)}",
                f"image_latents.{name}",
            )
    if "mask" in tensors and not bool(((tensors["mask"] == 0) | (tensors["mask"] == 1)).all()):
        raise WorkerError("INVALID_INPUTS", "image_latents.mask: 0 or 1 only", "image_latents.mask")
    factor = 2 ** (len(config.block_out_channels) - 1)
    check_size(shape[3] * factor, shape[2] * factor, model.settings)
    # In the dtype this model's pipelines encode in: a VAE worker with another DTYPE still fits.
    dtype = torch.float32 if _encodes_in_float32(model, config) else model.dtype
    masked = tensors.get("masked_image_moments")
    return EncodedImage(
        moments=moments.to(dtype),
        factor=factor,
        masked_moments=masked.to(dtype) if masked is not None else None,
        mask=tensors.get("mask"),
    )


def denoise(model: Any, payload: Any) -> dict:
    from ..generate import generate
    from ..model import fit_request

    asked = parse(DenoiseInput, payload)
    tensors, _ = unpack(asked.embeddings, "embeddings")
    names = (*EMBEDDINGS, *(POOLED if model.family == "sdxl" else ()))
    check_tensors(tensors, names, "embeddings")
    config = model.pipes["text2img"].unet.config
    tokens = tensors["prompt_embeds"].shape[1] if tensors["prompt_embeds"].ndim == 3 else 0
    expected = {name: (1, tokens, config.cross_attention_dim) for name in EMBEDDINGS}
    if model.family == "sdxl":  # what the UNet's added conditioning takes, less its six time ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        expected.update({name: (1, pooled) for name in POOLED})
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape or not tokens or tokens % 77:
            wanted = list(shape) if tokens and not tokens % 77 else f"[1, 77 x n, {config.cross_attention_dim}]"
            raise WorkerError(
                "INVALID_INPUTS",
                f"embeddings.{name}: this model takes {wanted}, not {list(tensors[name].shape)}",
                f"embeddings.{name}",
            )
    fields = asked.model_dump(exclude_none=True, exclude={"embeddings", "image_latents"})
    image = _image_latents(model, asked.image_latents) if asked.image_latents else None
    if image is not None:  # its size is the image's; the pipeline reads the encoded image, not these
        for name, side in (("width", image.width), ("height", image.height)):
            if fields.get(name, side) != side:
                raise WorkerError(
                    "INVALID_INPUTS",
                    f"{name}: the image latents are {image.width}x{image.height}, not {fields[name]}",
                    name,
                )
        fields.update(image="(encoded)", **({"mask_image": "(encoded)"} if image.mask is not None else {}))
    elif "strength" in fields:
        raise WorkerError("INVALID_INPUTS", "strength: img2img and inpaint only (give image_latents)", "strength")
    request = fit_request(as_generation(prompt="(encoded)", safety_checker=False, **fields), model.row, model.distilled)
    check_limits(request, model.settings)
    conditioning = {name: tensor.to(model.device, model.dtype) for name, tensor in tensors.items()}
    result = generate(model, request, encoded=Encoded(conditioning, image))
    meta = {
        "family": model.family,
        "task": request.task,
        "seeds": result.seeds,
        "width": result.width,
        "height": result.height,
        "scheduler": result.scheduler,
    }
    return {"latents": pack({"latents": result.latents}, meta), "$meta": {**meta, "batch_jobs": result.batch}}


def decode(model: Any, payload: Any) -> dict:
    from ..generate import check_safety

    asked = parse(DecodeInput, payload)
    request = as_generation(prompt="(decoded)", output_format=asked.output_format, output_quality=asked.output_quality)
    tensors, meta = unpack(asked.latents, "latents")
    check_tensors(tensors, ("latents",), "latents")
    pipe = model.pipes["text2img"]
    latents = tensors["latents"]
    channels = pipe.vae.config.latent_channels
    if (
        latents.ndim != 4
        or latents.shape[1] != channels
        or not 1 <= latents.shape[0] <= model.settings.max_images
        or min(latents.shape[2:]) < 8
    ):
        raise WorkerError(
            "INVALID_INPUTS",
            f"latents.latents: this model takes [images (1 to {model.settings.max_images}), {channels}, h, w]"
            " (h and w at least 8), "
            f"not {list(latents.shape)}",
            "latents.latents",
        )
    factor = pipe.vae_scale_factor
    width, height = latents.shape[3] * factor, latents.shape[2] * factor
    check_limits(as_generation(prompt="(decoded)", width=width, height=height), model.settings)

    def work() -> tuple[list[Any], list[bool] | None]:
        with torch.inference_mode():
            with _vae(model, encoding=False) as vae:
                scaled = latents.to(model.device, vae.dtype) / vae.config.scaling_factor
                image = vae.decode(scaled, return_dict=False)[0]
            images = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(image))
            if asked.safety_checker and model.safety_checker is not None:
                return check_safety(model, images)  # as a whole generation checks it: flagged images black
        return images, None

    images, nsfw = _in_turn(model, work)
    metrics.IMAGES.inc(len(images))
    seeds = meta.get("seeds")  # denoise's, in the file's metadata: used only when it is what denoise writes
    if not (isinstance(seeds, list) and len(seeds) == len(images) and all(type(s) is int for s in seeds)):
        seeds = [None] * len(images)
    encoded = [encode_picture(image, request.output_format, request.output_quality) for image in images]
    as_text = [base64.b64encode(data).decode("ascii") for data in encoded]
    body: dict[str, Any] = {
        "images": [
            {
                "base64": text,
                "seed": seed,
                "width": image.width,
                "height": image.height,
                "format": request.output_format,
            }
            for text, seed, image in zip(as_text, seeds, images, strict=False)
        ],
        "image_base64": as_text[0],
    }
    if len(as_text) > 1:
        body["images_base64"] = as_text
    if nsfw is not None:
        body["nsfw_content_detected"] = nsfw
    body["$meta"] = {"family": model.family, "stage": "decode"}
    return body
