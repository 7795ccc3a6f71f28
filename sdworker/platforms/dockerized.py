"""Seed 002's API ("Stable Diffusion Dockerized": Flask, Celery and Redis), with its request bodies as its README
writes them: `POST /generate`, `POST /img2img`, `GET /status/<task_id>`, `GET /recent`, and the image links
`/recent` gives, `GET /image/<task_id>/<n>`.

The key is `api_key` in the body (a query parameter on the GETs), checked against API_KEYS. A POST queues a job in
the one job store, like every other way in, and answers `{"task_id"}`, or with `synchronous_request` the finished
task as `/status` shows it. `/status` speaks Celery's states: PENDING, STARTED, PROGRESS (current and total
steps), SUCCESS (the images as base64 with what reproduces them, or with `return_base64: false` the image itself),
FAILURE (the error, naming the seed's field), REVOKED (cancelled).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyQuery
from PIL import Image
from pydantic import ConfigDict, Field, field_validator

from ..errors import WorkerError
from ..jobs import Job
from ..schema import RequestModel, check_limits, parse_request
from .access import State
from .answers import responses

FIELDS = {
    "num_inference_steps": "ddim_steps",
    "guidance_scale": "scale",
    "height": "H",
    "width": "W",
    "scheduler": "sampler",
    "num_images_per_prompt": "n_samples",
    "image": "init_img",
    "strength": "denoising_strength",
    "output_format": "format",
    "eta": "ddim_eta",
}
"""The worker's field -> the seed's: errors name the field as the seed's client wrote it."""

RECENT = 10


class DockerizedRequest(RequestModel):
    """The body of seed 002's `/generate` and `/img2img`: every field its README lists."""

    model_config = ConfigDict(populate_by_name=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    api_key: str | None = None
    return_base64: bool = True
    synchronous_request: bool = False
    ddim_steps: int = Field(50, ge=1)
    scale: float = Field(7.5, ge=0, le=50)
    ddim_eta: float = Field(0.0, ge=0, le=1)
    H: int = Field(512, ge=64)
    W: int = Field(512, ge=64)
    seed: int | None = None
    n_samples: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    n_rows: int = Field(0, ge=0)
    sampler: str = "ddim"
    format: Literal["png", "jpg"] = "png"
    skip_grid: bool = True
    ckpt: str | dict[str, Any] = "default"
    init_img: str | None = None
    denoising_strength: float = Field(0.75, gt=0, le=1)
    upscale: bool = False
    post_upscale: bool = False
    noise_multiplier: float = 1.0
    # What describes the seed's own machine: accepted, no effect here.
    type: str | None = None
    outdir: str | None = None
    C: int | None = None
    f: int | None = None
    device: str | None = None
    config: str | None = None
    unet_bs: float | None = None
    turbo: bool | None = None
    precision: str | None = None
    from_file: str | bool | None = Field(None, alias="from-file")
    skip_save: bool | None = None
    fixed_code: bool | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _random(cls, value: Any) -> Any:
        return None if value is False else value


def add_routes(server: FastAPI, state: State) -> None:
    """Seed 002's routes on `server`."""

    def caller_of(key: str | None) -> Any:
        if (caller := state.caller(key)) is None:
            raise WorkerError("UNAUTHORIZED", "missing or invalid api_key", "api_key", status=401)
        return caller

    async def submit(request: DockerizedRequest, task: str) -> JSONResponse:
        caller = caller_of(request.api_key)
        inputs = _inputs(request, task, state)
        job = Job(
            model_key=state.model_keys[0],
            input=inputs,
            result_ttl_s=state.settings.result_ttl_s,
            owner=caller.owner,
            view={
                "return_base64": request.return_base64,
                "skip_grid": request.skip_grid,
                "n_rows": request.n_rows,
                "sampler": request.sampler,
            },
        )
        job, _ = await state.submit(job)
        if not request.synchronous_request:
            return JSONResponse({"task_id": job.id})
        job = await state.wait(job.id, state.settings.direct_wait_s) or job
        return await anyio.to_thread.run_sync(_status, job)  # a grid is drawn: off the event loop

    post = {
        "tags": ["sd-dockerized"],
        "response_model": None,
        "responses": {
            **responses(400, 401, 413, 422, 429, 500, 503),
            200: {"description": '{"task_id"}; with synchronous_request, the task as /status shows it'},
        },
    }

    @server.post("/generate", summary="Seed 002: queue a text-to-image task", **post)
    async def generate(body: DockerizedRequest) -> JSONResponse:
        return await submit(body, "txt2img")

    @server.post("/img2img", summary="Seed 002: queue an image-to-image task (init_img)", **post)
    async def img2img(body: DockerizedRequest) -> JSONResponse:
        return await submit(body, "img2img")

    async def owned(task_id: str, key: str | None) -> Job:
        caller = caller_of(key)
        job = await state.call(state.store.get, task_id)
        if job is None or not caller.sees(job) or job.view is None:
            raise WorkerError("NOT_FOUND", f"no task {task_id!r} (unknown, or its result expired)", status=404)
        return job

    # A security scheme, not a plain parameter: the document says where the key goes, so that clients and the
    # contract test's fuzzer send it there.
    key_query = Depends(
        APIKeyQuery(name="api_key", scheme_name="SeedApiKey", auto_error=False, description="Seed 002: ?api_key=")
    )

    @server.get(
        "/status/{task_id}",
        tags=["sd-dockerized"],
        summary="Seed 002: a task's Celery state; when done, its images",
        response_model=None,
        responses={
            **responses(401, 404, 500, 503),
            200: {"description": "Celery's state; SUCCESS: base64 images and metadata, or the image itself"},
        },
    )
    async def status(task_id: str, api_key: str | None = key_query) -> Response:
        return await anyio.to_thread.run_sync(_status, await owned(task_id, api_key))

    @server.get(
        "/recent",
        tags=["sd-dockerized"],
        summary="Seed 002: links to the caller's last 10 images",
        response_model=None,
        responses={**responses(401, 500, 503), 200: {"description": '{"recent": [{"task_id", "url", ...}]}'}},
    )
    async def recent(api_key: str | None = key_query) -> JSONResponse:
        caller = caller_of(api_key)
        links: list[dict[str, Any]] = []
        for job in await state.call(state.store.recent, caller.owner, 10 * RECENT):
            if job.view is None:  # another way in's job: not this API's to list
                continue
            images = (job.output or {}).get("images") or [] if isinstance(job.output, dict) else []
            for index, image in enumerate(images):
                if len(links) < RECENT and "base64" in image:
                    links.append(
                        {
                            "task_id": job.id,
                            "url": f"/image/{job.id}/{index}",
                            "prompt": (job.input or {}).get("prompt"),
                            "seed": image.get("seed"),
                            "created": job.finished_at,
                        }
                    )
        return JSONResponse({"recent": links})

    @server.get(
        "/image/{task_id}/{index}",
        tags=["sd-dockerized"],
        summary="Seed 002: one image of a finished task (the links /recent gives)",
        response_model=None,
        responses={
            **responses(401, 404, 500, 503),
            200: {"description": "The image", "content": {"image/png": {}, "image/jpeg": {}}},
        },
    )
    async def image(task_id: str, index: int, api_key: str | None = key_query) -> Response:
        job = await owned(task_id, api_key)
        images = _images(job)
        if not 0 <= index < len(images):
            raise WorkerError("NOT_FOUND", f"task {task_id!r} has no image {index}", status=404)
        return _picture(images[index]["base64"], images[index].get("format", "png"))


def _inputs(request: DockerizedRequest, task: str, state: State) -> dict[str, Any]:
    """The seed's body as the worker's generation input, checked now so that a bad field is a 422 at once."""

    def refuse(field: str, message: str) -> None:
        raise WorkerError("INVALID_INPUTS", f"{field}: {message}", field)

    if isinstance(request.ckpt, str) and request.ckpt not in ("default", *state.model_keys):
        refuse("ckpt", f"this worker serves one baked model ({state.model_keys[0]}); send 'default'")
    for field in ("upscale", "post_upscale"):
        if getattr(request, field):
            refuse(field, "no upscaler is baked into this worker")
    if request.noise_multiplier != 1:
        refuse("noise_multiplier", "only 1 (no change to the noise) is run here")
    if task == "img2img" and not request.init_img:
        refuse("init_img", "img2img needs an init_img")
    if task == "txt2img" and request.init_img:
        refuse("init_img", "init_img is for /img2img")
    inputs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.ddim_steps,
        "guidance_scale": request.scale,
        "width": request.W,
        "height": request.H,
        "seed": request.seed,
        "num_images_per_prompt": request.n_samples * request.n_iter,
        "scheduler": request.sampler,
        "output_format": "jpeg" if request.format == "jpg" else "png",
        "output": {"type": "base64"},  # /status and /recent hand the images out themselves, whatever OUTPUT_TYPE
    }
    if request.negative_prompt:
        inputs["negative_prompt"] = request.negative_prompt
    if request.ddim_eta:
        inputs["eta"] = request.ddim_eta
    if task == "img2img":
        inputs["image"] = request.init_img
        inputs["strength"] = request.denoising_strength  # the image is resized to W x H, as the seed does
    try:
        parsed, _ = parse_request(inputs)
        check_limits(parsed, state.settings)
    except WorkerError as err:
        raise _renamed(err) from None
    return inputs


def _renamed(err: WorkerError) -> WorkerError:
    """`err` naming the seed's field (`ddim_steps`, not `num_inference_steps`)."""
    if err.field in FIELDS:
        err.message = err.message.replace(err.field, FIELDS[err.field])
        err.field = FIELDS[err.field]
    if err.field == "n_samples":
        err.message += " (n_samples x n_iter images)"
    return err


def _images(job: Job) -> list[dict[str, Any]]:
    output = job.output if isinstance(job.output, dict) else {}
    return [image for image in output.get("images") or [] if "base64" in image]


def _status(job: Job) -> Response:
    """A task as seed 002's `/status` shows it."""
    answer: dict[str, Any] = {"task_id": job.id}
    if job.status == "IN_QUEUE":
        return JSONResponse({**answer, "state": "PENDING", "status": "waiting in the queue"})
    if job.status == "IN_PROGRESS":
        if job.progress:
            step, total = job.progress.get("step", 0), job.progress.get("total", 0)
            return JSONResponse({**answer, "state": "PROGRESS", "current": step, "total": total})
        return JSONResponse({**answer, "state": "STARTED", "status": "running"})
    images = _images(job)
    if job.status == "COMPLETED" and images and (job.http_status or 200) == 200:
        view = job.view or {}
        meta = job.output.get("$meta") or {}
        grid = None if view.get("skip_grid", True) else _grid(images, view.get("n_rows") or 0)
        if not view.get("return_base64", True):
            return _picture(grid, "png") if grid else _picture(images[0]["base64"], images[0].get("format", "png"))
        inputs = job.input or {}
        metadata = {
            "prompt": inputs.get("prompt"),
            "negative_prompt": inputs.get("negative_prompt"),
            "seed": meta.get("seed"),
            "ddim_steps": meta.get("num_inference_steps"),
            "scale": meta.get("guidance_scale"),
            "ddim_eta": meta.get("eta") or 0.0,
            "H": meta.get("height"),
            "W": meta.get("width"),
            "sampler": view.get("sampler"),
            "format": "jpg" if meta.get("output_format") == "jpeg" else "png",
            "n_samples": len(images),
            "denoising_strength": meta.get("strength"),
            "model": meta.get("MODEL_ID"),
        }
        body = {**answer, "state": "SUCCESS", "images": images, "metadata": metadata}
        if grid is not None:
            body["grid"] = grid
        return JSONResponse(body)
    if job.status == "CANCELLED":
        return JSONResponse({**answer, "state": "REVOKED", "status": "cancelled"})
    error = dict(job.error or (job.output or {}).get("$error") or {"code": "FAILED", "message": "the task failed"})
    if error.get("field") in FIELDS:
        error = _renamed(WorkerError(error["code"], error.get("message", ""), error["field"])).to_dict()
    return JSONResponse({**answer, "state": "FAILURE", "error": error.get("message"), "$error": error})


def _grid(images: list[dict[str, Any]], columns: int) -> str:
    """The samples in one picture, `columns` to a row (all in one row by default), as base64 PNG."""
    pictures = [Image.open(io.BytesIO(base64.b64decode(image["base64"]))).convert("RGB") for image in images]
    columns = min(columns or len(pictures), len(pictures))
    rows = math.ceil(len(pictures) / columns)
    width, height = pictures[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, picture in enumerate(pictures):
        grid.paste(picture, ((index % columns) * width, (index // columns) * height))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _picture(data: str, format: str) -> Response:
    media = "image/jpeg" if format in ("jpeg", "jpg") else f"image/{format}"
    return Response(base64.b64decode(data), media_type=media)
