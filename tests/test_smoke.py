"""The smoke tests users run against a deployment, run here against `python app.py` on tiny-sd: test.py (Banana
start/check, a direct call, RunPod runsync) and postman_collection.json under newman."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARED_KEYS, Worker, free_port
from PIL import Image

KEY = SHARED_KEYS["smoke"]
NEWMAN = ROOT / "node_modules" / ".bin" / "newman"
STEPS = ("banana", "direct", "runpod")


@pytest.fixture
def server(quick_start_worker: Worker) -> Worker:
    """The suite's shared quick-start worker (tiny-sd, default settings), called with this file's key."""
    return quick_start_worker


def smoke(url: str, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run test.py as a user would."""
    command = [sys.executable, "test.py", "--url", url, "--out", str(out), "--steps", "3", "--seed", "7", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("model_key", [None, "tiny-sd"], ids=["model-key-from-health", "model-key-given"])
def test_smoke_script_passes_through_every_api(server: Worker, tmp_path: Path, model_key: str | None) -> None:
    extra = ["--model-key", model_key] if model_key else []
    result = smoke(server.url, tmp_path / "out", "--api-key", KEY, *extra)

    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nserver:\n{server.log_tail()}"
    assert result.stderr == ""
    assert "PASS: 3 APIs answered; 3 image(s) saved" in result.stdout
    for step in STEPS:
        assert re.search(rf"^{step}: round trip \d+ ms", result.stdout, re.MULTILINE), result.stdout
        with Image.open(tmp_path / "out" / f"{step}-0-seed-7.png") as image:
            assert (image.format, image.size) == ("PNG", (64, 64))
    assert result.stdout.count("worker timings: ") == 3 and "inference" in result.stdout
    if model_key is None:
        assert "model keys ['tiny-sd']" in result.stdout


def test_smoke_script_sends_an_image_for_img2img_through_every_api(server: Worker, tmp_path: Path) -> None:
    picture = tmp_path / "picture.png"
    Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)).save(picture)
    text = smoke(server.url, tmp_path / "text", "--api-key", KEY)
    result = smoke(server.url, tmp_path / "out", "--api-key", KEY, "--image", str(picture), "--strength", "0.6")

    assert text.returncode == 0 and result.returncode == 0, f"{result.stdout}{result.stderr}\n{server.log_tail()}"
    assert "PASS: 3 APIs answered; 3 image(s) saved" in result.stdout
    for step in STEPS:  # the same seed, but from the picture: another image than the text-only one
        with (
            Image.open(tmp_path / "out" / f"{step}-0-seed-7.png") as image,
            Image.open(tmp_path / "text" / f"{step}-0-seed-7.png") as from_text,
        ):
            assert image.size == (64, 64) and not np.array_equal(np.asarray(image), np.asarray(from_text))
    bad = smoke(server.url, tmp_path / "bad", "--api-key", KEY, "--image", str(ROOT / "README.md"))
    assert_one_line_failure(bad, "--image", "not a readable picture")


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *wanted: str) -> str:
    """test.py failed as it should: exit 1, one `FAIL: ...` line on stderr naming the reason, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL: "), result.stderr
    for text in wanted:
        assert text in lines[0]
    assert "PASS" not in result.stdout
    return lines[0]


def test_smoke_script_fails_on_a_wrong_api_key(server: Worker, tmp_path: Path) -> None:
    result = smoke(server.url, tmp_path / "out", "--api-key", "not-the-key")

    assert_one_line_failure(result, "the server refused the API key")
    assert not (tmp_path / "out").exists()


def test_smoke_script_fails_on_a_wrong_api_key_for_runpod_too(server: Worker, tmp_path: Path) -> None:
    result = smoke(server.url, tmp_path / "out", "--api-key", "not-the-key", "--model-key", "tiny-sd")

    assert_one_line_failure(result, "the server refused the API key")


def test_smoke_script_reports_the_workers_error(server: Worker, tmp_path: Path) -> None:
    result = smoke(server.url, tmp_path / "out", "--api-key", KEY, "--steps", "100000")

    assert_one_line_failure(result, "INVALID_INPUTS", "num_inference_steps")


def test_smoke_script_fails_on_an_unknown_model_key(server: Worker, tmp_path: Path) -> None:
    result = smoke(server.url, tmp_path / "out", "--api-key", KEY, "--model-key", "no-such-model")

    assert_one_line_failure(result, "no-such-model", "tiny-sd")


def test_smoke_script_fails_against_a_dead_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = smoke(url, tmp_path / "out", "--api-key", KEY, timeout=60)

    assert_one_line_failure(result, f"cannot reach {url}")


def test_postman_collection_passes_under_newman(server: Worker, tmp_path: Path) -> None:
    if not NEWMAN.exists():
        pytest.fail(f"{NEWMAN.relative_to(ROOT)} is missing: run `npm ci` in the repository root (make test does)")
    report = tmp_path / "newman.json"
    command = [str(NEWMAN), "run", "postman_collection.json", "--env-var", f"baseUrl={server.url}"]
    command += ["--env-var", f"apiKey={KEY}", "--env-var", "modelKey=tiny-sd", "--disable-unicode", "--color", "off"]
    command += ["--reporters", "cli,json", "--reporter-json-export", str(report)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nserver:\n{server.log_tail()}"
    run = json.loads(report.read_text())["run"]
    assert run["failures"] == []
    collection = json.loads((ROOT / "postman_collection.json").read_text())
    executed = {execution["item"]["name"] for execution in run["executions"]}
    assert executed == {item["name"] for item in collection["item"]}
    assertions = [a for execution in run["executions"] for a in execution.get("assertions", [])]
    passed = {a["assertion"] for a in assertions if not a.get("error")}
    assert {"success with the image in modelOutputs[0]", "COMPLETED with the image in output"} <= passed
    assert {"401 UNAUTHORIZED", "422 naming the bad field", "200: the whole prompt was read"} <= passed


def test_npm_run_newman_takes_the_key_from_the_environment(server: Worker, tmp_path: Path) -> None:
    """The README's `npm run newman` (API_KEY exported) passes against a worker; without a key it says how."""
    npm = shutil.which("npm")
    assert npm, "npm is not installed: install Node.js 18+ (make test needs it)"
    env = {key: value for key, value in os.environ.items() if key not in ("API_KEY", "API_KEYS", "MODEL_KEY")}
    passing = {**env, "API_KEY": KEY, "BASE_URL": server.url}
    result = subprocess.run(
        [npm, "run", "--silent", "newman", "--", "--color", "off"],
        cwd=ROOT,
        env=passing,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    bare = tmp_path / "bare"  # no data/api_key there: no key at all
    bare.mkdir()
    shutil.copy(ROOT / "package.json", bare)
    shutil.copy(ROOT / "postman_collection.json", bare)
    (bare / "node_modules").symlink_to(ROOT / "node_modules")
    result = subprocess.run([npm, "run", "--silent", "newman"], cwd=bare, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "set API_KEY to one of the worker's API_KEYS" in result.stderr, result.stderr


def test_npm_run_newman_installs_newman_on_a_fresh_clone(tmp_path: Path) -> None:
    """On a fresh clone (no node_modules: `make test` not run yet) `npm run newman` installs newman first, at
    package-lock.json's versions (from npm's cache where it has them), then runs: here it stops at the key."""
    npm = shutil.which("npm")
    assert npm, "npm is not installed: install Node.js 18+ (make test needs it)"
    for name in ("package.json", "package-lock.json", "postman_collection.json"):
        shutil.copy(ROOT / name, tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("API_KEY", "API_KEYS", "MODEL_KEY")}
    result = subprocess.run(
        [npm, "run", "--silent", "newman"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "installing newman" in result.stderr, result.stderr
    assert (tmp_path / "node_modules" / ".bin" / "newman").exists(), result.stderr
    assert result.returncode == 2 and "set API_KEY to one of the worker's API_KEYS" in result.stderr, result.stderr
    again = subprocess.run([npm, "run", "--silent", "newman"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "installing newman" not in again.stderr, again.stderr
