"""The worker loop: claim a job, run app.py's handler on it, record the result (its webhook goes with it).

The loop knows jobs and the handler's `(status, body)` answer, nothing of HTTP. While a job runs, a side thread
keeps its lease and writes its progress; each denoising step stops the run once the job was cancelled or ran
past its execution timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .. import logs, metrics
from ..config import Settings
from ..errors import WorkerError, failure
from ..generate import fetch_hook, step_hook
from . import Busy, Job, JobStore

log = logging.getLogger("sdworker")

Runner = Callable[[str, Any], tuple[int, Any]]
"""Runs app.py's handler for a route on a JSON payload: (route, payload) -> (HTTP status, JSON body)."""

PROGRESS_EVERY_S = 0.25
"""How often a running job's progress is written and its cancellation checked: the latency of a cancel."""

STOPPED = frozenset({"CANCELLED", "TIMED_OUT"})  # error codes that end a job with the status of that name


class Worker:
    """Runs the jobs of one model key from a job store, several in flight.

    A job holds a place (`jobs_in_flight()` of them) from its claim to its end, and a slot (MAX_BATCH) while it
    denoises. A thread claims only once it has both, so the GPU is never left waiting for a claim, jobs of the
    same shape that arrive together denoise as one batch, and a job finished denoising encodes and uploads while
    the next batch runs. Jobs beyond that stay in the queue, free for any other worker.

    A job downloading the URLs it names (images, masks, LoRAs) gives up its place and slot until the download is
    done: up to MAX_FETCHES downloads run beside the model, at most MAX_FETCHES_PER_KEY of them one key's, so a
    slow URL delays no other job. Past those, a job that names URLs waits in the queue (see `JobStore.claim`).
    """

    def __init__(self, store: JobStore, run: Runner, settings: Settings, model_key: str) -> None:
        self.store, self.run, self.settings, self.model_key = store, run, settings, model_key
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._places = threading.BoundedSemaphore(settings.jobs_in_flight())
        self._denoising = threading.BoundedSemaphore(settings.max_batch)
        self._running = 0
        self._count = threading.Lock()
        self._claim = threading.Lock()  # one claim at a time: who is busy, then the claim, then the count
        self._fetching: dict[str | None, int] = {}  # downloads running or about to, by owner
        self._active: dict[str, Job] = {}  # the jobs this worker runs now, by id
        self._claiming = threading.Event()  # cleared by `drain`: no new job is taken
        self._claiming.set()

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and run jobs until `stop` is set."""
        log.info("worker %s takes jobs for model key %r", self.id, self.model_key)
        others = [
            threading.Thread(target=self._loop, args=(stop,), name=f"worker-{n}", daemon=True)
            for n in range(1, self.settings.jobs_in_flight() + self.settings.max_fetches)
        ]
        for thread in others:
            thread.start()
        self._loop(stop)
        for thread in others:
            thread.join()
        with contextlib.suppress(Exception):
            self.store.set_worker_state(self.model_key, self.id, None)

    def _state(self) -> str:
        return "running" if self._running else "idle"

    def _busy(self) -> Busy:
        """Whose jobs that download may not be claimed now: everyone's at MAX_FETCHES, else keys' at their share."""
        with self._count:
            if sum(self._fetching.values()) >= self.settings.max_fetches:
                return Busy(everyone=True)
            full = [owner for owner, count in self._fetching.items() if count >= self.settings.max_fetches_per_key]
            return Busy(owners=frozenset(full))

    def _fetched(self, owner: str | None) -> None:
        """One download of `owner`'s over (or never begun)."""
        with self._count:
            self._fetching[owner] -= 1
            if not self._fetching[owner]:
                del self._fetching[owner]

    def _loop(self, stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            if not self._claiming.is_set():
                stop.wait(0.2)
                continue
            place, slot = _Slot(self._places), _Slot(self._denoising)
            if not place.take(timeout=1.0):
                continue
            try:
                if not slot.take(timeout=1.0):
                    continue
                self.store.set_worker_state(self.model_key, self.id, self._state())
                with self._claim:
                    job = self.store.claim(self.model_key, self.id, timeout=1.0, busy=self._busy)
                    fetches = job is not None and job.fetches
                    if fetches:
                        with self._count:
                            self._fetching[job.owner] = self._fetching.get(job.owner, 0) + 1
                if job is not None and not self._claiming.is_set():  # claimed as the drain began: hand it back
                    if fetches:
                        self._fetched(job.owner)
                    self.store.release(job)
                elif job is not None:
                    self.run_job(job, slot, place, counted=fetches)
                backoff = 0.0
            except Exception as err:  # the store is down (Redis restarting, a full disk): wait and try again
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("worker: job store error, retrying in %.1f s: %s: %s", backoff, type(err).__name__, err)
                stop.wait(backoff)
            finally:
                slot.give()
                place.give()

    def run_job(self, job: Job, slot: _Slot | None = None, place: _Slot | None = None, counted: bool = False) -> None:
        """Run one claimed job to its end and record it. `slot`, its place among the jobs denoising, is given up
        while it downloads the URLs it names and after its last denoising step; `place`, among the jobs this worker
        holds, while it downloads. `counted`: its download is counted among its owner's (given back once done).
        What it logs carries its id."""
        left = [counted]  # whether its download is still counted

        def fetched() -> None:
            if left[0]:
                left[0] = False
                self._fetched(job.owner)

        with logs.running(job.id):
            try:
                self._run_job(job, slot, place, fetched)
            finally:
                fetched()

    def _run_job(self, job: Job, slot: _Slot | None, place: _Slot | None, fetched: Callable[[], None]) -> None:
        timeout = job.execution_timeout_s or self.settings.execution_timeout_s

        lost = threading.Event()  # set by the lease keeper once the job is no longer this worker's

        def check() -> None:
            if time.time() - (job.started_at or time.time()) > timeout:
                raise WorkerError("TIMED_OUT", f"the job ran past its execution timeout of {timeout:g} s", status=408)
            if lost.is_set():
                raise WorkerError("CANCELLED", "the job was cancelled", status=409)

        def on_step(step: int, total: int) -> None:  # in the denoising loop: no I/O here, only flags
            if step >= total and slot is not None:
                slot.give()
            check()
            job.progress = {"step": step, "total": total}

        @contextmanager
        def fetching() -> Iterator[Callable[[], None]]:
            for held in (slot, place):
                if held is not None:
                    held.give()
            try:
                yield check
            finally:
                fetched()
                for held in (place, slot):  # in the loop's order: a place, then a slot
                    if held is not None:
                        held.take()

        done = threading.Event()
        keeper = threading.Thread(target=self._keep_lease, args=(job, done, lost), daemon=True)
        keeper.start()
        token, fetch_token = step_hook.set(on_step), fetch_hook.set(fetching)
        with self._count:
            self._running += 1
            self._active[job.id] = job
        try:
            self.store.set_worker_state(self.model_key, self.id, "running")
            status, body = self.run(job.route, job.input)
        except Exception:  # the runner should answer errors itself; a worker never dies of one job
            log.exception("job %s: the handler raised", job.id)
            status, body = 500, {"$error": WorkerError("INTERNAL_ERROR", "internal error").to_dict()}
        finally:
            step_hook.reset(token)
            fetch_hook.reset(fetch_token)
            done.set()
            keeper.join()
            with self._count:
                self._running -= 1
                self._active.pop(job.id, None)

        job.http_status, job.output, job.finished_at = status, body, time.time()
        job.error = failure(status, body)
        if job.error is None:
            job.status = "COMPLETED"
        else:
            code = job.error.get("code")
            job.status = code if code in STOPPED else "FAILED"  # type: ignore[assignment]
        if self.store.finish(job):
            log.info("job %s %s in %s ms", job.id, job.status, job.execution_ms)
            metrics.observe_job(job.status, job.created_at, job.started_at, job.finished_at)
        else:
            log.info("job %s ended elsewhere (cancelled or taken over); this run's result is dropped", job.id)

    def drain(self, grace_s: float) -> int:
        """Stop taking jobs, let the running ones finish within `grace_s`, and hand back to the queue those that
        do not (for another worker, or this one after a restart); answers how many were handed back."""
        self._claiming.clear()
        deadline = time.monotonic() + grace_s
        while self._running and time.monotonic() < deadline:
            time.sleep(0.1)
        with self._count:
            left = list(self._active.values())
        handed = 0
        for job in left:
            try:
                handed += self.store.release(job)
            except Exception as err:  # the store is down: the job's lease runs out and another worker takes it
                log.error("job %s: could not hand it back: %s: %s", job.id, type(err).__name__, err)
        if left:
            log.warning("shutdown: %d job(s) outlasted the %g s grace; %d handed back", len(left), grace_s, handed)
        return handed

    def _keep_lease(self, job: Job, done: threading.Event, lost: threading.Event) -> None:
        """Every PROGRESS_EVERY_S while the job runs: keep its lease, record its progress, and set `lost` when
        it was cancelled or taken over. Off the denoising loop, so a step never waits for the store."""
        every, beats, written = min(PROGRESS_EVERY_S, self.settings.lease_s / 3), 0, None
        while not done.wait(every):
            try:
                progress = job.progress if job.progress != written else None  # write only what changed
                if not self.store.heartbeat(job, progress):
                    lost.set()
                written = job.progress
                beats += 1
                if beats % 10 == 0:
                    self.store.set_worker_state(self.model_key, self.id, self._state())
            except Exception as err:
                log.error("job %s: heartbeat failed: %s: %s", job.id, type(err).__name__, err)


class _Slot:
    """One job's place among the MAX_BATCH a worker lets denoise at once: taken and given up any number of times,
    held at most once."""

    def __init__(self, places: threading.BoundedSemaphore) -> None:
        self.places, self.held, self.lock = places, False, threading.Lock()

    def take(self, timeout: float | None = None) -> bool:
        """Take the place (waiting up to `timeout` s, forever when None); True once held."""
        with self.lock:
            if self.held:
                return True
        if not self.places.acquire(timeout=timeout if timeout is not None else -1):
            return False
        with self.lock:
            self.held = True
        return True

    def give(self) -> None:
        """Give the place up, if held."""
        with self.lock:
            if not self.held:
                return
            self.held = False
        self.places.release()
