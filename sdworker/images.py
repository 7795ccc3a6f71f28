"""Input images in (base64, data URL or http(s) URL), output images out (png, jpeg or webp as base64)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from typing import Any

from PIL import Image

from .config import Settings
from .errors import WorkerError
from .urls import fetch


def decode_image(value: str, field: str, settings: Settings, check: Callable[[], None] | None = None) -> Image.Image:
    """An RGB image from base64 (with or without a `data:` prefix) or an http(s) URL, within the size limits.

    A URL goes through the guard (public addresses only, IMAGE_FETCH_TIMEOUT for the whole download); `check`
    may end the download early (see `urls.fetch`)."""
    if value.startswith(("http://", "https://")):
        data = fetch(value, field, settings, settings.max_input_image_bytes, "IMAGE_FETCH_FAILED", check)
    else:
        if value.startswith("data:"):
            value = value.partition(",")[2]
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise WorkerError("INVALID_IMAGE", f"{field} is neither base64 nor an http(s) URL", field) from None
        if len(data) > settings.max_input_image_bytes:
            raise WorkerError(
                "INVALID_IMAGE", f"{field} is larger than the {settings.max_input_image_bytes} byte limit", field
            )
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > settings.max_input_image_pixels:
            raise WorkerError(
                "INVALID_IMAGE",
                f"{field} is {image.width}x{image.height}; the limit is {settings.max_input_image_pixels} pixels",
                field,
            )
        return image.convert("RGB")
    except WorkerError:
        raise
    except Exception:  # PIL raises many types for undecodable data
        raise WorkerError("INVALID_IMAGE", f"{field} is not an image PIL can read", field) from None


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """The image as png, jpeg or webp bytes."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


# Linear maps from the VAE's 4 latent channels to RGB, good enough for a thumbnail while denoising runs
# (the approximations ComfyUI and A1111 use for their "cheap" previews).
LATENT_RGB = {
    "sd1": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
}


def latent_preview(latents: Any, family: str, quality: int = 40) -> str | None:
    """A small, rough JPEG (1/8 of the image's size) of the first image's latents, as base64; None for latents
    the maps above do not read (16 or 32 channels, or packed into tokens: SD3, FLUX and the DiTs after them)."""
    import torch

    if latents.ndim != 4 or latents.shape[1] != 4 or family not in ("sd1", "sd2", "sdxl"):
        return None
    factors, bias = LATENT_RGB["sdxl" if family == "sdxl" else "sd1"]
    latent = latents[0].detach().float().cpu()  # 4 x h x w
    rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(factors)) + torch.tensor(bias)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return base64.b64encode(encode_image(Image.fromarray(pixels), "jpeg", quality)).decode("ascii")
