"""Seed 001's three endpoints: encode (text encoders), denoise (UNet), decode (VAE), and encode_image (the VAE's
encoder, for img2img and inpaint). Through them a seed gives the all-in-one image, on one worker and across three
STAGES workers, with LoRAs too; tensors that do not fit the model are 422s naming them; a STAGES worker loads only
its part and refuses the rest."""

from __future__ import annotations

import base64
import io
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
from PIL import Image

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.generate import generate
from sdworker.handler import handle
from sdworker.model import LoadedModel, load_model
from sdworker.schema import GenerateInput
from sdworker.stages import pack, run_stage, unpack

KEY = "stage-key"
SHAPE = {"num_inference_steps": 3, "seed": 21, "width": 64, "height": 64}
LORAS = [{"name": "ink", "scale": 0.9}, {"name": "fog", "scale": 0.6}]  # ink adapts the text encoder, fog does not


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INIT = png(np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8))  # 72x80: not the default size
_mask = np.zeros((80, 72), np.uint8)
_mask[16:64, 8:48] = 255
MASK = png(_mask)
OTHER_MASK = png(np.ascontiguousarray(_mask[::-1, ::-1]))


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


def split_image(model: LoadedModel, prompt: dict, image: dict, **denoise: object) -> dict:
    """encode, encode_image, denoise, decode: img2img, or inpaint when `image` has a mask."""
    status, encoded = run_stage(model, "encode", prompt)
    assert status == 200, encoded
    status, latents = run_stage(model, "encode_image", image)
    assert status == 200, latents
    body = {"embeddings": encoded["embeddings"], "image_latents": latents["image_latents"], **denoise}
    status, denoised = run_stage(model, "denoise", body)
    assert status == 200, denoised
    status, decoded = run_stage(model, "decode", {"latents": denoised["latents"]})
    assert status == 200, decoded
    return decoded


def assert_same_images(mine: dict, theirs: dict) -> None:
    assert len(mine["images"]) == len(theirs["images"])
    for a, b in zip(mine["images"], theirs["images"], strict=True):
        assert (a["width"], a["height"], a["seed"]) == (b["width"], b["height"], b["seed"])
        assert np.abs(pixels(a["base64"]) - pixels(b["base64"])).max() <= 1


@pytest.fixture(scope="module")
def lora_sd(lora_baked: Path) -> LoadedModel:
    return load_model(Settings(model_dir=lora_baked))


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
def three_workers(lora_baked: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One worker per stage, on tiny-sd with two LoRAs baked (each loads its part of them)."""
    processes, urls = [], {}
    for stage in ("encode", "denoise", "decode"):
        process, urls[stage] = start_worker(lora_baked, tmp_path_factory.mktemp(stage), KEY, STAGES=stage)
        processes.append(process)
    yield urls
    for process in processes:
        process.terminate()
        process.wait(10)


def test_three_workers_each_with_one_stage_make_the_all_in_one_image(
    three_workers: dict[str, str], lora_sd: LoadedModel
) -> None:
    headers = {"X-BANANA-API-KEY": KEY}

    def call(stage: str, body: dict) -> dict:
        answer = requests.post(f"{three_workers[stage]}/stages/{stage}", json=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    embeddings = call("encode", {"prompt": "a (lighthouse:1.2)", "negative_prompt": "fog"})["embeddings"]
    latents = call("denoise", {"embeddings": embeddings, **SHAPE})["latents"]
    image = call("decode", {"latents": latents})["image_base64"]
    whole = handle(lora_sd, {"prompt": "a (lighthouse:1.2)", "negative_prompt": "fog", **SHAPE})[1]
    assert np.abs(pixels(image) - pixels(whole["image_base64"])).max() <= 1
    # Each worker refuses what it does not serve, and whole generations.
    for stage, url in three_workers.items():
        for other in ("encode", "denoise", "decode"):
            if other != stage:
                answer = requests.post(f"{url}/stages/{other}", json={}, headers=headers, timeout=30)
                assert answer.status_code == 404 and f"STAGES={stage}" in answer.json()["$error"]["message"]
        answer = requests.post(url, json={"prompt": "a lighthouse"}, headers=headers, timeout=30)
        assert answer.status_code == 404 and answer.json()["$error"]["code"] == "STAGE_NOT_SERVED"


def test_a_stage_worker_loads_only_its_part(baked: dict[str, Path], lora_baked: Path) -> None:
    denoiser = load_model(Settings(model_dir=lora_baked, stages="denoise"))
    pipe = denoiser.pipes["text2img"]
    assert pipe.text_encoder is None and pipe.vae is None and pipe.unet is not None
    assert pipe.get_list_adapters() == {"unet": ["ink", "fog"]}  # each LoRA's UNet layers
    encoder = load_model(Settings(model_dir=lora_baked, stages="encode"))
    assert encoder.pipes["text2img"].get_list_adapters() == {"text_encoder": ["ink"]}  # fog has none there
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
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    img2img = [*command, "--out", str(tmp_path / "img2img"), "--image", str(picture)]
    result = subprocess.run(img2img, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"encode_image \d+ B in, \d+ B out", result.stdout), result.stdout  # on the decode worker
    with (
        Image.open(tmp_path / "img2img" / "split-0-seed-7.png") as image,
        Image.open(tmp_path / "split-0-seed-7.png") as from_text,
    ):
        assert not np.array_equal(np.asarray(image), np.asarray(from_text))


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


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "task",
    [
        {},  # img2img
        {"mask_image": MASK},
        {"mask_image": MASK, "strength": 1.0, "scheduler": "euler a"},  # draws noise at each step from the seed
    ],
)
def test_img2img_and_inpaint_through_the_stages_are_the_all_in_one_images(
    name: str, task: dict, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(name)
    common = {"num_inference_steps": 4, "seed": 8, "num_images_per_prompt": 2}
    whole = handle(model, {"prompt": "a red barn", "image": INIT, **task, **common})[1]
    image = {"image": INIT, **({"mask_image": task["mask_image"]} if "mask_image" in task else {})}
    denoise = {key: value for key, value in {**task, **common}.items() if key != "mask_image"}
    parts = split_image(model, {"prompt": "a red barn"}, image, **denoise)
    assert_same_images(parts, whole)
    assert parts["images"][0]["width"] == 72 and parts["images"][0]["height"] == 80


def test_the_image_and_its_mask_reach_the_denoiser(sd: LoadedModel) -> None:
    def one(image: dict) -> np.ndarray:
        return pixels(split_image(sd, {"prompt": "a red barn"}, image, num_inference_steps=4, seed=3)["image_base64"])

    img2img, inpaint = one({"image": INIT}), one({"image": INIT, "mask_image": MASK})
    other_mask = one({"image": INIT, "mask_image": OTHER_MASK})
    other_image = one({"image": png(np.full((80, 72, 3), 30, np.uint8)), "mask_image": MASK})
    for a, b in ((img2img, inpaint), (inpaint, other_mask), (inpaint, other_image)):
        assert np.abs(a - b).max() > 10


def test_bad_image_latents_are_422s_naming_them(sd: LoadedModel) -> None:
    _, encoded = run_stage(sd, "encode", {"prompt": "a red barn"})
    _, latents = run_stage(sd, "encode_image", {"image": INIT, "mask_image": MASK})
    tensors, meta = unpack(latents["image_latents"], "image_latents")
    moments = tensors["image_moments"]
    cases = [
        ({"image_latents": "not base64!"}, "image_latents"),
        ({"image_latents": pack({**tensors, "extra": moments.clone()}, meta)}, "image_latents"),
        ({"image_latents": pack({"image_moments": moments[:, :4]}, meta)}, "image_latents.image_moments"),
        ({"image_latents": pack({**tensors, "mask": tensors["mask"][:, :, :5]}, meta)}, "image_latents.mask"),
        ({"image_latents": pack({**tensors, "mask": tensors["mask"] * 3}, meta)}, "image_latents.mask"),
        ({"image_latents": pack({**tensors, "mask": tensors["mask"].float()}, meta)}, "image_latents.mask"),
        (
            {"image_latents": pack({**tensors, "masked_image_moments": moments[..., :3]}, meta)},
            "image_latents.masked_image_moments",
        ),
        ({"image_latents": latents["image_latents"], "width": 64}, "width"),
        ({"image_latents": pack({"image_moments": torch.zeros(1, 8, 8, 300)}, meta)}, "width"),  # past MAX_SIDE
        ({"image_latents": latents["image_latents"], "strength": 0}, "strength"),
        ({"strength": 0.5}, "strength"),  # without an image
    ]
    for body, field in cases:
        status, answer = run_stage(
            sd, "denoise", {"embeddings": encoded["embeddings"], "num_inference_steps": 2, **body}
        )
        assert status == 422 and answer["$error"]["field"] == field, (field, answer)
    half = pack({name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}, meta)
    status, answer = run_stage(sd, "denoise", {"embeddings": encoded["embeddings"], "image_latents": half})
    assert status == 200, answer  # a VAE worker in float16, a denoiser in float32: converted
    for body, field in [
        ({}, "image"),
        ({"image": "not an image"}, "image"),
        ({"image": INIT, "mask_image": "nope"}, "mask_image"),
        ({"image": INIT, "width": 60}, "width"),
        ({"image": INIT, "prompt": "x"}, "prompt"),
    ]:
        status, answer = run_stage(sd, "encode_image", body)
        assert status == 422 and answer["$error"]["field"] == field, (field, answer)


def test_loras_through_the_stages_are_the_all_in_one_lora_images(lora_sd: LoadedModel) -> None:
    prompt = {"prompt": "a lighthouse"}
    whole = handle(lora_sd, {**prompt, **SHAPE, "loras": LORAS})[1]
    parts = split(lora_sd, {**prompt, "loras": LORAS}, loras=LORAS)
    assert_same_images(parts, whole)
    plain = handle(lora_sd, {**prompt, **SHAPE})[1]
    assert_same_images(split(lora_sd, prompt), plain)  # none named: none applied, after a call that named some
    unet_only = pixels(split(lora_sd, prompt, loras=LORAS)["image_base64"])  # ink's text-encoder part left out
    assert np.abs(unet_only - pixels(whole["image_base64"])).max() > 10
    assert np.abs(unet_only - pixels(plain["image_base64"])).max() > 10
    status, answer = run_stage(lora_sd, "encode", {**prompt, "loras": [{"name": "nope"}]})
    assert status == 422 and answer["$error"]["field"] == "loras[0].name", answer


def test_three_workers_make_the_all_in_one_inpaint_with_loras(
    three_workers: dict[str, str], lora_sd: LoadedModel
) -> None:
    headers = {"X-BANANA-API-KEY": KEY}

    def call(stage: str, body: dict, worker: str = "") -> dict:
        url = f"{three_workers[worker or stage]}/stages/{stage}"
        answer = requests.post(url, json=body, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()

    prompt = {"prompt": "a (lighthouse:1.2)", "negative_prompt": "fog"}
    embeddings = call("encode", {**prompt, "loras": LORAS})["embeddings"]
    image = call("encode_image", {"image": INIT, "mask_image": MASK}, worker="decode")["image_latents"]
    denoise = {"num_inference_steps": 4, "seed": 5, "strength": 0.9, "scheduler": "euler a", "loras": LORAS}
    latents = call("denoise", {"embeddings": embeddings, "image_latents": image, **denoise})["latents"]
    parts = call("decode", {"latents": latents})
    whole = handle(lora_sd, {**prompt, "image": INIT, "mask_image": MASK, **denoise})[1]
    assert_same_images(parts, whole)
    for stage in ("encode", "denoise"):  # encode_image is the VAE's: only the decode worker serves it
        answer = requests.post(f"{three_workers[stage]}/stages/encode_image", json={}, headers=headers, timeout=30)
        assert answer.status_code == 404 and "STAGES=decode" in answer.json()["$error"]["message"]


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_encode_image_sends_the_distributions_the_all_in_one_vae_computes(
    name: str, request: pytest.FixtureRequest
) -> None:
    """What the whole inpaint pipeline has its VAE encode (the image, then the image with the mask's part blacked
    out, which an inpainting UNet reads) is exactly what encode_image sends."""
    model = request.getfixturevalue(name)
    vae = model.pipes["inpaint"].vae
    seen: list[torch.Tensor] = []

    def recording(pixels: torch.Tensor, *args: object, **kwargs: object) -> object:
        answer = type(vae).encode(vae, pixels, *args, **kwargs)
        seen.append(answer.latent_dist.parameters.clone())
        return answer

    vae.encode = recording
    try:
        status, _ = handle(model, {"prompt": "a red barn", "image": INIT, "mask_image": MASK, "num_inference_steps": 2})
    finally:
        del vae.encode
    assert status == 200 and len(seen) == 2
    status, answer = run_stage(model, "encode_image", {"image": INIT, "mask_image": MASK})
    tensors, meta = unpack(answer["image_latents"], "image_latents")
    assert torch.equal(tensors["image_moments"], seen[0]) and torch.equal(tensors["masked_image_moments"], seen[1])
    assert not torch.equal(seen[0], seen[1])
    assert meta == {"family": model.family, "task": "inpaint", "width": 72, "height": 80}


def test_an_inpainting_unet_reads_the_masked_image_as_a_whole_worker_does(sd: LoadedModel) -> None:
    """A 9-channel (inpainting) UNet reads the masked image's latents: through the stand-in VAE it gets the
    masked image's distribution, sampled as a whole pipeline samples it, even where the mask's strokes are too
    thin to show at latent size."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    from sdworker.encoded import EncodedImage, vae_stand_in

    base = sd.pipes["inpaint"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(
        **{**base.components, "unet": unet, "safety_checker": None},
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    thin = np.zeros((80, 72), np.uint8)
    thin[3::8, :] = 255  # one-pixel lines between the rows the latent mask samples
    for mask in (MASK, png(thin)):
        common = {"prompt": "a red barn", "num_inference_steps": 3, "strength": 1.0, "output_type": "latent"}
        whole = pipe(
            **common,
            image=decode(INIT),
            mask_image=decode(mask),
            width=72,
            height=80,
            generator=[torch.Generator().manual_seed(4)],
        ).images
        _, answer = run_stage(sd, "encode_image", {"image": INIT, "mask_image": mask})
        tensors, _ = unpack(answer["image_latents"], "image_latents")
        image = EncodedImage(tensors["image_moments"], 8, tensors["masked_image_moments"], tensors["mask"])
        with vae_stand_in(pipe, pipe.vae.config, image, "cpu"):
            parts = pipe(
                **common, **image.pipeline_inputs(), width=72, height=80, generator=[torch.Generator().manual_seed(4)]
            ).images
        assert pipe.vae is base.vae and "prepare_mask_latents" not in vars(pipe)  # put back
        assert torch.allclose(parts, whole, atol=1e-5), (parts - whole).abs().max()


def test_a_denoise_worker_reads_an_old_vae_config_with_its_defaults(
    baked: dict[str, Path], sd: LoadedModel, tmp_path: Path
) -> None:
    """Hub configs from before a setting existed leave it out (SD 2.1's VAE has no scaling_factor): a worker
    without the VAE fills in the class's defaults, as loading the VAE would."""
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(baked["tiny-sd"], model_dir)
    config_file = model_dir / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    for name in ("scaling_factor", "force_upcast", "latent_channels"):
        config.pop(name, None)
    config_file.write_text(json.dumps(config))
    denoiser = load_model(Settings(model_dir=model_dir, stages="denoise"))
    _, encoded = run_stage(sd, "encode", {"prompt": "a red barn"})
    _, latents = run_stage(sd, "encode_image", {"image": INIT})
    body = {"embeddings": encoded["embeddings"], "image_latents": latents["image_latents"], "seed": 2}
    status, denoised = run_stage(denoiser, "denoise", {**body, "num_inference_steps": 3})
    assert status == 200, denoised
    decoded = run_stage(sd, "decode", {"latents": denoised["latents"]})[1]
    whole = handle(sd, {"prompt": "a red barn", "image": INIT, "seed": 2, "num_inference_steps": 3})[1]
    assert_same_images(decoded, whole)


def test_an_encode_image_waiting_beside_a_split_img2img_encodes_its_own_image(sd: LoadedModel) -> None:
    """The stand-in VAE of a denoise in progress never reaches an encode_image waiting for its turn."""
    from sdworker.generate import step_hook

    _, encoded = run_stage(sd, "encode", {"prompt": "a red barn"})
    _, mine = run_stage(sd, "encode_image", {"image": INIT})
    other = png(np.full((80, 72, 3), 200, np.uint8))
    alone = run_stage(sd, "encode_image", {"image": other})[1]["image_latents"]
    holding, release = threading.Event(), threading.Event()

    def hold(step: int, total: int) -> None:
        holding.set()
        release.wait(30)

    def denoise() -> None:
        step_hook.set(hold)
        run_stage(sd, "denoise", {"embeddings": encoded["embeddings"], "image_latents": mine["image_latents"]})

    answers: list[dict] = []
    first = threading.Thread(target=denoise)
    first.start()
    assert holding.wait(30)  # the denoise is in its turn, its stand-in in place
    second = threading.Thread(target=lambda: answers.append(run_stage(sd, "encode_image", {"image": other})[1]))
    second.start()
    second.join(2)  # it prepared its image and now waits for the turn
    release.set()
    first.join(60)
    second.join(60)
    assert unpack(answers[0]["image_latents"], "x")[0]["image_moments"].equal(unpack(alone, "x")[0]["image_moments"])


def _safetensors(metadata: dict[str, str]) -> str:
    """base64 of a safetensors file holding one small tensor and `metadata` as its header's metadata."""
    from safetensors.torch import save

    return base64.b64encode(save({"latents": torch.zeros(1, 4, 8, 8)}, metadata)).decode()


def test_any_bytes_sent_as_tensors_are_a_422_naming_the_field_whatever_is_inside() -> None:
    """Crafted headers (metadata nested past any recursion limit, too large, not an object) and a seeded fuzz of
    a real pack (bytes flipped, cut short, lengths rewritten): each is refused naming the field or read whole,
    never another error."""
    from sdworker.stages.wire import MAX_METADATA_CHARS, pack, unpack

    crafted = [
        _safetensors({"sdworker": "[" * 200_000 + "]" * 200_000}),
        _safetensors({"sdworker": '{"a": "' + "x" * MAX_METADATA_CHARS + '"}'}),
        _safetensors({"sdworker": "{not json"}),
    ]
    for data in crafted:
        with pytest.raises(WorkerError) as refused:
            unpack(data, "latents")
        assert refused.value.field == "latents" and refused.value.status == 422
    assert unpack(_safetensors({"sdworker": "[1, 2]"}), "latents")[1] == {}  # JSON, not an object: no metadata
    good = base64.b64decode(pack({"latents": torch.ones(1, 4, 8, 8)}, {"family": "sd1", "dtype": "torch.float32"}))
    random = np.random.default_rng(25)
    for trial in range(400):
        raw = bytearray(good)
        if trial % 4 == 0:
            raw = raw[: random.integers(0, len(raw))]  # cut short
        elif trial % 4 == 1:
            raw[:8] = int(random.integers(0, 2**63)).to_bytes(8, "little")  # the header's length rewritten
        else:
            for at in random.integers(0, len(raw), size=random.integers(1, 8)):
                raw[at] = random.integers(0, 256)  # bytes flipped, in the header or the data
        try:
            tensors, metadata = unpack(base64.b64encode(bytes(raw)).decode(), "latents")
        except WorkerError as err:
            assert err.field == "latents" and err.status == 422, err
        else:
            assert isinstance(tensors, dict) and isinstance(metadata, dict)
