"""Generation through the platform-neutral handler: every input, both request shapes, both model families."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode, png_base64

from sdworker.config import Settings
from sdworker.handler import handle
from sdworker.model import LoadedModel, load_model

FAST = {"prompt": "a red fox in the snow", "num_inference_steps": 2}


def ok(model: LoadedModel, payload: dict, **kwargs) -> dict:
    status, body = handle(model, payload, **kwargs)
    assert status == 200, body
    return body


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode(data).convert("RGB"), dtype=np.int16)


# --- txt2img, sizes, families ------------------------------------------------------------------------------------
def test_txt2img_returns_an_image_of_the_requested_size(sd: LoadedModel) -> None:
    body = ok(sd, {**FAST, "width": 96, "height": 64, "seed": 7})
    image = decode(body["image_base64"])
    assert (image.format, image.size) == ("PNG", (96, 64))
    assert body["images"] == [{"base64": body["image_base64"], "seed": 7, "width": 96, "height": 64, "format": "png"}]
    meta = body["$meta"]
    assert (meta["task"], meta["PIPELINE"], meta["family"], meta["MODEL_ID"]) == (
        "text2img",
        "StableDiffusionPipeline",
        "sd1",
        "tiny-sd",
    )
    assert set(body["$timings"]) >= {"inference", "encode", "total"}


def test_default_size_is_the_models_native_size(sd: LoadedModel) -> None:
    body = ok(sd, FAST)
    assert decode(body["image_base64"]).size == (sd.default_size, sd.default_size)


def test_sdxl_family_is_detected_and_generates(sdxl: LoadedModel) -> None:
    body = ok(sdxl, {**FAST, "width": 64, "height": 64})
    assert body["$meta"]["family"] == "sdxl"
    assert body["$meta"]["PIPELINE"] == "StableDiffusionXLPipeline"
    assert "nsfw_content_detected" not in body  # SDXL ships no safety checker
    assert body["$meta"]["safety_checker"] is False


def test_kiri_request_shape_gives_the_same_image_as_the_flat_shape(sd: LoadedModel) -> None:
    nested = ok(sd, {"modelInputs": {**FAST, "seed": 11}, "callInputs": {"SCHEDULER": "DDIMScheduler"}})
    flat = ok(sd, {**FAST, "seed": 11, "scheduler": "DDIMScheduler"})
    assert nested["image_base64"] == flat["image_base64"]
    assert nested["$meta"]["SCHEDULER"] == "DDIMScheduler"


def test_init_timing_is_reported_once_after_a_cold_start(baked: dict[str, Path]) -> None:
    model = load_model(Settings(model_dir=baked["tiny-sd"]))
    first, second = ok(model, FAST), ok(model, FAST)
    assert first["$timings"]["init"] > 0
    assert "init" not in second["$timings"]


# --- seeds -----------------------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_pixels_and_another_seed_does_not(sd: LoadedModel) -> None:
    a, b = ok(sd, {**FAST, "seed": 1234}), ok(sd, {**FAST, "seed": 1234})
    c = ok(sd, {**FAST, "seed": 1235})
    assert a["image_base64"] == b["image_base64"]
    assert a["image_base64"] != c["image_base64"]


def test_each_image_carries_its_own_seed_and_matches_a_single_run(sd: LoadedModel) -> None:
    batch = ok(sd, {**FAST, "seed": 500, "num_images_per_prompt": 3})
    assert [image["seed"] for image in batch["images"]] == [500, 501, 502]
    assert batch["images_base64"] == [image["base64"] for image in batch["images"]]
    single = ok(sd, {**FAST, "seed": 502})
    # One generator per image: image 3 of the batch is the picture seed 502 gives alone (batched maths may
    # round differently in the last bit).
    assert np.abs(pixels(batch["images"][2]["base64"]) - pixels(single["image_base64"])).max() <= 2


def test_full_64_bit_seed_range(sd: LoadedModel) -> None:
    body = ok(sd, {**FAST, "seed": 2**64 - 1, "num_images_per_prompt": 2})
    assert [image["seed"] for image in body["images"]] == [2**64 - 1, 0]
    status, body = handle(sd, {**FAST, "seed": 2**64})
    assert (status, body["$error"]["field"]) == (422, "seed")


@pytest.mark.parametrize("seed", [None, False, -1])
def test_missing_or_random_seed_picks_one_and_reports_it(sd: LoadedModel, seed: object) -> None:
    a, b = ok(sd, {**FAST, "seed": seed}), ok(sd, {**FAST, "seed": seed})
    assert isinstance(a["$meta"]["seed"], int) and 0 <= a["$meta"]["seed"] < 2**53
    assert a["$meta"]["seed"] != b["$meta"]["seed"]
    again = ok(sd, {**FAST, "seed": a["$meta"]["seed"]})
    assert again["image_base64"] == a["image_base64"]


# --- img2img and inpaint ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["sd", "sdxl"])
def test_img2img_follows_the_input_image_size(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    body = ok(model, {**FAST, "num_inference_steps": 4, "image": png_base64(80, 64), "strength": 0.5})
    assert body["$meta"]["task"] == "img2img"
    assert body["$meta"]["PIPELINE"].endswith("Img2ImgPipeline")
    assert body["$meta"]["strength"] == 0.5
    assert decode(body["image_base64"]).size == (80, 64)


def test_img2img_accepts_a_data_url_and_the_init_image_alias(sd: LoadedModel) -> None:
    plain = ok(sd, {**FAST, "seed": 3, "image": png_base64()})
    data_url = ok(sd, {**FAST, "seed": 3, "init_image": "data:image/png;base64," + png_base64()})
    assert plain["image_base64"] == data_url["image_base64"]


def test_img2img_depends_on_the_input_image(sd: LoadedModel) -> None:
    red = ok(sd, {**FAST, "seed": 3, "image": png_base64(color=(255, 0, 0)), "strength": 0.5})
    blue = ok(sd, {**FAST, "seed": 3, "image": png_base64(color=(0, 0, 255)), "strength": 0.5})
    assert red["image_base64"] != blue["image_base64"]


@pytest.fixture()
def image_server(tmp_path: Path):
    """A real HTTP server on loopback serving one PNG, for image URLs."""
    (tmp_path / "input.png").write_bytes(base64.b64decode(png_base64(72, 64)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_img2img_fetches_an_http_image(sd: LoadedModel, image_server: str) -> None:
    local = dataclasses.replace(sd, settings=sd.settings.model_copy(update={"allowed_url_hosts": "127.0.0.1"}))
    body = ok(local, {**FAST, "image": f"{image_server}/input.png"})
    assert decode(body["image_base64"]).size == (72, 64)


def test_an_image_url_that_fails_is_a_clear_error(sd: LoadedModel, image_server: str) -> None:
    local = dataclasses.replace(sd, settings=sd.settings.model_copy(update={"allowed_url_hosts": "127.0.0.1"}))
    status, body = handle(local, {"modelInputs": {**FAST, "image": f"{image_server}/missing.png"}})
    assert status == 422
    assert body["$error"]["code"] == "IMAGE_FETCH_FAILED"
    assert body["$error"]["field"] == "modelInputs.image"
    assert "404" not in body["$error"]["message"] and image_server not in body["$error"]["message"]


@pytest.mark.parametrize("model_name", ["sd", "sdxl"])
def test_inpaint_uses_the_mask(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    base = {**FAST, "seed": 9, "image": png_base64(64, 64), "width": 64, "height": 64}
    body = ok(model, {**base, "mask_image": png_base64(64, 64, (255, 255, 255))})
    assert body["$meta"]["task"] == "inpaint"
    assert body["$meta"]["PIPELINE"].endswith("InpaintPipeline")
    assert decode(body["image_base64"]).size == (64, 64)
    other_mask = ok(model, {**base, "mask_image": png_base64(64, 64, (0, 0, 0))})
    assert other_mask["image_base64"] != body["image_base64"]


def test_pipeline_names_pick_the_task(sd: LoadedModel) -> None:
    body = ok(
        sd, {"modelInputs": {**FAST, "image": png_base64()}, "callInputs": {"PIPELINE": "AutoPipelineForImage2Image"}}
    )
    assert body["$meta"]["task"] == "img2img"
    body = ok(sd, {"modelInputs": FAST, "callInputs": {"PIPELINE": "StableDiffusionPipeline"}})
    assert body["$meta"]["task"] == "text2img"


# --- schedulers ------------------------------------------------------------------------------------------------
SCHEDULER_NAMES = {
    "EulerAncestralDiscreteScheduler": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "DPMSolverSDEScheduler": ("DPMSolverSDEScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "k_lms_ka": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {}),
    "k_dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "k_dpmpp_2m_ka": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "k_dpmpp_sde_ka": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCDScheduler": ("TCDScheduler", {}),
    "Euler trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Euler a trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "DPM++ 2M Karras trailing": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
    ),
    "LCM trailing": ("LCMScheduler", {"timestep_spacing": "trailing"}),
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_names_resolve_and_run(sd: LoadedModel, name: str) -> None:
    class_name, config = SCHEDULER_NAMES[name]
    unet = sd.pipes["text2img"].unet
    seen: list = []
    body = ok(
        sd,
        {**FAST, "num_inference_steps": 3, "scheduler": name},
        on_step=lambda i, n: seen.append(type(sd.pipes["text2img"].scheduler)),
    )
    assert body["$meta"]["SCHEDULER"] == class_name
    assert seen and all(cls.__name__ == class_name for cls in seen)
    used = sd.pipes["text2img"].scheduler
    assert {key: used.config[key] for key in config} == config
    assert sd.pipes["text2img"].unet is unet  # swapped without reloading weights


def test_the_baked_scheduler_is_used_again_after_a_swap(sd: LoadedModel) -> None:
    ok(sd, {**FAST, "scheduler": "Euler a"})
    assert ok(sd, FAST)["$meta"]["SCHEDULER"] == "PNDMScheduler"


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("Ancestral Magic", "unknown scheduler"),
        ("DPM fast", "no diffusers implementation"),
        ("k_dpm_ad", "no diffusers implementation"),
        ("Euler a Karras", "no Karras variant"),
    ],
)
def test_unknown_schedulers_are_refused_by_name(sd: LoadedModel, name: str, words: str) -> None:
    status, body = handle(sd, {"modelInputs": FAST, "callInputs": {"SCHEDULER": name}})
    assert status == 422
    assert body["$error"]["code"] == "INVALID_SCHEDULER"
    assert body["$error"]["field"] == "callInputs.SCHEDULER"
    assert words in body["$error"]["message"]


# --- output ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("asked", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("jpg", "JPEG"), ("WEBP", "WEBP")])
def test_output_formats(sd: LoadedModel, asked: str, pil_format: str) -> None:
    body = ok(sd, {**FAST, "output_format": asked})
    assert decode(body["image_base64"]).format == pil_format
    assert body["images"][0]["format"] == pil_format.lower()


def test_output_quality_changes_the_size_of_lossy_images(sd: LoadedModel) -> None:
    low = ok(sd, {**FAST, "seed": 1, "output_format": "jpeg", "output_quality": 5})
    high = ok(sd, {**FAST, "seed": 1, "output_format": "jpeg", "quality": 100})
    assert len(low["image_base64"]) < len(high["image_base64"]) / 2


def test_safety_checker_runs_by_default_and_can_be_turned_off(sd: LoadedModel) -> None:
    on = ok(sd, {**FAST, "seed": 5})
    assert on["nsfw_content_detected"] == [False]
    assert on["$meta"]["safety_checker"] is True and "safety" in on["$timings"]
    off = ok(sd, {"modelInputs": {**FAST, "seed": 5}, "callInputs": {"safety_checker": False}})
    assert "nsfw_content_detected" not in off and off["$meta"]["safety_checker"] is False
    assert off["image_base64"] == on["image_base64"]


def test_flagged_images_come_back_black(sd: LoadedModel) -> None:
    weights = sd.safety_checker.concept_embeds_weights
    saved = weights.clone()
    try:
        with torch.no_grad():
            weights.fill_(-2.0)  # every concept now scores above its threshold
        body = ok(sd, {**FAST, "num_images_per_prompt": 2})
    finally:
        with torch.no_grad():
            weights.copy_(saved)
    assert body["nsfw_content_detected"] == [True, True]
    assert all(pixels(image["base64"]).max() == 0 for image in body["images"])


# --- progress, failures, memory --------------------------------------------------------------------------------
def test_progress_reports_every_step(sd: LoadedModel) -> None:
    steps: list[tuple[int, int]] = []
    ok(
        sd,
        {**FAST, "num_inference_steps": 10, "scheduler": "DDIM", "image": png_base64(), "strength": 0.5},
        on_step=lambda i, n: steps.append((i, n)),
    )
    assert steps == [(i, 5) for i in range(1, 6)]  # img2img at strength 0.5 runs half the steps


def test_an_error_inside_the_pipeline_is_a_500_without_traceback(sd: LoadedModel) -> None:
    def explode(step: int, total: int) -> None:
        raise RuntimeError("the unet caught fire")

    status, body = handle(sd, FAST, on_step=explode)
    assert status == 500
    assert body["$error"]["code"] == "PIPELINE_ERROR"
    assert "Traceback" not in str(body) and "File " not in str(body)
    assert ok(sd, FAST)["images"]


def test_out_of_memory_answers_an_error_and_the_worker_serves_the_next_request(sd: LoadedModel) -> None:
    def out_of_memory(step: int, total: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    status, body = handle(sd, {**FAST, "num_images_per_prompt": 4}, on_step=out_of_memory)
    assert status == 500
    assert body["$error"]["code"] == "OUT_OF_MEMORY"
    assert "fewer or smaller" in body["$error"]["message"]
    assert ok(sd, FAST)["images"]


def test_memory_usage_is_reported_only_on_cuda(sd: LoadedModel) -> None:
    body = ok(sd, FAST)
    assert ("$mem_usage" in body) == sd.device.startswith("cuda")


def test_trailing_spacing_changes_the_picture(sd: LoadedModel) -> None:
    seeded = {**FAST, "seed": 5, "num_inference_steps": 4}
    leading = ok(sd, {**seeded, "scheduler": "Euler"})["images"][0]["base64"]
    assert ok(sd, {**seeded, "scheduler": "Euler"})["images"][0]["base64"] == leading  # seeded: the same again
    assert ok(sd, {**seeded, "scheduler": "Euler trailing"})["images"][0]["base64"] != leading


@pytest.mark.parametrize(
    "scheduler, extra, steps",
    [
        ("PNDMScheduler", {}, 6),  # PLMS visits its first timestep twice: 7 calls
        ("HeunDiscreteScheduler", {}, 6),  # second order: 11 calls
        ("EulerDiscreteScheduler", {"image": png_base64(), "strength": 0.5}, 3),  # img2img: strength x steps
    ],
)
def test_progress_counts_the_steps_asked_once_each(sd: LoadedModel, scheduler: str, extra: dict, steps: int) -> None:
    from sdworker.generate import step_hook

    seen: list[tuple[int, int]] = []
    token = step_hook.set(lambda step, total: seen.append((step, total)))
    try:
        status, body = handle(sd, {**FAST, "num_inference_steps": 6, "scheduler": scheduler, "width": 64, **extra})
    finally:
        step_hook.reset(token)
    assert status == 200, body
    assert seen == [(step, steps) for step in range(1, steps + 1)]


def test_a_scheduler_is_asked_no_more_steps_than_it_can_take(baked: dict[str, Path]) -> None:
    model = load_model(Settings(model_dir=baked["tiny-sd"], max_steps=2000))
    status, body = handle(model, {**FAST, "num_inference_steps": 1000, "width": 64, "height": 64})  # PNDM, baked
    assert status == 422 and body["$error"]["field"] == "num_inference_steps", body
    assert "at most 999 with PNDMScheduler" in body["$error"]["message"]
    status, body = handle(model, {**FAST, "num_inference_steps": 1001, "scheduler": "EulerDiscreteScheduler"})
    assert status == 422 and "at most 1000" in body["$error"]["message"], body
