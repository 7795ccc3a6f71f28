"""app.py over HTTP: `python app.py` on a real port, as the job server and as Potassium's server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import ROOT, decode, free_port, start_process

SEED_000 = {  # the request of the kiri / Gradient README, as written there
    "modelInputs": {
        "prompt": "Soft pink roses, white Chinese peony, tiny apple blossom flowers, eucalyptus leaves, twigs of "
        "cranberries, twigs of copper pepper berries all arrangement into a cute beautiful flowers arrangement on a "
        "pink nickel mug. The mug is sitting on a thick white book with golden cover image design. Sunny, bright "
        "image. Ad copy, huge copy space on top of the image, negative space, hd, 8k, blurry dreamy background, "
        "beautiful pictures. Product",
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "seed": 3239022079,
    },
    "callInputs": {
        "MODEL_ID": "stabilityai/stable-diffusion-xl-base-1.0",
        "SCHEDULER": "EulerAncestralDiscreteScheduler",
        "safety_checker": True,
    },
}


KEY = {"X-BANANA-API-KEY": "test-key"}


def start_app(model_dir: Path, tmp_path: Path, *mode: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(tmp_path / "data"),
        "API_KEYS": "test-key",
        "PORT": str(port),
        "HOST": "127.0.0.1",
    }
    url = f"http://127.0.0.1:{port}"
    return url, start_process([sys.executable, "app.py", *mode], f"{url}/__status__", env)


@pytest.fixture(scope="module", params=["serve", "potassium"])
def server(request: pytest.FixtureRequest, baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """`python app.py` (the job server) and `python app.py --mode potassium` (Potassium's own server)."""
    mode = [] if request.param == "serve" else ["--mode", "potassium"]
    url, process = start_app(baked["tiny-sdxl"], tmp_path_factory.mktemp("app"), *mode)
    yield url
    process.terminate()
    process.wait(10)


def test_the_seed_000_request_returns_an_image(server: str) -> None:
    request = {**SEED_000, "callInputs": {**SEED_000["callInputs"], "MODEL_ID": "tiny-sdxl"}}
    response = requests.post(server, json=request, headers=KEY, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    image = decode(body["image_base64"])
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert body["$meta"]["SCHEDULER"] == "EulerAncestralDiscreteScheduler"
    assert body["$meta"]["seed"] == 3239022079
    assert body["$timings"]["inference"] > 0


def test_a_request_for_another_model_says_which_model_is_served(server: str) -> None:
    response = requests.post(server, json=SEED_000, headers=KEY, timeout=60)
    assert response.status_code == 422
    error = response.json()["$error"]
    assert error["code"] == "MODEL_MISMATCH"
    assert "stabilityai/stable-diffusion-xl-base-1.0" in error["message"] and "tiny-sdxl" in error["message"]


def test_bad_input_over_http_is_a_422_with_the_field(server: str) -> None:
    response = requests.post(server, json={"prompt": "x", "width": 999}, headers=KEY, timeout=60)
    assert response.status_code == 422
    assert response.json() == {
        "$error": {"code": "INVALID_INPUTS", "message": "width must be a multiple of 8 (got 999)", "field": "width"}
    }


def test_a_call_without_an_accepted_key_is_refused(server: str) -> None:
    for headers in ({}, {"X-BANANA-API-KEY": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = requests.post(server, json={"prompt": "a", "num_inference_steps": 2}, headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["$error"]["code"] == "UNAUTHORIZED", response.text
    bearer = requests.post(
        server, json={"prompt": "a", "num_inference_steps": 2}, headers={"Authorization": "Bearer test-key"}, timeout=60
    )
    assert bearer.status_code == 200 and bearer.json()["images"]


def test_potassium_routes_answer(server: str) -> None:
    assert requests.post(f"{server}/_k/warmup", timeout=10).json() == {"warm": True}
    status = requests.get(f"{server}/__status__", timeout=10).json()
    assert set(status) == {"gpu_available", "sequence_number", "idle_time", "inference_time"}


def test_the_v6_banana_client_calls_the_worker(server: str) -> None:
    from banana_dev import Client

    answer, meta = Client(api_key="test-key", url=server, verbosity="quiet").call(
        "/", {"prompt": "a", "seed": 1, "num_inference_steps": 2}
    )
    assert decode(answer["image_base64"]).size == (64, 64) and meta["headers"]["content-type"] == "application/json"


def test_the_v6_banana_client_shows_why_a_request_is_refused(server: str, capsys: pytest.CaptureFixture) -> None:
    from banana_dev import Client
    from banana_dev.client import ClientException

    with pytest.raises(ClientException, match="422"):  # not retried: a 400 would be, for five minutes
        Client(api_key="test-key", url=server).call("/", {"prompt": "a", "num_inference_steps": 0})
    printed = capsys.readouterr().out  # the client's default verbosity prints the answer's body
    assert "Status code: 422" in printed and '"field":"num_inference_steps"' in printed.replace(" ", "")


def test_a_worker_with_no_baked_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "empty"), "PORT": str(free_port())}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no baked model" in result.stdout + result.stderr
    assert "python download.py" in result.stdout + result.stderr
