"""Jobs: one record for every protocol, and the stores that queue and keep them.

A job is what a client asked for (`input`, for one model key) and what became of it (status, progress, output
or error, timestamps). Banana's start/check and RunPod's run/status are two views of the same record. Two
stores hold jobs behind one interface: SQLite in `DATA_DIR` (one process: HTTP and the worker together) and
Redis (a stream and a consumer group, for any number of gateway and worker processes).
"""

from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..config import Settings
from ..errors import WorkerError, describe

Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]
FINAL: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})


class Job(BaseModel):
    """One request to the worker and what became of it."""

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    model_key: str
    route: str = "/"
    input: Any = None
    status: Status = "IN_QUEUE"
    progress: dict[str, int] | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    http_status: int | None = None
    webhook: str | None = None
    execution_timeout_s: float | None = None
    ttl_s: float | None = None
    result_ttl_s: int = 1800
    idempotency_key: str | None = None
    owner: str | None = None  # who made it: a digest of the API key (never the key); None for jobs of no key
    view: dict[str, Any] | None = None  # how the way in that made it shows it (seed 002's return_base64, ...)
    webhook_queued: bool = False  # its final state is in the webhook outbox
    attempts: int = 0
    streamed: bool = False
    streamed_step: int = 0  # the last progress step /stream handed out
    retries: int = 0
    worker_id: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def final(self) -> bool:
        """True once the job will change no more."""
        return self.status in FINAL

    @property
    def delay_ms(self) -> int | None:
        """Time in the queue, in ms (RunPod's delayTime)."""
        end = self.started_at or (self.finished_at if self.final else None)
        return None if end is None else round((end - self.created_at) * 1000)

    @property
    def execution_ms(self) -> int | None:
        """Time running, in ms (RunPod's executionTime)."""
        if self.started_at is None:
            return None
        return round(((self.finished_at or time.time()) - self.started_at) * 1000)

    def status_body(self) -> dict[str, Any]:
        """The job as RunPod's /status answers it (also the webhook body): output when completed, error
        otherwise, progress while running."""
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.delay_ms is not None:
            body["delayTime"] = self.delay_ms
        if self.execution_ms is not None:
            body["executionTime"] = self.execution_ms
        if self.progress is not None and not self.final:
            body["progress"] = self.progress
        if self.status == "COMPLETED":
            body["output"] = self.output
        elif self.error:
            body["error"] = self.error_message()
        if self.retries:
            body["retries"] = self.retries
        if self.worker_id:
            body["workerId"] = self.worker_id
        return body

    def error_message(self) -> str:
        """The error as one line: code, message and field."""
        return describe(self.error) if self.error else ""

    @property
    def fetches(self) -> bool:
        """Whether running it downloads a URL its input names (an image, a mask, a LoRA): such a job waits in the
        queue while its key already runs MAX_FETCHES_PER_KEY downloads on a worker."""
        return names_url(self.input)


def names_url(value: Any) -> bool:
    """Whether `value` (parsed JSON) holds a string that is an http(s) URL; iterative, so any depth is safe."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item[:8].lower().startswith(("http://", "https://")):
                return True
        elif isinstance(item, dict | list):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


@dataclass(frozen=True)
class Busy:
    """Whose jobs that download URLs a worker cannot take now: everyone's when its downloads are at MAX_FETCHES,
    else those of the keys (`owners`) at MAX_FETCHES_PER_KEY. Their other jobs, and other keys' jobs, go ahead."""

    owners: frozenset[str | None] = frozenset()
    everyone: bool = False

    def refuses(self, job: Job) -> bool:
        """Whether `job` must wait for its turn in the queue."""
        return (self.everyone or job.owner in self.owners) and job.fetches


NOBODY = Busy()
BusyNow = Callable[[], Busy]
"""Asked before each look at the queue: who is busy now (downloads end while a claim waits)."""


class Delivery(BaseModel):
    """A webhook to deliver: kept in the job store's outbox from the moment its job ends until a 2xx answer, or
    until its tries run out, so that a restart (even kill -9) loses none."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    job_id: str
    url: str
    body: dict[str, Any]
    attempts: int = 0


def outbox_entry(job: Job) -> Delivery | None:
    """The delivery a job's save must add to the outbox, atomically: its webhook, once it is final."""
    if not (job.final and job.webhook and not job.webhook_queued):
        return None
    job.webhook_queued = True
    return Delivery(job_id=job.id, url=job.webhook, body=job.status_body())


def queue_full(model_key: str, limit: int) -> WorkerError:
    """The error for a submit past the queue bound."""
    return WorkerError("QUEUE_FULL", f"the queue for {model_key!r} is full ({limit} jobs); retry later", status=429)


def key_queue_full(limit: int) -> WorkerError:
    """The error for a submit past one key's share of the queue."""
    return WorkerError(
        "QUEUE_FULL",
        f"this API key already has {limit} jobs queued or running, the most MAX_QUEUED_PER_KEY allows; retry once "
        "some have ended",
        status=429,
    )


class JobStore(ABC):
    """Where jobs are queued, claimed, updated and kept until their results expire.

    Every method is safe to call from any thread. `wait` wakes as soon as a job in this process ends, and
    stores shared between processes also wake it when another process ends one.
    """

    unavailable: tuple[type[Exception], ...] = ()
    """The errors that mean the store cannot be reached right now (Redis restarting): the server answers 503 to
    them, and the worker waits and tries again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._changed = threading.Condition()
        self._version = 0  # bumped on every change, so a wake-up between `get` and `wait` is never lost

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    @abstractmethod
    def submit(self, job: Job) -> tuple[Job, bool]:
        """Queue `job`. Answers (the job, True), or (the existing job, False) for a known idempotency key.
        Raises WorkerError QUEUE_FULL past `max_queue`, or past its owner's `queued_per_key()`."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired."""

    @abstractmethod
    def claim(self, model_key: str, worker_id: str, timeout: float, busy: BusyNow = lambda: NOBODY) -> Job | None:
        """Take the next runnable job for `model_key` (waiting up to `timeout` s) and mark it IN_PROGRESS.

        Keys take turns: the next job is the oldest of the key whose last job was taken longest ago, so one key's
        burst delays another key's job by one job per worker at most. A key's jobs run in the order they came,
        and one that `busy()` refuses waits, with the key's later jobs. A job whose worker went silent for
        `lease_s` comes first, runnable again up to `max_attempts` runs."""

    @abstractmethod
    def heartbeat(self, job: Job, progress: dict[str, int] | None = None) -> bool:
        """Keep `job`'s lease alive, recording progress when given. False when the job is no longer this
        worker's to run: cancelled, timed out, or taken over after the lease lapsed."""

    @abstractmethod
    def finish(self, job: Job) -> bool:
        """Record `job`'s final status, output or error, and keep it for its result TTL; False (and nothing
        written) when the job is no longer this worker's."""

    @abstractmethod
    def mark_streamed(self, job_id: str, step: int | None = None) -> bool:
        """True the first time only: a completed job's output goes out on /stream once. With `step`: True when
        the running job's progress at `step` has not gone out yet (each step once, in order)."""

    @abstractmethod
    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one ends at once, a running one at its next step."""

    @abstractmethod
    def retry(self, job_id: str) -> Job | None:
        """Queue a failed, timed-out or cancelled job again under the same id."""

    @abstractmethod
    def release(self, job: Job) -> bool:
        """Hand back a job this worker still runs (a shutdown outlasted its grace period): queued again for any
        worker, this run not counted as an attempt. False when the job is no longer this worker's."""

    @abstractmethod
    def purge(self, model_key: str, owner: str | None = None) -> int:
        """Cancel every queued job for `model_key` (only `owner`'s when given); answers how many."""

    @abstractmethod
    def recent(self, owner: str, limit: int) -> list[Job]:
        """`owner`'s last `limit` completed jobs, newest first, among those whose results are still kept."""

    @abstractmethod
    def stats(self, model_key: str, owner: str | None = None) -> dict[str, int]:
        """Counts: completed, failed, retried, inProgress, inQueue, and idle and running workers; with `owner`,
        the job counts are that key's jobs only (the workers are everyone's)."""

    @abstractmethod
    def set_worker_state(self, model_key: str, worker_id: str, state: str | None) -> None:
        """Say that a worker is idle or running (None: gone)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    def ping(self) -> None:  # noqa: B027 (optional hook)
        """Raise one of `unavailable` when the store cannot be reached."""

    @abstractmethod
    def claim_deliveries(self, limit: int, lease_s: float) -> list[Delivery]:
        """Up to `limit` webhooks due now, each kept from every other caller for `lease_s` (after which, if not
        settled, it is due again: a sender that died mid-delivery loses nothing)."""

    @abstractmethod
    def settle_delivery(self, delivery: Delivery, retry_at: float | None) -> None:
        """Delivered or given up (`retry_at` None): off the outbox. Else due again at `retry_at`."""

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is final, or as it stands when `timeout` s have passed."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._version
            job = self.get(job_id)
            left = deadline - time.monotonic()
            if job is None or job.final or left <= 0:
                return job
            with self._changed:
                if self._version == seen:
                    self._changed.wait(min(left, 1.0))


# Transitions both stores make.
def end(job: Job, status: Status, code: str, message: str) -> None:
    """End `job` with `status` and an error."""
    job.status, job.finished_at = status, time.time()
    job.error = {"code": code, "message": message, "field": None}


def requeue_or_fail(job: Job, max_attempts: int) -> None:
    """A job whose worker was lost: queue it again, or fail it once it has had its runs."""
    if job.attempts >= max_attempts:
        end(job, "FAILED", "WORKER_LOST", f"the worker running this job was lost, {job.attempts} times; not retried")
    else:
        job.status, job.started_at, job.worker_id, job.progress = "IN_QUEUE", None, None, None


def handed_back(job: Job) -> Job:
    """`job` queued again after a graceful shutdown outlasted its grace period; the run is not an attempt."""
    job.status, job.started_at, job.worker_id, job.progress = "IN_QUEUE", None, None, None
    job.attempts = max(0, job.attempts - 1)
    return job


def expired_in_queue(job: Job) -> bool:
    """Time out a queued job older than its TTL (RunPod's policy.ttl); True if it was."""
    if job.ttl_s is not None and time.time() - job.created_at > job.ttl_s:
        end(job, "TIMED_OUT", "TIMED_OUT", f"the job waited longer than its ttl of {job.ttl_s:g} s and never ran")
        return True
    return False


def reset_for_retry(job: Job) -> Job:
    """`job` as new, to run again under the same id (RunPod's /retry)."""
    job.status, job.retries, job.attempts, job.webhook_queued = "IN_QUEUE", job.retries + 1, 0, False
    job.output = job.error = job.progress = job.http_status = None
    job.started_at = job.finished_at = job.worker_id = None
    job.created_at = time.time()
    return job


def stats_body(by_status: dict[str, int], retried: int, worker_states: list[str]) -> dict[str, Any]:
    """RunPod's /health body."""
    return {
        "jobs": {
            "completed": by_status.get("COMPLETED", 0),
            "failed": by_status.get("FAILED", 0) + by_status.get("TIMED_OUT", 0),
            "cancelled": by_status.get("CANCELLED", 0),
            "inProgress": by_status.get("IN_PROGRESS", 0),
            "inQueue": by_status.get("IN_QUEUE", 0),
            "retried": retried,
        },
        "workers": {
            "idle": worker_states.count("idle"),
            "running": worker_states.count("running"),
        },
    }


def open_store(settings: Settings) -> JobStore:
    """The Redis store when REDIS_URL is set, else SQLite in DATA_DIR."""
    if settings.redis_url is not None:
        from .redis_store import RedisStore

        return RedisStore(settings)
    from .sqlite_store import SQLiteStore

    return SQLiteStore(settings)
