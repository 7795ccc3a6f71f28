"""The job server over HTTP, driven by the unmodified clients people already have: banana_dev 6.3.0 (run, start
and check of `banana_dev.package`, over start/check v4) and runpod 1.12.0 (`Endpoint`). Every test runs against
the SQLite store and against Redis.

Both clients read their base URL once, at import, from an environment variable (BANANA_URL,
RUNPOD_ENDPOINT_BASE_URL) into a module global; the tests set that global, which is all the variable does. One
test drives both clients in a fresh process with the variables themselves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import runpod
from banana_dev import generics
from banana_dev import package as banana
from conftest import decode, free_port, start_process, wait_for

from sdworker.platforms.server import DOCS_ASSETS

KEY = "server-test-key"
OTHER = "other-key"  # a second accepted key: a second customer of the same endpoint
ADMIN = "admin-key"
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7}
SLOW = {"prompt": "slow", "num_inference_steps": 800}  # about 13 s on a CPU: long enough to watch and cancel
MAX_QUEUE = 4


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(
    request: pytest.FixtureRequest, baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[str]:
    """`python app.py` (HTTP and the worker in one process) on tiny-sd, with its jobs in SQLite or in Redis."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_ID": "tiny-sd",
        "MODEL_DIR": str(baked["tiny-sd"]),
        "DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "API_KEYS": f"{OTHER},{KEY}",
        "ADMIN_API_KEYS": ADMIN,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MAX_STEPS": "5000",
        "MAX_QUEUE": str(MAX_QUEUE),
        "MAX_QUEUED_PER_KEY": str(MAX_QUEUE - 1),
        "BANANA_WAIT_S": "5",
    }
    if request.param == "redis":
        redis.Redis.from_url(redis_url).flushdb()
        env["REDIS_URL"] = redis_url
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "app.py"], f"{url}/health", env)
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/health", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def clients(server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point both clients at the server, as BANANA_URL and RUNPOD_ENDPOINT_BASE_URL do at import."""
    monkeypatch.setattr(generics, "endpoint", server + "/")
    monkeypatch.setattr(runpod, "endpoint_url_base", server + "/v2")
    monkeypatch.setattr(runpod, "api_key", KEY)
    return server


def rp(server: str, method: str, path: str, key: str = KEY, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return requests.request(method, f"{server}/v2/tiny-sd/{path}", headers=headers, timeout=30, **kwargs)


def running(server: str, job_id: str) -> dict:
    """The status body once the job has made a denoising step."""
    return wait_for(lambda: (body := rp(server, "GET", f"status/{job_id}").json()).get("progress") and body)


# Banana start/check v4.
def test_banana_run_gets_the_outputs(clients: str) -> None:
    out = banana.run(KEY, "tiny-sd", FAST)
    assert out["message"] == "success"
    assert decode(out["modelOutputs"][0]["image_base64"]).size == (64, 64)


def test_banana_start_then_check_with_long_poll(clients: str) -> None:
    call_id = banana.start(KEY, "tiny-sd", FAST)
    assert call_id.startswith("call_")
    out = wait_for(lambda: (out := banana.check(KEY, call_id))["message"] != "running" and out)  # each check waits 5 s
    assert out["message"] == "success" and out["modelOutputs"][0]["images"][0]["seed"] == 7


def test_banana_run_polls_a_job_longer_than_the_start_wait(clients: str) -> None:
    out = banana.run(KEY, "tiny-sd", {**SLOW, "num_inference_steps": 400})  # ~6 s; start waits 5 s
    assert out["message"] == "success" and out["modelOutputs"][0]["$meta"]["num_inference_steps"] == 400


def test_banana_run_raises_on_a_failed_job_instead_of_polling_forever(clients: str) -> None:
    with pytest.raises(Exception, match=r"error: job failed: INVALID_INPUTS.*field width"):
        banana.run(KEY, "tiny-sd", {**FAST, "width": 9})


def test_banana_check_raises_on_a_cancelled_job(clients: str) -> None:
    call_id = banana.start(KEY, "tiny-sd", SLOW)
    wait_for(lambda: rp(clients, "GET", f"status/{call_id}").json().get("progress"))
    rp(clients, "POST", f"cancel/{call_id}")
    with pytest.raises(Exception, match="error: job cancelled"):
        banana.check(KEY, call_id)


def test_banana_wrong_key_or_model_key_is_an_error_message(clients: str) -> None:
    with pytest.raises(Exception, match="error: invalid apiKey"):
        banana.start("wrong", "tiny-sd", FAST)
    with pytest.raises(Exception, match="unknown modelKey 'sdxl'"):
        banana.start(KEY, "sdxl", FAST)
    with pytest.raises(Exception, match="no job with callID"):
        banana.check(KEY, "call_nope")


def test_a_retried_banana_start_returns_the_same_call(server: str) -> None:
    body = {"id": str(uuid.uuid4()), "apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": FAST, "startOnly": True}
    first = requests.post(f"{server}/start/v4/", json=body, timeout=30).json()
    again = requests.post(f"{server}/start/v4", json=body, timeout=30).json()
    assert first["message"] == "" and first["finished"] is False and again["callID"] == first["callID"]


def test_check_shows_progress_while_running(server: str) -> None:
    body = {"apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": SLOW, "startOnly": True}
    call_id = requests.post(f"{server}/start/v4/", json=body, timeout=30).json()["callID"]
    check = {"apiKey": KEY, "callID": call_id, "longPoll": False}
    seen = wait_for(
        lambda: (out := requests.post(f"{server}/check/v4/", json=check, timeout=30).json()).get("progress") and out
    )
    assert seen["message"] == "running" and seen["progress"]["total"] >= 800 and 0 < seen["progress"]["step"] < 800
    rp(server, "POST", f"cancel/{call_id}")


# RunPod's endpoint API.
def test_runpod_endpoint_runs_and_returns_the_output(clients: str) -> None:
    job = runpod.Endpoint("tiny-sd").run(FAST)
    output = job.output(timeout=60)
    assert job.status() == "COMPLETED" and decode(output["images"][0]["base64"]).size == (64, 64)


def test_runpod_run_sync_and_health(clients: str) -> None:
    endpoint = runpod.Endpoint("tiny-sd")
    assert endpoint.run_sync({"input": FAST}, timeout=60)["images"][0]["seed"] == 7
    health = endpoint.health()
    assert health["jobs"]["completed"] >= 1 and health["workers"]["idle"] + health["workers"]["running"] == 1


def test_runpod_stream_yields_progress_while_running_then_the_output_once(clients: str) -> None:
    chunks = list(runpod.Endpoint("tiny-sd").run({**FAST, "num_inference_steps": 250}).stream())
    progress, last = chunks[:-1], chunks[-1]
    assert last["images"][0]["seed"] == 7  # the output, once, at the end
    assert progress and all(set(chunk) == {"progress"} for chunk in progress), chunks
    steps = [chunk["progress"]["step"] for chunk in progress]
    totals = {chunk["progress"]["total"] for chunk in progress}  # PNDM's 251 timesteps count as the 250 asked
    assert steps == sorted(set(steps)) and totals == {250} and max(steps) <= 250


def test_runpod_cancel_stops_a_running_job_at_the_next_step(clients: str) -> None:
    job = runpod.Endpoint("tiny-sd").run(SLOW)
    step = running(clients, job.job_id)["progress"]["step"]
    assert job.cancel()["status"] == "CANCELLED"
    time.sleep(0.5)
    ended = rp(clients, "GET", f"status/{job.job_id}").json()
    assert ended["status"] == "CANCELLED" and "output" not in ended
    # The worker is free again at once: the next job completes well before the cancelled one would have (13 s).
    started = time.monotonic()
    assert runpod.Endpoint("tiny-sd").run_sync(FAST, timeout=60)["images"]
    assert time.monotonic() - started < 10 and step < 800


def test_runpod_failed_job_has_the_error_and_can_be_retried(clients: str) -> None:
    job_id = rp(clients, "POST", "run", json={"input": {**FAST, "width": 9}}).json()["id"]
    failed = wait_for(lambda: (body := rp(clients, "GET", f"status/{job_id}").json())["status"] == "FAILED" and body)
    assert "INVALID_INPUTS" in failed["error"] and "width" in failed["error"]
    assert rp(clients, "POST", f"retry/{job_id}").json() == {"id": job_id, "status": "IN_QUEUE"}
    again = wait_for(lambda: (body := rp(clients, "GET", f"status/{job_id}").json())["status"] == "FAILED" and body)
    assert again["retries"] == 1
    completed = rp(clients, "POST", "runsync", json={"input": FAST}).json()
    refused = rp(clients, "POST", f"retry/{completed['id']}")
    assert refused.status_code == 409 and "only failed" in refused.json()["error"]


def test_runpod_execution_timeout_policy_times_the_job_out(server: str) -> None:
    body = rp(server, "POST", "runsync", json={"input": SLOW, "policy": {"executionTimeout": 1000}}).json()
    assert body["status"] == "TIMED_OUT" and "execution timeout of 1 s" in body["error"]


def test_runpod_idempotency_key_returns_the_same_job(server: str) -> None:
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    first = rp(server, "POST", "run", json={"input": FAST}, headers=headers).json()
    again = rp(server, "POST", "run", json={"input": FAST}, headers=headers).json()
    assert again["id"] == first["id"]


# One key's jobs are its own.
def test_another_key_cannot_see_or_touch_a_keys_job(server: str) -> None:
    job_id = rp(server, "POST", "runsync", json={"input": FAST}).json()["id"]
    for method, path in (("GET", "status"), ("GET", "stream"), ("POST", "cancel"), ("POST", "retry")):
        response = rp(server, method, f"{path}/{job_id}", key=OTHER)
        assert response.status_code == 404 and response.json()["$error"]["code"] == "NOT_FOUND", (path, response.text)
    check = {"apiKey": OTHER, "callID": job_id, "longPoll": False}
    assert "no job" in requests.post(f"{server}/check/v4/", json=check, timeout=30).json()["message"]
    # Its own key and an admin key see it, output and all; the stream is still there to be taken once.
    assert rp(server, "GET", f"status/{job_id}", key=ADMIN).json()["status"] == "COMPLETED"
    assert len(rp(server, "GET", f"stream/{job_id}").json()["stream"]) == 1


def test_with_several_keys_each_sees_its_own_counts_and_no_count_shows_without_a_key(server: str) -> None:
    def counts(key: str) -> dict:
        return rp(server, "GET", "health", key=key).json()["jobs"]

    mine, others, everyone = counts(KEY), counts(OTHER), counts(ADMIN)
    assert rp(server, "POST", "runsync", json={"input": FAST}).json()["status"] == "COMPLETED"
    assert counts(KEY)["completed"] == mine["completed"] + 1
    assert counts(OTHER) == others  # nothing of KEY's shows to OTHER
    assert counts(ADMIN)["completed"] == everyone["completed"] + 1
    tenant = requests.get(f"{server}/metrics", headers={"X-BANANA-API-KEY": KEY}, timeout=30)
    assert tenant.status_code == 403 and "ADMIN_API_KEYS" in tenant.json()["$error"]["message"]
    admin = requests.get(f"{server}/metrics", headers={"X-BANANA-API-KEY": ADMIN}, timeout=30)
    assert admin.status_code == 200 and "sdworker_jobs" in admin.text
    for path in ("/__status__", "/_k/status"):  # Potassium's: what its clients read, the request count for a key
        bare = requests.get(f"{server}{path}", timeout=30).json()
        keyed = requests.get(f"{server}{path}", headers={"X-BANANA-API-KEY": KEY}, timeout=30).json()
        assert bare["sequence_number"] == 0 and keyed["sequence_number"] > 0, (bare, keyed)
        assert set(bare) == set(keyed) == {"gpu_available", "sequence_number", "idle_time", "inference_time"}


def test_idempotency_keys_are_each_keys_own(server: str) -> None:
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    mine = rp(server, "POST", "run", json={"input": FAST}, headers=headers).json()["id"]
    theirs = rp(server, "POST", "run", json={"input": FAST}, headers=headers, key=OTHER).json()["id"]
    assert theirs != mine and rp(server, "GET", f"status/{theirs}", key=OTHER).status_code == 200
    body = {"id": str(uuid.uuid4()), "apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": FAST, "startOnly": True}
    first = requests.post(f"{server}/start/v4/", json=body, timeout=30).json()["callID"]
    second = requests.post(f"{server}/start/v4/", json={**body, "apiKey": OTHER}, timeout=30).json()["callID"]
    assert first != second
    for job_id, key in ((mine, KEY), (theirs, OTHER), (first, KEY), (second, OTHER)):
        wait_for(
            lambda job_id=job_id, key=key: (
                rp(server, "GET", f"status/{job_id}", key=key).json()["status"] == "COMPLETED"
            )
        )


def test_purge_queue_cancels_only_the_callers_queued_jobs(server: str) -> None:
    busy = rp(server, "POST", "run", json={"input": SLOW}).json()["id"]  # holds the worker
    running(server, busy)
    mine = rp(server, "POST", "run", json={"input": FAST}).json()["id"]
    theirs = rp(server, "POST", "run", json={"input": FAST}, key=OTHER).json()["id"]
    try:
        assert rp(server, "POST", "purge-queue", key=OTHER).json()["removed"] == 1
        assert rp(server, "GET", f"status/{theirs}", key=OTHER).json()["status"] == "CANCELLED"
        assert rp(server, "GET", f"status/{mine}").json()["status"] == "IN_QUEUE"
        assert rp(server, "POST", "purge-queue", key=ADMIN).json()["removed"] == 1
        assert rp(server, "GET", f"status/{mine}").json()["status"] == "CANCELLED"
    finally:
        rp(server, "POST", f"cancel/{busy}")


def test_runpod_wrong_key_is_401_and_raises_in_the_client(clients: str) -> None:
    assert rp(clients, "GET", "health", key="wrong").status_code == 401
    with pytest.raises(RuntimeError, match="Unauthorized"):
        runpod.Endpoint("tiny-sd", api_key="wrong").health()


def test_runpod_unknown_endpoint_or_job_is_404(server: str) -> None:
    response = requests.get(f"{server}/v2/nope/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert response.status_code == 404 and "no endpoint 'nope'" in response.json()["error"]
    assert rp(server, "GET", "status/nope").status_code == 404


def test_a_webhook_to_a_private_address_is_refused_when_the_job_is_submitted(server: str) -> None:
    for url in ("http://169.254.169.254/latest", "http://127.0.0.1:9/hook", "http://2130706433/hook"):
        response = rp(server, "POST", "run", json={"input": FAST, "webhook": url})
        assert response.status_code == 422, response.text
        assert response.json()["$error"]["field"] == "webhook" and "169.254" not in response.text


def test_bad_input_is_a_422_naming_the_field_on_every_protocol(server: str) -> None:
    response = rp(server, "POST", "run", json={"inputs": FAST})
    assert response.status_code == 422 and response.json()["$error"]["field"] == "input"
    direct = requests.post(server, json={**FAST, "width": 999}, headers={"X-BANANA-API-KEY": KEY}, timeout=30)
    assert direct.status_code == 422 and direct.json()["$error"]["field"] == "width"
    cases = [
        ("/start/v4/", None, "body"),
        ("/start/v4/", {"apiKey": KEY}, "modelInputs"),
        ("/start/v4/", {"apiKey": KEY, "modelInputs": FAST, "startOnly": 0}, "startOnly"),
        ("/check/v4/", {"apiKey": KEY}, "callID"),
    ]
    for route, body, field in cases:
        answer = requests.post(f"{server}{route}", json=body, timeout=30)
        assert answer.status_code == 422 and answer.json()["$error"]["field"] == field, (route, body, answer.text)
        assert "error" in answer.json()["message"]  # Banana's client raises on it, as on the status


def test_a_wrong_method_on_a_route_is_405_with_allow_and_an_unknown_route_404(server: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "X-BANANA-API-KEY": KEY}
    for method, path, allowed in (
        ("DELETE", "/", "GET, POST"),
        ("GET", "/infer", "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/v2/tiny-sd/status/some-id", "GET"),
        ("GET", "/v2/tiny-sd/run", "POST"),
        ("DELETE", "/start/v4/", "POST"),
    ):
        response = requests.request(method, f"{server}{path}", headers=headers, json={}, timeout=30)
        assert response.status_code == 405, (method, path, response.status_code)
        assert response.headers["Allow"] == allowed and response.json()["$error"]["code"] == "METHOD_NOT_ALLOWED"
    for method in ("GET", "POST"):
        response = requests.request(method, f"{server}/no/such/route", headers=headers, json=FAST, timeout=30)
        assert response.status_code == 404 and response.json()["$error"]["code"] == "NOT_FOUND"


def test_the_openapi_document_lists_each_routes_real_answers(server: str) -> None:
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    statuses = {path: {m: set(op["responses"]) for m, op in ops.items()} for path, ops in paths.items()}
    assert {"200", "400", "401", "404", "413", "422", "429", "500", "503"} <= statuses["/v2/{endpoint_id}/run"]["post"]
    assert {"409"} <= statuses["/v2/{endpoint_id}/retry/{job_id}"]["post"]
    assert {"200", "400", "401", "409", "413", "422", "503", "504"} <= statuses["/"]["post"]
    assert {"200", "422"} <= statuses["/start/v4/"]["post"] and {"200", "503"} <= statuses["/health"]["get"]
    run = paths["/v2/{endpoint_id}/run"]["post"]
    assert run["parameters"][0]["schema"]["enum"] == ["tiny-sd"] and run["security"] == [{"HTTPBearer": []}]


# Backpressure.
def test_past_the_queue_bound_each_protocol_refuses_cleanly(clients: str) -> None:
    """A key past its share (MAX_QUEUED_PER_KEY) is refused while another key's job is taken, up to the whole
    queue's bound (MAX_QUEUE); each protocol says so its own way, with Retry-After."""
    wait_for(lambda: (jobs := rp(clients, "GET", "health").json()["jobs"])["inQueue"] + jobs["inProgress"] == 0)
    ids = [rp(clients, "POST", "run", json={"input": SLOW}).json()["id"] for _ in range(MAX_QUEUE - 1)]
    running(clients, ids[0])  # a job cancelled just before may still hold the worker for a step or two
    try:
        refused = rp(clients, "POST", "run", json={"input": FAST}, headers={})
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert f"already has {MAX_QUEUE - 1} jobs" in refused.json()["error"] and "MAX_QUEUED_PER_KEY" in refused.text
        with pytest.raises(Exception, match="error: QUEUE_FULL"):
            banana.start(KEY, "tiny-sd", FAST)
        direct = requests.post(clients, json=FAST, headers={"X-BANANA-API-KEY": KEY}, timeout=30)
        assert direct.status_code == 503 and direct.headers["Retry-After"] == "1"
        other = rp(clients, "POST", "run", json={"input": SLOW}, key=OTHER)  # another key still gets its turn
        assert other.status_code == 200
        ids.append(other.json()["id"])
        full = rp(clients, "POST", "run", json={"input": FAST}, key=OTHER)
        assert full.status_code == 429 and f"is full ({MAX_QUEUE} jobs)" in full.json()["error"]
    finally:
        assert rp(clients, "POST", "purge-queue", key=ADMIN).json()["removed"] == MAX_QUEUE - 1
        for job_id in ids:
            rp(clients, "POST", f"cancel/{job_id}", key=ADMIN)
    assert all(rp(clients, "GET", f"status/{job_id}", key=ADMIN).json()["status"] == "CANCELLED" for job_id in ids)
    assert runpod.Endpoint("tiny-sd").run_sync(FAST, timeout=60)["images"]


# Direct calls and the rest.
def test_direct_call_needs_a_key(server: str) -> None:
    assert requests.post(server, json=FAST, timeout=30).status_code == 401
    answer = requests.post(server, json=FAST, headers={"X-BANANA-API-KEY": KEY}, timeout=30)
    assert answer.status_code == 200 and answer.json()["images"][0]["seed"] == 7


def test_banana_server_mode_with_the_key_in_the_url(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generics, "is_direct", True)
    monkeypatch.setattr(generics, "direct_call_endpoint", f"{server}/?apiKey={KEY}")
    out = banana.run("ignored", "ignored", FAST)
    assert out["apiVersion"] == "DIRECT" and out["modelOutputs"][0]["images"][0]["seed"] == 7


def test_health_docs_and_openapi(server: str) -> None:
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ready"
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    assert {"/start/v4/", "/check/v4/", "/v2/{endpoint_id}/run", "/health"} <= set(paths)


def test_the_api_docs_load_their_scripts_from_the_worker_not_a_cdn(server: str) -> None:
    """/docs (Swagger UI) and /redoc are public pages whose scripts, stylesheet and icon the worker serves itself
    (the fastapi-offline package's copies): they work with no network."""
    pages = {
        "/docs": {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"},
        "/redoc": {"redoc.standalone.js": "text/javascript", "favicon.png": "image/png"},
    }
    for page, assets in pages.items():
        html = requests.get(f"{server}{page}", timeout=10)  # no key: public, as FastAPI's own pages are
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html"), page
        assert "://" not in html.text and "/openapi.json" in html.text, html.text  # no CDN, no other host
        linked = set(re.findall(r'(?:src|href)="([^"]+)"', html.text))
        assert linked == {f"{DOCS_ASSETS}/{name}" for name in assets}, linked
        for name, kind in assets.items():
            asset = requests.get(f"{server}{DOCS_ASSETS}/{name}", timeout=10)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
            assert len(asset.content) > 1000, name
    missing = requests.get(f"{server}{DOCS_ASSETS}/no-such.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["$error"]["code"] == "NOT_FOUND"


def test_clients_configured_by_their_environment_variables(server: str) -> None:
    script = f"""
import runpod
from banana_dev import package as banana
out = banana.run("{KEY}", "tiny-sd", {FAST})
assert out["message"] == "success", out
runpod.api_key = "{KEY}"
assert runpod.Endpoint("tiny-sd").run_sync({FAST}, timeout=60)["images"]
print("both clients ok")
"""
    env = {**os.environ, "BANANA_URL": server + "/", "RUNPOD_ENDPOINT_BASE_URL": server + "/v2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "both clients ok" in result.stdout, result.stdout + result.stderr


def test_a_body_over_the_limit_is_413_even_when_chunked(server: str) -> None:
    big = b'{"input": {"prompt": "' + b"x" * (21 * 1024 * 1024) + b'"}}'
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    declared = requests.post(f"{server}/v2/tiny-sd/run", data=big, headers=headers, timeout=60)
    chunked = requests.post(
        f"{server}/v2/tiny-sd/run",
        data=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers=headers,
        timeout=60,
    )
    assert declared.status_code == chunked.status_code == 413
    for answer in (declared, chunked):
        assert answer.json()["$error"]["code"] == "PAYLOAD_TOO_LARGE" and "MAX_BODY_BYTES" in answer.json()["error"]


def test_malformed_or_deeply_nested_json_is_a_400_with_the_error_body_on_every_route(server: str) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", "X-BANANA-API-KEY": KEY}
    deep = b"[" * 100_000 + b"]" * 100_000  # a RecursionError in json.loads
    for body in (b"{not json", deep, b'{"input": ' + deep + b"}"):
        for route in ("/", "/start/v4/", "/check/v4/", "/v2/tiny-sd/run", "/v2/tiny-sd/runsync"):
            response = requests.post(f"{server}{route}", data=body, headers=headers, timeout=30)
            assert response.status_code == 400, (route, response.text[:200])
            assert response.json()["$error"]["code"] == "INVALID_JSON", route


def test_json_nested_as_deep_as_the_parser_allows_is_refused_with_the_limit(server: str) -> None:
    nested: object = "x"
    for _ in range(900):
        nested = [nested]
    direct = requests.post(server, json={**FAST, "extra": nested}, headers={"X-BANANA-API-KEY": KEY}, timeout=60)
    queued = rp(server, "POST", "runsync", json={"input": {**FAST, "extra": nested}})
    for response in (direct, queued):
        assert response.status_code == 400, response.text[:300]
        assert response.json()["$error"]["code"] == "INVALID_JSON" and "deeper than 64" in response.json()["error"]
    assert rp(server, "POST", "runsync", json={"input": {**FAST, "extra": [[[["fine"]]]]}}).status_code == 200


def test_text_that_is_not_unicode_is_a_422_naming_the_field_on_every_route_and_the_server_goes_on(server: str) -> None:
    """A JSON string may carry a lone UTF-16 surrogate (`\\ud800`), which no store can write: refused on every
    route before it is stored, naming the field as the client wrote it; a valid pair (an emoji) is text."""
    lone = "a \\ud800 lighthouse"  # as it appears in the raw JSON
    bodies = [
        ("/", {"prompt": lone, "num_inference_steps": 2}, "prompt"),
        ("/stages/encode", {"prompt": lone}, "prompt"),
        ("/v2/tiny-sd/run", {"input": {"prompt": lone}}, "input"),
        ("/v2/tiny-sd/runsync", {"input": {"prompt": "a", "negative_prompt": lone}}, "input"),
        ("/v2/tiny-sd/run", {"input": {"prompt": "a"}, "webhook": f"https://example.org/{lone}"}, "webhook"),
        ("/start/v4/", {"apiKey": KEY, "modelInputs": {"prompt": lone}}, "modelInputs"),
        ("/start/v4/", {"apiKey": KEY, "id": lone, "modelInputs": {"prompt": "a"}}, "id"),
        ("/check/v4/", {"apiKey": KEY, "callID": lone}, "callID"),
        ("/generate", {"prompt": lone, "api_key": KEY}, "prompt"),
        ("/infer", {"prompt": {"text": lone}}, "prompt"),
        ("/infer", {"prompt": "a", "negative_prompt": lone}, "negative_prompt"),  # an input beside OctoAI's prompt
    ]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", "X-BANANA-API-KEY": KEY}
    for route, body, field in bodies:
        raw = json.dumps(body).replace("\\\\ud800", "\\ud800")  # json.dumps escaped the backslash: undo it
        answer = requests.post(f"{server}{route}", data=raw.encode(), headers=headers, timeout=30)
        assert answer.status_code == 422, (route, answer.status_code, answer.text[:300])
        error = answer.json()["$error"]
        assert error["field"].startswith(field) and "unicode" in error["message"].lower(), (route, error)
    emoji = json.dumps({"input": {"prompt": "a \\ud83c\\udf0a wave", "num_inference_steps": 2}})
    done = requests.post(f"{server}/v2/tiny-sd/runsync", data=emoji.replace("\\\\", "\\"), headers=headers, timeout=60)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED", done.text[:300]
