"""Seed 003's service (an OctoAI container run on Fair): `POST /infer`, the readiness at `GET /` that its
`wait_for_server` polls, OctoAI's `GET /healthcheck`, and idle self-shutdown (IDLE_SHUTDOWN_S) for a node that
starts the worker on demand.

`POST /infer` takes `{"prompt": {"text": "..."}}` (OctoAI's Text type; any other generation input may sit beside
it) with the key as `Authorization: Bearer <key>`, the way `octoai.client.Client().infer(endpoint_url, inputs)`
sends it, and answers `{"output": {"image_b64": "..."}}` once the job is done. With `X-OctoAI-Async: 1` (what
`Client().infer_async` sends) it answers at once with the job's `response_id` and `poll_url`; the poll answers
`status` (`pending`, `running`, `completed`) and, once completed, the `response_url` of the same answer `infer`
gives, and a job that failed is its error, which the client raises. The job goes through the same store and
worker as every other way in.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def _text_too(schema: dict[str, Any]) -> None:
    """The document says what `_text` reads: a Text, or the text itself."""
    schema["properties"]["prompt"] = {"anyOf": [schema["properties"]["prompt"], {"type": "string", "minLength": 1}]}


class InferRequest(RequestModel):
    """Seed 003's inputs: the prompt as OctoAI's Text (or plain text), and any other generation input beside it."""

    model_config = ConfigDict(extra="allow", json_schema_extra=lambda schema: _text_too(schema))
    prompt: OctoText

    @field_validator("prompt", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        """Plain text is a Text: one type, so an error names `prompt.text`, not a branch of a union."""
        return {"text": value} if isinstance(value, str) else value


class InferOutput(BaseModel):
    """OctoAI's Image type: the first image as base64 (its URL instead, with an `output` of type s3)."""

    image_b64: str | None = None
    image_url: str | None = None


class InferAnswer(BaseModel):
    """What `Client().infer` returns: `output.image_b64`; the worker's `$meta` beside it."""

    model_config = ConfigDict(populate_by_name=True)
    output: InferOutput
    meta: dict[str, Any] | None = Field(None, alias="$meta")


class Future(BaseModel):
    """What `Client().infer_async` reads: the job's id and where to poll it."""

    response_id: str
    poll_url: str


class FutureState(BaseModel):
    """A poll's answer: `completed` with the `response_url` of the answer, else `pending` or `running`."""

    response_id: str
    status: Literal["pending", "running", "completed"]
    response_url: str | None = None


class Health(BaseModel):
    """OctoAI's `GET /healthcheck`: `RUNNING` (200) once the model is loaded, else 503."""

    status: str
    async_enable: bool


NOT_FOUND = WorkerError("NOT_FOUND", "no such response_id", "response_id", status=404)


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
        ready, status = readiness_of(state, ("ready", "draining", "loading"))
        return JSONResponse({"status": status}, status_code=200 if ready else 503)

    @server.get(
        "/healthcheck",
        tags=["octoai"],
        summary="OctoAI's health check: 200 RUNNING once the model is loaded",
        responses={200: {"model": Health}, 503: {"model": Health, "description": "Not ready yet"}},
        response_model=None,
    )
    async def healthcheck() -> JSONResponse:
        ready, status = readiness_of(state, ("RUNNING", "SHUTTING_DOWN", "SETUP_SERVICE"))
        return JSONResponse({"status": status, "async_enable": True}, status_code=200 if ready else 503)

    def caller_of(credentials: HTTPAuthorizationCredentials | None) -> Any:
        if (caller := state.caller(credentials.credentials if credentials else None)) is None:
            raise WorkerError("UNAUTHORIZED", "missing or invalid API key (Authorization: Bearer <key>)", status=401)
        return caller

    @server.post(
        "/infer",
        tags=["octoai"],
        summary="OctoAI's infer: a prompt in, output.image_b64 out (with X-OctoAI-Async: 1, a future to poll)",
        responses={
            **responses(400, 401, 409, 413, 422, 500, 503, 504, ok=InferAnswer),
            202: {"model": Future, "description": "With X-OctoAI-Async: 1: the job is queued; poll `poll_url`"},
        },
        response_model=None,
    )
    async def infer(
        body: InferRequest,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        x_octoai_async: Annotated[str | None, Header(description="`1`: answer a future at once")] = None,
    ) -> JSONResponse:
        caller = caller_of(credentials)
        inputs = dict(body.model_extra or {})
        if nested_too_deep(inputs):
            raise WorkerError("INVALID_JSON", f"the body is nested deeper than {MAX_JSON_DEPTH} levels", status=400)
        inputs["prompt"] = body.prompt.text
        later = (x_octoai_async or "").strip().lower() in ("1", "true")
        job = Job(
            model_key=state.model_keys[0],
            input=inputs,
            result_ttl_s=state.settings.result_ttl_s if later else state.settings.runsync_result_ttl_s,
            owner=caller.owner,
        )
        job, _ = await state.submit(job, full_status=503)  # a full queue: 503, which OctoAI's client retries
        if later:
            poll = str(request.url_for("octoai_future", response_id=job.id))
            return JSONResponse({"response_id": job.id, "poll_url": poll}, status_code=202)
        job = await state.wait(job.id, state.settings.direct_wait_s) or job
        return answer(job, state.settings.direct_wait_s)

    async def owned(response_id: str, credentials: HTTPAuthorizationCredentials | None) -> Job:
        caller = caller_of(credentials)
        job = await state.call(state.store.get, response_id)
        if job is None or not caller.sees(job):
            raise NOT_FOUND
        return job

    @server.get(
        "/futures/{response_id}",
        name="octoai_future",
        tags=["octoai"],
        summary="OctoAI's poll of an async infer: pending, running, or completed with its response_url",
        responses=responses(401, 404, 409, 422, 500, 503, 504, ok=FutureState),
        response_model=None,
    )
    async def future(
        response_id: str, request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> JSONResponse:
        job = await owned(response_id, credentials)
        if not job.final:
            status = "running" if job.status == "IN_PROGRESS" else "pending"
            return JSONResponse({"response_id": job.id, "status": status})
        if not succeeded(job):
            return answer(job, 0)  # its error, which the client raises rather than polling on
        result = str(request.url_for("octoai_result", response_id=job.id))
        return JSONResponse({"response_id": job.id, "status": "completed", "response_url": result})

    @server.get(
        "/futures/{response_id}/result",
        name="octoai_result",
        tags=["octoai"],
        summary="An async infer's answer, once completed: what infer itself answers",
        responses=responses(401, 404, 409, 422, 500, 503, 504, ok=InferAnswer),
        response_model=None,
    )
    async def result(
        response_id: str, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> JSONResponse:
        job = await owned(response_id, credentials)
        if not job.final:
            raise WorkerError(
                "NOT_READY", f"{response_id} is still {job.status}: poll until it is completed", "response_id", 409
            )
        return answer(job, 0)


def readiness_of(state: State, words: tuple[str, str, str]) -> tuple[bool, str]:
    """Whether the worker takes jobs, and its state in `words` (ready, draining, loading), as a route names them."""
    ready = state.ready() and not state.draining
    return ready, words[0] if ready else words[1] if state.draining else words[2]


def succeeded(job: Job) -> bool:
    """Whether the job ended with images: what OctoAI's `output` holds."""
    return job.status == "COMPLETED" and isinstance(job.output, dict) and "images" in job.output


def answer(job: Job, waited: float) -> JSONResponse:
    """What infer answers for `job`: OctoAI's output, else the error as a direct call gives it."""
    if not succeeded(job):
        return direct_answer(job, waited)
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
