"""Seed 002's API (Flask + Celery + Redis) on this worker, with the seed's own request bodies as its README writes
them (tests/seeds/sd_dockerized_*.json, copied verbatim): queue, Celery states, images as base64 or as the image,
grids, errors naming the seed's fields, and /recent. Against SQLite, and /recent against Redis too."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from conftest import ROOT, decode, start_worker, wait_for
from PIL import Image

SEED_KEY = "lksalsdfjliadfds"  # the seed's dummy key: accepted here only because API_KEYS names it
OTHER = "another-customer"
SEEDS = ROOT / "tests" / "seeds"
FAST = {"prompt": "a lighthouse", "api_key": SEED_KEY, "ddim_steps": 2, "H": 64, "W": 64, "seed": 5}


def seed_body(name: str) -> dict:
    return json.loads((SEEDS / f"sd_dockerized_{name}.json").read_text())


def start(baked: dict[str, Path], data: Path, **extra: str) -> tuple:
    return start_worker(baked["tiny-sd"], data, f"{SEED_KEY},{OTHER}", MAX_STEPS="5000", **extra)


@pytest.fixture(scope="module")
def server(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start(baked, tmp_path_factory.mktemp("dockerized"))
    yield url
    process.terminate()
    process.wait(10)


def finished(server: str, task_id: str, key: str = SEED_KEY) -> requests.Response:
    """Poll /status as the seed's clients do until the task is no longer pending or running."""

    def done() -> requests.Response | None:
        answer = requests.get(f"{server}/status/{task_id}", params={"api_key": key}, timeout=30)
        is_json = answer.headers["content-type"].startswith("application/json")
        return None if is_json and answer.json()["state"] in ("PENDING", "STARTED", "PROGRESS") else answer

    return wait_for(done, timeout=120)


def png(answer: requests.Response) -> Image.Image:
    return Image.open(io.BytesIO(answer.content))


def test_the_seeds_generate_body_as_written_queues_a_task_and_status_gives_the_image(server: str) -> None:
    body = seed_body("generate")  # return_base64 false, synchronous_request false, ((dragon)), 512x512, ddim
    answer = requests.post(f"{server}/generate", json=body, timeout=30)
    assert answer.status_code == 200 and set(answer.json()) == {"task_id"}, answer.text
    done = finished(server, answer.json()["task_id"])
    assert done.headers["content-type"] == "image/png"
    assert png(done).size == (512, 512)


def test_the_seeds_img2img_body_as_written(server: str) -> None:
    body = seed_body("img2img")  # a 24x24 init_img, n_iter 2, plms, ckpt given as the seed's dict of checkpoints
    body["ddim_steps"] = 4  # the seed's 50 steps at 512x512, twice, take minutes on a CPU; nothing else changed
    answer = requests.post(f"{server}/img2img", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    done = finished(server, answer.json()["task_id"])
    assert done.headers["content-type"] == "image/png" and png(done).size == (512, 512)  # resized to W x H
    as_json = requests.get(
        f"{server}/status/{answer.json()['task_id']}", params={"api_key": SEED_KEY}, timeout=30
    )  # return_base64 is false: the status is the image again, the first of the n_iter x n_samples
    assert as_json.content == done.content


def test_synchronous_base64_answer_has_what_reproduces_each_image(server: str) -> None:
    body = {**FAST, "n_samples": 2, "synchronous_request": True, "return_base64": True, "sampler": "k_euler_a"}
    answer = requests.post(f"{server}/generate", json=body, timeout=120).json()
    assert answer["state"] == "SUCCESS" and len(answer["images"]) == 2
    metadata = answer["metadata"]
    assert metadata["seed"] == 5 and metadata["ddim_steps"] == 2 and metadata["sampler"] == "k_euler_a"
    assert (metadata["H"], metadata["W"], metadata["scale"], metadata["format"]) == (64, 64, 7.5, "png")
    second = answer["images"][1]
    again = requests.post(
        f"{server}/generate",
        json={**FAST, "seed": second["seed"], "synchronous_request": True, "sampler": "k_euler_a"},
        timeout=120,
    ).json()
    alone, in_batch = (np.asarray(decode(image["base64"]), dtype=int) for image in (again["images"][0], second))
    assert np.abs(alone - in_batch).max() <= 2  # image 2 is seed + 1, reproduced alone (batched maths rounds)


def test_progress_is_celerys_progress_state_with_step_counts(server: str) -> None:
    task = requests.post(f"{server}/generate", json={**FAST, "ddim_steps": 400}, timeout=30).json()["task_id"]

    def progress() -> dict | None:
        state = requests.get(f"{server}/status/{task}", params={"api_key": SEED_KEY}, timeout=30).json()
        return state if state["state"] == "PROGRESS" else None

    state = wait_for(progress, timeout=60)
    assert 0 < state["current"] <= state["total"] == 400
    assert finished(server, task).json()["state"] == "SUCCESS"


def test_a_grid_of_the_samples_n_rows_to_a_row(server: str) -> None:
    body = {**FAST, "n_samples": 2, "n_iter": 2, "skip_grid": False, "n_rows": 2, "synchronous_request": True}
    answer = requests.post(f"{server}/generate", json=body, timeout=120).json()
    grid = Image.open(io.BytesIO(base64.b64decode(answer["grid"])))
    assert grid.size == (128, 128) and len(answer["images"]) == 4
    first = decode(answer["images"][0]["base64"])
    assert grid.crop((0, 0, 64, 64)).tobytes() == first.convert("RGB").tobytes()
    image = requests.post(f"{server}/generate", json={**body, "return_base64": False}, timeout=120)
    assert image.headers["content-type"] == "image/png" and png(image).size == (128, 128)


def test_jpg_format_comes_back_as_jpeg(server: str) -> None:
    body = {**FAST, "format": "jpg", "return_base64": False, "synchronous_request": True}
    answer = requests.post(f"{server}/generate", json=body, timeout=120)
    assert answer.headers["content-type"] == "image/jpeg" and png(answer).format == "JPEG"


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"api_key": "wrong"}, "api_key", 401),
        ({"api_key": None}, "api_key", 401),
        ({"ddim_steps": 0}, "ddim_steps", 422),
        ({"H": 100}, "H", 422),
        ({"W": 100000}, "W", 422),
        ({"n_samples": 3, "n_iter": 3}, "n_samples", 422),
        ({"ckpt": "sd21"}, "ckpt", 422),
        ({"upscale": True}, "upscale", 422),
        ({"noise_multiplier": 2}, "noise_multiplier", 422),
        ({"format": "gif"}, "format", 422),
        ({"bogus": 1}, "bogus", 422),
        ({"init_img": "aGk="}, "init_img", 422),
    ],
)
def test_bad_bodies_are_refused_naming_the_seeds_field(server: str, change: dict, field: str, status: int) -> None:
    answer = requests.post(f"{server}/generate", json={**FAST, **change}, timeout=30)
    assert answer.status_code == status and answer.json()["$error"]["field"] == field, answer.text


def test_a_failure_in_the_worker_is_celerys_failure_naming_the_seeds_field(server: str) -> None:
    task = requests.post(f"{server}/generate", json={**FAST, "sampler": "k_dpm_fast"}, timeout=30).json()["task_id"]
    state = finished(server, task).json()
    assert state["state"] == "FAILURE" and state["$error"]["field"] == "sampler", state
    assert "k_dpm_fast" in state["error"]


def test_a_task_is_its_keys_own(server: str) -> None:
    task = requests.post(f"{server}/generate", json=FAST, timeout=30).json()["task_id"]
    assert requests.get(f"{server}/status/{task}", params={"api_key": OTHER}, timeout=30).status_code == 404
    assert requests.get(f"{server}/status/{task}", params={"api_key": "nope"}, timeout=30).status_code == 401
    assert requests.get(f"{server}/status/unknown-task", params={"api_key": SEED_KEY}, timeout=30).status_code == 404


@pytest.fixture
def redis_server(baked: dict[str, Path], tmp_path: Path, redis_url: str) -> Iterator[str]:
    redis.Redis.from_url(redis_url).flushdb()
    process, url = start(baked, tmp_path, REDIS_URL=redis_url)
    yield url
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_recent_links_the_keys_last_ten_images_each_fetchable_with_the_key(
    store: str, server: str, request: pytest.FixtureRequest
) -> None:
    url = server if store == "sqlite" else request.getfixturevalue("redis_server")
    mine = [
        requests.post(f"{url}/generate", json={**FAST, "seed": seed, "synchronous_request": True}, timeout=120).json()
        for seed in range(100, 112)
    ]
    theirs = requests.post(
        f"{url}/generate", json={**FAST, "api_key": OTHER, "synchronous_request": True}, timeout=120
    ).json()
    recent = requests.get(f"{url}/recent", params={"api_key": SEED_KEY}, timeout=30).json()["recent"]
    assert [link["task_id"] for link in recent] == [task["task_id"] for task in reversed(mine)][:10]
    assert theirs["task_id"] not in {link["task_id"] for link in recent}
    direct = requests.post(url, json={"prompt": "x", "num_inference_steps": 2}, headers={"X-BANANA-API-KEY": SEED_KEY})
    assert direct.status_code == 200  # the key's job through another way in: not this API's to list
    again = requests.get(f"{url}/recent", params={"api_key": SEED_KEY}, timeout=30).json()["recent"]
    assert [link["task_id"] for link in again] == [link["task_id"] for link in recent]
    newest = requests.get(f"{url}{recent[0]['url']}", params={"api_key": SEED_KEY}, timeout=30)
    assert newest.headers["content-type"] == "image/png"
    assert newest.content == base64.b64decode(mine[-1]["images"][0]["base64"])
    assert requests.get(f"{url}{recent[0]['url']}", params={"api_key": OTHER}, timeout=30).status_code == 404
    assert requests.get(f"{url}/recent", timeout=30).status_code == 401
