"""The families after SD 1.x/2.x and SDXL (sd3, flux, flux2, flux2-klein, qwenimage and its edit models, zimage,
chroma, the inpainting and edit checkpoints): baked offline from their tiny recipes with the real baking code,
loaded by the real loader, served through the one handler and every client's route; and the family table's rules
(defaults, fields, sizes, dtype)."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from conftest import decode, download, free_port, png_base64, start_process, wait_for
from PIL import Image

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.handler import handle
from sdworker.model import FAMILIES, LoadedModel, family_of, load_model, read_manifest

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 5, "width": 64, "height": 64}


EDIT = {
    "tiny-flux2": "flux2",
    "tiny-flux2-klein": "flux2-klein",
    "tiny-flux-kontext": "flux-kontext",
    "tiny-qwenimage-edit": "qwenimage-edit",
    "tiny-qwenimage-edit-plus": "qwenimage-edit-plus",
}
"""The models that edit from reference images, by their tiny recipe."""
NEW = {
    "tiny-flux2": "flux2",
    "tiny-flux2-klein": "flux2-klein",
    "tiny-qwenimage": "qwenimage",
    "tiny-zimage": "zimage",
    "tiny-chroma": "chroma",
}
"""The families of 2025-26 by their tiny recipe."""
INPAINTING = {"tiny-sd-inpaint": "sd1-inpaint", "tiny-sdxl-inpaint": "sdxl-inpaint", "tiny-flux-fill": "flux-fill"}
"""The inpainting checkpoints by their tiny recipe."""


@pytest.fixture(scope="module")
def tiny(recipe: Callable[[str], Path]) -> dict[str, Path]:
    names = ("tiny-sd3", "tiny-flux", "tiny-flux-schnell", *NEW, "tiny-flux2-klein-base", *INPAINTING, *EDIT)
    return {name: recipe(name) for name in names}


@pytest.fixture(scope="module")
def models(tiny: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_model(Settings(model_dir=path)) for name, path in tiny.items()}


QWEN_EDIT = [("tiny-qwenimage-edit", "qwenimage-edit"), ("tiny-qwenimage-edit-plus", "qwenimage-edit-plus")]


@pytest.mark.parametrize(("name", "family"), [("tiny-sd3", "sd3"), ("tiny-flux", "flux"), *NEW.items(), *QWEN_EDIT])
def test_every_task_of_the_family_makes_its_image(models: dict[str, LoadedModel], name: str, family: str) -> None:
    model = models[name]
    image = png_base64(96, 80)
    tasks = {
        "text2img": {},
        "img2img": {"image": image, "strength": 0.5},
        "inpaint": {"image": image, "mask_image": png_base64(96, 80, (255, 255, 255))},
        "edit": {"images": [png_base64(96, 80, (0, 0, 255))]},
    }
    pictures = set()
    for task in FAMILIES[family].pipelines:
        status, body = handle(model, {**FAST, "width": 96, "height": 80, **tasks[task]})
        assert status == 200, body
        assert decode(body["images"][0]["base64"]).size == (96, 80), task  # the size asked, not the default
        meta = body["$meta"]
        assert (meta["family"], meta["task"]) == (family, task)
        assert meta["PIPELINE"] == FAMILIES[family].pipelines[task]
        pictures.add(body["images"][0]["base64"])
    assert len(pictures) == len(FAMILIES[family].pipelines)  # each task drew its own picture
    first = next(iter(FAMILIES[family].pipelines))  # Qwen-Image-Edit's first task is edit
    again = handle(model, {**FAST, "width": 96, "height": 80, **tasks[first]})[1]["images"][0]["base64"]
    assert again == handle(model, {**FAST, "width": 96, "height": 80, **tasks[first]})[1]["images"][0]["base64"]


def test_a_prompt_alone_gets_the_familys_defaults(models: dict[str, LoadedModel]) -> None:
    status, body = handle(models["tiny-sd3"], {"prompt": "a lighthouse", "seed": 1})
    assert status == 200, body
    meta = body["$meta"]
    assert (meta["num_inference_steps"], meta["guidance_scale"]) == (28, 7.0)
    assert (meta["width"], meta["height"]) == (64, 64)  # tiny-sd3's native size: 8 latent patches x 8
    # FLUX.1-schnell's layout (no guidance embedding) is a distilled model: 4 steps, no guidance.
    status, body = handle(models["tiny-flux-schnell"], {**FAST, "num_inference_steps": None})
    assert status == 200, body
    assert (body["$meta"]["num_inference_steps"], body["$meta"]["guidance_scale"]) == (4, 0.0)
    dev = handle(models["tiny-flux"], {**FAST, "num_inference_steps": None})[1]["$meta"]
    assert (dev["num_inference_steps"], dev["guidance_scale"]) == (28, 3.5)


def test_the_new_families_defaults_are_their_model_cards(models: dict[str, LoadedModel]) -> None:
    expected = {
        "tiny-qwenimage": (50, 4.0),  # true CFG 4 against a " " negative prompt, as Qwen-Image's own examples
        "tiny-zimage": (50, 5.0),
        "tiny-chroma": (40, 3.0),  # Chroma1-HD's card
        "tiny-flux2-klein": (4, 1.0),  # FLUX.2 [klein] 4B/9B: distilled, its pipeline config says so
        "tiny-flux2-klein-base": (50, 4.0),  # the [klein] base models: not distilled
        "tiny-flux2": (50, 2.5),  # FLUX.2 [dev]: its card and pipeline example
    }
    for name, (steps, guidance) in expected.items():
        status, body = handle(models[name], {**FAST, "num_inference_steps": None})
        assert status == 200, (name, body)
        assert (body["$meta"]["num_inference_steps"], body["$meta"]["guidance_scale"]) == (steps, guidance), name
        assert body["$meta"]["width"] == 64
    assert models["tiny-qwenimage"].default_size == models["tiny-zimage"].default_size == 1024
    assert models["tiny-chroma"].size_multiple == models["tiny-zimage"].size_multiple == 16
    # Z-Image-Turbo is known by its name, as the other turbo models: 8 steps, no guidance.
    assert FAMILIES["zimage"].is_distilled({}, "Tongyi-MAI/Z-Image-Turbo")
    assert not FAMILIES["zimage"].is_distilled({}, "Tongyi-MAI/Z-Image")
    assert (FAMILIES["zimage"].distilled_steps, FAMILIES["zimage"].distilled_guidance) == (8, 0.0)


def test_guidance_and_the_negative_prompt_steer_the_families_that_take_them(models: dict[str, LoadedModel]) -> None:
    def picture(name: str, **extra: object) -> str:
        status, body = handle(models[name], {**FAST, **extra})
        assert status == 200, (name, body)
        return body["images"][0]["base64"]

    for name in ("tiny-qwenimage", "tiny-zimage", "tiny-chroma"):
        plain = picture(name)
        assert picture(name) == plain  # seeded
        assert picture(name, negative_prompt="blurry") != plain, name
        assert picture(name, guidance_scale=1.0) != plain, name  # guidance off
    # Qwen-Image's pipeline calls its guidance true_cfg_scale: either name sets the same number.
    assert picture("tiny-qwenimage", true_cfg_scale=2.0) == picture("tiny-qwenimage", guidance_scale=2.0)
    status, body = handle(models["tiny-qwenimage"], {**FAST, "true_cfg_scale": 2.0, "guidance_scale": 3.0})
    assert status == 422 and body["$error"]["field"] == "true_cfg_scale"


def test_a_task_or_field_a_new_family_lacks_is_a_422_naming_it(models: dict[str, LoadedModel]) -> None:
    klein = models["tiny-flux2-klein"]
    status, body = handle(klein, {**FAST, "pipeline": "img2img", "image": png_base64()})
    assert status == 422 and body["$error"]["field"] == "pipeline"
    assert "flux2-klein family has no img2img" in body["$error"]["message"]
    status, body = handle(klein, {**FAST, "negative_prompt": "blur"})
    assert status == 422 and body["$error"]["field"] == "negative_prompt" and "flux2-klein" in body["$error"]["message"]
    status, body = handle(models["tiny-chroma"], {**FAST, "true_cfg_scale": 4.0})
    assert status == 422 and body["$error"]["field"] == "true_cfg_scale" and "chroma" in body["$error"]["message"]
    status, body = handle(models["tiny-chroma"], {**FAST, "max_sequence_length": 600})
    assert status == 422 and body["$error"]["field"] == "max_sequence_length" and "at most 512" in str(body)
    status, body = handle(models["tiny-qwenimage"], {**FAST, "max_sequence_length": 600})
    assert status == 200, body  # Qwen-Image reads up to 1024
    weighted = {**FAST, "prompt": "a (red:1.3) lighthouse"}
    status, body = handle(models["tiny-zimage"], weighted)
    assert status == 200 and body["$meta"]["prompt_syntax"] == "plain"  # read as written: no weights here
    status, body = handle(models["tiny-zimage"], {**weighted, "prompt_syntax": "a1111"})
    assert status == 422 and body["$error"]["field"] == "prompt" and "zimage" in body["$error"]["message"]
    status, body = handle(models["tiny-zimage"], {**FAST, "width": 72})
    assert status == 422 and body["$error"]["field"] == "width" and "multiple of 16" in body["$error"]["message"]


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("name", "family"), list(INPAINTING.items()))
def test_an_inpainting_checkpoint_serves_inpaint_and_names_what_it_lacks(
    models: dict[str, LoadedModel], name: str, family: str
) -> None:
    model = models[name]
    assert model.family == family and list(model.pipes) == ["inpaint"]
    image = png_base64(64, 64)
    left = Image.new("L", (64, 64))
    left.paste(255, (0, 0, 32, 64))  # white: painted; black: kept

    def inpaint(mask: Image.Image, **extra: object) -> dict:
        status, body = handle(model, {**FAST, "image": image, "mask_image": encoded(mask), **extra})
        assert status == 200, body
        return body

    body = inpaint(left)
    assert (body["$meta"]["family"], body["$meta"]["task"], body["$meta"]["PIPELINE"]) == (
        family,
        "inpaint",
        FAMILIES[family].pipelines["inpaint"],
    )
    assert inpaint(left)["images"][0]["base64"] == body["images"][0]["base64"]  # seeded
    whole = inpaint(Image.new("L", (64, 64), 255))
    assert whole["images"][0]["base64"] != body["images"][0]["base64"]  # the mask is read
    # Outpainting: a larger canvas, white where it is new, at the canvas's size.
    canvas = Image.new("L", (96, 64), 255)
    canvas.paste(0, (16, 0, 80, 64))
    status, wider = handle(model, {**FAST, "width": 96, "image": png_base64(96, 64), "mask_image": encoded(canvas)})
    assert status == 200 and decode(wider["images"][0]["base64"]).size == (96, 64), wider
    status, refused = handle(model, FAST)
    assert status == 422 and refused["$error"]["field"] == "mask_image" and family in refused["$error"]["message"]
    status, refused = handle(model, {**FAST, "image": image})
    assert status == 422 and refused["$error"]["field"] == "image" and "no img2img" in refused["$error"]["message"]


def test_an_sd2_inpainting_checkpoint_is_known_by_its_unets_text_width(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionInpaintPipeline"}')
    (tmp_path / "unet" / "config.json").write_text('{"in_channels": 9, "cross_attention_dim": 1024}')
    assert family_of(tmp_path).name == "sd2-inpaint" and FAMILIES["sd2-inpaint"].kin == "sd2"


@pytest.mark.parametrize(("name", "family"), list(EDIT.items()))
def test_an_edit_model_draws_from_its_reference_images(models: dict[str, LoadedModel], name: str, family: str) -> None:
    model = models[name]
    first, second = png_base64(80, 64), png_base64(64, 64, (0, 0, 255))

    def edit(**extra: object) -> dict:
        status, body = handle(model, {**FAST, "width": None, "height": None, **extra})
        assert status == 200, body
        return body

    one = edit(images=[first])
    meta = one["$meta"]
    assert (meta["family"], meta["task"], meta["references"], meta["strength"]) == (family, "edit", 1, None)
    assert (meta["width"], meta["height"]) == (80, 64)  # the first reference's size
    assert decode(one["images"][0]["base64"]).size == (80, 64)
    assert edit(images=[first])["images"][0]["base64"] == one["images"][0]["base64"]  # seeded
    assert edit(image=first)["images"][0]["base64"] == one["images"][0]["base64"]  # `image` alone: one reference
    assert edit(images=[png_base64(80, 64, (0, 200, 0))])["images"][0]["base64"] != one["images"][0]["base64"]
    sized = edit(images=[first], width=64, height=64)
    assert decode(sized["images"][0]["base64"]).size == (64, 64)  # the size asked, not the reference's
    if "text2img" in FAMILIES[family].pipelines:
        drawn = edit(width=64, height=64)  # text alone: its pipeline draws without references too
        assert drawn["$meta"]["task"] == "text2img" and decode(drawn["images"][0]["base64"]).size == (64, 64)
    else:  # Qwen-Image-Edit's pipelines read the size of a reference image: without one, a 422 naming them
        status, body = handle(model, {**FAST, "width": 64, "height": 64})
        assert status == 422 and body["$error"]["field"] == "images" and "no text2img" in body["$error"]["message"]
    if FAMILIES[family].references > 1:
        two = edit(images=[first, second])
        assert two["$meta"]["references"] == 2 and two["images"][0]["base64"] != one["images"][0]["base64"]
    else:
        status, body = handle(model, {**FAST, "images": [first, second]})
        assert status == 422 and body["$error"]["field"] == "images" and "at most 1" in body["$error"]["message"]


def test_reference_images_are_refused_where_they_cannot_be_read(
    models: dict[str, LoadedModel], sd: LoadedModel
) -> None:
    image = png_base64()
    for model in (sd, models["tiny-zimage"]):
        status, body = handle(model, {**FAST, "images": [image]})
        assert status == 422 and body["$error"]["field"] == "images", body
        assert f"the {model.family} family takes no reference images" in body["$error"]["message"]
    klein = models["tiny-flux2-klein"]
    status, body = handle(klein, {**FAST, "images": [image], "image": image})
    assert status == 422 and body["$error"]["field"] == "image"
    status, body = handle(klein, {**FAST, "images": [image] * 5})
    assert status == 422 and body["$error"]["field"] == "images" and "at most 4" in body["$error"]["message"]
    one_only = dataclasses.replace(klein, settings=klein.settings.model_copy(update={"max_reference_images": 1}))
    status, body = handle(one_only, {**FAST, "images": [image] * 2})
    assert status == 422 and body["$error"]["field"] == "images" and "MAX_REFERENCE_IMAGES" in body["$error"]["message"]
    status, body = handle(klein, {**FAST, "images": [image, "not an image"]})
    assert status == 422 and body["$error"]["field"] == "images[1]", body


def test_a_pipeline_named_by_its_class_runs_its_task_and_one_with_two_tasks_takes_it_from_the_images(
    models: dict[str, LoadedModel],
) -> None:
    klein = {**FAST, "pipeline": "Flux2KleinPipeline"}  # text2img or edit, as the family table says
    status, drawn = handle(models["tiny-flux2-klein"], klein)
    assert status == 200 and drawn["$meta"]["task"] == "text2img", drawn
    status, edited = handle(models["tiny-flux2-klein"], {**klein, "images": [png_base64()]})
    assert status == 200 and edited["$meta"]["task"] == "edit", edited
    fill = {**FAST, "pipeline": "FluxFillPipeline", "image": png_base64(), "mask_image": png_base64(64, 64, (255,) * 3)}
    status, filled = handle(models["tiny-flux-fill"], fill)  # every class the family table names is known
    assert status == 200 and filled["$meta"]["task"] == "inpaint", filled


@pytest.mark.parametrize("name", ["tiny-flux", *NEW])
def test_a_baked_lora_changes_a_new_familys_picture_and_leaves_nothing_behind(
    tiny: dict[str, Path], tmp_path: Path, name: str
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny[name], model_dir)
    baked = download("--model-dir", str(model_dir), MODEL_ID=name, LORAS="ink=tiny-lora")
    assert baked.returncode == 0, baked.stderr
    model = load_model(Settings(model_dir=model_dir))
    assert model.loras == ["ink"]

    def picture(scale: float | None) -> str:
        loras = [] if scale is None else [{"name": "ink", "scale": scale}]
        status, body = handle(model, {**FAST, "loras": loras})
        assert status == 200, body
        return body["images"][0]["base64"]

    plain = picture(None)
    assert picture(1.0) != plain
    assert picture(0.0) == plain  # scale 0 is the plain model
    assert picture(None) == plain  # nothing left on after a request with the LoRA


def test_the_prompt_past_max_sequence_length_is_cut_and_said(models: dict[str, LoadedModel]) -> None:
    long = {**FAST, "prompt": "a lighthouse on a cliff " * 20}
    for name in ("tiny-zimage", "tiny-chroma", "tiny-qwenimage", "tiny-flux2-klein", "tiny-flux2"):
        full = handle(models[name], long)[1]
        cut = handle(models[name], {**long, "max_sequence_length": 8})[1]
        assert cut["$meta"]["truncated"] is True and full["$meta"]["truncated"] is False, name
        assert cut["images"][0]["base64"] != full["images"][0]["base64"], name


def test_qwen_images_prompt_past_its_pipelines_512_tokens_is_cut_unless_the_request_asks_for_more(
    models: dict[str, LoadedModel],
) -> None:
    long = {**FAST, "prompt": "color " * 600}  # a template word: one token each, 600 in all
    cut = handle(models["tiny-qwenimage"], long)[1]
    full = handle(models["tiny-qwenimage"], {**long, "max_sequence_length": 1024})[1]
    assert cut["$meta"]["truncated"] is True and full["$meta"]["truncated"] is False
    assert cut["images"][0]["base64"] != full["images"][0]["base64"]  # the pipeline read past 512 tokens


def test_a_field_or_size_the_family_does_not_take_is_a_422_naming_both(
    models: dict[str, LoadedModel], sd: LoadedModel
) -> None:
    status, body = handle(models["tiny-flux"], {**FAST, "negative_prompt": "blur"})
    assert status == 422 and body["$error"]["field"] == "negative_prompt" and "flux" in body["$error"]["message"]
    status, body = handle(sd, {**FAST, "max_sequence_length": 64})
    assert status == 422 and body["$error"]["field"] == "max_sequence_length" and "sd1" in body["$error"]["message"]
    status, body = handle(models["tiny-sd3"], {**FAST, "width": 72})
    assert status == 422 and body["$error"]["field"] == "width" and "multiple of 16" in body["$error"]["message"]
    status, body = handle(models["tiny-sd3"], {**FAST, "max_sequence_length": 32, "negative_prompt": "blur"})
    assert status == 200, body


def test_max_sequence_length_changes_what_t5_reads(models: dict[str, LoadedModel]) -> None:
    long = {**FAST, "prompt": "a lighthouse on a cliff " * 20}
    full = handle(models["tiny-flux"], long)[1]["images"][0]["base64"]
    cut = handle(models["tiny-flux"], {**long, "max_sequence_length": 8})[1]["images"][0]["base64"]
    assert full != cut


def test_dtype_bfloat16_loads_and_serves_in_bfloat16(tiny: dict[str, Path]) -> None:
    model = load_model(Settings(model_dir=tiny["tiny-flux"], dtype="bfloat16"))
    # Every task's pipeline shares the weights in bfloat16 (diffusers' from_pipe casts to float32 unless told).
    for pipe in model.pipes.values():
        assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.bfloat16
    status, body = handle(model, FAST)
    assert status == 200 and body["$meta"]["dtype"] == "bfloat16", body


def test_distilled_models_are_known_by_their_layout_or_name() -> None:
    flux, sd3, sd1 = FAMILIES["flux"], FAMILIES["sd3"], FAMILIES["sd1"]
    assert flux.is_distilled({"guidance_embeds": False}, "black-forest-labs/FLUX.1-schnell")
    assert not flux.is_distilled({"guidance_embeds": True}, "black-forest-labs/FLUX.1-dev")
    assert sd3.is_distilled({}, "stabilityai/stable-diffusion-3.5-large-turbo")
    assert not sd3.is_distilled({}, "stabilityai/stable-diffusion-3.5-medium")
    assert not sd1.is_distilled({}, "someone/sd15-turbo")  # SD 1.x has no distilled defaults in the table


def test_a_pipeline_of_another_family_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(WorkerError) as refused:
        family_of(tmp_path)
    assert refused.value.code == "UNSUPPORTED_MODEL" and "KandinskyPipeline" in refused.value.message


def test_the_server_serves_flux_to_a_runpod_client(tiny: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "API_KEYS")},
        "MODEL_DIR": str(tiny["tiny-flux-schnell"]),
        "DATA_DIR": str(tmp_path / "data"),
        "API_KEYS": "k",
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "app.py"], f"{url}/health", env)
    try:
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200)
        body = {"input": {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 2}}
        answer = requests.post(
            f"{url}/v2/tiny-flux-schnell/runsync", json=body, headers={"Authorization": "Bearer k"}, timeout=120
        ).json()
        assert answer["status"] == "COMPLETED", answer
        assert answer["output"]["$meta"]["family"] == "flux" and answer["output"]["$meta"]["num_inference_steps"] == 4
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def servers(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`python app.py` on each new family's tiny recipe, started side by side: recipe -> base URL."""

    def start(name: str) -> tuple[str, object]:
        port = free_port()
        env = {
            **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "API_KEYS", "MODEL_ID")},
            "MODEL_DIR": str(tiny[name]),
            "DATA_DIR": str(tmp_path_factory.mktemp(name) / "data"),
            "API_KEYS": "k",
            "HOST": "127.0.0.1",
            "PORT": str(port),
        }
        url = f"http://127.0.0.1:{port}"
        process = start_process([sys.executable, "app.py"], f"{url}/health", env)
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, timeout=120)
        return url, process

    with ThreadPoolExecutor(len(NEW)) as pool:
        started = dict(zip(NEW, pool.map(start, NEW), strict=True))
    yield {name: url for name, (url, _) in started.items()}
    for _, process in started.values():
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("name", list(NEW))
def test_each_new_family_serves_its_tasks_to_direct_banana_and_runpod_clients(
    servers: dict[str, str], name: str
) -> None:
    url, family = servers[name], FAMILIES[NEW[name]]
    image, mask = png_base64(64, 64), png_base64(64, 64, (255, 255, 255))
    # the family's task from an image through RunPod's route: inpaint where it has one (FLUX.2 [dev]: an edit)
    last = next(task for task in ("inpaint", "img2img", "edit") if task in family.pipelines)
    given = {"images": [image]} if last == "edit" else {"image": image, "mask_image": mask}
    direct = requests.post(url, json=FAST, headers={"Authorization": "Bearer k"}, timeout=120)
    assert direct.status_code == 200, direct.text
    assert direct.json()["$meta"]["family"] == family.name and direct.json()["$meta"]["task"] == "text2img"
    banana = {"id": str(uuid.uuid4()), "apiKey": "k", "modelKey": name, "startOnly": False}
    answer = requests.post(f"{url}/start/v4/", json={**banana, "modelInputs": {**FAST, "image": image}}, timeout=120)
    outputs = answer.json()
    assert outputs["message"] == "success", outputs
    # FLUX.2 [klein] has no img2img: its `image` alone is one reference image of an edit
    expected = "img2img" if "img2img" in family.pipelines else "edit"
    assert outputs["modelOutputs"][0]["$meta"]["task"] == expected
    runpod = requests.post(
        f"{url}/v2/{name}/runsync",
        json={"input": {**FAST, **given, "pipeline": last}},
        headers={"Authorization": "Bearer k"},
        timeout=120,
    ).json()
    assert runpod["status"] == "COMPLETED", runpod
    assert runpod["output"]["$meta"]["task"] == last and runpod["output"]["$meta"]["family"] == family.name
    assert decode(runpod["output"]["images"][0]["base64"]).size == (64, 64)
    if "edit" in family.pipelines:
        edit = {**FAST, "images": [image, png_base64(64, 64, (0, 0, 255))]}
        answer = requests.post(
            f"{url}/v2/{name}/runsync", json={"input": edit}, headers={"Authorization": "Bearer k"}, timeout=120
        ).json()
        assert answer["status"] == "COMPLETED" and answer["output"]["$meta"]["references"] == 2, answer


def test_a_flow_matching_model_refuses_noise_prediction_schedulers(models: dict[str, LoadedModel]) -> None:
    for name in ("LCM", "Euler a", "Euler trailing"):
        status, body = handle(models["tiny-flux"], {**FAST, "scheduler": name})
        assert status == 422 and body["$error"]["code"] == "INVALID_SCHEDULER", (name, body)
    status, body = handle(models["tiny-flux"], {**FAST, "scheduler": "FlowMatchEulerDiscreteScheduler"})
    assert status == 200 and body["$meta"]["SCHEDULER"] == "FlowMatchEulerDiscreteScheduler"


# --- the SDXL refiner -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refined(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """tiny-sdxl, baked, then download.py with REFINER_ID: the refiner is added, the base kept as it was."""
    model_dir = tmp_path_factory.mktemp("refined") / "model"
    shutil.copytree(baked["tiny-sdxl"], model_dir)
    baked_at = read_manifest(model_dir)["baked_at"]
    second = download("--model-dir", str(model_dir), MODEL_ID="tiny-sdxl", REFINER_ID="tiny-sdxl-refiner")
    assert second.returncode == 0, second.stderr
    assert "already baked" in second.stdout and "baked tiny-sdxl-refiner" in second.stdout, second.stdout
    return {"dir": model_dir, "baked_at": baked_at, "model": load_model(Settings(model_dir=model_dir))}


def test_a_refiner_is_added_beside_the_kept_base_and_shares_its_weights(refined: dict) -> None:
    model_dir, model = refined["dir"], refined["model"]
    assert read_manifest(model_dir)["baked_at"] == refined["baked_at"]  # the base was not baked again
    assert read_manifest(model_dir / "refiner")["model_id"] == "tiny-sdxl-refiner"
    base = model.pipes["text2img"]
    assert model.refiner.vae is base.vae and model.refiner.text_encoder_2 is base.text_encoder_2


def test_refiner_true_finishes_with_the_refiner(refined: dict) -> None:
    model = refined["model"]
    request = {**FAST, "num_inference_steps": 10, "num_images_per_prompt": 2}
    plain = handle(model, request)[1]
    status, refined_body = handle(model, {**request, "refiner": True})
    assert status == 200, refined_body
    assert refined_body["$meta"]["refiner"] is True and refined_body["$meta"]["high_noise_frac"] == 0.8
    assert plain["$meta"]["refiner"] is False
    assert [image["base64"] for image in plain["images"]] != [image["base64"] for image in refined_body["images"]]
    assert decode(refined_body["images"][1]["base64"]).size == (64, 64)
    half = handle(model, {**request, "refiner": True, "high_noise_frac": 0.5})[1]
    assert half["images"][0]["base64"] != refined_body["images"][0]["base64"]
    again = handle(model, {**request, "refiner": True})[1]
    assert again["images"][0]["base64"] == refined_body["images"][0]["base64"]  # seeded, both stages


def test_the_refiner_reads_weighted_and_long_prompts_too(refined: dict) -> None:
    model = refined["model"]
    request = {**FAST, "num_inference_steps": 4, "refiner": True}

    def picture(prompt: str) -> str:
        status, body = handle(model, {**request, "prompt": prompt})
        assert status == 200, body
        return body["images"][0]["base64"]

    plain = picture("a red cat")
    assert picture("a red (cat:1.0)") == plain
    assert picture("a red (cat:1.3)") != plain
    long = "a lighthouse on a cliff at dusk, waves, gulls, " * 2
    assert picture(long + "a red boat") != picture(long + "a blue boat")  # past 77 tokens, in both stages


def test_the_refiner_is_refused_where_it_cannot_run(refined: dict, sd: LoadedModel) -> None:
    status, body = handle(sd, {**FAST, "refiner": True})
    assert status == 422 and body["$error"]["field"] == "refiner" and "sd1" in body["$error"]["message"]
    status, body = handle(refined["model"], {**FAST, "refiner": True, "image": png_base64()})
    assert status == 422 and body["$error"]["field"] == "refiner" and "img2img" in body["$error"]["message"]
    status, body = handle(refined["model"], {**FAST, "high_noise_frac": 0.5})
    assert status == 422 and body["$error"]["field"] == "high_noise_frac"


def test_a_refiner_beside_a_family_without_one_is_refused_at_bake(baked: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(baked["tiny-sd"], tmp_path / "m")  # baked already: the refiner is what download.py adds
    result = download("--model-dir", str(tmp_path / "m"), MODEL_ID="tiny-sd", REFINER_ID="tiny-sdxl-refiner")
    assert result.returncode == 1 and "sd1 family has no refiner" in result.stderr
    result = download("--model-dir", str(tmp_path / "r"), MODEL_ID="tiny-sdxl-refiner")
    assert result.returncode == 1 and "REFINER_ID" in result.stderr


# --- memory options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_stores_the_denoiser_in_fewer_bits_and_still_draws(tiny: dict[str, Path], kind: str) -> None:
    plain = load_model(Settings(model_dir=tiny["tiny-flux"]))
    model = load_model(Settings(model_dir=tiny["tiny-flux"], quantize=kind))
    weight = model.pipes["text2img"].transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ != "Parameter" and "8" in type(weight).__name__  # a torchao int8/float8 tensor
    for pipe in model.pipes.values():  # shared by every task
        assert pipe.transformer.transformer_blocks[0].attn.to_q.weight is weight
    quantized = decode(handle(model, FAST)[1]["images"][0]["base64"])
    full = decode(handle(plain, FAST)[1]["images"][0]["base64"])
    difference = [abs(a - b) for a, b in zip(quantized.tobytes(), full.tobytes(), strict=True)]
    assert max(difference) > 0 and sum(difference) / len(difference) < 8  # close to, not equal to, the full model


def test_layerwise_casting_stores_the_denoiser_in_fp8_and_still_draws(tiny: dict[str, Path]) -> None:
    for name in ("tiny-flux", "tiny-zimage"):
        plain = load_model(Settings(model_dir=tiny[name]))
        model = load_model(Settings(model_dir=tiny[name], layerwise_casting="fp8"))
        denoiser = model.pipe.transformer
        stored = {p.dtype for n, p in denoiser.named_parameters() if n.endswith("weight") and p.ndim == 2}
        assert torch.float8_e4m3fn in stored, (name, stored)  # linear weights in 8 bits; norms and embeddings kept
        assert all(pipe.transformer is denoiser for pipe in model.pipes.values())  # shared by every task
        cast = decode(handle(model, FAST)[1]["images"][0]["base64"])
        full = decode(handle(plain, FAST)[1]["images"][0]["base64"])
        difference = [abs(a - b) for a, b in zip(cast.tobytes(), full.tobytes(), strict=True)]
        assert max(difference) > 0 and sum(difference) / len(difference) < 8, name  # close to the full model
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=tiny["tiny-flux"], layerwise_casting="fp8", quantize="int8"))
    assert refused.value.field == "LAYERWISE_CASTING"


def test_quantize_text_encoders_stores_them_in_fewer_bits_and_still_reads_the_prompt(tiny: dict[str, Path]) -> None:
    plain = load_model(Settings(model_dir=tiny["tiny-zimage"]))
    model = load_model(Settings(model_dir=tiny["tiny-zimage"], quantize_text_encoders="int8"))
    weight = model.pipe.text_encoder.layers[0].self_attn.q_proj.weight
    assert "8" in type(weight).__name__ and model.pipe.transformer.dtype == torch.float32  # the denoiser is not
    quantized = handle(model, FAST)[1]["images"][0]["base64"]
    assert quantized != handle(plain, FAST)[1]["images"][0]["base64"]
    assert quantized == handle(model, FAST)[1]["images"][0]["base64"]  # seeded
    other = handle(model, {**FAST, "prompt": "a red boat"})[1]["images"][0]["base64"]
    assert other != quantized  # the prompt is still read


def test_group_offload_without_a_gpu_is_refused_by_name(tiny: dict[str, Path]) -> None:
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=tiny["tiny-flux"], group_offload="leaf"))
    assert refused.value.field == "GROUP_OFFLOAD" and "runs on cpu" in refused.value.message


def test_cpu_offload_without_a_gpu_is_refused_by_name(tiny: dict[str, Path]) -> None:
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=tiny["tiny-flux"], enable_model_cpu_offload=True))
    assert refused.value.field == "ENABLE_MODEL_CPU_OFFLOAD" and "GPU" in refused.value.message


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_stages_on_a_family_that_is_not_split_is_refused_at_start(tiny: dict[str, Path], name: str) -> None:
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=tiny[name], stages="denoise"))
    assert refused.value.field == "STAGES" and "sd1, sd2, sdxl are" in refused.value.message


def test_torchvision_imports_here_for_the_processors_and_costs_nothing_where_unused() -> None:
    # FLUX.2 [dev]'s and Qwen-Image-Edit's processors need torchvision; beside a CPU torch, PyPI's CUDA build
    # imports through tools/torchvision_on_cpu_torch.py (installed by the Makefile where it is needed).
    imported = subprocess.run(
        [sys.executable, "-c", "from transformers import PixtralProcessor, Qwen2VLProcessor"],
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    # a process that never imports torchvision imports no torch for it (a gateway starts without torch)
    bare = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules)"], capture_output=True)
    assert bare.stdout.strip() == b"False"
