"""A generation's inputs already encoded by other workers (seed 001's split stages, `sdworker/stages/`): the
prompt's embeddings from the text encoders' worker and, for img2img and inpaint, the image as the VAE's worker
encoded it. The UNet's worker runs the same pipeline call a whole generation makes, on these."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EncodedImage:
    """img2img's or inpaint's image through the VAE's encoder: its latent distribution (mean and log-variance,
    `[1, 2 x latent channels, h, w]`, not yet sampled, so that the generation samples it with its own seeds)
    and, for inpaint, that of the image with the masked part blacked out, and the mask at latent size (0 or 1)."""

    moments: torch.Tensor
    factor: int  # pixels per latent: the VAE's downscaling
    masked_moments: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """The image's width in pixels."""
        return self.moments.shape[3] * self.factor

    @property
    def height(self) -> int:
        """The image's height in pixels."""
        return self.moments.shape[2] * self.factor

    def pipeline_inputs(self) -> dict[str, torch.Tensor]:
        """What the img2img or inpaint pipeline is given for its image: a blank one of the image's size, which
        `vae_stand_in` answers for, and the mask, which the pipeline scales to pixels and back to the same latents."""
        inputs = {"image": torch.ones(1, 3, self.height, self.width)}
        if self.mask is not None:
            inputs["mask_image"] = self.mask.float()
        return inputs


@dataclass
class Encoded:
    """The prompt's embeddings (prompt_embeds and the rest, as the pipeline takes them) and, for img2img and
    inpaint, the image. A generation from these answers its latents, for the VAE's worker to decode."""

    conditioning: dict[str, torch.Tensor]
    image: EncodedImage | None = None


class _VaeEncoder:
    """Stands in for the VAE in an img2img or inpaint pipeline for one call: `encode` answers the distributions
    the VAE's worker computed. The pipeline then samples them with the request's generators, at the point and
    in the order a whole generation does, so the random numbers and the image are a whole worker's. What it
    encodes inside `prepare_mask_latents` is the masked image (what an inpainting UNet reads); anything else is
    the image."""

    def __init__(self, config: Any, image: EncodedImage, device: Any) -> None:
        self.config = config
        self.image = image
        self.device = device
        self.masked = False  # set while the pipeline prepares the mask's latents

    def encode(self, pixels: torch.Tensor) -> Any:
        """The distribution the VAE's worker computed for what `pixels` stands for, one per image in the batch."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        moments = self.image.masked_moments if self.masked else self.image.moments
        if moments is None:  # never expected: inpaint's image latents always hold the masked image's
            raise ValueError("the pipeline encodes a masked image, and the image latents hold none")
        moments = moments.to(self.device).repeat(pixels.shape[0], 1, 1, 1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def to(self, *args: Any, **kwargs: Any) -> _VaeEncoder:
        """The pipeline moves the VAE to float32 and back around encoding (SDXL's upcast): the VAE's worker did."""
        return self


@contextmanager
def vae_stand_in(pipe: Any, config: Any, image: EncodedImage, device: Any) -> Iterator[None]:
    """`pipe.vae` is `_VaeEncoder` (with the VAE's `config`) for the duration, and `pipe.prepare_mask_latents`
    tells it when it encodes the masked image. Called in the model's turn: nothing else uses `pipe` meanwhile."""
    encoder = _VaeEncoder(config, image, device)
    prepare = getattr(pipe, "prepare_mask_latents", None)

    def prepare_mask_latents(*args: Any, **kwargs: Any) -> Any:
        encoder.masked = True
        try:
            return prepare(*args, **kwargs)
        finally:
            encoder.masked = False

    real = pipe.vae
    pipe.vae = encoder
    if prepare is not None:
        pipe.prepare_mask_latents = prepare_mask_latents
    try:
        yield
    finally:
        pipe.vae = real
        if prepare is not None:
            del pipe.prepare_mask_latents  # the class's method again
