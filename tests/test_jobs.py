"""The job stores and the worker loop, each test run against SQLite and against a real redis-server."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import HookTarget, free_port, wait_for
from pydantic import SecretStr

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.generate import step_hook
from sdworker.jobs import Job, JobStore
from sdworker.jobs.redis_store import RedisStore
from sdworker.jobs.sqlite_store import SQLiteStore
from sdworker.jobs.webhooks import WebhookOutbox
from sdworker.jobs.worker import Worker


def open_kind(kind: str, tmp_path: Path, redis_url: str, **overrides: Any) -> JobStore:
    if kind == "sqlite":
        return SQLiteStore(Settings(data_dir=tmp_path / "data", **overrides))
    return RedisStore(Settings(redis_url=redis_url, **overrides))


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        redis.Redis.from_url(redis_url).flushdb()
    return request.param


@pytest.fixture
def store(kind: str, tmp_path: Path, redis_url: str) -> Iterator[JobStore]:
    opened = open_kind(
        kind, tmp_path, redis_url, max_queue=3, lease_s=0.5, webhook_retry_delay_s=0.1, allow_private_urls=True
    )
    yield opened
    opened.close()


def steps_runner(steps: int = 3, delay: float = 0.0, fail: bool = False):
    """A stand-in for app.py's handler that goes through `steps` denoising steps like generate() does."""

    def run(route: str, payload: Any) -> tuple[int, Any]:
        on_step = step_hook.get()
        try:
            for step in range(1, steps + 1):
                time.sleep(delay)
                if on_step:
                    on_step(step, steps)
        except WorkerError as err:
            return err.status, {"$error": err.to_dict()}
        if fail:
            return 422, {"$error": {"code": "INVALID_INPUTS", "message": "width is over 2048", "field": "width"}}
        return 200, {"echo": payload, "route": route}

    return run


def test_a_submitted_job_is_claimed_run_and_kept(store: JobStore) -> None:
    job, created = store.submit(Job(model_key="m", input={"prompt": "a"}))
    assert created and store.get(job.id).status == "IN_QUEUE"
    worker = Worker(store, steps_runner(), store.settings, "m")
    claimed = store.claim("m", worker.id, timeout=1)
    assert claimed.id == job.id and store.get(job.id).status == "IN_PROGRESS"
    worker.run_job(claimed)
    done = store.get(job.id)
    assert done.status == "COMPLETED" and done.output == {"echo": {"prompt": "a"}, "route": "/"}
    assert done.progress == {"step": 3, "total": 3}
    body = done.status_body()
    assert body["output"]["echo"] == {"prompt": "a"} and body["delayTime"] >= 0 and body["executionTime"] >= 0


def test_jobs_of_another_model_key_are_not_claimed(store: JobStore) -> None:
    store.submit(Job(model_key="other", input={}))
    assert store.claim("m", "w1", timeout=0.2) is None


def test_a_failed_handler_fails_the_job_with_its_error(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    worker = Worker(store, steps_runner(fail=True), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    failed = store.get(job.id)
    assert failed.status == "FAILED" and failed.http_status == 422
    assert failed.status_body()["error"] == "INVALID_INPUTS: width is over 2048 (field width)"


def test_the_same_idempotency_key_gives_the_same_job(store: JobStore) -> None:
    first, created = store.submit(Job(model_key="m", input={"n": 1}, idempotency_key="abc"))
    again, created_again = store.submit(Job(model_key="m", input={"n": 1}, idempotency_key="abc"))
    assert created and not created_again and again.id == first.id
    assert store.stats("m")["jobs"]["inQueue"] == 1


def test_past_the_queue_bound_a_submit_is_refused_and_nothing_is_lost(store: JobStore) -> None:
    ids = [store.submit(Job(model_key="m", input={"n": n}))[0].id for n in range(3)]
    with pytest.raises(WorkerError) as refused:
        store.submit(Job(model_key="m", input={"n": 3}))
    assert refused.value.code == "QUEUE_FULL" and refused.value.status == 429 and "3 jobs" in refused.value.message
    assert [store.get(job_id).status for job_id in ids] == ["IN_QUEUE"] * 3


def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_runs(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    assert store.cancel(job.id).status == "CANCELLED"
    assert store.get(job.id).status == "CANCELLED"
    assert store.claim("m", "w1", timeout=0.3) is None


def test_cancelling_a_running_job_stops_it_at_the_next_step(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    worker = Worker(store, steps_runner(steps=200, delay=0.01), store.settings, "m")
    claimed = store.claim("m", worker.id, 1)
    runner = threading.Thread(target=worker.run_job, args=(claimed,))
    runner.start()
    while (store.get(job.id).progress or {}).get("step", 0) < 3:
        time.sleep(0.01)
    store.cancel(job.id)
    runner.join(5)
    assert not runner.is_alive()
    ended = store.get(job.id)
    assert ended.status == "CANCELLED" and ended.progress["step"] < 100


def test_a_job_past_its_execution_timeout_times_out(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}, execution_timeout_s=0.1))
    worker = Worker(store, steps_runner(steps=100, delay=0.01), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    ended = store.get(job.id)
    assert ended.status == "TIMED_OUT" and "execution timeout of 0.1 s" in ended.error["message"]


def test_a_job_queued_past_its_ttl_times_out_without_running(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}, ttl_s=0.05))
    time.sleep(0.1)
    assert store.claim("m", "w1", timeout=0.3) is None
    assert store.get(job.id).status == "TIMED_OUT"


def test_results_are_removed_after_their_ttl(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}, result_ttl_s=1))
    worker = Worker(store, steps_runner(), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    assert store.get(job.id).status == "COMPLETED"
    time.sleep(2.1)
    store.stats("m")  # SQLite sweeps expired rows on its next write; Redis expires the key itself
    assert store.get(job.id) is None


def test_a_failed_job_can_be_retried_under_the_same_id(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    Worker(store, steps_runner(fail=True), store.settings, "m").run_job(store.claim("m", "w1", 1))
    assert store.retry(job.id).status == "IN_QUEUE"
    worker = Worker(store, steps_runner(), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    again = store.get(job.id)
    assert again.status == "COMPLETED" and again.retries == 1 and store.stats("m")["jobs"]["retried"] == 1


def test_purge_cancels_queued_jobs_only(store: JobStore) -> None:
    running, _ = store.submit(Job(model_key="m", input={}))
    store.claim("m", "w1", 1)
    queued = [store.submit(Job(model_key="m", input={}))[0] for _ in range(2)]
    assert store.purge("m") == 2
    assert [store.get(job.id).status for job in queued] == ["CANCELLED", "CANCELLED"]
    assert store.get(running.id).status == "IN_PROGRESS"


def test_a_completed_job_streams_its_output_once(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    assert store.mark_streamed(job.id) and not store.mark_streamed(job.id)


def test_health_counts_jobs_and_workers(store: JobStore) -> None:
    store.submit(Job(model_key="m", input={}))
    store.set_worker_state("m", "w1", "idle")
    stats = store.stats("m")
    assert stats["jobs"]["inQueue"] == 1 and stats["workers"] == {"idle": 1, "running": 0}


def test_a_long_poll_wakes_when_the_job_ends(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    worker = Worker(store, steps_runner(), store.settings, "m")
    threading.Timer(0.3, lambda: worker.run_job(store.claim("m", worker.id, 1))).start()
    started = time.monotonic()
    assert store.wait(job.id, timeout=10).status == "COMPLETED"
    assert time.monotonic() - started < 2


@pytest.fixture
def outbox(store: JobStore) -> Iterator[WebhookOutbox]:
    """The store's webhook sender, running; WEBHOOK_SECRET set."""
    settings = store.settings.model_copy(update={"webhook_secret": SecretStr("s3cret"), "webhook_timeout_s": 2.0})
    stop = threading.Event()
    sender = WebhookOutbox(store, settings)
    sender.start(stop)
    yield sender
    stop.set()


def test_a_webhook_gets_the_status_body_signed(store: JobStore, outbox: WebhookOutbox, hooks: HookTarget) -> None:
    job, _ = store.submit(Job(model_key="m", input={"p": 1}, webhook=f"{hooks.url}/hook"))
    worker = Worker(store, steps_runner(), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    wait_for(lambda: hooks.received, timeout=10)
    time.sleep(0.5)  # a second delivery would come now
    [(path, headers, body)] = hooks.received
    assert path == "/hook" and body["status"] == "COMPLETED" and body["id"] == job.id
    assert body["output"] == {"echo": {"p": 1}, "route": "/"}
    data = json.dumps(body).encode()
    expected = hmac.new(b"s3cret", headers["X-Webhook-Timestamp"].encode() + b"." + data, hashlib.sha256)
    assert headers["X-Webhook-Signature"] == "sha256=" + expected.hexdigest()


def test_every_final_state_sends_its_webhook(store: JobStore, outbox: WebhookOutbox, hooks: HookTarget) -> None:
    cancelled, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/cancelled"))
    store.cancel(cancelled.id)
    purged, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/purged"))
    store.purge("m")
    stale, _ = store.submit(Job(model_key="m", input={}, ttl_s=0.01, webhook=f"{hooks.url}/ttl"))
    time.sleep(0.05)
    assert store.claim("m", "w", timeout=0.5) is None  # the stale job times out instead of running
    timed_out, _ = store.submit(Job(model_key="m", input={}, execution_timeout_s=0.2, webhook=f"{hooks.url}/slow"))
    worker = Worker(store, steps_runner(steps=20, delay=0.05), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    wait_for(lambda: len(hooks.received) >= 4, timeout=10)
    time.sleep(0.5)
    assert [body["status"] for body in hooks.bodies("/cancelled")] == ["CANCELLED"]
    assert [body["status"] for body in hooks.bodies("/purged")] == ["CANCELLED"]
    assert [body["status"] for body in hooks.bodies("/ttl")] == ["TIMED_OUT"]
    assert [body["status"] for body in hooks.bodies("/slow")] == ["TIMED_OUT"]
    store.retry(timed_out.id)  # a retried job ends again: one more webhook
    store.cancel(timed_out.id)
    wait_for(lambda: len(hooks.bodies("/slow")) == 2, timeout=10)
    assert {stale.id, purged.id} == {hooks.bodies("/ttl")[0]["id"], hooks.bodies("/purged")[0]["id"]}


def test_a_job_whose_workers_were_lost_sends_its_webhook(kind: str, tmp_path: Path, redis_url: str) -> None:
    hooks = HookTarget()
    store = open_kind(kind, tmp_path, redis_url, lease_s=0.3, max_attempts=1, allow_private_urls=True)
    try:
        job, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/lost"))
        store.claim("m", "dies", 1)
        if kind == "sqlite":  # the process dies; the next one finds the job lost
            store.close()
            store = open_kind(kind, tmp_path, redis_url, lease_s=0.3, max_attempts=1, allow_private_urls=True)
        else:  # the worker goes silent; the next claim finds the job lost
            time.sleep(0.4)
            assert store.claim("m", "another", 1) is None
        stop = threading.Event()
        WebhookOutbox(store, store.settings).start(stop)
        wait_for(lambda: hooks.received, timeout=10)
        stop.set()
        [body] = hooks.bodies("/lost")
        assert body["id"] == job.id and body["status"] == "FAILED" and "WORKER_LOST" in body["error"]
    finally:
        store.close()
        hooks.close()


def test_hanging_webhook_targets_delay_no_other_delivery(
    store: JobStore, outbox: WebhookOutbox, hooks: HookTarget
) -> None:
    for n in range(6):
        job, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/hang-{n}"))
        store.cancel(job.id)
    time.sleep(0.5)  # all six are being sent, and hang
    started = time.monotonic()
    job, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/ok"))
    worker = Worker(store, steps_runner(), store.settings, "m")
    worker.run_job(store.claim("m", worker.id, 1))
    wait_for(lambda: hooks.bodies("/ok"), timeout=10)
    assert time.monotonic() - started < 2, "the webhook waited for the hanging ones"


def test_a_refused_webhook_is_retried_then_given_up_and_a_pending_one_outlives_the_process(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    hooks = HookTarget()
    options = {"webhook_retries": 2, "webhook_retry_delay_s": 0.1, "allow_private_urls": True}
    store = open_kind(kind, tmp_path, redis_url, **options)
    try:
        failing, _ = store.submit(Job(model_key="m", input={}, webhook=f"{hooks.url}/fail"))
        store.cancel(failing.id)
        stop = threading.Event()
        WebhookOutbox(store, store.settings).start(stop)
        wait_for(lambda: len(hooks.bodies("/fail")) == 3, timeout=10)
        time.sleep(1.0)  # a fourth try would come now
        stop.set()
        assert len(hooks.bodies("/fail")) == 3
        assert len({headers["X-Webhook-Id"] for _, headers, _ in hooks.received}) == 1  # one delivery, 3 tries
        time.sleep(0.5)  # the sender has stopped

        port = free_port()
        pending, _ = store.submit(Job(model_key="m", input={}, webhook=f"http://127.0.0.1:{port}/later"))
        store.cancel(pending.id)
        store.close()  # the process ends before the webhook is sent

        later = HookTarget(port)
        store = open_kind(kind, tmp_path, redis_url, **options)
        stop = threading.Event()
        WebhookOutbox(store, store.settings).start(stop)
        wait_for(lambda: later.received, timeout=10)
        stop.set()
        later.close()
        assert [body["id"] for body in later.bodies("/later")] == [pending.id]
        assert store.claim_deliveries(10, 1.0) == []  # nothing is left in the outbox
    finally:
        store.close()
        hooks.close()


def test_sqlite_reruns_a_job_left_running_by_a_dead_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    store = SQLiteStore(settings)
    job, _ = store.submit(Job(model_key="m", input={}))
    store.claim("m", "dead", 1)
    store.close()  # the process "dies" with the job IN_PROGRESS
    store = SQLiteStore(settings)
    assert store.get(job.id).status == "IN_QUEUE"
    store.claim("m", "dead-again", 1)
    store.close()
    store = SQLiteStore(settings)
    lost = store.get(job.id)
    assert lost.status == "FAILED" and lost.error["code"] == "WORKER_LOST"
    store.close()


def test_sqlite_refuses_a_second_process_on_the_same_data_dir(tmp_path: Path) -> None:
    store = SQLiteStore(Settings(data_dir=tmp_path))
    with pytest.raises(WorkerError) as refused:
        SQLiteStore(Settings(data_dir=tmp_path))
    assert refused.value.field == "DATA_DIR" and "REDIS_URL" in refused.value.message
    store.close()


def test_redis_hands_a_silent_workers_job_to_another_after_the_lease(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    store = RedisStore(Settings(redis_url=redis_url, lease_s=0.5))
    job, _ = store.submit(Job(model_key="m", input={}))
    assert store.claim("m", "dies", 1).id == job.id
    assert store.claim("m", "lives", timeout=0.2) is None  # within the lease nobody else takes it
    time.sleep(0.6)
    taken = store.claim("m", "lives", timeout=1)
    assert taken.id == job.id and taken.worker_id == "lives" and taken.attempts == 2
    dead = job.model_copy(update={"worker_id": "dies", "status": "COMPLETED", "output": {"late": True}})
    assert not store.finish(dead)  # the first worker, back from the dead, cannot overwrite it
    worker = Worker(store, steps_runner(), store.settings, "m")
    worker.run_job(taken.model_copy(update={"worker_id": "lives"}))
    assert store.get(job.id).output["route"] == "/"


def test_concurrent_starts_with_one_idempotency_key_make_one_job(store: JobStore) -> None:
    ids: list[str] = []

    def start() -> None:
        ids.append(store.submit(Job(model_key="m", input={}, idempotency_key="same"))[0].id)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and store.stats("m")["jobs"]["inQueue"] == 1


def test_the_worker_outlives_a_redis_that_lost_its_data(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = RedisStore(Settings(redis_url=redis_url, lease_s=0.5))
    worker = Worker(store, steps_runner(), store.settings, "m")
    stop = threading.Event()
    loop = threading.Thread(target=worker.run_forever, args=(stop,))
    loop.start()
    try:
        first, _ = store.submit(Job(model_key="m", input={}))
        assert store.wait(first.id, 10).status == "COMPLETED"
        client.flushdb()  # as after a restart without persistence: the stream and its group are gone
        second, _ = store.submit(Job(model_key="m", input={}))
        assert store.wait(second.id, 20).status == "COMPLETED"
    finally:
        stop.set()
        loop.join(10)
        store.close()


def test_an_old_entry_of_a_retried_job_does_not_take_it_from_its_worker(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    store = RedisStore(Settings(redis_url=redis_url, lease_s=0.5))
    job, _ = store.submit(Job(model_key="m", input={}))
    store.claim("m", "w1", 1)
    store.cancel(job.id)
    store.retry(job.id)
    # The running job's entry went with the retry: one entry (what KEDA and MAX_QUEUE count), one place to take.
    assert redis.Redis.from_url(redis_url).xlen("sdw:queue:m") == 1
    running = store.claim("m", "w2", 1)
    assert running.worker_id == "w2"
    for _ in range(4):  # w2 keeps its lease; w1 is silent past it, still holding the first entry
        time.sleep(0.2)
        assert store.heartbeat(running)
    assert store.claim("m", "w3", timeout=0.2) is None
    assert store.heartbeat(store.get(job.id)) and store.get(job.id).worker_id == "w2"
    store.close()


def test_redis_drops_the_queue_entry_of_a_job_whose_record_expired_while_it_waited(redis_url: str) -> None:
    """The stream is what KEDA counts: an entry left behind would keep a worker running for nothing."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = RedisStore(Settings(redis_url=redis_url))
    try:
        gone, _ = store.submit(Job(model_key="m", input={}, owner="a"))
        kept, _ = store.submit(Job(model_key="m", input={}, owner="a"))
        client.delete(f"sdw:job:{gone.id}")  # as when no worker came for longer than its TTL
        assert client.xlen("sdw:queue:m") == 2
        assert store.claim("m", "w", timeout=1).id == kept.id  # the expired one passed over and forgotten
        jobs = store.stats("m")["jobs"]
        assert client.xlen("sdw:queue:m") == 1 and (jobs["inQueue"], jobs["inProgress"]) == (0, 1)
    finally:
        store.close()


def test_the_next_job_denoises_while_the_last_one_encodes_and_no_more_are_hoarded(store: JobStore) -> None:
    """MAX_BATCH=1: a job is claimed once the one before has finished denoising, not sooner and not later."""
    denoising, most, lock = [0], [0], threading.Lock()

    def run(route: str, payload: Any) -> tuple[int, Any]:
        with lock:
            denoising[0] += 1
            most[0] = max(most[0], denoising[0])
        on_step = step_hook.get()
        for step in range(1, 3):
            time.sleep(0.05)
            on_step(step, 3)
        time.sleep(0.05)
        with lock:
            denoising[0] -= 1
        on_step(3, 3)  # the last step: from here the worker may claim the next job
        time.sleep(0.5)  # decoding, encoding and upload, off the GPU
        return 200, {"echo": payload}

    worker = Worker(store, run, store.settings, "m")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,))
    ids = [store.submit(Job(model_key="m", input={"n": n}))[0].id for n in range(3)]
    thread.start()
    try:
        jobs = [store.wait(job_id, 30) for job_id in ids]
    finally:
        stop.set()
        thread.join(10)
    assert [job.status for job in jobs] == ["COMPLETED"] * 3
    assert jobs[1].started_at < jobs[0].finished_at and jobs[2].started_at < jobs[1].finished_at
    assert most[0] == 1  # with MAX_BATCH=1 the worker never held a second job while one was denoising


def test_a_released_job_is_queued_again_for_any_worker_without_counting_the_run(store: JobStore) -> None:
    job, _ = store.submit(Job(model_key="m", input={}))
    claimed = store.claim("m", "w1", timeout=1)
    assert claimed.attempts == 1 and store.release(claimed)
    back = store.get(job.id)
    assert back.status == "IN_QUEUE" and back.attempts == 0 and back.worker_id is None
    assert not store.release(claimed), "a job no longer this worker's is not handed back twice"
    again = store.claim("m", "w2", timeout=2)  # at once: not after the lease runs out
    assert again is not None and again.id == job.id and again.attempts == 1


# Sharing between keys: turns in the queue, each key's share of it, and downloads beside the model.
def test_keys_take_turns_and_each_keys_jobs_run_in_the_order_they_came(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    store = open_kind(kind, tmp_path, redis_url)
    try:
        a = [store.submit(Job(model_key="m", input={"n": n}, owner="a"))[0].id for n in range(4)]
        b = [store.submit(Job(model_key="m", input={"n": n}, owner="b"))[0].id for n in range(2)]
        c = store.submit(Job(model_key="m", input={}, owner="c"))[0].id
        order = [store.claim("m", "w", timeout=1).id for _ in range(7)]
        assert order == [a[0], b[0], c, a[1], b[1], a[2], a[3]]  # a burst waits its turn; no key is skipped
        late = store.submit(Job(model_key="m", input={}, owner="b"))[0].id
        more = store.submit(Job(model_key="m", input={}, owner="a"))[0].id
        assert [store.claim("m", "w", timeout=1).id for _ in range(2)] == [late, more]  # b was served longer ago
    finally:
        store.close()


def test_past_its_share_of_the_queue_a_key_is_refused_and_other_keys_are_not(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    store = open_kind(kind, tmp_path, redis_url, max_queue=10, max_queued_per_key=2)
    try:
        first, _ = store.submit(Job(model_key="m", input={}, owner="a"))
        store.submit(Job(model_key="m", input={}, owner="a"))
        with pytest.raises(WorkerError) as refused:
            store.submit(Job(model_key="m", input={}, owner="a"))
        assert refused.value.code == "QUEUE_FULL" and refused.value.status == 429
        assert "already has 2 jobs" in refused.value.message and "MAX_QUEUED_PER_KEY" in refused.value.message
        assert store.submit(Job(model_key="m", input={}, owner="b"))[1]
        claimed = store.claim("m", "w", timeout=1)
        assert claimed.id == first.id
        with pytest.raises(WorkerError):  # running counts: a job queued or running holds its place
            store.submit(Job(model_key="m", input={}, owner="a"))
        Worker(store, steps_runner(), store.settings, "m").run_job(claimed)
        assert store.submit(Job(model_key="m", input={}, owner="a"))[1]  # ended: its place is free again
        assert store.stats("m")["jobs"]["inQueue"] == 3
    finally:
        store.close()


def test_a_busy_keys_jobs_that_download_wait_while_other_jobs_go_ahead(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    from sdworker.jobs import Busy

    store = open_kind(kind, tmp_path, redis_url)
    try:
        fetches = store.submit(Job(model_key="m", input={"image": "https://example.com/a.png"}, owner="a"))[0]
        after = store.submit(Job(model_key="m", input={"prompt": "text"}, owner="a"))[0]
        plain = store.submit(Job(model_key="m", input={"prompt": "text"}, owner="b"))[0]
        other = store.submit(Job(model_key="m", input={"loras": [{"url": "HTTPS://x/y.safetensors"}]}, owner="b"))[0]
        assert fetches.fetches and other.fetches and not plain.fetches
        busy_a = Busy(owners=frozenset({"a"}))
        assert store.claim("m", "w", timeout=1, busy=lambda: busy_a).id == plain.id  # a's head waits, a's later too
        assert store.claim("m", "w", timeout=1, busy=lambda: busy_a).id == other.id
        assert store.claim("m", "w", timeout=0.3, busy=lambda: Busy(everyone=True)) is None
        assert [store.claim("m", "w", timeout=1).id for _ in range(2)] == [fetches.id, after.id]
    finally:
        store.close()


def test_downloads_hold_no_place_on_the_model_and_each_key_runs_its_share(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    """Key a's image URLs hang: two of them download at once (MAX_FETCHES_PER_KEY), the rest wait in the queue,
    and key b's jobs run meanwhile, one of them downloading too."""
    from sdworker.generate import fetch_hook

    store = open_kind(kind, tmp_path, redis_url, max_fetches_per_key=2, max_queue=50)
    gate, downloading, lock = threading.Event(), [], threading.Lock()

    def run(route: str, payload: Any) -> tuple[int, Any]:
        if "image" in payload:
            with fetch_hook.get()():
                with lock:
                    downloading.append(payload["who"])
                if payload["who"] == "a":
                    gate.wait(30)  # a's URL hangs until the test lets it go
                with lock:
                    downloading.remove(payload["who"])
        return steps_runner()(route, payload)

    worker = Worker(store, run, store.settings, "m")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,))
    thread.start()
    try:
        hanging = [
            store.submit(Job(model_key="m", input={"who": "a", "image": "http://a/x.png"}, owner="a"))[0].id
            for _ in range(6)
        ]
        wait_for(lambda: downloading.count("a") == 2, timeout=10)
        b = [store.submit(Job(model_key="m", input={"who": "b", "n": n}, owner="b"))[0].id for n in range(3)]
        b.append(store.submit(Job(model_key="m", input={"who": "b", "image": "http://b/y.png"}, owner="b"))[0].id)
        assert all(store.wait(job_id, 10).status == "COMPLETED" for job_id in b)
        assert downloading.count("a") == 2  # never more than a's share
        assert sum(store.get(job_id).status == "IN_QUEUE" for job_id in hanging) == 4
        gate.set()
        assert all(store.wait(job_id, 20).status == "COMPLETED" for job_id in hanging)
    finally:
        gate.set()
        stop.set()
        thread.join(10)
        store.close()


def test_redis_takes_over_the_jobs_an_older_release_queued_in_its_stream(redis_url: str) -> None:
    """Before turns, jobs waited in one stream read by the consumer group "workers": an upgrade loses none."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    stream = "sdw:queue:m"
    client.xgroup_create(stream, "workers", id="0", mkstream=True)
    old = {}
    for name, status in (("running", "IN_PROGRESS"), ("waiting", "IN_QUEUE"), ("ended", "COMPLETED")):
        job = Job(
            model_key="m",
            input={"n": name},
            owner="a",
            status=status,
            worker_id="old" if status != "IN_QUEUE" else None,
        )
        entry = client.xadd(stream, {"id": job.id})
        client.hset(f"sdw:job:{job.id}", mapping={"data": job.model_dump_json(), "status": status, "entry": entry})
        old[name] = job
    client.xreadgroup("workers", "old", {stream: ">"}, count=1)  # the running job's entry, pending for its worker
    store = RedisStore(Settings(redis_url=redis_url, lease_s=0.5))
    try:
        waiting = store.claim("m", "new", timeout=1)
        assert waiting.id == old["waiting"].id
        Worker(store, steps_runner(), store.settings, "m").run_job(waiting)
        taken = store.claim("m", "new", timeout=2)  # the old worker's lease runs out: taken over
        assert taken.id == old["running"].id and taken.attempts == 1
        assert client.xlen(stream) == 1 and not client.xinfo_groups(stream)  # only the running job's entry is left
        assert store.claim("m", "new", timeout=0.2) is None
    finally:
        store.close()


def test_each_keys_share_of_the_queue_is_all_of_it_with_one_key_and_a_quarter_with_more() -> None:
    assert Settings(max_queue=100).queued_per_key() == 100
    assert Settings(max_queue=100, api_keys=SecretStr("one")).queued_per_key() == 100
    assert Settings(max_queue=100, api_keys=SecretStr("one,two")).queued_per_key() == 25
    assert Settings(max_queue=100, api_keys=SecretStr("one"), admin_api_keys=SecretStr("root")).queued_per_key() == 25
    assert Settings(max_queue=2, api_keys=SecretStr("one,two")).queued_per_key() == 1
    keyless = Settings(max_queue=100, api_keys=SecretStr("none"), admin_api_keys=SecretStr("root"))
    assert keyless.queued_per_key() == 100  # API_KEYS=none: one caller, whatever the admin keys
    assert Settings(max_queue=100, api_keys=SecretStr("a,b"), max_queued_per_key=70).queued_per_key() == 70
