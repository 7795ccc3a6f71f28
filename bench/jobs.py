"""What the job server costs: status reads under load, start/check over a direct call, and crash recovery.

    python bench/jobs.py [--store sqlite|redis|both] [--seconds 10] [--threads 8] [--rounds 30] [--out FILE]

It bakes tiny-sd, starts `python app.py` (and redis-server for the Redis store) and measures from this process,
which is a second process to the server:
- status_rps: GET /v2/<key>/status/<id> and POST /check/v4/ requests per second, from `--threads` keep-alive
  clients for `--seconds`, with the median and p99 latency;
- added latency: the median round trip of start/v4 (waiting) and of start-only + long-polled check over the
  median of a direct POST / on the same tiny request, interleaved so that noise hits all three alike;
- recovery (Redis only): a gateway and two workers, the worker running a job is killed with SIGKILL, and the
  time until the job is COMPLETED by the other worker is measured, for LEASE_S 2 and the default 10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KEY = "bench-key"
TINY = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError("gave up waiting")


def start(env: dict[str, str], *mode: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "app.py", *mode],
        cwd=ROOT,
        env={**env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: requests.get(f"{url}/health", timeout=2).status_code == 200)
    return url, process


def start_tiny(model_dir: Path, work: Path, threads: int) -> tuple[str, subprocess.Popen]:
    """`python app.py` (SQLite store, every stage) on a baked tiny-sd, its torch on `threads` threads."""
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "MODE", "STAGES")}
    env.update(
        MODEL_ID="tiny-sd",
        MODEL_DIR=str(model_dir),
        API_KEYS=KEY,
        HOST="127.0.0.1",
        DATA_DIR=str(work / "data"),
        TORCH_THREADS=str(threads),
    )
    return start(env)


def status_rps(url: str, seconds: float, threads: int) -> dict:
    """Requests per second of status and check reads on a completed job, from `threads` clients."""
    headers = {"Authorization": f"Bearer {KEY}"}
    job = requests.post(f"{url}/v2/tiny-sd/runsync", json={"input": TINY}, headers=headers, timeout=60).json()
    results = {}
    for name, call in {
        "runpod_status": lambda s: s.get(f"{url}/v2/tiny-sd/status/{job['id']}", headers=headers, timeout=10),
        "banana_check": lambda s: s.post(f"{url}/check/v4/", json={"apiKey": KEY, "callID": job["id"]}, timeout=10),
    }.items():
        latencies: list[float] = []
        stop = time.monotonic() + seconds

        def client(call=call, stop: float = stop, latencies: list[float] = latencies) -> None:
            session = requests.Session()
            while time.monotonic() < stop:
                began = time.perf_counter()
                response = call(session)
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - began)

        workers = [threading.Thread(target=client) for _ in range(threads)]
        began = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - began
        latencies.sort()
        results[name] = {
            "requests": len(latencies),
            "rps": round(len(latencies) / elapsed),
            "median_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        }
    return results


def added_latency(url: str, rounds: int) -> dict:
    """Median round trips of a direct call, start/v4 waiting, and start-only + long-polled check."""
    session = requests.Session()
    handler_ms: list[float] = []

    def direct() -> None:
        response = session.post(url, json=TINY, headers={"X-BANANA-API-KEY": KEY}, timeout=60)
        assert response.status_code == 200
        handler_ms.append(response.json()["$timings"]["total"])

    def start_waiting() -> None:
        body = {"apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": TINY, "startOnly": False}
        assert session.post(f"{url}/start/v4/", json=body, timeout=60).json()["message"] == "success"

    def start_then_check() -> None:
        body = {"apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": TINY, "startOnly": True}
        call_id = session.post(f"{url}/start/v4/", json=body, timeout=60).json()["callID"]
        check = {"apiKey": KEY, "callID": call_id, "longPoll": True}
        assert session.post(f"{url}/check/v4/", json=check, timeout=60).json()["message"] == "success"

    calls = {"direct": direct, "start_waiting": start_waiting, "start_then_check": start_then_check}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):  # warm up
        for call in calls.values():
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {
        "rounds": rounds,
        "median_ms": {name: round(value, 1) for name, value in medians.items()},
        "handler_total_median_ms": round(statistics.median(handler_ms), 1),
        "added_ms": {
            name: round(medians[name] - medians["direct"], 1) for name in ("start_waiting", "start_then_check")
        },
    }


def recovery(env: dict[str, str], lease_s: float) -> dict:
    """Kill the worker running a job; time until another worker has completed it."""
    env = {**env, "LEASE_S": str(lease_s)}
    url, gateway = start(env, "--mode", "gateway")
    workers = [
        subprocess.Popen(
            [sys.executable, "app.py", "--mode", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    headers = {"Authorization": f"Bearer {KEY}"}

    def status(job_id: str) -> dict:
        return requests.get(f"{url}/v2/tiny-sd/status/{job_id}", headers=headers, timeout=10).json()

    try:
        wait_until(
            lambda: requests.get(f"{url}/v2/tiny-sd/health", headers=headers, timeout=5).json()["workers"]["idle"] == 2
        )
        slow = {"prompt": "slow", "num_inference_steps": 300}
        job_id = requests.post(f"{url}/v2/tiny-sd/run", json={"input": slow}, headers=headers, timeout=10).json()["id"]
        first = wait_until(lambda: (body := status(job_id)).get("progress") and body)
        pid = int(first["workerId"].split("-")[-2])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        taken = wait_until(lambda: (body := status(job_id))["workerId"] != first["workerId"] and body)
        taken_s = time.monotonic() - killed
        done = wait_until(lambda: (body := status(job_id))["status"] == "COMPLETED" and body)
        return {
            "lease_s": lease_s,
            "killed_at_step": first["progress"]["step"],
            "taken_over_after_s": round(taken_s, 2),
            "completed_after_s": round(time.monotonic() - killed, 2),
            "rerun_execution_ms": done["executionTime"],
            "progress_when_taken": taken.get("progress"),
        }
    finally:
        for process in [gateway, *workers]:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sdworker.model import bake_model

    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    model_dir = bake_model("tiny-sd", work / "models").model_dir
    env = {key: value for key, value in os.environ.items() if key not in ("API_KEYS", "REDIS_URL", "MODE")}
    env.update(MODEL_ID="tiny-sd", MODEL_DIR=str(model_dir), API_KEYS=KEY, HOST="127.0.0.1", MAX_STEPS="1000")
    redis_process = None
    report: dict = {"machine": f"{os.cpu_count()} CPU cores, no GPU" if not shutil.which("nvidia-smi") else "GPU"}
    try:
        for store in ["sqlite", "redis"] if args.store == "both" else [args.store]:
            store_env = {**env, "DATA_DIR": str(work / f"data-{store}")}
            if store == "redis":
                port = free_port()
                redis_process = subprocess.Popen(
                    # Persistent, as the worker requires of a production Redis (AOF, fsync every second).
                    ["redis-server", "--port", str(port), "--save", "", "--appendonly", "yes", "--dir", str(work)],
                    stdout=subprocess.DEVNULL,
                )
                store_env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                time.sleep(0.5)
            url, server = start(store_env)
            try:
                report[store] = {
                    "status_load": status_rps(url, args.seconds, args.threads),
                    "latency": added_latency(url, args.rounds),
                }
            finally:
                server.kill()
                server.wait()
            if store == "redis":
                report[store]["recovery"] = [recovery(store_env, lease) for lease in (2.0, 10.0)]
            print(json.dumps({store: report[store]}, indent=2), flush=True)
    finally:
        if redis_process is not None:
            redis_process.kill()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
