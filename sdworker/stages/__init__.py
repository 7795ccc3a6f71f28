"""Seed 001's split of Stable Diffusion into its three models, each its own endpoint and, with STAGES, its own
worker: `encode` (the text encoders: prompt -> embeddings), `denoise` (the UNet: embeddings -> latents) and
`decode` (the VAE: latents -> the image, answered as a direct call answers it). For img2img and inpaint the VAE's
worker also serves `encode_image` (image and mask -> the image's latent distribution), which denoise takes.

Tensors travel as base64 of a safetensors file and are checked on arrival against this model: a tensor that does
not fit is a 422 naming it. Through the stages a seed gives the all-in-one image, on one worker or across three,
with the same LoRAs named to encode (their text-encoder layers) and denoise (their UNet layers). Families: sd1,
sd2 and sdxl (its pooled embeddings travel with the rest, its time ids are made from width and height as the
all-in-one call makes them). SD3 and FLUX.1 are not split here: their embeddings are T5's and two CLIPs' (a
4096-wide, up to 512-token tensor, and pooled ones), their latents are packed (FLUX.1) and shifted as well as
scaled, so each stage would need its own tensor names, shape rules and VAE arithmetic.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import WorkerError
from .wire import pack, unpack
from .work import decode, denoise, encode, encode_image

__all__ = ["SERVED_BY", "pack", "run_stage", "unpack"]

SERVED_BY = {"encode": "encode", "denoise": "denoise", "decode": "decode", "encode_image": "decode"}
"""Each stage, and the STAGES name of the worker that serves it: encode_image needs the VAE, as decode does."""
STAGES = {"encode": encode, "denoise": denoise, "decode": decode, "encode_image": encode_image}


def run_stage(model: Any, stage: str, payload: Any) -> tuple[int, dict]:
    """Run one stage; answers (HTTP status, body) and never raises, as `handle` does."""
    started = time.perf_counter()
    try:
        _check_served(model, stage)
        body = STAGES[stage](model, payload)
    except WorkerError as err:
        return err.status, {"$error": err.to_dict()}
    except Exception:
        import logging

        logging.getLogger("sdworker").exception("stage %s failed", stage)
        error = WorkerError("INTERNAL_ERROR", "internal error; the worker's log has the details", status=500)
        return error.status, {"$error": error.to_dict()}
    body["$timings"] = {"total": round((time.perf_counter() - started) * 1000, 1)}
    return 200, body


def _check_served(model: Any, stage: str) -> None:
    stages = model.settings.served_stages()
    if SERVED_BY[stage] not in stages:
        where = f" (the VAE's: STAGES={SERVED_BY[stage]})" if SERVED_BY[stage] != stage else ""
        raise WorkerError(
            "STAGE_NOT_SERVED",
            f"this worker serves STAGES={','.join(stages)}, not {stage}{where}",
            "STAGES",
            status=404,
        )
    if not model.row.stages:
        raise WorkerError(
            "STAGE_NOT_SERVED", f"the {model.family} family is not split into stages here", "STAGES", status=404
        )
