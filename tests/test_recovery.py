"""Jobs that are not lost: a restarted server, a worker killed mid-job, and the start-up guards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from conftest import ROOT, HookTarget, free_port, output_of, start_process, start_redis, start_workers, wait_for

from sdworker.config import Settings
from sdworker.jobs.sqlite_store import SQLiteStore

KEY = "recovery-key"
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 3}
SLOW = {"prompt": "slow", "num_inference_steps": 200}  # about 3 s on a CPU: outlasts the 1 s grace below


def env_for(model_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("API_KEYS", "REDIS_URL")}
    return {
        **env,
        "MODEL_ID": "tiny-sd",
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(data_dir),
        "HOST": "127.0.0.1",
        "API_KEYS": KEY,
        "MAX_STEPS": "1000",
        **extra,
    }


def rp(url: str, method: str, path: str, **kwargs) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    return requests.request(method, f"{url}/v2/tiny-sd/{path}", headers=headers, timeout=30, **kwargs).json()


def serve(env: dict[str, str], *mode: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "app.py", *mode], f"{url}/health", {**env, "PORT": str(port)})
    return url, process


@dataclass
class Restarted:
    """A server killed with -9 in the middle of its work, and the server started again on its DATA_DIR."""

    url: str
    done: dict  # completed before the kill
    slow: str  # IN_PROGRESS at the kill
    queued: str  # IN_QUEUE at the kill
    hooked: list[str]  # completed before the kill, their webhooks not delivered: the receiver was down
    hooks: HookTarget  # the receiver, up once the server was killed


@pytest.fixture(scope="module")
def restarted(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restarted]:
    port = free_port()  # the receiver is down while the jobs end
    data = tmp_path_factory.mktemp("restarted") / "data"
    env = env_for(baked["tiny-sd"], data, ALLOW_PRIVATE_URLS="1", WEBHOOK_RETRY_DELAY_S="1")
    url, process = serve(env)
    try:
        done = rp(url, "POST", "runsync", json={"input": FAST})
        assert done["status"] == "COMPLETED"
        hooked = [
            rp(url, "POST", "run", json={"input": FAST, "webhook": f"http://127.0.0.1:{port}/hook/{n}"})["id"]
            for n in range(12)
        ]
        wait_for(lambda: all(rp(url, "GET", f"status/{job}")["status"] == "COMPLETED" for job in hooked))
        slow = rp(url, "POST", "run", json={"input": SLOW})["id"]
        queued = rp(url, "POST", "run", json={"input": FAST})["id"]
        wait_for(lambda: rp(url, "GET", f"status/{slow}").get("progress"))
    finally:
        process.send_signal(signal.SIGKILL)  # no clean shutdown: the job is IN_PROGRESS on disk
        process.wait(10)
    hooks = HookTarget(port)
    url, process = serve(env)
    try:
        yield Restarted(url, done, slow, queued, hooked, hooks)
    finally:
        process.terminate()
        process.wait(10)
        hooks.close()


def test_jobs_and_results_survive_a_killed_server(restarted: Restarted) -> None:
    url = restarted.url
    kept = rp(url, "GET", f"status/{restarted.done['id']}")
    assert kept["status"] == "COMPLETED" and kept["output"]["images"][0]["seed"] == 3
    rerun = wait_for(lambda: (body := rp(url, "GET", f"status/{restarted.slow}"))["status"] == "COMPLETED" and body)
    assert rerun["output"]["$meta"]["num_inference_steps"] == SLOW["num_inference_steps"]
    assert wait_for(lambda: rp(url, "GET", f"status/{restarted.queued}")["status"] == "COMPLETED")


def test_webhooks_pending_at_a_kill_are_delivered_after_the_restart(restarted: Restarted) -> None:
    hooks = restarted.hooks
    wait_for(lambda: len(hooks.received) >= len(restarted.hooked), timeout=60)
    assert sorted(body["id"] for _, _, body in hooks.received) == sorted(restarted.hooked)
    assert {body["status"] for _, _, body in hooks.received} == {"COMPLETED"}


def test_a_killed_workers_job_completes_once_on_another_worker(
    baked: dict[str, Path], tmp_path: Path, redis_url: str
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    env = env_for(baked["tiny-sd"], tmp_path / "data", REDIS_URL=redis_url, LEASE_S="2")
    url, gateway = serve(env, "--mode", "gateway")
    workers = start_workers(env, 2)
    try:
        wait_for(lambda: rp(url, "GET", "health")["workers"]["idle"] == 2)
        job_id = rp(url, "POST", "run", json={"input": SLOW})["id"]
        first = wait_for(lambda: (body := rp(url, "GET", f"status/{job_id}")).get("progress") and body)
        pid = int(first["workerId"].split("-")[-2])
        victim = next(worker for worker in workers if worker.pid == pid)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        done = wait_for(lambda: (body := rp(url, "GET", f"status/{job_id}"))["status"] == "COMPLETED" and body)
        took = time.monotonic() - killed_at
        assert (
            done["workerId"] != first["workerId"]
            and done["output"]["$meta"]["num_inference_steps"] == SLOW["num_inference_steps"]
        )
        assert rp(url, "GET", "health")["jobs"]["completed"] == 1  # once, not twice
        assert took < 60, f"the job took {took:.1f} s to finish elsewhere"
    finally:
        for process in [gateway, *workers]:
            process.kill()
            process.wait(10)


def test_sigterm_finishes_the_running_job_refusing_new_ones_meanwhile(baked: dict[str, Path], tmp_path: Path) -> None:
    url, process = serve(env_for(baked["tiny-sd"], tmp_path / "data", SHUTDOWN_GRACE_S="60"))
    try:
        slow = rp(url, "POST", "run", json={"input": SLOW})["id"]
        wait_for(lambda: rp(url, "GET", f"status/{slow}").get("progress"))
        process.send_signal(signal.SIGTERM)
        health = wait_for(lambda: (r := requests.get(f"{url}/health", timeout=5)).status_code == 503 and r.json())
        assert health["status"] == "draining"
        refused = requests.post(
            f"{url}/v2/tiny-sd/run", json={"input": FAST}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        )
        assert refused.status_code == 503 and refused.json()["$error"]["code"] == "DRAINING"
        assert refused.headers["Retry-After"] == "1"
        assert rp(url, "GET", f"status/{slow}")["status"] == "IN_PROGRESS"  # reads are still answered
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait(10)
    # The server left once the job was done: it is COMPLETED in the store, after one run, not handed back.
    store = SQLiteStore(Settings(data_dir=tmp_path / "data"))
    done = store.get(slow)
    store.close()
    assert done.status == "COMPLETED" and done.attempts == 1, done
    assert done.output["$meta"]["num_inference_steps"] == SLOW["num_inference_steps"]


def test_a_job_outlasting_the_shutdown_grace_goes_back_to_the_queue(baked: dict[str, Path], tmp_path: Path) -> None:
    env = env_for(baked["tiny-sd"], tmp_path / "data", SHUTDOWN_GRACE_S="1", MAX_ATTEMPTS="1")
    url, process = serve(env)
    try:
        slow = rp(url, "POST", "run", json={"input": SLOW})["id"]
        wait_for(lambda: rp(url, "GET", f"status/{slow}").get("progress"))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0 and time.monotonic() - started < 15
    finally:
        process.kill()
        process.wait(10)
    # Handed back, not lost: with MAX_ATTEMPTS=1 a lost run would fail it as WORKER_LOST at the next start.
    url, process = serve(env)
    try:
        rerun = wait_for(
            lambda: (body := rp(url, "GET", f"status/{slow}"))["status"] in ("COMPLETED", "FAILED") and body
        )
        assert rerun["status"] == "COMPLETED", rerun
    finally:
        process.terminate()
        process.wait(10)


def test_a_fresh_server_makes_an_api_key_once_and_keeps_it(baked: dict[str, Path], tmp_path: Path) -> None:
    env = env_for(baked["tiny-sd"], tmp_path / "data")
    del env["API_KEYS"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env["PORT"] = str(port)
    process = start_process([sys.executable, "app.py"], f"{url}/health", env)
    try:
        assert requests.post(url, json=FAST, timeout=30).status_code == 401
        key = (tmp_path / "data" / "api_key").read_text().strip()
        assert (tmp_path / "data" / "api_key").stat().st_mode & 0o777 == 0o600
        # Prompts, images, webhook URLs and the key: readable by the server's user only.
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "data" / "jobs.sqlite3").stat().st_mode & 0o777 == 0o600
        assert requests.post(url, json=FAST, headers={"X-BANANA-API-KEY": key}, timeout=60).status_code == 200
    finally:
        process.terminate()
        first_output = output_of(process)
    assert key in first_output
    process = start_process([sys.executable, "app.py"], f"{url}/health", env)
    try:
        assert requests.post(url, json=FAST, headers={"X-BANANA-API-KEY": key}, timeout=60).status_code == 200
    finally:
        process.terminate()
        assert key not in output_of(process)  # printed once, at its making


def test_api_keys_none_lets_callers_in_without_a_key_and_says_so_at_every_start(
    baked: dict[str, Path], tmp_path: Path
) -> None:
    """For a worker behind a private network, whose clients (docker-diffusers-api's) send no key. It keeps nothing
    that would make a later start quiet: no key file is made."""
    url, process = serve(env_for(baked["tiny-sd"], tmp_path / "data", API_KEYS="none"))
    try:
        assert requests.post(url, json=FAST, timeout=60).status_code == 200
        job = requests.post(f"{url}/v2/tiny-sd/run", json={"input": FAST}, timeout=30).json()["id"]
        other = {"Authorization": "Bearer whatever"}  # any key, or none: the same caller, who sees every job
        assert requests.get(f"{url}/v2/tiny-sd/status/{job}", headers=other, timeout=30).status_code == 200
        assert not (tmp_path / "data" / "api_key").exists()
    finally:
        process.terminate()
    output = output_of(process)
    assert "API_KEYS=none: every caller is let in without a key" in output, output[-2000:]


def test_gateway_and_worker_modes_without_redis_say_so(tmp_path: Path) -> None:
    for mode in ("gateway", "worker"):
        result = subprocess.run(
            [sys.executable, "app.py", "--mode", mode],
            cwd=ROOT,
            env=env_for(tmp_path, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "set REDIS_URL" in result.stderr


def test_a_second_server_on_the_same_data_dir_says_so(baked: dict[str, Path], tmp_path: Path) -> None:
    env = env_for(baked["tiny-sd"], tmp_path / "data")
    _, process = serve(env)
    try:
        result = subprocess.run(
            [sys.executable, "app.py"],
            cwd=ROOT,
            env={**env, "PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "another process already serves the jobs" in result.stderr
    finally:
        process.terminate()
        process.wait(10)


def test_a_gateway_without_api_keys_says_so(tmp_path: Path, redis_url: str) -> None:
    env = {**env_for(tmp_path, tmp_path), "REDIS_URL": redis_url}
    del env["API_KEYS"]
    result = subprocess.run(
        [sys.executable, "app.py", "--mode", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "needs API_KEYS" in result.stderr


def test_an_empty_key_file_is_refused_never_an_open_server(baked: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text("\n")
    env = env_for(baked["tiny-sd"], tmp_path / "data", PORT=str(free_port()))
    del env["API_KEYS"]
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "api_key is empty" in result.stderr


def test_a_redis_that_keeps_nothing_on_disk_is_refused_unless_allowed(tmp_path: Path) -> None:
    port = free_port()
    volatile = start_redis(tmp_path, port, persistent=False)
    env = {**env_for(tmp_path / "models", tmp_path / "data"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        refused = subprocess.run(
            [sys.executable, "app.py", "--mode", "gateway"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "keeps nothing on disk" in refused.stderr and "REDIS_ALLOW_VOLATILE=1" in refused.stderr
        url, gateway = serve({**env, "REDIS_ALLOW_VOLATILE": "1"}, "--mode", "gateway")
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        gateway.terminate()
        gateway.wait(10)
    finally:
        volatile.kill()
        volatile.wait(10)


def test_while_redis_is_down_the_gateway_answers_503_and_says_it_is_not_ready(tmp_path: Path) -> None:
    port = free_port()
    store = start_redis(tmp_path, port)
    env = {**env_for(tmp_path / "models", tmp_path / "data"), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    url, gateway = serve(env, "--mode", "gateway")
    try:
        job = rp(url, "POST", "run", json={"input": FAST})["id"]
        time.sleep(1.5)  # appendfsync everysec: the job is on disk
        store.kill()
        store.wait(10)
        headers = {"Authorization": f"Bearer {KEY}"}
        for method, path in (("GET", f"status/{job}"), ("POST", "run")):
            response = requests.request(
                method, f"{url}/v2/tiny-sd/{path}", json={"input": FAST}, headers=headers, timeout=60
            )
            assert response.status_code == 503, response.text
            assert response.json()["$error"]["code"] == "STORE_UNAVAILABLE" and response.headers["Retry-After"]
        health = requests.get(f"{url}/health", timeout=60)
        assert health.status_code == 503 and health.json()["status"] == "store unavailable"
        store = start_redis(tmp_path, port)  # back, with its append-only file: the job is still there
        assert wait_for(lambda: requests.get(f"{url}/health", timeout=60).status_code == 200, timeout=60)
        assert rp(url, "GET", f"status/{job}")["status"] == "IN_QUEUE"
    finally:
        gateway.terminate()
        gateway.wait(10)
        store.kill()
        store.wait(10)
