"""What every way in shares: the accepted keys and who a key is (a job belongs to the key that made it), the
routes' shared state over the job store, where callers put their key, and the one error body."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPBearer

from ..config import Settings
from ..errors import WorkerError
from ..jobs import Job, JobStore
from ..schema import refuse_invalid_text

log = logging.getLogger("sdworker")


def api_keys(settings: Settings) -> list[str]:
    """The accepted API keys: API_KEYS, else the one kept in DATA_DIR, else a new one, made and printed once.
    Never an empty key: an empty key would let in callers that send none. None for API_KEYS=none, said loudly
    at every start: a keyless worker must never be one by accident."""
    if settings.keyless():
        log.warning(
            "API_KEYS=none: every caller is let in without a key and sees every job. Serve on a private network "
            "only (HOST=%s, PORT=%s)",
            settings.host,
            settings.port,
        )
        return []
    if settings.api_keys is not None:
        keys = [key.strip() for key in settings.api_keys.get_secret_value().split(",") if key.strip()]
        if keys:
            return keys
    path = settings.data_dir / "api_key"
    if path.exists():
        key = path.read_text().strip()
        if not key:
            raise WorkerError(
                "NO_API_KEY", f"{path} is empty: delete it to make a new key, or set API_KEYS", "API_KEYS"
            )
        log.info("API_KEYS is not set: using the key kept in %s", path)
        return [key]
    settings.private_data_dir()
    key = "sdw_" + secrets.token_urlsafe(32)
    staged = path.with_suffix(".new")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    os.replace(staged, path)  # all or nothing: a crash never leaves an empty key file
    # Printed this once only (to the console, not the log), so a fresh server is never open by accident.
    print(f"API_KEYS is not set: made an API key and kept it in {path}. Your key:\n  {key}", file=sys.stderr)
    return [key]


MAX_JSON_DEPTH = 64
"""How deep a request's JSON may nest: a request needs a handful of levels, and a deeper one would only make
the job store and the handler recurse."""


def nested_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests deeper than `limit` lists and objects; iterative, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


@dataclass(frozen=True)
class Caller:
    """Who is calling: `owner` is a digest of their API key (jobs record it, never the key); an admin key
    (ADMIN_API_KEYS) sees and manages every key's jobs."""

    owner: str
    admin: bool = False

    def sees(self, job: Job) -> bool:
        """A job belongs to the key that made it: any other key is told it does not exist."""
        return self.admin or job.owner == self.owner

    def scoped(self, prefix: str, key: str | None) -> str | None:
        """A client's idempotency key, made this caller's own: another key's same value is another job."""
        return f"{prefix}:{self.owner}:{key}" if key else None


class State:
    """What the routes share: settings, store, keys, and the worker's readiness and Potassium-style counters."""

    def __init__(self, settings: Settings, store: JobStore, routes: dict[str, bool], ready: Callable[[], bool]):
        self.settings, self.store, self.routes, self.ready = settings, store, routes, ready
        admins = settings.admin_api_keys.get_secret_value().split(",") if settings.admin_api_keys else []
        self.admins = [key.strip().encode() for key in admins if key.strip()]
        self.keys = [key.encode() for key in api_keys(settings)] + self.admins
        self.keyless = settings.keyless()
        self.model_keys = settings.model_keys()
        self.waiters = anyio.CapacityLimiter(256)  # threads parked in long-polls and synchronous calls
        self.sequence_number = 0
        self.last_request = time.time()
        self.last_activity = time.monotonic()  # the last request with an accepted key (IDLE_SHUTDOWN_S)
        self.draining = False  # set on SIGTERM: new jobs are refused, reads still answered

    def counted_owner(self, caller: Caller) -> str | None:
        """Whose job counts `caller` may see: everyone's (None) for an admin or the only key, else its own."""
        return None if caller.admin or len(set(self.keys)) <= 1 else caller.owner

    def caller(self, key: str | None, use: bool = True) -> Caller | None:
        """The caller of an accepted key, else None; constant-time comparison against every key. With `use`, the
        call counts as use of the worker (IDLE_SHUTDOWN_S); a status read does not."""
        given = (key or "").encode()
        admin = any([hmac.compare_digest(given, accepted) for accepted in self.admins])
        if not admin and self.keyless:
            given = b""  # API_KEYS=none: whatever was sent, one caller
        elif not any([hmac.compare_digest(given, accepted) for accepted in self.keys]):
            return None
        if use:  # only a request with an accepted key is use (IDLE_SHUTDOWN_S)
            self.last_activity = time.monotonic()
        return Caller(hashlib.sha256(b"sdworker-owner:" + given).hexdigest()[:32], admin)

    def caller_of(self, request: Request, use: bool = True) -> Caller | None:
        """The caller of a request that may present its key three ways (`X-BANANA-API-KEY`, `Authorization:
        Bearer`, `?apiKey=`): every key presented, an empty one included, must be accepted and name the same
        caller, so that a bad key is never passed over for a good one beside it."""
        authorization = request.headers.get("authorization")
        bearer = None
        if authorization is not None and authorization[:7].lower() == "bearer ":
            bearer = authorization[7:].strip()
        keys = (request.headers.get("x-banana-api-key"), bearer, request.query_params.get("apiKey"))
        callers = [self.caller(key, use) for key in keys if key is not None]
        if not callers and self.keyless:
            callers = [self.caller(None, use)]
        if not callers or None in callers or len(set(callers)) > 1:
            return None
        return callers[0]

    async def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once final, or as it stands after `timeout` s, without holding the event loop."""
        try:
            return await anyio.to_thread.run_sync(partial(self.store.wait, job_id, timeout), limiter=self.waiters)
        except self.store.unavailable:
            raise store_unavailable() from None

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """A store method, run off the event loop: a slow or unreachable store never stalls other requests, and
        an unreachable one is a 503 the client may retry, not a 500."""
        try:
            return await anyio.to_thread.run_sync(partial(method, *args))
        except self.store.unavailable:
            raise store_unavailable() from None

    async def submit(self, job: Job, full_status: int = 429) -> tuple[Job, bool]:
        """Store a new job (or find the one its idempotency key made). Whatever route made it, its input holds
        only Unicode text: no store can write a lone surrogate. A full queue answers `full_status` (503 for the
        clients that retry a 503 and not a 429: Banana's v6, OctoAI's)."""
        refuse_invalid_text(job.input)
        if self.draining:
            raise WorkerError("DRAINING", "this server is shutting down and takes no new jobs; retry", status=503)
        self.sequence_number += 1
        self.last_request = time.time()
        try:
            return await self.call(self.store.submit, job)
        except WorkerError as err:
            if err.code != "QUEUE_FULL" or err.status == full_status:
                raise
            raise WorkerError(err.code, err.message, err.field, status=full_status) from None


def store_unavailable() -> WorkerError:
    """The answer while the job store cannot be reached: a 503 with Retry-After, for the client to retry."""
    return WorkerError("STORE_UNAVAILABLE", "the job store cannot be reached right now; retry", status=503)


# Where callers put their API key, as the OpenAPI document's security schemes (none raises by itself: a route
# answers 401 with the error body when no accepted key came).
BEARER = HTTPBearer(auto_error=False, description="RunPod, OctoAI and others: `Authorization: Bearer <key>`")
BANANA_KEY = APIKeyHeader(name="X-BANANA-API-KEY", auto_error=False, description="Banana's v6 client")
QUERY_KEY = APIKeyQuery(name="apiKey", auto_error=False, description="BANANA_SERVER=<url>?apiKey=<key>")


def error_answer(err: WorkerError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body: `error` (the message) and `$error`; 429 and 503 say when to retry."""
    if err.status in (429, 503):
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse({"error": err.message, "$error": err.to_dict()}, status_code=err.status, headers=headers)


def direct_answer(job: Job, waited: float) -> JSONResponse:
    """A direct call's answer: the handler's own status and body, or an error saying what became of the job."""
    if job.status == "COMPLETED" or (job.final and job.output is not None):
        return JSONResponse(job.output, status_code=job.http_status or 200)
    if job.final:
        status = {"CANCELLED": 409, "TIMED_OUT": 504}.get(job.status, 500)
        return JSONResponse({"$error": job.error}, status_code=status)
    error = WorkerError(
        "STILL_RUNNING",
        f"job {job.id} is still {job.status} after {waited:g} s; it goes on, but this call stops waiting",
        status=504,
    )
    return JSONResponse({"$error": error.to_dict(), "id": job.id}, status_code=504)
