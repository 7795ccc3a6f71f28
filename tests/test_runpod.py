"""The RunPod serverless worker: `python app.py --mode runpod`, run locally the way RunPod documents."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, decode

from sdworker.platforms.runpod import make_handler


def run_local(model_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "MODEL_ID": "tiny-sd"}
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--mode", "runpod", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_committed_test_input_runs_one_job_locally(baked: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(ROOT / "test_input.json", tmp_path)
    result = run_local(baked["tiny-sd"], tmp_path)
    logged = result.stdout + result.stderr
    assert result.returncode == 0, logged
    # RunPod's SDK logs the result as a Python dict; its base64 images are shown by their length.
    assert "Job local_test completed successfully" in logged
    assert re.search(r"\{'output': \{'images': \[\{'base64': '<\d+ base64 characters>'", logged), logged
    seed = json.loads((ROOT / "test_input.json").read_text())["input"]["seed"]
    assert f"'seed': {seed}, 'safety_checker': True" in logged and "'MODEL_ID': 'tiny-sd'" in logged


def test_a_test_input_flag_with_bad_input_fails_the_job_with_the_field(baked: dict[str, Path], tmp_path: Path) -> None:
    result = run_local(baked["tiny-sd"], tmp_path, "--test_input", json.dumps({"input": {"prompt": "a", "width": 9}}))
    assert result.returncode == 1
    assert "INVALID_INPUTS" in result.stdout + result.stderr and "(field width)" in result.stdout + result.stderr


def test_other_modes_refuse_runpod_flags(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--test_input", "{}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unrecognized arguments: --test_input" in result.stderr


@pytest.mark.parametrize(
    ("status", "body", "error", "refresh"),
    [
        (
            422,
            {"$error": {"code": "INVALID_INPUTS", "message": "width is 9", "field": "width"}},
            "INVALID_INPUTS: width is 9 (field width)",
            False,
        ),
        (
            500,
            {"$error": {"code": "OUT_OF_MEMORY", "message": "out of GPU memory", "field": None}},
            "OUT_OF_MEMORY: out of GPU memory",
            True,
        ),
    ],
)
def test_errors_fail_the_job_readably_and_oom_replaces_the_worker(
    status: int, body: dict, error: str, refresh: bool
) -> None:
    answer = asyncio.run(make_handler(lambda route, payload: (status, body))({"id": "j", "input": {}}))
    assert answer["error"] == error and answer["$error"] == body["$error"]
    assert answer.get("refresh_worker", False) is refresh


def test_a_good_answer_is_the_output() -> None:
    handler = make_handler(lambda route, payload: (200, {"images": [], "route": route}))
    answer = asyncio.run(handler({"id": "j", "input": {}}))
    assert answer == {"images": [], "route": "/"}


def test_the_stream_handler_yields_steps_and_previews_then_the_answer(sd) -> None:
    from sdworker.handler import handle
    from sdworker.platforms.runpod import make_stream_handler

    handler = make_stream_handler(lambda route, payload: handle(sd, payload), sd.family, every=4)
    chunks = list(handler({"id": "j", "input": {"prompt": "a", "num_inference_steps": 8, "seed": 5}}))
    steps, final = chunks[:-1], chunks[-1]
    assert [chunk["step"] for chunk in steps] == list(range(1, steps[0]["total"] + 1))
    previews = [chunk for chunk in steps if "preview" in chunk]
    assert [chunk["step"] for chunk in previews] == [
        s for s in range(1, steps[0]["total"] + 1) if s % 4 == 0 or s == steps[0]["total"]
    ]
    thumb = decode(previews[0]["preview"])
    assert (thumb.format, thumb.size) == ("JPEG", (8, 8))  # 1/8 of the 64x64 image
    assert final["images"][0]["seed"] == 5 and "error" not in final


def test_the_stream_handler_streams_the_steps_of_a_model_whose_latents_have_no_preview(recipe) -> None:
    """FLUX.1's latents are packed into tokens of 64 channels: no RGB map reads them, so its steps stream without
    previews and the job ends with its picture (not a failed job)."""
    from sdworker.config import Settings
    from sdworker.handler import handle
    from sdworker.model import load_model
    from sdworker.platforms.runpod import make_stream_handler

    flux = load_model(Settings(model_dir=recipe("tiny-flux")))
    handler = make_stream_handler(lambda route, payload: handle(flux, payload), flux.family, every=1)
    body = {"prompt": "a", "num_inference_steps": 3, "seed": 5, "width": 64, "height": 64}
    chunks = list(handler({"id": "j", "input": body}))
    steps, final = chunks[:-1], chunks[-1]
    assert [chunk["step"] for chunk in steps] == [1, 2, 3] and not any("preview" in chunk for chunk in steps)
    assert final["images"][0]["seed"] == 5 and "error" not in final, final


def test_the_stream_handler_ends_with_the_error_on_bad_input(sd) -> None:
    from sdworker.handler import handle
    from sdworker.platforms.runpod import make_stream_handler

    handler = make_stream_handler(lambda route, payload: handle(sd, payload), sd.family, every=4)
    chunks = list(handler({"id": "j", "input": {"prompt": "a", "width": 9}}))
    assert len(chunks) == 1 and chunks[0]["error"].startswith("INVALID_INPUTS")
