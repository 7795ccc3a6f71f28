"""Seed 003's service: `GET /` readiness (what its `wait_for_server` polls), `POST /infer` driven by the unmodified
octoai-sdk client (in a virtualenv of its own: its pins clash with the worker's; `make test` builds it), and
IDLE_SHUTDOWN_S."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SHARED_KEYS, Worker, decode, start_worker, wait_for
from fastapi.testclient import TestClient

from sdworker.config import Settings
from sdworker.jobs import open_store
from sdworker.platforms.server import create_server

KEY = SHARED_KEYS["octoai"]
CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
SEEDED = {"num_inference_steps": 2, "seed": 11}


def start(baked: dict[str, Path], data: Path, **extra: str) -> tuple[subprocess.Popen, str]:
    return start_worker(baked["tiny-sd"], data, KEY, **extra)


@pytest.fixture
def worker(quick_start_worker: Worker) -> str:
    """The suite's shared quick-start worker (tiny-sd, default settings), called with this file's key."""
    return quick_start_worker.url


def test_get_root_is_503_until_the_model_is_loaded_then_200(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=KEY)
    loaded = {"yes": False}
    client = TestClient(create_server(settings, open_store(settings), {"/": False}, lambda: loaded["yes"]))
    answer = client.get("/")
    assert answer.status_code == 503 and answer.json() == {"status": "loading"}
    loaded["yes"] = True
    answer = client.get("/")
    assert answer.status_code == 200 and answer.json() == {"status": "ready"}


def seed_wait_for_server(url: str, retries: int, timeout: float, delay: float = 1.0) -> None:
    """The seed's own readiness loop, as it is written there (no key: GET / needs none)."""
    for i in range(retries):
        try:
            r = requests.get(url, timeout=timeout)
            r.raise_for_status()
            return
        except (requests.exceptions.ConnectionError, requests.exceptions.HTTPError, requests.exceptions.Timeout):
            if i == retries - 1:
                raise
            time.sleep(delay)


def test_the_octoai_client_gets_image_b64_and_it_is_the_direct_calls_image(worker: str) -> None:
    seed_wait_for_server(worker, retries=10, timeout=1.0)
    script = (
        "import json, sys\n"
        "from octoai.client import Client\n"
        "inputs = {'prompt': {'text': 'a lighthouse'}, **json.loads(sys.argv[2])}\n"
        "print(json.dumps(Client().infer(endpoint_url=sys.argv[1] + '/infer', inputs=inputs)))\n"
    )
    result = run_client(script, worker, json.dumps(SEEDED))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    direct = requests.post(worker, json={"prompt": "a lighthouse", **SEEDED}, headers={"X-BANANA-API-KEY": KEY})
    assert answer["output"]["image_b64"] == direct.json()["images"][0]["base64"]
    assert decode(answer["output"]["image_b64"]).size == (64, 64)
    assert answer["$meta"]["seed"] == 11


def run_client(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` on the unmodified octoai-sdk client, with this file's key as OCTOAI_TOKEN."""
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON.relative_to(ROOT)} is missing: `make test` builds it (requirements-clients.txt)")
    env = {**os.environ, "OCTOAI_TOKEN": KEY}
    return subprocess.run(
        [str(CLIENT_PYTHON), "-c", script, *args], capture_output=True, text=True, timeout=120, env=env
    )


ASYNC = """
import json, sys, time
from octoai.client import Client
from octoai.errors import OctoAIError
client = Client()
print(client.health_check(sys.argv[1] + "/healthcheck", timeout=30))
future = client.infer_async(sys.argv[1] + "/infer", json.loads(sys.argv[2]))
print(future.response_id)
try:
    while not client.is_future_ready(future):
        time.sleep(0.05)
    print(json.dumps(client.get_future_result(future)))
except OctoAIError as err:
    print("raised", err)
"""


def test_the_octoai_clients_async_infer_gets_the_same_image_and_a_failed_one_raises(worker: str) -> None:
    inputs = {"prompt": {"text": "a lighthouse"}, **SEEDED}
    result = run_client(ASYNC, worker, json.dumps(inputs))
    assert result.returncode == 0, result.stderr
    health, job, answer = result.stdout.splitlines()
    direct = requests.post(worker, json={"prompt": "a lighthouse", **SEEDED}, headers={"X-BANANA-API-KEY": KEY})
    assert health == "200" and json.loads(answer)["output"]["image_b64"] == direct.json()["images"][0]["base64"]
    other = {"Authorization": f"Bearer {SHARED_KEYS['smoke']}"}  # a job belongs to the key that made it
    assert requests.get(f"{worker}/futures/{job}", headers=other, timeout=30).status_code == 404
    assert requests.get(f"{worker}/futures/{job}/result", headers=other, timeout=30).status_code == 404

    failing = {**inputs, "image": "http://nowhere.invalid/a.png"}  # fails when the worker fetches it
    result = run_client(ASYNC, worker, json.dumps(failing))
    assert result.returncode == 0, result.stderr
    raised = result.stdout.splitlines()[-1]
    assert raised.startswith("raised") and "IMAGE_FETCH_FAILED" in raised, result.stdout


def test_infer_refuses_a_bad_key_and_names_bad_fields(worker: str) -> None:
    body = {"prompt": {"text": "a lighthouse"}, **SEEDED}
    assert requests.post(f"{worker}/infer", json=body, timeout=30).status_code == 401
    wrong = requests.post(f"{worker}/infer", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    bearer = {"Authorization": f"Bearer {KEY}"}
    for bad, field in (
        ({"prompt": {"words": "x"}}, "prompt.text"),
        ({"prompt": {"text": "x"}, "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": {"text": "x"}, "nope": 1}, "nope"),
    ):
        answer = requests.post(f"{worker}/infer", json=bad, headers=bearer, timeout=30)
        assert answer.status_code == 422 and answer.json()["$error"]["field"] == field, answer.text


def test_an_idle_worker_exits_0_but_never_while_a_job_runs(baked: dict[str, Path], tmp_path: Path) -> None:
    process, url = start(baked, tmp_path, IDLE_SHUTDOWN_S="2", MAX_STEPS="5000")
    try:
        wait_for(lambda: requests.get(url, timeout=5).status_code == 200, timeout=60)
        started = time.monotonic()
        slow = requests.post(  # 3 to 10 s of denoising on a CPU: longer than IDLE_SHUTDOWN_S
            f"{url}/infer",
            json={"prompt": {"text": "slow"}, "num_inference_steps": 900},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert slow.status_code == 200 and slow.json()["output"]["image_b64"]
        assert time.monotonic() - started > 2  # it ran longer than the idle time, and the worker stayed up
        unkeyed = (  # not use, so none keeps it up: probes, refusals, unknown routes, Potassium's warm-up and status
            ("GET", url, {}),
            ("POST", f"{url}/infer", {"Authorization": "Bearer wrong"}),
            ("POST", f"{url}/", {}),
            ("GET", f"{url}/no-such-route", {}),
            ("POST", f"{url}/_k/warmup", {}),
            ("GET", f"{url}/__status__", {"Authorization": f"Bearer {KEY}"}),  # a status read, even with a key
        )
        probing = time.monotonic()  # the probes' minute starts after the job (slower when other tests load the CPU)
        while process.poll() is None and time.monotonic() - probing < 60:
            try:
                for method, address, headers in unkeyed:
                    requests.request(method, address, json={"prompt": "x"}, headers=headers, timeout=5)
            except requests.ConnectionError:
                break  # it has stopped listening
            time.sleep(0.2)
        assert time.monotonic() - probing < 60, "the probes kept the idle worker up for 60 s"
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_seed_002s_dummy_key_is_refused_where_api_keys_does_not_name_it(worker: str) -> None:
    body = json.loads((ROOT / "tests" / "seeds" / "sd_dockerized_generate.json").read_text())  # api_key: the dummy
    answer = requests.post(f"{worker}/generate", json=body, timeout=30)
    assert answer.status_code == 401 and answer.json()["$error"]["field"] == "api_key"
    assert requests.get(f"{worker}/recent", params={"api_key": body["api_key"]}, timeout=30).status_code == 401


def test_infer_refuses_a_body_nested_too_deep(worker: str) -> None:
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    body = json.dumps({"prompt": {"text": "a"}, "x": deep})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = requests.post(f"{worker}/infer", data=body, headers=headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["$error"]["code"] == "INVALID_JSON", answer.text
