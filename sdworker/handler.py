"""One request in, one response out: the platform-neutral body every platform serves.

`handle` never raises: bad input is a 4xx with `{"$error": {"code", "message", "field"}}`, a failure inside
the worker a 5xx with a code and a message, and no traceback ever reaches the client.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

from .errors import WorkerError
from .generate import StepCallback, generate
from .images import encode_image
from .model import LoadedModel, fit_request
from .schema import OutputTarget, check_limits, parse_request
from .storage import upload_image

log = logging.getLogger("sdworker")
_first_answer = threading.Lock()


def handle(model: LoadedModel, payload: Any, on_step: StepCallback | None = None) -> tuple[int, dict]:
    """Validate `payload`, generate, and answer `(HTTP status, JSON body)`."""
    started = time.perf_counter()
    where: dict[str, str] = {}
    try:
        if not model.settings.whole():
            stages = model.settings.served_stages()
            raise WorkerError(
                "STAGE_NOT_SERVED",
                f"this worker serves STAGES={','.join(stages)} (POST /stages/...), not whole generations",
                "STAGES",
                status=404,
            )
        request, where = parse_request(payload)
        request = fit_request(request, model.row, model.distilled, model.refiner is not None)
        check_limits(request, model.settings)
        baked = model.manifest.get("model_id")
        if request.model_id is not None and request.model_id != baked:
            raise WorkerError(
                "MODEL_MISMATCH",
                f"model {request.model_id!r} is not on this worker, which serves {baked!r}",
                "model_id",
            )
        target = request.output or OutputTarget(type=model.settings.output_type)
        if target.type == "s3" and not model.settings.s3_bucket and not target.fallback:
            raise WorkerError(
                "S3_NOT_CONFIGURED", "output.type s3: this server has no bucket configured (S3_BUCKET)", "output.type"
            )
        result = generate(model, request, on_step)
        encode_started = time.perf_counter()
        encoded = [encode_image(image, request.output_format, request.output_quality) for image in result.images]
        timings = dict(result.timings, encode=round((time.perf_counter() - encode_started) * 1000, 1))
        uploads, upload_error = None, None
        if target.type == "s3":
            upload_started = time.perf_counter()
            try:
                uploads = [
                    upload_image(data, request.output_format, model.settings, target.prefix, target.expires)
                    for data in encoded
                ]
            except WorkerError as err:
                if not target.fallback:
                    raise
                upload_error = err.to_dict()  # the caller allowed base64 instead: say why it came back that way
            timings["upload"] = round((time.perf_counter() - upload_started) * 1000, 1)
    except WorkerError as err:
        err.field = where.get(err.field, err.field) if err.field else None
        stopped = err.code in ("CANCELLED", "TIMED_OUT")  # stopped while running, not refused
        log.info("%s: %s %s", "job stopped" if stopped else "request refused", err.code, err.message)
        return err.status, {"$error": err.to_dict()}
    except Exception:
        log.exception("unexpected error")
        error = WorkerError("INTERNAL_ERROR", "internal error; the worker's log has the details", status=500)
        return error.status, {"$error": error.to_dict()}

    timings["total"] = round((time.perf_counter() - started) * 1000, 1)
    with _first_answer:  # the first answer after a cold start, and only it, says how long the start took
        first, model.init_reported = not model.init_reported, True
    if first:
        timings["init"] = round(model.load_ms, 1)
        timings["load_bytes"] = model.load_bytes
    if uploads is not None:
        delivered: list[dict[str, Any]] = uploads
        body: dict[str, Any] = {"image_url": uploads[0]["url"]}
    else:
        as_text = [base64.b64encode(data).decode("ascii") for data in encoded]
        delivered = [{"base64": text} for text in as_text]
        body = {"image_base64": as_text[0]}
        if len(as_text) > 1:
            body["images_base64"] = as_text
        if upload_error is not None:
            body["upload_error"] = upload_error
    images = [
        {**where_to, "seed": seed, "width": image.width, "height": image.height, "format": request.output_format}
        for where_to, seed, image in zip(delivered, result.seeds, result.images, strict=True)
    ]
    body = {"images": images, **body}
    if result.nsfw is not None:
        body["nsfw_content_detected"] = result.nsfw
    body["$timings"] = timings
    if result.mem_usage is not None:
        body["$mem_usage"] = result.mem_usage
    body["$meta"] = {
        "MODEL_ID": model.manifest.get("model_id"),
        "PIPELINE": result.pipeline,
        "SCHEDULER": result.scheduler,
        "family": model.family,
        "task": result.task,
        "device": model.device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "width": result.width,
        "height": result.height,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "strength": request.strength if result.task in ("img2img", "inpaint") else None,
        "references": result.references,
        "num_images_per_prompt": request.num_images_per_prompt,
        "seed": result.seeds[0],
        "safety_checker": result.nsfw is not None,
        "output_format": request.output_format,
        "batch_jobs": result.batch,
        "loras": [choice.model_dump(exclude_none=True) for choice in request.loras or []],
        "prompt_syntax": result.prompt_syntax,
        "prompt_tokens": result.prompt_tokens,
        "truncated": result.truncated,
        "clip_skip": request.clip_skip,
        "eta": request.eta,
        "refiner": request.refiner,
        "high_noise_frac": request.high_noise_frac,
    }
    return 200, body
