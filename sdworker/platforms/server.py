"""The job server: app.py's handlers behind the HTTP APIs existing clients speak (see PROTOCOLS.md).

- `POST /` (and each route app.py registers): a direct call, answered when the job is done, as Potassium does.
- `POST /start/v4/`, `/check/v4/`: Banana's call-ID API, with its long-poll.
- `/v2/{endpoint_id}/run|runsync|status|stream|cancel|retry|purge-queue|health`: RunPod's endpoint API.
- `POST /_k/warmup`, `GET /__status__`, `GET /_k/status`: Potassium's own routes; `GET /health`: readiness.
- `GET /docs`, `/redoc`, `/openapi.json`: the API's docs, public, their scripts served from here (no CDN).
- `GET /` (readiness) and `POST /infer`: seed 003's OctoAI service (octoai.py).
- `POST /generate`, `/img2img`, `GET /status/<id>`, `/recent`: seed 002's Flask+Celery API (dockerized.py).

Every way in makes the same job in the same store; the worker loop runs it. The server holds no model.
A job belongs to the API key that made it: another key is told it does not exist (404, or Banana's "no job"),
purges only its own queued jobs and has its own idempotency keys; ADMIN_API_KEYS see and manage all.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

import anyio
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import metrics
from ..config import Settings
from ..errors import WorkerError
from ..jobs import Job, JobStore
from ..schema import RequestModel
from ..urls import check_url
from . import dockerized, octoai
from .access import (
    BANANA_KEY,
    BEARER,
    MAX_JSON_DEPTH,
    QUERY_KEY,
    Caller,
    State,
    direct_answer,
    error_answer,
    nested_too_deep,
)
from .answers import (
    BananaAnswer,
    BananaRefusal,
    EndpointHealth,
    Health,
    JobRef,
    JobStatus,
    PotassiumStatus,
    Purged,
    StreamAnswer,
    direct_body,
    responses,
)

log = logging.getLogger("sdworker")


def _shallow(value: Any) -> Any:
    if nested_too_deep(value):
        raise PydanticCustomError("json_too_deep", "nested deeper than {limit} levels", {"limit": MAX_JSON_DEPTH})
    return value


class Banana(RequestModel):
    """A Banana v4 body; other fields are ignored, as the hosted API did. Types are strict: `"startOnly": 0` is
    refused, not read as false."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)
    id: str | None = None
    created: int | None = None
    api_key: str = Field(alias="apiKey")


class BananaStart(Banana):
    """Banana's start/v4 body: the inputs of a call."""

    model_key: str | None = Field(None, alias="modelKey")
    model_inputs: Annotated[dict[str, Any], AfterValidator(_shallow)] = Field(alias="modelInputs")
    start_only: bool = Field(False, alias="startOnly")


class BananaCheck(Banana):
    """Banana's check/v4 body: which call."""

    call_id: str = Field(alias="callID")
    long_poll: bool = Field(False, alias="longPoll")


class Policy(BaseModel):
    """RunPod's per-job policy."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)
    execution_timeout: int | None = Field(None, alias="executionTimeout", ge=1000, description="ms")
    ttl: int | None = Field(None, ge=1000, description="ms")


class RunRequest(RequestModel):
    """A RunPod /run or /runsync body."""

    model_config = ConfigDict(extra="ignore", strict=True)
    input: Annotated[dict[str, Any], AfterValidator(_shallow)]
    webhook: str | None = Field(None, pattern=r"^https?://[^/?#\s]+", description="A public http(s) URL")
    policy: Policy | None = None


@dataclass(frozen=True)
class Endpoint:
    """A RunPod route's endpoint (the model key) and its caller."""

    model_key: str
    caller: Caller


class Measured:
    """ASGI middleware: each HTTP request counted and timed by method, route template and status (metrics)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "(no route)")  # a template: job ids make no new series
            metrics.observe_request(scope["method"], route, status[0], time.perf_counter() - started)


class JsonBodies:
    """ASGI middleware, one rule for every route: a body is read as JSON whatever its Content-Type says. `curl -d`
    sends a form's type, other clients none; the direct routes read such bodies as JSON, and the routes with a
    declared body (RunPod, Banana, seed 002, OctoAI) now do too, instead of finding no body. A body that is not
    JSON is a 400 on every route, as before. (No cookie or other ambient credential exists here, so a browser's
    form post gains nothing: every route still wants its key.)"""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if not (kind == b"application/json" or kind.endswith(b"+json")):
                headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over MAX_BODY_BYTES with 413, whether or not the client declared a Content-Length."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the body is over MAX_BODY_BYTES ({self.limit} bytes)"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            error = WorkerError("PAYLOAD_TOO_LARGE", message, status=413)
            response = JSONResponse({"error": message, "$error": error.to_dict()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            chunk = await receive()
            received += len(chunk.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, detail=message)
            return chunk

        return await self.app(scope, counted, send)


NOT_JSON = "the body is not valid JSON, or is nested too deep"


HTTP_ERRORS = {
    400: ("INVALID_JSON", NOT_JSON),  # FastAPI's "error parsing the body": a RecursionError, say
    404: ("NOT_FOUND", "no such route"),
    405: ("METHOD_NOT_ALLOWED", "this route does not take that method"),
    413: ("PAYLOAD_TOO_LARGE", "the body is over MAX_BODY_BYTES"),
}


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains before it stops: new jobs are refused with 503, status reads
    and long-polls are still answered, /health says draining, and the running jobs get SHUTDOWN_GRACE_S to
    finish (what outlasts it goes back to the queue). A second signal, or Ctrl-C, stops at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain, self.draining = drain, False

    def handle_exit(self, sig: int, frame: Any) -> None:
        """uvicorn's signal handler."""
        if self.draining or sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        threading.Thread(target=self._drain_then_exit, name="drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.drain()
        finally:
            self.should_exit = True


DOCS_ASSETS = "/docs/assets"
"""Where the API docs' scripts, stylesheet and icon are served from (fastapi-offline's copies)."""


def serve_docs(server: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc`, public as FastAPI's own are, with their scripts, stylesheet and icon
    served by the worker from the fastapi-offline package under DOCS_ASSETS: the pages work with no network (a
    worker behind a firewall, a laptop offline), where FastAPI's own load them from a CDN."""
    server.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    def under(request: Request, path: str) -> str:
        return request.scope.get("root_path", "").rstrip("/") + path  # behind a proxy's prefix, as FastAPI does

    @server.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=under(request, server.openapi_url),
            title=f"{server.title} - Swagger UI",
            oauth2_redirect_url=under(request, server.swagger_ui_oauth2_redirect_url),
            swagger_js_url=under(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=under(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            swagger_favicon_url=under(request, f"{DOCS_ASSETS}/favicon.png"),
        )

    @server.get(server.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @server.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=under(request, server.openapi_url),
            title=f"{server.title} - ReDoc",
            redoc_js_url=under(request, f"{DOCS_ASSETS}/redoc.standalone.js"),
            redoc_favicon_url=under(request, f"{DOCS_ASSETS}/favicon.png"),
            with_google_fonts=False,
        )


def create_server(
    settings: Settings, store: JobStore, routes: dict[str, bool], ready: Callable[[], bool] = lambda: True
) -> FastAPI:
    """The FastAPI app: every protocol's routes over one job store. `routes` are app.py's (route -> is it
    a background route); `ready` says whether a worker has its model loaded."""
    state = State(settings, store, routes, ready)
    server = FastAPI(
        title="sd-worker",
        description="Stable Diffusion worker: direct calls, Banana start/check v4, RunPod v2, Potassium routes.",
        version="1",
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: serve_docs serves them from here
        redoc_url=None,
    )
    server.state.jobs = state
    serve_docs(server)

    server.add_middleware(JsonBodies)
    server.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    server.add_middleware(Measured)

    @server.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every error the framework raises (a body it cannot parse, an unknown route, a wrong method, a body
        over the limit) answers like the worker's own: `error` and `$error`."""
        code, message = HTTP_ERRORS.get(exc.status_code, (f"HTTP_{exc.status_code}", str(exc.detail)))
        if exc.status_code == 413:
            message = str(exc.detail)
        error = WorkerError(code, message, status=exc.status_code)
        headers = exc.headers
        if exc.status_code == 405:  # every method the path takes (Starlette names only its first route's)
            methods = {
                method
                for route in server.router.routes
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
                for method in route.methods or ()
            }
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods - {"HEAD"}))}
        return error_answer(error, headers)

    @server.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A body that does not fit the route: 422 naming the field (400 when it is not JSON at all)."""
        problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        field = ".".join(str(part) for part in problem["loc"] if part != "body")
        if problem.get("type") in ("json_invalid", "json_too_deep"):
            message = NOT_JSON if problem["type"] == "json_invalid" else f"{field}: {problem['msg']}"
            return error_answer(WorkerError("INVALID_JSON", message, field or None, status=400))
        if field:
            message = f"{field}: {problem['msg']}"
        else:
            field, message = "body", "the body must be a JSON object with the route's fields"
        error = WorkerError("INVALID_REQUEST", message, field, status=422)
        refused(request, error)
        if request.url.path.startswith(("/start/", "/check/")):  # the Banana answer too: its client reads message
            body = {**_banana(None, f"error: invalid request: {message}"), "$error": error.to_dict()}
            return JSONResponse(body, status_code=422)
        return error_answer(error)

    async def keyed(
        request: Request,
        header_key: Annotated[str | None, Depends(BANANA_KEY)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        query_key: Annotated[str | None, Depends(QUERY_KEY)],
    ) -> Caller:
        """The caller of a route that takes its key three ways: the three dependencies document them (OpenAPI),
        `caller_of` reads them all, so that a bad key beside a good one is refused."""
        if (caller := state.caller_of(request)) is None:
            raise WorkerError("UNAUTHORIZED", "missing or invalid API key (X-BANANA-API-KEY header)", status=401)
        return caller

    # Health and Potassium's routes.
    @server.get(
        "/health",
        tags=["health"],
        summary="Liveness and readiness: 200 once a worker's model is loaded",
        responses={200: {"model": Health}, 503: {"model": Health, "description": "Not ready"}},
    )
    async def health() -> JSONResponse:
        try:
            await state.call(state.store.ping)
            reachable = True
        except WorkerError:
            reachable = False
        ready = state.ready() and not state.draining and reachable
        status = "ready" if ready else "loading"
        if not reachable or state.draining:
            status = "draining" if state.draining else "store unavailable"
        body = {"status": status, "model_keys": state.model_keys}
        return JSONResponse(body, status_code=200 if ready else 503)

    @server.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (any accepted key, an admin key when there are several; METRICS_PORT serves "
        "them without one)",
        response_model=None,
        responses={
            200: {
                "description": "Prometheus' text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **responses(401, 403),
        },
    )
    async def metrics_text(caller: Caller = Depends(keyed)) -> PlainTextResponse:
        if state.counted_owner(caller) is not None:  # the counts are every key's: not for one tenant's eyes
            raise WorkerError(
                "FORBIDDEN",
                "with more than one API key, /metrics (every key's counts) needs an ADMIN_API_KEYS key; "
                "or serve it on METRICS_PORT",
                status=403,
            )
        data = await state.call(generate_latest)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    @server.post("/_k/warmup", tags=["potassium"], summary="Potassium's warm-up call", responses=responses(413))
    async def warmup() -> dict:
        return {"warm": True}

    @server.get(
        "/__status__",
        tags=["potassium"],
        summary="Potassium's status",
        responses=responses(500, 503, ok=PotassiumStatus),
    )
    @server.get(
        "/_k/status",
        tags=["potassium"],
        summary="Potassium's status",
        responses=responses(500, 503, ok=PotassiumStatus),
    )
    async def potassium_status(request: Request) -> dict:
        running = (await state.call(state.store.stats, state.model_keys[0]))["jobs"]["inProgress"]
        keyed = state.caller_of(request, use=False) is not None  # a status read keeps no idle worker up
        return {
            "gpu_available": state.ready() and running == 0,
            "sequence_number": state.sequence_number if keyed else 0,  # the request count: for a key's eyes only
            "idle_time": 0 if running else int((time.time() - state.last_request) * 1000),
            "inference_time": 0,
        }

    octoai.add_routes(server, state)  # seed 003: GET / (readiness) and POST /infer
    dockerized.add_routes(server, state)  # seed 002: /generate, /img2img, /status/<id>, /recent, /image/<id>/<n>

    # Banana start/check v4.
    def model_key_of(given: str | None) -> str:
        if not given:
            return state.model_keys[0]
        if given not in state.model_keys:
            raise WorkerError("UNKNOWN_MODEL_KEY", f"unknown modelKey {given!r}; this server serves {state.model_keys}")
        return given

    def banana_view(body: Banana, job: Job, started: bool = False) -> dict:
        if job.status == "COMPLETED":
            return _banana(body, "success", job, finished=True)
        if job.final:
            return _banana(body, f"error: job {job.status.lower()}: {job.error_message()}", job)
        return _banana(body, "" if started else "running", job)

    def banana_refusal(request: Request, body: Banana, err: WorkerError, message: str | None = None) -> dict:
        """A refusal as Banana's clients read it (200, "error" in the message), logged as every refusal is."""
        refused(request, err)
        return _banana(body, message or f"error: {err.code}: {err.message}")

    async def start(body: BananaStart, request: Request) -> dict:
        if (caller := state.caller(body.api_key)) is None:
            return banana_refusal(request, body, BANANA_UNAUTHORIZED, "error: invalid apiKey")
        try:
            job = Job(
                id=f"call_{uuid.uuid4()}",
                model_key=model_key_of(body.model_key),
                input=body.model_inputs,
                result_ttl_s=settings.result_ttl_s,
                idempotency_key=caller.scoped("banana", body.id),
                owner=caller.owner,
            )
            job, _ = await state.submit(job)
        except WorkerError as err:
            if err.status == 503:  # draining, or the store unreachable: a status the client retries on
                raise
            return banana_refusal(request, body, err)
        if not body.start_only and not job.final:
            job = await state.wait(job.id, settings.banana_wait_s) or job
        return banana_view(body, job, started=True)

    async def check(body: BananaCheck, request: Request) -> dict:
        if (caller := state.caller(body.api_key)) is None:
            return banana_refusal(request, body, BANANA_UNAUTHORIZED, "error: invalid apiKey")
        job = await state.call(state.store.get, body.call_id)
        if job is None or not caller.sees(job):
            return _banana(body, f"error: no job with callID {body.call_id!r} (unknown, or its result expired)")
        if body.long_poll and not job.final:
            job = await state.wait(job.id, settings.banana_wait_s) or job
        return banana_view(body, job)

    banana = {
        "tags": ["banana"],
        "response_model": None,
        "responses": {**responses(400, 413, 500, 503, ok=BananaAnswer), 422: {"model": BananaRefusal}},
    }
    for path in ("/start/v4", "/start/v4/"):
        server.post(path, **banana, summary="Banana v4: start a call", include_in_schema=path.endswith("/"))(start)
    for path in ("/check/v4", "/check/v4/"):
        server.post(path, **banana, summary="Banana v4: check a call", include_in_schema=path.endswith("/"))(check)

    # RunPod's endpoint API.
    served = Path(
        description="The endpoint id: a model key this server serves", json_schema_extra={"enum": state.model_keys}
    )

    def endpoint(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        endpoint_id: str = served,
    ) -> Endpoint:
        if (caller := state.caller(credentials.credentials if credentials else None)) is None:
            raise WorkerError("UNAUTHORIZED", "missing or invalid API key (Authorization: Bearer <key>)", status=401)
        if endpoint_id not in state.model_keys:
            raise WorkerError(
                "UNKNOWN_ENDPOINT", f"no endpoint {endpoint_id!r}; this server serves {state.model_keys}", status=404
            )
        return Endpoint(endpoint_id, caller)

    async def job_of(ep: Endpoint, job_id: str) -> Job:
        job = await state.call(state.store.get, job_id)
        if job is None or job.model_key != ep.model_key or not ep.caller.sees(job):
            raise WorkerError("NOT_FOUND", f"no job {job_id!r} (unknown, or its result expired)", status=404)
        return job

    async def new_job(ep: Endpoint, body: RunRequest, request: Request, result_ttl_s: int) -> Job:
        if body.webhook:  # refused now with a 4xx, and checked again when it is sent
            await anyio.to_thread.run_sync(check_url, body.webhook, "webhook", settings)
        policy = body.policy or Policy()
        idempotency = request.headers.get("idempotency-key")
        return Job(
            model_key=ep.model_key,
            input=body.input,
            webhook=body.webhook,
            execution_timeout_s=policy.execution_timeout / 1000 if policy.execution_timeout else None,
            ttl_s=policy.ttl / 1000 if policy.ttl else settings.job_ttl_s,
            result_ttl_s=result_ttl_s,
            idempotency_key=ep.caller.scoped(f"runpod:{ep.model_key}", idempotency),
            owner=ep.caller.owner,
        )

    def runpod(*statuses: int, ok: type[BaseModel], **extra: Any) -> dict[str, Any]:
        """A RunPod route's tag and documented answers: each can be 401, 404, 422, 500 and 503."""
        documented = responses(401, 404, 422, 500, 503, *statuses, ok=ok, **extra)
        return {"tags": ["runpod"], "responses": documented, "response_model": None}

    job_links = {  # for clients and fuzzers: what to do with the id a new job answers
        name: {
            "operationId": name,
            "parameters": {"endpoint_id": "$request.path.endpoint_id", "job_id": "$response.body#/id"},
        }
        for name in ("status", "stream", "cancel", "retry")
    }

    @server.post(
        "/v2/{endpoint_id}/run",
        **runpod(400, 413, 429, ok=JobRef, links=job_links),
        summary="Queue a job",
        operation_id="run",
    )
    async def run(body: RunRequest, request: Request, ep: Endpoint = Depends(endpoint)) -> dict:
        job, _ = await state.submit(await new_job(ep, body, request, settings.result_ttl_s))
        return {"id": job.id, "status": job.status}

    @server.post(
        "/v2/{endpoint_id}/runsync",
        **runpod(400, 413, 429, ok=JobStatus, links=job_links),
        summary="Run a job and wait for it",
        operation_id="runsync",
    )
    async def runsync(body: RunRequest, request: Request, ep: Endpoint = Depends(endpoint)) -> dict:
        job, _ = await state.submit(await new_job(ep, body, request, settings.runsync_result_ttl_s))
        job = await state.wait(job.id, settings.runsync_wait_s) or job
        return job.status_body()

    @server.get(
        "/v2/{endpoint_id}/status/{job_id}",
        **runpod(ok=JobStatus),
        summary="A job's status, progress and output",
        operation_id="status",
    )
    async def status(job_id: str, ep: Endpoint = Depends(endpoint)) -> dict:
        return (await job_of(ep, job_id)).status_body()

    @server.get(
        "/v2/{endpoint_id}/stream/{job_id}",
        **runpod(ok=StreamAnswer),
        summary="A job's progress while it runs, then its output, each handed out once",
        operation_id="stream",
    )
    async def stream(job_id: str, ep: Endpoint = Depends(endpoint)) -> dict:
        job = await job_of(ep, job_id)
        chunks = []
        step = (job.progress or {}).get("step")
        if job.status == "IN_PROGRESS" and step and await state.call(state.store.mark_streamed, job.id, step):
            chunks.append({"output": {"progress": job.progress}})  # while it runs: each new step, once
        if job.status == "COMPLETED" and await state.call(state.store.mark_streamed, job.id):
            chunks.append({"output": job.output})
        return {"id": job.id, "status": job.status, "stream": chunks}

    @server.post(
        "/v2/{endpoint_id}/cancel/{job_id}", **runpod(ok=JobRef), summary="Cancel a job", operation_id="cancel"
    )
    async def cancel(job_id: str, ep: Endpoint = Depends(endpoint)) -> dict:
        await job_of(ep, job_id)
        job = await state.call(state.store.cancel, job_id)
        return {"id": job_id, "status": job.status if job else "CANCELLED"}

    @server.post(
        "/v2/{endpoint_id}/retry/{job_id}",
        **runpod(409, ok=JobRef),
        summary="Run a failed or timed-out job again",
        operation_id="retry",
    )
    async def retry(job_id: str, ep: Endpoint = Depends(endpoint)) -> dict:
        job = await job_of(ep, job_id)
        if job.status not in ("FAILED", "TIMED_OUT", "CANCELLED"):
            raise WorkerError(
                "NOT_RETRYABLE",
                f"job {job_id!r} is {job.status}; only failed, timed-out or cancelled jobs can be retried",
                status=409,
            )
        job = await state.call(state.store.retry, job_id) or job
        return {"id": job.id, "status": job.status}

    @server.post(
        "/v2/{endpoint_id}/purge-queue",
        **runpod(ok=Purged),
        summary="Cancel every queued job of this key",
        operation_id="purge_queue",
    )
    async def purge_queue(ep: Endpoint = Depends(endpoint)) -> dict:
        owner = None if ep.caller.admin else ep.caller.owner  # a key purges its own jobs; an admin key, all
        return {"removed": await state.call(state.store.purge, ep.model_key, owner), "status": "completed"}

    @server.get(
        "/v2/{endpoint_id}/health",
        **runpod(ok=EndpointHealth),
        summary="Job counts and workers",
        operation_id="endpoint_health",
    )
    async def endpoint_health(ep: Endpoint = Depends(endpoint)) -> dict:
        return await state.call(state.store.stats, ep.model_key, state.counted_owner(ep.caller))

    @server.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        """Whatever else goes wrong: logged with its traceback, answered without it."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error_answer(
            WorkerError("INTERNAL_ERROR", "internal error; the server's log has the details", status=500)
        )

    @server.exception_handler(WorkerError)
    async def worker_error(request: Request, err: WorkerError) -> JSONResponse:
        refused(request, err)
        return error_answer(err)

    # Direct calls: each route app.py registers, answered when its job is done, as Potassium does.
    def direct_route(route: str) -> Callable[..., Any]:
        async def direct(request: Request, caller: Caller = Depends(keyed)) -> JSONResponse:
            try:
                payload = await request.json()
            except (ValueError, RecursionError):
                raise WorkerError("INVALID_JSON", NOT_JSON, status=400) from None
            if nested_too_deep(payload):
                raise WorkerError("INVALID_JSON", f"the body is nested deeper than {MAX_JSON_DEPTH} levels", status=400)
            request_id = request.headers.get("x-banana-request-id")
            job = Job(
                model_key=state.model_keys[0],
                route=route,
                input=payload,
                result_ttl_s=settings.runsync_result_ttl_s,
                idempotency_key=caller.scoped("direct", request_id),
                owner=caller.owner,
            )
            job, _ = await state.submit(job, full_status=503)  # a full queue: 503, which Banana's v6 client retries
            if state.routes[route]:
                return JSONResponse({"started": True})
            job = await state.wait(job.id, settings.direct_wait_s) or job
            return direct_answer(job, settings.direct_wait_s)

        return direct

    for route in state.routes:
        server.post(
            route,
            tags=["direct"],
            summary=f"Call app.py's handler for {route} and wait for its answer",
            description="The body is the handler's input (this template's `/`: a generation request; see README).",
            responses={
                200: {"description": "The handler's answer", "content": {"application/json": {"schema": {}}}},
                **responses(400, 401, 409, 413, 422, 500, 502, 503, 504),
            },
            openapi_extra=direct_body(route),
            operation_id="direct" if route == "/" else f"direct_{route.strip('/').replace('/', '_')}",
        )(direct_route(route))

    return server


BANANA_UNAUTHORIZED = WorkerError("UNAUTHORIZED", "invalid apiKey", "apiKey", status=401)


def refused(request: Request, err: WorkerError) -> None:
    """One info line per refused request: its method, path, status, code and field, never its body, its query
    string or its key."""
    field = f" ({err.field})" if err.field else ""
    log.info("%s %s refused: %d %s%s", request.method, request.url.path, err.status, err.code, field)


def _banana(body: Banana | None, message: str, job: Job | None = None, finished: bool = False) -> dict:
    """A Banana v4 answer. Failures carry "error" in `message`: the client raises on it instead of polling on."""
    answer = {
        "id": (body.id if body else None) or str(uuid.uuid4()),
        "message": message,
        "created": int(time.time()),
        "apiVersion": "v4",
        "callID": job.id if job else None,
        "finished": finished,
        "modelOutputs": [job.output] if finished and job else None,
    }
    if job is not None:
        answer["status"] = job.status
        if job.progress and not job.final:
            answer["progress"] = job.progress
    return answer
