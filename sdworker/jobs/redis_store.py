"""The shared job store: Redis, for any number of gateway and worker processes on any number of machines.

For each model key: every job waiting or running has an entry in the stream `sdw:queue:<key>` (the length KEDA
scales on); a waiting job's id is in its owner's list `sdw:wait:<key>:<owner>`, and the owners with waiting jobs
take turns (`sdw:turns:<key>`, the least recently served first); a running job has a lease in `sdw:leases:<key>`,
kept fresh by its worker; if the worker dies (kill -9, a lost machine), the lease runs out and the next claim by
any worker takes the job over. Each job is a hash (`sdw:job:<id>`) with a TTL. Claims and submits are Lua scripts,
atomic, on Redis's own clock; writes check that the writer still owns the job, so a job completes once. Ends are
published on `sdw:done`, which wakes long-polls in every gateway; new jobs on `sdw:queued`, which wakes claims.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import redis

from ..config import Settings
from ..errors import WorkerError
from . import (
    NOBODY,
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

log = logging.getLogger("sdworker")

DONE_CHANNEL, QUEUED_CHANNEL = "sdw:done", "sdw:queued"
OUTBOX, OUTBOX_DATA = "sdw:outbox", "sdw:outbox:data"  # delivery ids by due time; delivery JSON by id
NO_OWNER = "-"  # the owner of jobs made without a key, in key names (an owner is otherwise a hex digest)

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

# The keys of one job's place in its model key's queue, in this order, for ENQUEUE, SUBMIT and RELEASE:
# KEYS: job hash, stream, turns, served, owner's waiting list, owner's running set, idempotency key ("" for none).
# ARGV: job id, owner, model key, then SUBMIT's own.
ENQUEUE = """
local entry = redis.call("XADD", KEYS[2], "*", "id", ARGV[1])
redis.call("HSET", KEYS[1], "entry", entry)
redis.call("RPUSH", KEYS[5], ARGV[1])
redis.call("ZADD", KEYS[3], "NX", tonumber(redis.call("HGET", KEYS[4], ARGV[2]) or "0"), ARGV[2])
redis.call("PUBLISH", "sdw:queued", ARGV[3])
return {"OK", entry}
"""

# ARGV 4...: job JSON, status, TTL (s), queue bound, the owner's bound (0: none), "1" when the job fetches URLs.
SUBMIT = (
    """
if KEYS[7] ~= "" then
  local existing = redis.call("GET", KEYS[7])
  if existing and redis.call("EXISTS", "sdw:job:" .. existing) == 1 then
    return {"EXISTS", existing}
  end
end
if redis.call("XLEN", KEYS[2]) >= tonumber(ARGV[7]) then
  return {"FULL", ""}
end
local mine = tonumber(ARGV[8])
if mine > 0 and redis.call("LLEN", KEYS[5]) + redis.call("SCARD", KEYS[6]) >= mine then
  return {"KEY_FULL", ""}
end
redis.call("HSET", KEYS[1], "data", ARGV[4], "status", ARGV[5], "fetches", ARGV[9])
redis.call("EXPIRE", KEYS[1], ARGV[6])
if KEYS[7] ~= "" then
  redis.call("SET", KEYS[7], ARGV[1], "EX", ARGV[6])
end
"""
    + ENQUEUE
)

# Off the queue, once a job has ended: its stream entry, lease, place among its owner's running and waiting jobs.
# KEYS: as ENQUEUE's, and the leases. ARGV: job id.
RELEASE = """
local entry = redis.call("HGET", KEYS[1], "entry")
if not entry then  -- its record expired first (no worker for its TTL): find the entry by the id it carries
  for _, item in ipairs(redis.call("XRANGE", KEYS[2], "-", "+")) do
    if item[2][1] == "id" and item[2][2] == ARGV[1] then entry = item[1] end
  end
end
if entry then redis.call("XDEL", KEYS[2], entry) end
redis.call("ZREM", KEYS[8], ARGV[1])
redis.call("SREM", KEYS[6], ARGV[1])
redis.call("LREM", KEYS[5], 0, ARGV[1])
return 1
"""

# KEYS: turns, served, leases, turn counter. ARGV: lease (s), waiting-list prefix, running-set prefix, "1" when no
# job that fetches may be taken, then the owners whose jobs that fetch may not be. First a job whose lease ran out
# (its worker was lost), else the first waiting job of the owner served longest ago that may be taken.
CLAIM = """
local now = redis.call("TIME")
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local until_ = now + tonumber(ARGV[1])
local lost = redis.call("ZRANGEBYSCORE", KEYS[3], "-inf", now, "LIMIT", 0, 1)
if #lost > 0 then
  redis.call("ZADD", KEYS[3], until_, lost[1])
  return {"LOST", lost[1], ""}
end
local busy = {}
for i = 5, #ARGV do busy[ARGV[i]] = true end
for _, owner in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  local waiting = ARGV[2] .. owner
  local head = redis.call("LINDEX", waiting, 0)
  if not head then
    redis.call("ZREM", KEYS[1], owner)
  elseif not ((ARGV[4] == "1" or busy[owner]) and redis.call("HGET", "sdw:job:" .. head, "fetches") == "1") then
    redis.call("LPOP", waiting)
    local turn = redis.call("INCR", KEYS[4])
    redis.call("HSET", KEYS[2], owner, turn)
    if redis.call("LLEN", waiting) == 0 then
      redis.call("ZREM", KEYS[1], owner)
    else
      redis.call("ZADD", KEYS[1], turn, owner)
    end
    redis.call("ZADD", KEYS[3], until_, head)
    redis.call("SADD", ARGV[3] .. owner, head)
    return {"NEW", head, owner}
  end
end
return {"NONE", "", ""}
"""

# KEYS: leases. ARGV: lease (s), job id. A running job's lease, from now on Redis's clock, if it still has one.
RENEW = """
local now = redis.call("TIME")
return redis.call("ZADD", KEYS[1], "XX", tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1]), ARGV[2])
"""

# KEYS: stream, turns, served, leases. ARGV: waiting-list prefix, running-set prefix, lease (s). Jobs queued by a
# release before turns (one stream read by the consumer group "workers"): each waiting job joins its owner's list,
# each running one gets a lease, and the group goes. Once, atomically, whichever process comes first.
MIGRATE = """
local ok, groups = pcall(redis.call, "XINFO", "GROUPS", KEYS[1])
if not ok then return 0 end
local found = false
for _, group in ipairs(groups) do
  for i = 1, #group, 2 do
    if group[i] == "name" and group[i + 1] == "workers" then found = true end
  end
end
if not found then return 0 end
local now = redis.call("TIME")
local until_ = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[3])
local moved = 0
for _, item in ipairs(redis.call("XRANGE", KEYS[1], "-", "+")) do
  local fields, id = item[2], nil
  for i = 1, #fields, 2 do
    if fields[i] == "id" then id = fields[i + 1] end
  end
  local job = id and "sdw:job:" .. id
  local status = job and redis.call("HGET", job, "status")
  if status == "IN_QUEUE" or status == "IN_PROGRESS" then
    local owner = cjson.decode(redis.call("HGET", job, "data")).owner
    if type(owner) ~= "string" then owner = "-" end
    redis.call("HSET", job, "entry", item[1])
    if status == "IN_QUEUE" then
      redis.call("RPUSH", ARGV[1] .. owner, id)
      redis.call("ZADD", KEYS[2], "NX", 0, owner)
    else
      redis.call("ZADD", KEYS[4], until_, id)
      redis.call("SADD", ARGV[2] .. owner, id)
    end
    moved = moved + 1
  else
    redis.call("XDEL", KEYS[1], item[1])
  end
end
redis.call("XGROUP", "DESTROY", KEYS[1], "workers")
return moved
"""


def _job_key(job_id: str) -> str:
    return f"sdw:job:{job_id}"


def _counts_keys(job: Job) -> list[str]:
    """The hashes that count ended and retried jobs: the model key's, and its owner's."""
    return [f"sdw:stats:{job.model_key}", f"sdw:stats:{job.model_key}:{_owner(job.owner)}"]


def _recent_key(owner: str) -> str:
    return f"sdw:recent:{owner}"


def _queue_key(model_key: str) -> str:
    return f"sdw:queue:{model_key}"


def _owner(owner: str | None) -> str:
    return owner or NO_OWNER


def _place(job: Job) -> list[str]:
    """The keys of ENQUEUE, SUBMIT and RELEASE for `job`."""
    key, owner = job.model_key, _owner(job.owner)
    idem = f"sdw:idem:{job.idempotency_key}" if job.idempotency_key else ""
    return [
        _job_key(job.id),
        _queue_key(key),
        f"sdw:turns:{key}",
        f"sdw:served:{key}",
        f"sdw:wait:{key}:{owner}",
        f"sdw:running:{key}:{owner}",
        idem,
        f"sdw:leases:{key}",
    ]


class RedisStore(JobStore):
    """Jobs in Redis at REDIS_URL."""

    unavailable = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        self._redis = redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=15,  # a hung Redis is an error, not a hang
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._redis.ping()
        self._check_persistence()
        script = self._redis.register_script
        self._submit_script, self._enqueue_script = script(SUBMIT), script(ENQUEUE)
        self._claim_script, self._release_script, self._renew_script = script(CLAIM), script(RELEASE), script(RENEW)
        self._migrate_script, self._deliveries_script = script(MIGRATE), script(CLAIM_DELIVERIES)
        self._migrated: set[str] = set()
        self._renewed_at: dict[str, float] = {}  # job id -> when this process last renewed its lease
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
    def _migrate(self, model_key: str) -> None:
        """Once per model key and process: take over the jobs an older release queued (see MIGRATE)."""
        if model_key in self._migrated:
            return
        keys = [_queue_key(model_key), f"sdw:turns:{model_key}", f"sdw:served:{model_key}", f"sdw:leases:{model_key}"]
        moved = self._migrate_script(
            keys=keys, args=[f"sdw:wait:{model_key}:", f"sdw:running:{model_key}:", self.settings.lease_s]
        )
        if moved:
            log.info("took over %d job(s) of model key %r queued by an older release", moved, model_key)
        self._migrated.add(model_key)

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

    def _ended(self, job: Job, release: bool) -> None:
        """Record a final job and count it; with `release`, take it off the queue (see RELEASE): not while a worker
        still runs it (a cancelled job, until its next step), for the stream to count that worker busy."""
        with self._redis.pipeline() as pipe:
            self._write(pipe, job)
            if release:
                self._release_script(keys=_place(job), args=[job.id], client=pipe)
            for counts in _counts_keys(job):
                pipe.hincrby(counts, job.status, 1)
            if job.status == "COMPLETED" and job.owner:  # the owner's recent jobs, newest last, the last 100
                recent = _recent_key(job.owner)
                pipe.zadd(recent, {job.id: job.finished_at or time.time()})
                pipe.zremrangebyrank(recent, 0, -101)
                pipe.expire(recent, max(self._ttl(job), self.settings.result_ttl_s))
            pipe.publish(DONE_CHANNEL, job.id)
            pipe.execute()
        self._notify()

    def _update_if(
        self,
        job_id: str,
        check: Callable[[Job], bool],
        change: Callable[[Job], Job],
        also: Callable[[redis.client.Pipeline, Job], None] | None = None,
    ) -> tuple[Job | None, bool]:
        """If `check(job)` holds, store `change(job)` (and run `also` in the same MULTI), atomically (WATCH).
        Answers (the job as it now is, changed)."""
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
                    if also is not None:
                        also(pipe, job)
                    pipe.execute()
                    return job, True
                except redis.WatchError:  # changed meanwhile: look again (`change` may return the caller's job)
                    if queued and job is not None:
                        job.webhook_queued = False
                    continue

    # The interface.
    def submit(self, job: Job) -> tuple[Job, bool]:
        self._migrate(job.model_key)
        owner = _owner(job.owner)
        mine = self.settings.queued_per_key() if job.owner is not None else 0
        while True:
            outcome, value = self._submit_script(
                keys=_place(job),
                args=[
                    job.id,
                    owner,
                    job.model_key,
                    job.model_dump_json(),
                    job.status,
                    self._ttl(job),
                    self.settings.max_queue,
                    mine,
                    int(job.fetches),
                ],
            )
            if outcome == "FULL":
                raise queue_full(job.model_key, self.settings.max_queue)
            if outcome == "KEY_FULL":
                raise key_queue_full(mine)
            if outcome == "OK":
                self._notify()
                return job, True
            existing = self.get(value)  # a job with this idempotency key exists
            if existing is not None:
                return existing, False

    def get(self, job_id: str) -> Job | None:
        data = self._redis.hget(_job_key(job_id), "data")
        return Job.model_validate_json(data) if data else None

    def claim(self, model_key: str, worker_id: str, timeout: float, busy: BusyNow = lambda: NOBODY) -> Job | None:
        self._migrate(model_key)
        self._listen()
        keys = [f"sdw:turns:{model_key}", f"sdw:served:{model_key}", f"sdw:leases:{model_key}", f"sdw:turn:{model_key}"]
        prefixes = [f"sdw:wait:{model_key}:", f"sdw:running:{model_key}:"]
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._version
            now = busy()
            refused = [_owner(owner) for owner in now.owners]
            outcome, job_id, owner = self._claim_script(
                keys=keys, args=[self.settings.lease_s, *prefixes, int(now.everyone), *refused]
            )
            if outcome != "NONE":
                job = self._take(model_key, job_id, worker_id, lost=outcome == "LOST", owner=owner or None)
                if job is not None:
                    return job
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._changed:  # woken by a new job anywhere (sdw:queued); a lost worker's lease, within 1 s
                if self._version == seen:
                    self._changed.wait(min(left, 1.0))

    def _take(self, model_key: str, job_id: str, worker_id: str, lost: bool, owner: str | None) -> Job | None:
        """Own the job a claim took, or end it if it may not run; None when there is nothing to run."""

        def own(job: Job) -> Job:
            job.status, job.started_at, job.worker_id = "IN_PROGRESS", time.time(), worker_id
            job.progress = None
            job.attempts += 1
            return job

        def runnable(job: Job) -> bool:
            if not lost:
                return job.status == "IN_QUEUE"
            return not job.final and job.attempts < self.settings.max_attempts

        job = self.get(job_id)
        if job is None:  # expired meanwhile (or evicted): forget its place
            gone = Job(id=job_id, model_key=model_key, owner=None if owner == NO_OWNER else owner)
            self._release_script(keys=_place(gone), args=[job_id])
            return None
        if not job.final and not lost and expired_in_queue(job):
            self._ended(job, release=True)
            return None
        if not lost and job.status == "IN_PROGRESS":  # a stale place of a job another worker runs: nothing to do
            return None
        job, taken = self._update_if(job_id, runnable, own)
        if taken:
            self._renewed_at[job_id] = time.monotonic()
            return job
        if job is not None and not job.final:  # its workers were lost too often
            requeue_or_fail(job, self.settings.max_attempts)
            self._ended(job, release=True)
        elif job is not None:  # ended meanwhile (cancelled): off the queue
            self._release_script(keys=_place(job), args=[job_id])
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
        if time.monotonic() - self._renewed_at.get(job.id, 0) > self.settings.lease_s / 3:
            self._renew_script(keys=[f"sdw:leases:{job.model_key}"], args=[self.settings.lease_s, job.id])
            self._renewed_at[job.id] = time.monotonic()
        return True

    def finish(self, job: Job) -> bool:
        job.finished_at = job.finished_at or time.time()
        self._renewed_at.pop(job.id, None)
        _, owned = self._update_if(
            job.id,
            lambda current: current.status == "IN_PROGRESS" and current.worker_id == job.worker_id,
            lambda _: job,
        )
        if owned:
            self._ended(job, release=True)
            return True
        current = self.get(job.id)
        if current is not None and current.final and current.worker_id == job.worker_id:
            self._release_script(keys=_place(current), args=[job.id])  # cancelled while it ran, not taken over
        return False

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

    def cancel(self, job_id: str) -> Job | None:
        return self._cancel(job_id)[0]

    def _cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Cancel the job if it has not ended: (the job, whether this call cancelled it). A queued one leaves the
        queue at once; a running one when its worker stops it."""

        def cancelled(job: Job) -> Job:
            end(job, "CANCELLED", "CANCELLED", "the job was cancelled")
            return job

        job, changed = self._update_if(job_id, lambda job: not job.final, cancelled)
        if changed and job is not None:
            self._ended(job, release=job.started_at is None)
        return job, changed

    def retry(self, job_id: str) -> Job | None:
        def enqueue(pipe: redis.client.Pipeline, job: Job) -> None:
            # A job cancelled while it ran keeps its place until its worker stops: off it first, so that the old
            # entry, lease and running mark cannot outlive the retry (nor hand the job to a second worker).
            self._release_script(keys=_place(job), args=[job.id], client=pipe)
            self._enqueue_script(keys=_place(job), args=[job.id, _owner(job.owner), job.model_key], client=pipe)
            for counts in _counts_keys(job):
                pipe.hincrby(counts, "retried", 1)

        job, _ = self._update_if(
            job_id, lambda job: job.status in ("FAILED", "TIMED_OUT", "CANCELLED"), reset_for_retry, enqueue
        )
        self._notify()
        return job

    def claim_deliveries(self, limit: int, lease_s: float) -> list[Delivery]:
        now = time.time()
        taken = self._deliveries_script(keys=[OUTBOX, OUTBOX_DATA], args=[now, now + lease_s, limit])
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
        self._renewed_at.pop(job.id, None)

        def lapse(pipe: redis.client.Pipeline, current: Job) -> None:
            # Its lease over at once: the next claim of any worker takes it (as a lost worker's, first).
            pipe.zadd(f"sdw:leases:{current.model_key}", {current.id: 0}, xx=True)
            pipe.publish(QUEUED_CHANNEL, current.model_key)

        _, released = self._update_if(
            job.id,
            lambda current: current.status == "IN_PROGRESS" and current.worker_id == job.worker_id,
            handed_back,
            lapse,
        )
        if released:
            self._notify()
        return released

    def purge(self, model_key: str, owner: str | None = None) -> int:
        owners = [_owner(owner)] if owner is not None else self._redis.zrange(f"sdw:turns:{model_key}", 0, -1)
        removed = 0
        for each in owners:
            for job_id in self._redis.lrange(f"sdw:wait:{model_key}:{each}", 0, -1):
                removed += self._cancel(job_id)[1]
        return removed

    def stats(self, model_key: str, owner: str | None = None) -> dict[str, int]:
        if owner is None:
            counts = {k: int(v) for k, v in self._redis.hgetall(f"sdw:stats:{model_key}").items()}
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.zcard(f"sdw:leases:{model_key}").xlen(_queue_key(model_key))
                in_progress, waiting_and_running = pipe.execute()
            counts["IN_PROGRESS"] = in_progress
            counts["IN_QUEUE"] = max(0, waiting_and_running - in_progress)
        else:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(f"sdw:stats:{model_key}:{owner}")
                pipe.scard(f"sdw:running:{model_key}:{owner}").llen(f"sdw:wait:{model_key}:{owner}")
                ended, in_progress, waiting = pipe.execute()
            counts = {k: int(v) for k, v in ended.items()} | {"IN_PROGRESS": in_progress, "IN_QUEUE": waiting}
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
        """Wake local waiters whenever any process ends or queues a job (one listener per store, from first use)."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen_loop, name="redis-listener", daemon=True)
                self._listener.start()

    def _listen_loop(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        while not self._closed.is_set():
            try:
                if not pubsub.subscribed:
                    pubsub.subscribe(DONE_CHANNEL, QUEUED_CHANNEL)
                    self._notify()  # a change may have been missed while unsubscribed: let waiters look again
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
