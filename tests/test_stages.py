"""Seed 001's three endpoints: encode (text encoders), denoise (UNet), decode (VAE). Through the three a seed gives
the all-in-one image, on one worker and across three STAGES workers; tensors that do not fit the model are 422s
naming them; a STAGES worker loads only its part and refuses the rest."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import ROOT, batched, decode, start_worker, wait_for

from sdworker.config import Settings
from sdworker.generate import generate
from sdworker.handler import handle
from sdworker.model import LoadedModel, load_model
from sdworker.schema import GenerateInput
from sdworker.stages import pack, run_stage, unpack

KEY = "stage-key"
SHAPE = {"num_inference_steps": 3, "seed": 21, "width": 64, "height": 64}


def split(model: LoadedModel, prompt: dict, **denoise: object) -> dict:
    status, encoded = run_stage(model, "encode", prompt)
    assert status == 200, encoded
    status, denoised = run_stage(model, "denoise", {"embeddings": encoded["embeddings"], **SHAPE, **denoise})
    assert status == 200, denoised
    status, decoded = run_stage(model, "decode", {"latents": denoised["latents"]})
    assert status == 200, decoded
    return decoded


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode(data), dtype=int)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "prompt",
    [
        {"prompt": "a lighthouse"},
        {"prompt": "a (lighthouse:1.3) at dusk", "negative_prompt": "fog"},
        {"prompt": "a lighthouse on a cliff, " * 5},  # past 77 tokens
    ],
)
def test_encode_denoise_decode_is_the_all_in_one_image(name: str, prompt: dict, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    whole = handle(model, {**prompt, **SHAPE, "safety_checker": True})[1]
    parts = split(model, prompt)
    assert parts["images"][0]["seed"] == 21
    assert np.abs(pixels(parts["image_base64"]) - pixels(whole["image_base64"])).max() <= 1


def test_several_images_and_their_seeds_come_through(sd: LoadedModel) -> None:
    whole = handle(sd, {"prompt": "a lighthouse", **SHAPE, "num_images_per_prompt": 2})[1]
    parts = split(sd, {"prompt": "a lighthouse"}, num_images_per_prompt=2)
    assert [image["seed"] for image in parts["images"]] == [21, 22]
    for mine, theirs in zip(parts["images"], whole["images"], strict=True):
        assert np.abs(pixels(mine["base64"]) - pixels(theirs["base64"])).max() <= 1


def test_tensors_that_do_not_fit_are_422s_naming_them(sd: LoadedModel, sdxl: LoadedModel) -> None:
    _, encoded = run_stage(sd, "encode", {"prompt": "a lighthouse"})
    tensors, meta = unpack(encoded["embeddings"], "embeddings")
    cases = [
        ({"embeddings": "not base64!"}, "embeddings"),
        ({"embeddings": base64.b64encode(b"12345678junk").decode()}, "embeddings"),
        ({"embeddings": pack({"prompt_embeds": tensors["prompt_embeds"]}, meta)}, "embeddings"),
        ({"embeddings": pack({**tensors, "prompt_embeds": torch.zeros(1, 77, 5)}, meta)}, "embeddings.prompt_embeds"),
        (
            {"embeddings": pack({**tensors, "negative_prompt_embeds": torch.zeros(1, 154, 32)}, meta)},
            "embeddings.negative_prompt_embeds",
        ),
        (
            {"embeddings": pack({**tensors, "prompt_embeds": torch.full((1, 77, 32), float("nan"))}, meta)},
            "embeddings.prompt_embeds",
        ),
        ({"embeddings": encoded["embeddings"], "num_inference_steps": 0}, "num_inference_steps"),
        ({"embeddings": encoded["embeddings"], "bogus": 1}, "bogus"),
    ]
    for body, field in cases:
        status, answer = run_stage(sd, "denoise", body)
        assert status == 422 and answer["$error"]["field"] == field, (field, answer)
    status, answer = run_stage(sdxl, "denoise", {"embeddings": encoded["embeddings"]})  # SD 1.x's, to SDXL
    assert status == 422 and answer["$error"]["field"].startswith("embeddings"), answer
    status, answer = run_stage(sd, "decode", {"latents": pack({"latents": torch.zeros(1, 3, 8, 8)}, {})})
    assert status == 422 and answer["$error"]["field"] == "latents.latents"
    status, answer = run_stage(sd, "decode", {"latents": pack({"latents": torch.zeros(1, 4, 8, 8).double()}, {})})
    assert status == 422 and "float64" in answer["$error"]["message"]
    status, answer = run_stage(sd, "decode", {"latents": pack({"latents": torch.zeros(1, 4, 8, 8)}, {"seeds": 5})})
    assert status == 200 and answer["images"][0]["seed"] is None  # metadata not denoise's: read as none


@pytest.fixture(scope="module")
def three_workers(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    processes, urls = [], {}
    for stage in ("encode", "denoise", "decode"):
        process, urls[stage] = start_worker(baked["tiny-sd"], tmp_path_factory.mktemp(stage), KEY, STAGES=stage)
        processes.append(process)
    yield urls
    for process in processes:
        process.terminate()
        process.wait(10)


def test_three_workers_each_with_one_stage_make_the_all_in_one_image(
    three_workers: dict[str, str], sd: LoadedModel
) -> None:
    headers = {"X-BANANA-API-KEY": KEY}

    def call(stage: str, body: dict) -> dict:
        answer = requests.post(f"{three_workers[stage]}/stages/{stage}", json=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    embeddings = call("encode", {"prompt": "a (lighthouse:1.2)", "negative_prompt": "fog"})["embeddings"]
    latents = call("denoise", {"embeddings": embeddings, **SHAPE})["latents"]
    image = call("decode", {"latents": latents})["image_base64"]
    whole = handle(sd, {"prompt": "a (lighthouse:1.2)", "negative_prompt": "fog", **SHAPE})[1]
    assert np.abs(pixels(image) - pixels(whole["image_base64"])).max() <= 1
    # Each worker refuses what it does not serve, and whole generations.
    for stage, url in three_workers.items():
        for other in ("encode", "denoise", "decode"):
            if other != stage:
                answer = requests.post(f"{url}/stages/{other}", json={}, headers=headers, timeout=30)
                assert answer.status_code == 404 and f"STAGES={stage}" in answer.json()["$error"]["message"]
        answer = requests.post(url, json={"prompt": "a lighthouse"}, headers=headers, timeout=30)
        assert answer.status_code == 404 and answer.json()["$error"]["code"] == "STAGE_NOT_SERVED"


def test_a_stage_worker_loads_only_its_part(baked: dict[str, Path]) -> None:
    denoiser = load_model(Settings(model_dir=baked["tiny-sd"], stages="denoise"))
    pipe = denoiser.pipes["text2img"]
    assert pipe.text_encoder is None and pipe.vae is None and pipe.unet is not None
    decoder = load_model(Settings(model_dir=baked["tiny-sdxl"], stages="decode"))
    pipe = decoder.pipes["text2img"]
    assert pipe.unet is None and pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.vae is not None


def test_the_smoke_script_runs_the_three_stages_on_three_workers(three_workers: dict[str, str], tmp_path: Path) -> None:
    urls = [three_workers[stage] for stage in ("encode", "denoise", "decode")]
    command = [sys.executable, "test.py", "--split", *urls, "--api-key", KEY, "--steps", "3", "--seed", "7"]
    result = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: the three stages answered; 1 image(s) saved" in result.stdout
    for stage in ("encode", "denoise", "decode"):
        assert re.search(rf"{stage} \d+ B in, \d+ B out, \d+ ms", result.stdout), result.stdout
    assert (tmp_path / "split-0-seed-7.png").exists()


def test_a_stage_and_a_generation_waiting_together_each_run_their_own_work(sd: LoadedModel) -> None:
    """Both wait for the model behind a third job; whichever caller takes the turn runs each its own way."""
    model = batched(sd)
    gate, results = threading.Event(), {}
    holder = threading.Thread(
        target=generate, args=(model, GenerateInput(prompt="hold", **SHAPE), lambda *_: gate.wait()), daemon=True
    )
    holder.start()
    wait_for(lambda: model.batcher._busy)
    calls = {
        "generation": lambda: generate(model, GenerateInput(prompt="a lighthouse", **SHAPE)),
        "stage": lambda: run_stage(model, "encode", {"prompt": "a lighthouse"}),
    }
    threads = [
        threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, c()), daemon=True) for n, c in calls.items()
    ]
    for index, thread in enumerate(threads):
        thread.start()
        wait_for(lambda n=index + 1: len(model.batcher._waiting) == n)
    gate.set()
    for thread in [holder, *threads]:
        thread.join(60)
    assert len(results["generation"].images) == 1
    assert results["stage"][0] == 200 and "embeddings" in results["stage"][1]


def test_stages_settings(redis_url: str, baked: dict[str, Path], tmp_path: Path) -> None:
    assert Settings(stages="encode,encode").served_stages() == ("encode",)
    assert not Settings(stages="encode,encode").whole() and Settings(stages="decode, encode ,denoise").whole()
    env = {**os.environ, "MODEL_DIR": str(baked["tiny-sd"]), "DATA_DIR": str(tmp_path), "STAGES": "denoise"}
    env["REDIS_URL"] = redis_url
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "MODEL_KEY of their own" in result.stderr
