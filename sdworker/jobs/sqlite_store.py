"""The embedded job store: one SQLite file in DATA_DIR, for one process that serves HTTP and runs the model.

Jobs and results survive a restart. A job that was running when the process died is queued again at the next
start (or failed with WORKER_LOST once it has had `max_attempts` runs), so nothing stays IN_PROGRESS forever.
A lock file keeps a second process off the same DATA_DIR; many processes share jobs through Redis instead.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from typing import Any

from ..config import Settings
from ..errors import WorkerError
from . import (
    NOBODY,
    Busy,
    BusyNow,
    Delivery,
    Job,
    JobStore,
    end,
    expired_in_queue,
    handed_back,
    key_queue_full,
    outbox_entry,
    queue_full,
    requeue_or_fail,
    reset_for_retry,
    stats_body,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, due_at REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model_key TEXT NOT NULL,
    status TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL,
    retries INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""
# Added since the first release: an older DATA_DIR gains them at start, filled from each job's data.
COLUMNS = {"owner": "json_extract(data, '$.owner')"}
INDEXES = """
DROP INDEX IF EXISTS jobs_queue;
CREATE INDEX IF NOT EXISTS jobs_turns ON jobs (model_key, status, owner, created_at);
"""


class SQLiteStore(JobStore):
    """Jobs in `DATA_DIR/jobs.sqlite3`, for one process."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        folder = settings.private_data_dir()
        for name in ("jobs.lock", "jobs.sqlite3"):  # 0600 from the start; SQLite gives its -wal and -shm the same
            os.close(os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o600))
            (folder / name).chmod(0o600)
        self._lock_file = open(folder / "jobs.lock", "w")  # noqa: SIM115 (held for the store's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise WorkerError(
                "STORE_IN_USE",
                f"another process already serves the jobs in {settings.data_dir}; give each process its own "
                "DATA_DIR, or set REDIS_URL to share one queue between processes",
                "DATA_DIR",
                status=500,
            ) from None
        self._db = sqlite3.connect(settings.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash; fast
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, value in COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
                self._db.execute(f"UPDATE jobs SET {column} = {value}")
        self._db.executescript(INDEXES)
        self._mutex = threading.RLock()
        self._workers: dict[tuple[str, str], str] = {}
        self._served: dict[tuple[str, str | None], int] = {}  # (model key, owner) -> the claim that last took its job
        self._claims = 0
        self._recover()

    # Rows <-> jobs.
    def _save(self, job: Job) -> None:
        expires = job.finished_at + job.result_ttl_s if job.final and job.finished_at else None
        row = (
            job.id,
            job.model_key,
            job.status,
            job.idempotency_key,
            job.created_at,
            expires,
            job.retries,
            job.owner,
        )
        delivery = outbox_entry(job)  # marks the job: serialise it after
        statements = [
            (
                "INSERT OR REPLACE INTO jobs"
                " (id, model_key, status, idempotency_key, created_at, expires_at, retries, owner, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, job.model_dump_json()),
            )
        ]
        if delivery is not None:  # the job's end and its webhook, in one transaction
            statements.append(
                (
                    "INSERT INTO outbox (id, due_at, data) VALUES (?, ?, ?)",
                    (delivery.id, time.time(), delivery.model_dump_json()),
                )
            )
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            if delivery is not None:  # not in the outbox after all
                job.webhook_queued = False
            raise

    def _load(self, where: str, args: tuple[Any, ...]) -> Job | None:
        row = self._db.execute(f"SELECT data FROM jobs WHERE {where} LIMIT 1", args).fetchone()
        return Job.model_validate_json(row[0]) if row else None

    def _expire(self) -> None:
        self._db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at < ?", (time.time(),))

    def _recover(self) -> None:
        """Jobs left IN_PROGRESS by a process that died: run them again, or fail them once out of attempts."""
        with self._mutex:
            for (data,) in self._db.execute("SELECT data FROM jobs WHERE status = 'IN_PROGRESS'").fetchall():
                job = Job.model_validate_json(data)
                requeue_or_fail(job, self.settings.max_attempts)
                self._save(job)

    def submit(self, job: Job) -> tuple[Job, bool]:
        with self._mutex:
            self._expire()
            if job.idempotency_key:
                existing = self._load("idempotency_key = ?", (job.idempotency_key,))
                if existing is not None:
                    return existing, False
            (active,) = self._db.execute(
                "SELECT count(*) FROM jobs WHERE model_key = ? AND status IN ('IN_QUEUE', 'IN_PROGRESS')",
                (job.model_key,),
            ).fetchone()
            if active >= self.settings.max_queue:
                raise queue_full(job.model_key, self.settings.max_queue)
            if job.owner is not None:
                (mine,) = self._db.execute(
                    "SELECT count(*) FROM jobs WHERE model_key = ? AND status IN ('IN_QUEUE', 'IN_PROGRESS') "
                    "AND owner = ?",
                    (job.model_key, job.owner),
                ).fetchone()
                if mine >= (share := self.settings.queued_per_key()):
                    raise key_queue_full(share)
            self._save(job)
        self._notify()
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._mutex:
            return self._load("id = ? AND (expires_at IS NULL OR expires_at >= ?)", (job_id, time.time()))

    def claim(self, model_key: str, worker_id: str, timeout: float, busy: BusyNow = lambda: NOBODY) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._version
            with self._mutex:
                self._expire()
                while job := self._next(model_key, busy()):
                    if expired_in_queue(job):
                        self._save(job)
                        continue
                    job.status, job.started_at, job.worker_id = "IN_PROGRESS", time.time(), worker_id
                    job.attempts += 1
                    self._save(job)
                    self._claims += 1
                    self._served[(model_key, job.owner)] = self._claims
                    return job
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._changed:
                if self._version == seen:
                    self._changed.wait(left)

    def _next(self, model_key: str, busy: Busy) -> Job | None:
        """The oldest queued job of the key served longest ago (never, first) that `busy` does not refuse."""
        owners = self._db.execute(
            "SELECT owner, min(created_at) FROM jobs WHERE model_key = ? AND status = 'IN_QUEUE' GROUP BY owner",
            (model_key,),
        ).fetchall()
        for owner, _ in sorted(owners, key=lambda row: (self._served.get((model_key, row[0]), 0), row[1])):
            job = self._load(
                "model_key = ? AND status = 'IN_QUEUE' AND owner IS ? ORDER BY created_at", (model_key, owner)
            )
            if job is not None and not busy.refuses(job):
                return job
        return None

    def _owned(self, job: Job) -> Job | None:
        current = self._load("id = ?", (job.id,))
        if current is None or current.status != "IN_PROGRESS" or current.worker_id != job.worker_id:
            return None
        return current

    def heartbeat(self, job: Job, progress: dict[str, int] | None = None) -> bool:
        with self._mutex:
            current = self._owned(job)
            if current is None:
                return False
            if progress is not None:
                current.progress = progress
                self._save(current)
            return True

    def finish(self, job: Job) -> bool:
        with self._mutex:
            if self._owned(job) is None:
                return False
            job.finished_at = job.finished_at or time.time()
            self._save(job)
        self._notify()
        return True

    def mark_streamed(self, job_id: str, step: int | None = None) -> bool:
        with self._mutex:
            job = self.get(job_id)
            if job is None or (job.streamed if step is None else job.final or step <= job.streamed_step):
                return False
            if step is None:
                job.streamed = True
            else:
                job.streamed_step = step
            self._save(job)
            return True

    def recent(self, owner: str, limit: int) -> list[Job]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT data FROM jobs WHERE status = 'COMPLETED' AND expires_at >= ? "
                "AND json_extract(data, '$.owner') = ? ORDER BY json_extract(data, '$.finished_at') DESC LIMIT ?",
                (time.time(), owner, limit),
            ).fetchall()
        return [Job.model_validate_json(data) for (data,) in rows]

    def cancel(self, job_id: str) -> Job | None:
        with self._mutex:
            job = self.get(job_id)
            if job is None or job.final:
                return job
            end(job, "CANCELLED", "CANCELLED", "the job was cancelled")
            self._save(job)
        self._notify()
        return job

    def retry(self, job_id: str) -> Job | None:
        with self._mutex:
            job = self.get(job_id)
            if job is None or job.status not in ("FAILED", "TIMED_OUT", "CANCELLED"):
                return job
            reset_for_retry(job)
            self._save(job)
        self._notify()
        return job

    def claim_deliveries(self, limit: int, lease_s: float) -> list[Delivery]:
        now = time.time()
        with self._mutex:
            rows = self._db.execute(
                "SELECT id, data FROM outbox WHERE due_at <= ? ORDER BY due_at LIMIT ?", (now, limit)
            ).fetchall()
            self._db.executemany(
                "UPDATE outbox SET due_at = ? WHERE id = ?", [(now + lease_s, delivery_id) for delivery_id, _ in rows]
            )
        return [Delivery.model_validate_json(data) for _, data in rows]

    def settle_delivery(self, delivery: Delivery, retry_at: float | None) -> None:
        with self._mutex:
            if retry_at is None:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (delivery.id,))
            else:
                self._db.execute(
                    "UPDATE outbox SET due_at = ?, data = ? WHERE id = ?",
                    (retry_at, delivery.model_dump_json(), delivery.id),
                )

    def release(self, job: Job) -> bool:
        with self._mutex:
            current = self._owned(job)
            if current is None:
                return False
            self._save(handed_back(current))
        self._notify()
        return True

    def purge(self, model_key: str, owner: str | None = None) -> int:
        removed = 0
        with self._mutex:
            queued = self._db.execute(
                "SELECT data FROM jobs WHERE model_key = ? AND status = 'IN_QUEUE'", (model_key,)
            ).fetchall()
            for (data,) in queued:
                job = Job.model_validate_json(data)
                if owner is None or job.owner == owner:
                    end(job, "CANCELLED", "CANCELLED", "the job was cancelled")
                    self._save(job)
                    removed += 1
        self._notify()
        return removed

    def stats(self, model_key: str, owner: str | None = None) -> dict[str, int]:
        mine = "" if owner is None else " AND owner = ?"
        with self._mutex:
            self._expire()
            rows = self._db.execute(
                f"SELECT status, count(*), sum(retries) FROM jobs WHERE model_key = ?{mine} GROUP BY status",
                (model_key,) if owner is None else (model_key, owner),
            ).fetchall()
            states = [state for (key, _), state in self._workers.items() if key == model_key]
        return stats_body({status: count for status, count, _ in rows}, sum(r or 0 for *_, r in rows), states)

    def set_worker_state(self, model_key: str, worker_id: str, state: str | None) -> None:
        with self._mutex:
            if state is None:
                self._workers.pop((model_key, worker_id), None)
            else:
                self._workers[(model_key, worker_id)] = state

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            self._lock_file.close()
