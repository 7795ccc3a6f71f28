"""What an operator meets at start and in the log: a wrong model or setting refused in one line, --help, a quiet
log (text or JSON lines) without secrets, each request logged once, a busy port said before loading."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SHARED_KEYS, Worker, free_port, output_of, start_worker, wait_for

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.logs import NOISE
from sdworker.model import load_model

SECRET = SHARED_KEYS["operations"]
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64}


def app_py(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "app.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def env(baked: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("MODEL_ID", "MODE", "PORT")}
    return {**clean, "MODEL_DIR": str(baked["tiny-sd"]), "DATA_DIR": str(tmp_path), "PORT": str(free_port())}


@pytest.mark.parametrize(
    "setting, said",
    [
        ({"PORT": "abc"}, "PORT='abc': takes a whole number at least 1 and at most 65535"),
        ({"MAX_BATCH": "zero"}, "MAX_BATCH='zero': takes a whole number at least 1 and at most 64"),
        ({"MODE": "bogus"}, "MODE='bogus': takes one of serve, gateway, worker, potassium, runpod"),
        ({"RUNPOD_CONCURRENCY": "-2"}, "RUNPOD_CONCURRENCY='-2': takes a whole number at least 1"),  # an alias
        ({"OUTPUT_TYPE": "s3"}, "OUTPUT_TYPE=s3 needs S3_BUCKET"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_as_written(env: dict[str, str], setting: dict, said: str) -> None:
    result = app_py(env={**env, **setting})
    assert result.returncode == 2 and result.stderr.startswith(f"error: {said}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    baked = subprocess.run(
        [sys.executable, "download.py", "--model-id", "tiny-sd", "--model-dir", env["MODEL_DIR"]],
        cwd=ROOT,
        env={**env, **setting},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert baked.returncode == 2 and baked.stderr.count("\n") == 1 and said in baked.stderr, baked.stderr


@pytest.mark.parametrize("mode", ["serve", "runpod", "potassium"])
def test_a_model_id_other_than_the_baked_one_is_refused_at_start(env: dict[str, str], mode: str) -> None:
    result = app_py("--mode", mode, env={**env, "MODEL_ID": "stabilityai/sdxl-turbo"}, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    line = "error: MODEL_ID=stabilityai/sdxl-turbo but the model baked in "
    assert result.stderr.startswith(line) and "is tiny-sd" in result.stderr and result.stderr.count("\n") == 1
    assert "loaded" not in result.stdout + result.stderr  # refused before loading anything


def test_the_loader_refuses_another_model_id_too(baked: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ID", "someone/else")
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=baked["tiny-sd"]))
    assert refused.value.field == "MODEL_ID"
    monkeypatch.setenv("MODEL_ID", "tiny-sd")  # the baked one: served
    assert load_model(Settings(model_dir=baked["tiny-sd"])).family == "sd1"


def test_help_explains_each_mode_and_where_the_settings_are(env: dict[str, str]) -> None:
    result = app_py("--help", env=env, timeout=30)
    assert result.returncode == 0
    for mode in ("serve", "gateway", "worker", "potassium", "runpod"):
        assert re.search(rf"^  {mode} +\S", result.stdout, re.MULTILINE), result.stdout
    assert "docs/settings.md lists each" in " ".join(result.stdout.split())


def test_runpod_serverless_is_detected_from_runpods_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODE", raising=False)
    assert Settings().mode == "serve"
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "abc123")
    assert Settings().mode == "runpod"
    monkeypatch.setenv("MODE", "serve")  # said: kept
    assert Settings().mode == "serve"


def test_the_log_is_quiet_json_lines_with_job_ids_and_no_secret(baked: dict[str, Path], tmp_path: Path) -> None:
    process, url = start_worker(baked["tiny-sd"], tmp_path, SECRET, LOG_FORMAT="json", HF_TOKEN="hf_operations_tok")
    try:
        answer = requests.post(f"{url}/?apiKey={SECRET}", json=FAST, timeout=120)
        assert answer.status_code == 200, answer.text
        bad = requests.post(url, json=FAST, headers={"X-BANANA-API-KEY": SECRET + "-wrong"}, timeout=30)
        assert bad.status_code == 401
        shapeless = requests.post(  # a 422: logged once, without the body
            f"{url}/v2/tiny-sd/run", json={"inputs": FAST}, headers={"Authorization": f"Bearer {SECRET}"}, timeout=30
        )
        assert shapeless.status_code == 422
        banana = requests.post(f"{url}/start/v4/", json={"apiKey": SECRET + "-wrong", "modelInputs": FAST}, timeout=30)
        assert banana.json()["message"] == "error: invalid apiKey"  # Banana's clients read a 200 with an error
    finally:
        process.terminate()
    output = output_of(process, 60)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert not [line for line in lines if any(noise in line["message"] for noise in NOISE)]
    assert any(line.get("job_id") and "COMPLETED" in line["message"] for line in lines), output
    assert [line["message"] for line in lines if "refused" in line["message"]] == [
        "POST / refused: 401 UNAUTHORIZED",
        "POST /v2/tiny-sd/run refused: 422 INVALID_REQUEST (input)",
        "POST /start/v4/ refused: 401 UNAUTHORIZED (apiKey)",
    ]
    assert SECRET not in output and "hf_operations_tok" not in output


def test_potassium_logs_each_request_once_without_its_key(env: dict[str, str]) -> None:
    from conftest import start_process

    url = f"http://127.0.0.1:{env['PORT']}"
    process = start_process(
        [sys.executable, "app.py", "--mode", "potassium"], url, {**env, "API_KEYS": SECRET, "HOST": "127.0.0.1"}
    )
    try:
        assert requests.post(f"{url}/?apiKey={SECRET}", json=FAST, timeout=120).status_code == 200
        assert requests.post(f"{url}/?apiKey={SECRET}-typo", json=FAST, timeout=120).status_code == 401
        # werkzeug writes its access line after the answer has gone out: let it, before stopping the server
        deadline = time.monotonic() + 10
        while sum('"POST /' in line for line in process.output) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.terminate()
    output = output_of(process, 60)
    assert len([line for line in output.splitlines() if '"POST /' in line]) == 2, output  # one line each
    assert SECRET not in output and "apiKey=***" in output  # a wrong key (a typo of the right one) too
    assert "\x1b[" not in output  # werkzeug colours its error lines: not in a log
    assert not [noise for noise in NOISE if noise in output], output


def test_the_local_runpod_test_prints_no_base64(env: dict[str, str]) -> None:
    job = json.dumps({"input": FAST})
    result = app_py("--mode", "runpod", "--test_input", job, env=env, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "completed successfully" in output, output
    assert "base64 characters>" in output and not re.search(r"[A-Za-z0-9+/]{200,}", output)


def test_a_busy_port_is_said_at_once_before_loading(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", int(env["PORT"])))
        taken.listen()
        result = app_py(env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: cannot listen on 0.0.0.0:{env['PORT']} (PORT): Address already in use" in result.stderr
    assert "listening" not in result.stderr and "loaded" not in result.stderr


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_count_requests_jobs_images_and_the_queue(baked: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    process, url = start_worker(baked["tiny-sd"], tmp_path, SECRET, METRICS_PORT=str(port))
    try:
        assert requests.get(f"{url}/metrics", timeout=30).status_code == 401  # the main port wants a key
        for wrong in ({"Authorization": "Bearer wrong"}, {"X-BANANA-API-KEY": ""}):  # a bad key beside a good one
            for path in ("/metrics", "/"):
                answer = requests.request(
                    "GET" if path == "/metrics" else "POST",
                    f"{url}{path}?apiKey={SECRET}",
                    json=FAST,
                    headers=wrong,
                    timeout=30,
                )
                assert answer.status_code == 401, (path, wrong, answer.text)
        before = scrape(f"{url}/metrics", **{"X-BANANA-API-KEY": SECRET})
        answer = requests.post(url, json={**FAST, "num_images_per_prompt": 2}, headers={"X-BANANA-API-KEY": SECRET})
        assert answer.status_code == 200, answer.text
        # The answer goes out once the store has the job COMPLETED; the worker counts it a moment later.
        done = ("sdworker_job_seconds_count", (("status", "COMPLETED"),))

        def counted() -> dict | None:
            now = scrape(f"{url}/metrics", **{"X-BANANA-API-KEY": SECRET})
            return now if now.get(done, 0) > before.get(done, 0) else None

        after = wait_for(counted, timeout=30)
        alone = scrape(f"http://127.0.0.1:{port}/metrics")  # METRICS_PORT: no key
    finally:
        process.terminate()
        process.wait(30)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("sdworker_http_requests_total", method="POST", route="/", status="200") == 1
    assert grew("sdworker_http_request_seconds_count", method="POST", route="/") == 1
    assert grew("sdworker_images_total") == 2
    assert grew("sdworker_job_seconds_count", status="COMPLETED") == 1
    assert grew("sdworker_job_queue_wait_seconds_count") == 1
    assert grew("sdworker_inference_seconds_count") == 1 and grew("sdworker_batch_jobs_sum") == 1
    assert after[("sdworker_model_load_seconds", ())] > 0
    workers = {
        state: after[("sdworker_workers", (("model_key", "tiny-sd"), ("state", state)))]
        for state in ("idle", "running")
    }
    assert sum(workers.values()) == 1, workers  # this one worker, idle or just finishing its job
    assert after[("sdworker_jobs", (("model_key", "tiny-sd"), ("state", "completed")))] >= 1
    assert after[("sdworker_jobs", (("model_key", "tiny-sd"), ("state", "inQueue")))] == 0
    assert alone[("sdworker_images_total", ())] == after[("sdworker_images_total", ())]


def test_torch_leaves_a_core_to_serving_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sdworker.model.load import set_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("TORCH_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(Settings(), "cpu") == max(1, cores - 1)
        monkeypatch.setenv("TORCH_THREADS", "3")
        assert set_threads(Settings(), "cpu") == 3
        monkeypatch.setenv("TORCH_THREADS", "0")
        with pytest.raises(WorkerError, match="TORCH_THREADS='0': takes a whole number at least 1"):
            Settings()
    finally:
        torch.set_num_threads(before)


def test_the_readmes_first_requests_work_on_the_quick_start_worker(quick_start_worker: Worker) -> None:
    """The quick start's curl body, the README's request and the first of docs/requests.md, on tiny-sd; and the
    commands of the README and docs/ run in a fresh shell (the venv's python, not the system's)."""
    readme = (ROOT / "README.md").read_text()
    curl = json.loads(re.search(r"curl -s localhost:8000/ .*?-d '(\{.*?\})'", readme, re.DOTALL).group(1))

    def first_json(text: str, heading: str) -> dict:
        return json.loads(re.search(r"```json\n(.*?)\n```", text[text.index(heading) :], re.DOTALL).group(1))

    requests_doc = (ROOT / "docs" / "requests.md").read_text()
    bodies = [curl, first_json(readme, "## A request and its answer"), first_json(requests_doc, "## Requests")]
    bodies = [body for index, body in enumerate(bodies) if body not in bodies[:index]]  # the same request once
    for body in bodies:
        answer = requests.post(quick_start_worker.url, json=body, headers={"X-BANANA-API-KEY": SECRET}, timeout=300)
        assert answer.status_code == 200, answer.text
    pages = [readme, *(page.read_text() for page in (ROOT / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page, re.DOTALL)]
    commands = [line.strip() for block in blocks for line in block.split("\n")]
    assert not [line for line in commands if re.match(r"python3? test\.py", line)]


def test_make_run_says_what_it_is_installing_and_serves_this_machine_only() -> None:
    env = {key: value for key, value in os.environ.items() if key != "HOST"}
    plan = subprocess.run(
        ["make", "-n", "run", "VENV=/nonexistent/venv"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    ).stdout
    install = next(line for line in plan.splitlines() if "pip install" in line and "requirements.txt" in line)
    assert " -q" not in install  # pip's own progress shows
    assert re.search(r"echo .*installing.*minutes", plan), plan
    assert "HOST=127.0.0.1 .venv/bin/python app.py" in plan.replace("/nonexistent/venv", ".venv")  # this machine
    elsewhere = subprocess.run(
        ["make", "-n", "run", "VENV=.venv", "HOST=0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "HOST=0.0.0.0 .venv/bin/python app.py" in elsewhere, elsewhere


def test_every_route_reads_a_json_body_whatever_its_content_type_says(quick_start_worker: Worker) -> None:
    """One rule: `curl -d` sends a form's Content-Type, other clients text/plain or none; every route reads the
    body as JSON all the same, and a body that is not JSON is a 400 on every route."""
    url, bearer = quick_start_worker.url, {"Authorization": f"Bearer {SECRET}", "X-BANANA-API-KEY": SECRET}
    calls = [
        ("/", FAST, lambda body: body["images"]),
        ("/v2/tiny-sd/runsync", {"input": FAST}, lambda body: body["status"] == "COMPLETED"),
        ("/start/v4/", {"apiKey": SECRET, "modelInputs": FAST}, lambda body: body["modelOutputs"]),
        ("/infer", {"prompt": {"text": "a"}, "num_inference_steps": 2}, lambda body: body["output"]["image_b64"]),
        ("/generate", {"prompt": "a", "api_key": SECRET, "ddim_steps": 2, "H": 64, "W": 64}, lambda b: b["task_id"]),
    ]
    for kind in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**bearer, **({"Content-Type": kind} if kind else {})}
        for route, body, answered in calls:
            data = json.dumps(body).encode()
            answer = requests.post(f"{url}{route}", data=data, headers=headers, timeout=120)
            assert answer.status_code == 200 and answered(answer.json()), (kind, route, answer.text[:300])
            broken = requests.post(f"{url}{route}", data=b"{not json", headers=headers, timeout=30)
            assert broken.status_code == 400 and broken.json()["$error"]["code"] == "INVALID_JSON", (kind, route)
