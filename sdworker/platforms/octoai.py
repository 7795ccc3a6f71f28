"""Seed 003's service (an OctoAI container run on Fair): `POST /infer`, the readiness at `GET /` that its
`wait_for_server` polls, and idle self-shutdown (IDLE_SHUTDOWN_S) for a node that starts the worker on demand.

`POST /infer` takes `{"prompt": {"text": "..."}}` (OctoAI's Text type; any other generation input may sit beside
it) with the key as `Authorization: Bearer <key>`, the way `octoai.client.Client().infer(endpoint_url, inputs)`
sends it, and answers `{"output": {"image_b64": "..."}}` once the job is done. The job goes through the same
store and worker as every other way in.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from ..errors import WorkerError
from ..jobs import Job
from ..schema import RequestModel
from .access import BEARER, MAX_JSON_DEPTH, State, direct_answer, nested_too_deep
from .answers import responses

log = logging.getLogger("sdworker")


class OctoText(RequestModel):
    """OctoAI's Text type."""

    model_config = ConfigDict(extra="ignore")
    text: str = Field(min_length=1)


class InferRequest(RequestModel):
    """Seed 003's inputs: the prompt as OctoAI's Text, and any other generation input beside it."""

    model_config = ConfigDict(extra="allow")
    prompt: OctoText | str


class InferOutput(BaseModel):
    """OctoAI's Image type: the first image as base64 (its URL instead, with an `output` of type s3)."""

    image_b64: str | None = None
    image_url: str | None = None


class InferAnswer(BaseModel):
    """What `Client().infer` returns: `output.image_b64`; the worker's `$meta` beside it."""

    model_config = ConfigDict(populate_by_name=True)
    output: InferOutput
    meta: dict[str, Any] | None = Field(None, alias="$meta")


class Readiness(BaseModel):
    """`GET /`: 200 `ready` once the model is loaded, 503 `loading` (or `draining`) before."""

    status: str


def add_routes(server: FastAPI, state: State) -> None:
    """Seed 003's `GET /` and `POST /infer` on `server`."""

    @server.get(
        "/",
        tags=["octoai"],
        summary="Readiness for seed 003's wait_for_server: 200 once the model is loaded",
        responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "Not ready yet"}},
        response_model=None,
    )
    async def readiness() -> JSONResponse:
        ready = state.ready() and not state.draining
        status = "ready" if ready else "draining" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=200 if ready else 503)

    @server.post(
        "/infer",
        tags=["octoai"],
        summary="OctoAI's infer: a prompt in, output.image_b64 out",
        responses=responses(400, 401, 409, 413, 422, 500, 503, 504, ok=InferAnswer),
        response_model=None,
    )
    async def infer(
        body: InferRequest, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> JSONResponse:
        if (caller := state.caller(credentials.credentials if credentials else None)) is None:
            raise WorkerError("UNAUTHORIZED", "missing or invalid API key (Authorization: Bearer <key>)", status=401)
        inputs = dict(body.model_extra or {})
        if nested_too_deep(inputs):
            raise WorkerError("INVALID_JSON", f"the body is nested deeper than {MAX_JSON_DEPTH} levels", status=400)
        inputs["prompt"] = body.prompt.text if isinstance(body.prompt, OctoText) else body.prompt
        job = Job(
            model_key=state.model_keys[0],
            input=inputs,
            result_ttl_s=state.settings.runsync_result_ttl_s,
            owner=caller.owner,
        )
        job, _ = await state.submit(job, full_status=503)  # a full queue: 503, which OctoAI's client retries
        job = await state.wait(job.id, state.settings.direct_wait_s) or job
        if job.status != "COMPLETED" or not isinstance(job.output, dict) or "images" not in job.output:
            return direct_answer(job, state.settings.direct_wait_s)  # the error, as a direct call gives it
        first = job.output["images"][0]
        output = {"image_b64": first["base64"]} if "base64" in first else {"image_url": first.get("url")}
        return JSONResponse({"output": output, "$meta": job.output.get("$meta")})


def watch_idle(state: State, idle_s: float) -> threading.Thread:
    """Start a thread that, once the loaded worker has had no request with an accepted key and no job (queued or
    running) for `idle_s`, sends this process SIGTERM: the server drains (nothing is running) and exits 0."""

    def watch() -> None:
        while True:
            time.sleep(min(1.0, idle_s / 4))
            try:
                counts = state.store.stats(state.model_keys[0])["jobs"]
            except Exception:  # the store unreachable: not idle, as far as anyone knows
                state.last_activity = time.monotonic()
                continue
            if counts.get("inQueue", 0) or counts.get("inProgress", 0) or not state.ready():
                state.last_activity = time.monotonic()  # busy, or still loading: idle time starts when ready
            elif time.monotonic() - state.last_activity >= idle_s:
                log.info("idle for %g s (IDLE_SHUTDOWN_S): shutting down", idle_s)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="idle-shutdown", daemon=True)
    thread.start()
    return thread
