"""The shared job store: Redis, for any number of gateway and worker processes on any number of machines.

Each model key has a stream (`sdw:queue:<key>`) read by the consumer group `workers`; each job is a hash
(`sdw:job:<id>`) with a TTL. A worker that takes a job keeps refreshing its claim on the stream entry; if it
dies (kill -9, a lost machine), the entry goes idle and, after `lease_s`, another worker takes it over with
XAUTOCLAIM. Writes check that the writer still owns the job, so a job completes once. Ends are published on
`sdw:done`, which wakes long-polls in every gateway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable

import redis

from ..config import Settings
from ..errors import WorkerError
from . import (
    Delivery,
    Job,
    JobStore,
    end,
    expired_in_queue,
    handed_back,
    outbox_entry,
    queue_full,
    requeue_or_fail,
    reset_for_retry,
    stats_body,
)

log = logging.getLogger("sdworker")

GROUP = "workers"
DONE_CHANNEL = "sdw:done"
OUTBOX, OUTBOX_DATA = "sdw:outbox", "sdw:outbox:data"  # delivery ids by due time; delivery JSON by id

# KEYS: outbox, outbox data. ARGV: now, lease end, limit. Takes the due deliveries and makes them due again at the
# lease's end, in one step, so two senders never take the same one.
CLAIM_DELIVERIES = """
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", ARGV[1], "LIMIT", 0, tonumber(ARGV[3]))
local taken = {}
for _, id in ipairs(ids) do
  redis.call("ZADD", KEYS[1], ARGV[2], id)
  local data = redis.call("HGET", KEYS[2], id)
  if data then table.insert(taken, data) else redis.call("ZREM", KEYS[1], id) end
end
return taken
"""

# KEYS: job hash, stream, idempotency key ("" for none). ARGV: job JSON, status, TTL (s), queue bound, job id.
SUBMIT = """
if KEYS[3] ~= "" then
  local existing = redis.call("GET", KEYS[3])
  if existing and redis.call("EXISTS", "sdw:job:" .. existing) == 1 then
    return {"EXISTS", existing}
  end
end
if redis.call("XLEN", KEYS[2]) >= tonumber(ARGV[4]) then
  return {"FULL", ""}
end
local entry = redis.call("XADD", KEYS[2], "*", "id", ARGV[5])
redis.call("HSET", KEYS[1], "data", ARGV[1], "status", ARGV[2], "entry", entry)
redis.call("EXPIRE", KEYS[1], ARGV[3])
if KEYS[3] ~= "" then
  redis.call("SET", KEYS[3], ARGV[5], "EX", ARGV[3])
end
return {"OK", entry}
"""


def _job_key(job_id: str) -> str:
    return f"sdw:job:{job_id}"


def _recent_key(owner: str) -> str:
    return f"sdw:recent:{owner}"


def _queue_key(model_key: str) -> str:
    return f"sdw:queue:{model_key}"


class RedisStore(JobStore):
    """Jobs in Redis at REDIS_URL."""

    unavailable = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        self._redis = redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=15,  # above the longest blocking read (5 s): a hung Redis is an error, not a hang
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._redis.ping()
        self._check_persistence()
        self._groups: set[str] = set()
        self._submit_script: redis.commands.core.Script | None = None
        self._claim_script: redis.commands.core.Script | None = None
        self._claimed_at: dict[str, float] = {}  # job id -> when this process last refreshed its claim
        self._entries: dict[str, str] = {}  # job id -> stream entry, for jobs this process runs
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._closed = threading.Event()

    def _check_persistence(self) -> None:
        """Refuse a Redis that keeps nothing on disk: its restart would lose every job, unseen by anyone."""
        if self.settings.redis_allow_volatile:
            return
        try:
            aof = self._redis.config_get("appendonly").get("appendonly")
            snapshots = self._redis.config_get("save").get("save")
        except redis.ResponseError:  # CONFIG renamed or forbidden, as on some managed services: cannot tell
            log.warning("cannot read Redis's persistence settings (CONFIG is not allowed); make sure AOF or RDB is on")
            return
        if aof != "yes" and not (snapshots or "").strip():
            raise WorkerError(
                "REDIS_VOLATILE",
                'the Redis at REDIS_URL keeps nothing on disk (appendonly no, save ""), so a restart would lose '
                "every job: turn on appendonly (or RDB snapshots), or set REDIS_ALLOW_VOLATILE=1",
                "REDIS_URL",
                status=500,
            )

    def ping(self) -> None:
        self._redis.ping()

    # Helpers.
    def _queue(self, model_key: str) -> str:
        key = _queue_key(model_key)
        if key not in self._groups:
            with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
                self._redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            self._groups.add(key)
        return key

    def _ttl(self, job: Job) -> int:
        if job.final:
            return job.result_ttl_s
        return int((job.ttl_s or self.settings.job_ttl_s) + (job.execution_timeout_s or 0) + 3600)

    def _write(self, pipe: redis.client.Pipeline, job: Job) -> bool:
        """Queue the job's write on `pipe` (a MULTI), with its webhook into the outbox once it is final; True when
        the webhook was queued (if the MULTI then fails, the caller sets `job.webhook_queued` back)."""
        key = _job_key(job.id)
        delivery = outbox_entry(job)
        pipe.hset(key, mapping={"data": job.model_dump_json(), "status": job.status})
        pipe.expire(key, self._ttl(job))
        if delivery is not None:
            pipe.hset(OUTBOX_DATA, delivery.id, delivery.model_dump_json())
            pipe.zadd(OUTBOX, {delivery.id: time.time()})
        return delivery is not None

    def _ended(self, job: Job, entry: str | None) -> None:
        """Record a final job, release its stream entry and count it."""
        with self._redis.pipeline() as pipe:
            self._write(pipe, job)
            if entry:
                pipe.xack(_queue_key(job.model_key), GROUP, entry)
                pipe.xdel(_queue_key(job.model_key), entry)
            pipe.hincrby(f"sdw:stats:{job.model_key}", job.status, 1)
            if job.status == "COMPLETED" and job.owner:  # the owner's recent jobs, newest last, the last 100
                recent = _recent_key(job.owner)
                pipe.zadd(recent, {job.id: job.finished_at or time.time()})
                pipe.zremrangebyrank(recent, 0, -101)
                pipe.expire(recent, max(self._ttl(job), self.settings.result_ttl_s))
            pipe.publish(DONE_CHANNEL, job.id)
            pipe.execute()
        self._notify()

    def _update_if(
        self, job_id: str, check: Callable[[Job], bool], change: Callable[[Job], Job]
    ) -> tuple[Job | None, bool]:
        """If `check(job)` holds, store `change(job)`, atomically (WATCH). Answers (the job as it now is, changed)."""
        key = _job_key(job_id)
        with self._redis.pipeline() as pipe:
            while True:
                queued, job = False, None
                try:
                    pipe.watch(key)
                    data = pipe.hget(key, "data")
                    if data is None:
                        return None, False
                    job = Job.model_validate_json(data)
                    if not check(job):
                        pipe.unwatch()
                        return job, False
                    job = change(job)
                    pipe.multi()
                    queued = self._write(pipe, job)
                    pipe.execute()
                    return job, True
                except redis.WatchError:  # changed meanwhile: look again (`change` may return the caller's job)
                    if queued and job is not None:
                        job.webhook_queued = False
                    continue

    # The interface.
    def submit(self, job: Job) -> tuple[Job, bool]:
        queue = self._queue(job.model_key)
        idem = f"sdw:idem:{job.idempotency_key}" if job.idempotency_key else ""
        while True:
            outcome, value = self._submit(
                keys=[_job_key(job.id), queue, idem],
                args=[job.model_dump_json(), job.status, self._ttl(job), self.settings.max_queue, job.id],
            )
            if outcome == "FULL":
                raise queue_full(job.model_key, self.settings.max_queue)
            if outcome == "OK":
                return job, True
            existing = self.get(value)  # a job with this idempotency key exists
            if existing is not None:
                return existing, False

    def _submit(self, keys: list[str], args: list) -> list:
        """One atomic step: the idempotency check, the queue bound, the job hash and its stream entry."""
        if self._submit_script is None:
            self._submit_script = self._redis.register_script(SUBMIT)
        try:
            return self._submit_script(keys=keys, args=args)
        except redis.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            self._groups.discard(keys[1])
            self._queue(keys[1].removeprefix("sdw:queue:"))
            return self._submit_script(keys=keys, args=args)

    def get(self, job_id: str) -> Job | None:
        data = self._redis.hget(_job_key(job_id), "data")
        return Job.model_validate_json(data) if data else None

    def claim(self, model_key: str, worker_id: str, timeout: float) -> Job | None:
        try:
            return self._claim(model_key, worker_id, timeout)
        except redis.ResponseError as err:
            if "NOGROUP" in str(err):  # Redis lost its data (a restart without persistence): make the group again
                self._groups.discard(_queue_key(model_key))
            raise

    def _claim(self, model_key: str, worker_id: str, timeout: float) -> Job | None:
        queue = self._queue(model_key)
        deadline = time.monotonic() + timeout
        while True:
            # First a job whose worker went silent, then a new one.
            _, stale, _ = self._redis.xautoclaim(
                queue, GROUP, worker_id, min_idle_time=int(self.settings.lease_s * 1000), start_id="0-0", count=1
            )
            if stale:
                entry, fields = stale[0]
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                read = self._redis.xreadgroup(
                    GROUP, worker_id, {queue: ">"}, count=1, block=max(1, int(min(left, 5) * 1000))
                )
                if not read:
                    continue
                entry, fields = read[0][1][0]
            job = self._take(queue, entry, fields.get("id", ""), worker_id, lost=bool(stale))
            if job is not None:
                return job

    def _take(self, queue: str, entry: str, job_id: str, worker_id: str, lost: bool) -> Job | None:
        """Own the job behind a stream entry, or end it if it may not run; None when there is nothing to run."""

        def own(job: Job) -> Job:
            job.status, job.started_at, job.worker_id = "IN_PROGRESS", time.time(), worker_id
            job.progress = None
            job.attempts += 1
            return job

        def runnable(job: Job) -> bool:
            return not job.final and not (lost and job.attempts >= self.settings.max_attempts)

        if lost and self._redis.hget(_job_key(job_id), "entry") != entry:
            # An entry left over from an earlier run of a retried job: the job has a newer one; drop this.
            self._redis.xack(queue, GROUP, entry)
            self._redis.xdel(queue, entry)
            return None
        job = self.get(job_id)
        if job is not None and not job.final and not lost and expired_in_queue(job):
            self._ended(job, entry)
            return None
        job, taken = self._update_if(job_id, runnable, own)
        if taken:
            self._entries[job_id], self._claimed_at[job_id] = entry, time.monotonic()
            return job
        if job is not None and not job.final:  # its workers were lost too often
            requeue_or_fail(job, self.settings.max_attempts)
            self._ended(job, entry)
        else:  # ended meanwhile (cancelled) or expired: release the entry
            self._redis.xack(queue, GROUP, entry)
            self._redis.xdel(queue, entry)
        return None

    def heartbeat(self, job: Job, progress: dict[str, int] | None = None) -> bool:
        def mine(current: Job) -> bool:
            return current.status == "IN_PROGRESS" and current.worker_id == job.worker_id

        def record(current: Job) -> Job:
            current.progress = progress
            return current

        if progress is not None:
            current, _ = self._update_if(job.id, mine, record)
        else:
            current = self.get(job.id)
        if current is None or not mine(current):
            return False
        entry = self._entries.get(job.id)
        if entry and time.monotonic() - self._claimed_at.get(job.id, 0) > self.settings.lease_s / 3:
            # Claiming the entry again resets its idle time: the lease that keeps other workers off it.
            self._redis.xclaim(_queue_key(job.model_key), GROUP, job.worker_id, 0, [entry], justid=True)
            self._claimed_at[job.id] = time.monotonic()
        return True

    def finish(self, job: Job) -> bool:
        job.finished_at = job.finished_at or time.time()
        entry = self._entries.pop(job.id, None)
        self._claimed_at.pop(job.id, None)
        _, owned = self._update_if(
            job.id,
            lambda current: current.status == "IN_PROGRESS" and current.worker_id == job.worker_id,
            lambda _: job,
        )
        if owned:
            self._ended(job, entry)
        elif entry and self._holds(job, entry):  # cancelled meanwhile, and not taken over: release the entry
            self._redis.xack(_queue_key(job.model_key), GROUP, entry)
            self._redis.xdel(_queue_key(job.model_key), entry)
        return owned

    def recent(self, owner: str, limit: int) -> list[Job]:
        jobs = []
        for job_id in self._redis.zrevrange(_recent_key(owner), 0, -1):
            job = self.get(job_id)
            if job is not None and job.status == "COMPLETED":  # a retried job is queued again under its id
                jobs.append(job)
            if len(jobs) == limit:
                break
        return jobs

    def mark_streamed(self, job_id: str, step: int | None = None) -> bool:
        def streamed(job: Job) -> Job:
            if step is None:
                job.streamed = True
            else:
                job.streamed_step = step
            return job

        def fresh(job: Job) -> bool:
            return not job.streamed if step is None else not job.final and step > job.streamed_step

        return self._update_if(job_id, fresh, streamed)[1]

    def _holds(self, job: Job, entry: str) -> bool:
        """Whether this job's worker still holds the stream entry (another may have claimed it after a lease)."""
        pending = self._redis.xpending_range(_queue_key(job.model_key), GROUP, entry, entry, 1)
        return bool(pending) and pending[0]["consumer"] == job.worker_id

    def cancel(self, job_id: str) -> Job | None:
        return self._cancel(job_id)[0]

    def _cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Cancel the job if it has not ended: (the job, whether this call cancelled it)."""

        def cancelled(job: Job) -> Job:
            end(job, "CANCELLED", "CANCELLED", "the job was cancelled")
            return job

        job, changed = self._update_if(job_id, lambda job: not job.final, cancelled)
        if changed and job is not None:
            entry = self._redis.hget(_job_key(job_id), "entry")
            if entry and job.started_at is None:  # still queued: off the stream at once
                self._redis.xdel(_queue_key(job.model_key), entry)
            self._ended(job, None)
        return job, changed

    def retry(self, job_id: str) -> Job | None:
        job, changed = self._update_if(
            job_id, lambda job: job.status in ("FAILED", "TIMED_OUT", "CANCELLED"), reset_for_retry
        )
        if changed and job is not None:
            entry = self._redis.xadd(self._queue(job.model_key), {"id": job.id})
            self._redis.hset(_job_key(job.id), "entry", entry)
            self._redis.hincrby(f"sdw:stats:{job.model_key}", "retried", 1)
        self._notify()
        return job

    def claim_deliveries(self, limit: int, lease_s: float) -> list[Delivery]:
        if self._claim_script is None:
            self._claim_script = self._redis.register_script(CLAIM_DELIVERIES)
        now = time.time()
        taken = self._claim_script(keys=[OUTBOX, OUTBOX_DATA], args=[now, now + lease_s, limit])
        return [Delivery.model_validate_json(data) for data in taken]

    def settle_delivery(self, delivery: Delivery, retry_at: float | None) -> None:
        with self._redis.pipeline() as pipe:
            if retry_at is None:
                pipe.zrem(OUTBOX, delivery.id)
                pipe.hdel(OUTBOX_DATA, delivery.id)
            else:
                pipe.hset(OUTBOX_DATA, delivery.id, delivery.model_dump_json())
                pipe.zadd(OUTBOX, {delivery.id: retry_at})
            pipe.execute()

    def release(self, job: Job) -> bool:
        entry = self._entries.pop(job.id, None)
        self._claimed_at.pop(job.id, None)
        _, released = self._update_if(
            job.id,
            lambda current: current.status == "IN_PROGRESS" and current.worker_id == job.worker_id,
            handed_back,
        )
        if released and entry:
            # Past the lease at once: the next claim of any worker (XAUTOCLAIM) takes the entry now.
            idle = int(self.settings.lease_s * 1000) + 1000
            self._redis.xclaim(_queue_key(job.model_key), GROUP, job.worker_id, 0, [entry], idle=idle, justid=True)
        return released

    def purge(self, model_key: str, owner: str | None = None) -> int:
        queue = self._queue(model_key)
        pending = {item["message_id"] for item in self._redis.xpending_range(queue, GROUP, "-", "+", 10_000)}
        removed = 0
        for entry, fields in self._redis.xrange(queue):
            if entry in pending:
                continue
            if owner is not None and getattr(self.get(fields.get("id", "")), "owner", None) != owner:
                continue
            removed += self._cancel(fields.get("id", ""))[1]
            self._redis.xdel(queue, entry)
        return removed

    def stats(self, model_key: str) -> dict[str, int]:
        queue = self._queue(model_key)
        counts = {k: int(v) for k, v in self._redis.hgetall(f"sdw:stats:{model_key}").items()}
        in_progress = self._redis.xpending(queue, GROUP)["pending"]
        counts["IN_PROGRESS"] = in_progress
        counts["IN_QUEUE"] = max(0, self._redis.xlen(queue) - in_progress)
        now, states, gone = time.time(), [], []
        for worker_id, state in self._redis.hgetall(f"sdw:workers:{model_key}").items():
            seen = json.loads(state)
            if now - seen["seen"] < max(self.settings.lease_s, 10):
                states.append(seen["state"])
            elif now - seen["seen"] > 3600:  # a worker gone for an hour is forgotten
                gone.append(worker_id)
        if gone:
            self._redis.hdel(f"sdw:workers:{model_key}", *gone)
        return stats_body(counts, counts.get("retried", 0), states)

    def set_worker_state(self, model_key: str, worker_id: str, state: str | None) -> None:
        key = f"sdw:workers:{model_key}"
        if state is None:
            self._redis.hdel(key, worker_id)
        else:
            self._redis.hset(key, worker_id, json.dumps({"state": state, "seen": time.time()}))

    def wait(self, job_id: str, timeout: float) -> Job | None:
        self._listen()
        return super().wait(job_id, timeout)

    def _listen(self) -> None:
        """Wake local waiters whenever any process ends a job (one listener per store, started on first use)."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen_loop, name="redis-done-listener", daemon=True)
                self._listener.start()

    def _listen_loop(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        while not self._closed.is_set():
            try:
                if not pubsub.subscribed:
                    pubsub.subscribe(DONE_CHANNEL)
                    self._notify()  # an end may have been missed while unsubscribed: let waiters look again
                if pubsub.get_message(timeout=1.0) is not None:
                    self._notify()
            except (redis.RedisError, ValueError):  # Redis restarting; ValueError once closed
                self._closed.wait(1)
        pubsub.close()

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(2)
        self._redis.close()
