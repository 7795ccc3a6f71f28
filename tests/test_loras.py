"""LoRAs: made here with peft on tiny-sd (random, so they visibly change the picture), baked by download.py with
LORAS, and chosen per request. What a user sees: pixels change with a LoRA, are exactly the plain model's without
one or at scale 0, and never leak from one request (or batch) into another."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import download, same_picture, serve_folder

from sdworker.config import Settings
from sdworker.generate import generate
from sdworker.handler import handle
from sdworker.model import LoadedModel, load_model, read_manifest
from sdworker.model.loras import baked
from sdworker.model.recipes import make_tiny_lora
from sdworker.schema import GenerateInput

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def with_loras(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("loras")
    ink = make_tiny_lora(baked["tiny-sd"], root / "ink.safetensors", seed=1)
    fog = make_tiny_lora(baked["tiny-sd"], root / "fog.safetensors", seed=2, text_encoders=False)
    model_dir = root / "model"
    first = download("--model-dir", str(model_dir), MODEL_ID="tiny-sd", LORAS=f"ink={ink}")
    assert first.returncode == 0, first.stderr
    baked_at = read_manifest(model_dir)["baked_at"]
    # Run again with one more LoRA: it is added, the model and the first LoRA are kept.
    second = download("--model-dir", str(model_dir), MODEL_ID="tiny-sd", LORAS=f"ink={ink},fog={fog}")
    assert second.returncode == 0 and "baked loras fog" in second.stdout, second.stdout + second.stderr
    assert read_manifest(model_dir)["baked_at"] == baked_at
    return {"dir": model_dir, "model": load_model(Settings(model_dir=model_dir, max_batch=4))}


def image(model: LoadedModel, **extra: object) -> str:
    status, body = handle(model, {**FAST, **extra})
    assert status == 200, body
    return body["images"][0]["base64"]


def test_baked_loras_are_listed_and_loaded_as_adapters(with_loras: dict) -> None:
    assert set(baked(with_loras["dir"], "loras")) == {"ink", "fog"}
    assert with_loras["model"].loras == ["ink", "fog"]


def test_a_lora_changes_the_picture_and_nothing_leaks(with_loras: dict, sd: LoadedModel) -> None:
    model = with_loras["model"]
    fresh = image(sd)  # a worker with no LoRA at all
    assert image(model) == fresh  # adapters loaded but off: exactly the plain model
    inked = image(model, loras=[{"name": "ink", "scale": 1.0}])
    assert inked != fresh
    assert image(model) == fresh  # after a LoRA request, a plain one is a fresh worker's
    assert image(model, loras=[{"name": "ink", "scale": 0}]) == fresh  # scale 0 is the plain model
    both = image(model, loras=[{"name": "ink", "scale": 1.0}, {"name": "fog", "scale": 0.5}])
    assert both not in (inked, fresh)
    assert image(model, loras=[{"name": "ink", "scale": 1.0}]) == inked  # the same set gives the same pixels
    _, body = handle(model, {**FAST, "loras": [{"name": "fog", "scale": -0.5}]})
    assert body["$meta"]["loras"] == [{"name": "fog", "scale": -0.5}]


def test_img2img_and_inpaint_take_loras_too(with_loras: dict) -> None:
    from conftest import png_base64

    model = with_loras["model"]
    for extra in ({"image": png_base64()}, {"image": png_base64(), "mask_image": png_base64(color=(255, 255, 255))}):
        plain, inked = image(model, **extra), image(model, **extra, loras=[{"name": "ink"}])
        assert plain != inked


def test_concurrent_requests_with_other_loras_never_share_a_batch(with_loras: dict) -> None:
    model = with_loras["model"]
    shape = {"prompt": "a lighthouse", "num_inference_steps": 3, "width": 64, "height": 64}
    sets = [
        None,
        [{"name": "ink"}],
        [{"name": "fog", "scale": 0.7}],
        None,
        [{"name": "ink"}],
        [{"name": "ink", "scale": 0.5}],
    ]
    requests = [GenerateInput(**shape, seed=index, loras=chosen) for index, chosen in enumerate(sets)]
    alone = [generate(model, request) for request in requests]
    together: list[object] = [None] * len(requests)

    def run(index: int) -> None:
        together[index] = generate(model, requests[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for mine, solo in zip(together, alone, strict=True):
        same_picture(mine, solo)  # its own LoRAs (or none), whatever ran beside it
    inked, plain = alone[1].images[0], alone[0].images[0]
    assert np.abs(np.asarray(inked, dtype=int) - np.asarray(plain, dtype=int)).max() > 10  # a LoRA is no rounding


def test_an_unknown_lora_or_a_bad_scale_is_a_422_naming_the_entry(with_loras: dict, sd: LoadedModel) -> None:
    model = with_loras["model"]
    for loras, field in (
        ([{"name": "nope"}], "loras[0].name"),
        ([{"name": "ink"}, {"name": "ink"}], "loras[1].name"),
        ([{"name": "ink", "scale": 5}], "loras[0].scale"),
        ([{"name": "ink", "weight": 1}], "loras[0].weight"),
    ):
        status, body = handle(model, {**FAST, "loras": loras})
        assert status == 422 and body["$error"]["field"] == field, (loras, body)
    status, body = handle(sd, {**FAST, "loras": [{"name": "ink"}]})
    assert status == 422 and "bake them with LORAS" in body["$error"]["message"]


def test_a_file_that_is_not_a_lora_is_refused_at_bake(baked: dict[str, Path], tmp_path: Path) -> None:
    not_a_lora = next((baked["tiny-sd"] / "vae").glob("*.safetensors"))
    result = download("--model-dir", str(tmp_path / "m"), MODEL_ID="tiny-sd", LORAS=f"vae={not_a_lora}")
    assert result.returncode == 1 and "LORAS: vae does not load as a LoRA" in result.stderr, result.stderr
    pickled = download("--model-dir", str(tmp_path / "m"), MODEL_ID="tiny-sd", LORAS="old=https://example.com/x.ckpt")
    assert pickled.returncode == 1 and "only .safetensors" in pickled.stderr
    bad = download("--model-dir", str(tmp_path / "m"), MODEL_ID="tiny-sd", LORAS="no name here")
    assert bad.returncode == 1 and "name=source" in bad.stderr


def kohya(diffusers_file: Path, path: Path) -> Path:
    """The same LoRA in Kohya's (A1111's) layout: `lora_unet_*` and `lora_te_text_model_*` modules with
    `lora_down`, `lora_up` and `alpha` tensors."""
    from safetensors.torch import load_file, save_file

    out = {}
    for key, tensor in load_file(str(diffusers_file)).items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + module.replace(".", "_")
        down = kind.startswith("A")
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0] if down else tensor.shape[1]))  # scale 1
    save_file(out, str(path))
    return path


def test_a_kohya_format_lora_is_the_same_lora_as_its_diffusers_form(baked: dict[str, Path], tmp_path: Path) -> None:
    attention = ("q_proj", "k_proj", "v_proj", "out_proj")  # what Kohya's trainer adapts in the text encoder
    ours = make_tiny_lora(baked["tiny-sd"], tmp_path / "ours.safetensors", seed=3, clip_modules=attention)
    theirs = kohya(ours, tmp_path / "theirs.safetensors")
    model_dir = tmp_path / "model"
    result = download("--model-dir", str(model_dir), MODEL_ID="tiny-sd", LORAS=f"ours={ours},theirs={theirs}")
    assert result.returncode == 0, result.stderr
    model = load_model(Settings(model_dir=model_dir))
    as_kohya = image(model, loras=[{"name": "theirs", "scale": 0.9}])
    assert as_kohya == image(model, loras=[{"name": "ours", "scale": 0.9}])
    assert as_kohya != image(model)


# --- LoRAs by URL (ALLOW_LORA_URLS) ---------------------------------------------------------------------------
@pytest.fixture
def lora_server(with_loras: dict, baked: dict[str, Path]) -> Iterator[str]:
    """The LoRA files (and a file that is not one) over HTTP on loopback."""
    server = serve_folder(Path(with_loras["dir"]) / "loras")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_lora_by_url_is_the_same_lora_as_baked_and_is_cached(
    with_loras: dict, lora_server: str, sd: LoadedModel, tmp_path: Path
) -> None:
    settings = Settings(
        model_dir=with_loras["dir"],
        data_dir=tmp_path,
        allow_lora_urls=True,
        allow_private_urls=True,
        max_loaded_loras=1,
    )
    model = load_model(settings)
    baked_ink = image(with_loras["model"], loras=[{"name": "ink"}])
    ink, fog = f"{lora_server}/ink.safetensors", f"{lora_server}/fog.safetensors"
    assert image(model, loras=[{"url": ink}]) == baked_ink
    fog_image = image(model, loras=[{"url": fog, "scale": 0.7}])  # past MAX_LOADED_LORAS=1: ink's adapter goes
    assert model.url_loras is not None and list(model.url_loras.loaded) == [model.url_loras.adapter_name(fog)]
    assert image(model, loras=[{"url": ink}]) == baked_ink  # loaded again from the disk cache
    assert image(model, loras=[{"url": fog, "scale": 0.7}]) == fog_image
    assert image(model) == image(sd)  # and a plain request is still the plain model
    assert len(list((tmp_path / "lora-cache").glob("*.safetensors"))) == 2
    _, body = handle(model, {**FAST, "loras": [{"url": ink, "scale": 0.5}]})
    assert body["$meta"]["loras"] == [{"url": ink, "scale": 0.5}]


def test_lora_urls_are_refused_unless_allowed_and_public_and_a_lora(
    with_loras: dict, lora_server: str, baked: dict[str, Path], sd: LoadedModel, tmp_path: Path
) -> None:
    url = f"{lora_server}/ink.safetensors"
    off = load_model(Settings(model_dir=with_loras["dir"], data_dir=tmp_path / "a"))
    status, body = handle(off, {**FAST, "loras": [{"url": url}]})
    assert (
        status == 422 and body["$error"]["field"] == "loras[0].url" and "ALLOW_LORA_URLS" in body["$error"]["message"]
    )
    guarded = load_model(Settings(model_dir=with_loras["dir"], data_dir=tmp_path / "b", allow_lora_urls=True))
    status, body = handle(guarded, {**FAST, "loras": [{"url": url}]})  # 127.0.0.1 is not a public address
    assert status == 422 and body["$error"]["code"] == "LORA_FETCH_FAILED" and "127.0.0.1" not in str(body)
    status, body = handle(guarded, {**FAST, "loras": [{"name": "ink", "url": url}]})
    assert status == 422 and body["$error"]["field"] == "loras[0]"
    settings = Settings(
        model_dir=with_loras["dir"], data_dir=tmp_path / "c", allow_lora_urls=True, allow_private_urls=True
    )
    model = load_model(settings)
    not_a_lora = f"{lora_server}/index.json"
    status, body = handle(model, {**FAST, "loras": [{"url": not_a_lora}]})
    assert status == 422 and body["$error"]["code"] == "NOT_A_LORA" and body["$error"]["field"] == "loras[0].url"
    assert image(model) == image(sd)  # a failed load leaves nothing behind
    small = Settings(
        model_dir=with_loras["dir"],
        data_dir=tmp_path / "d",
        allow_lora_urls=True,
        allow_private_urls=True,
        max_lora_bytes=1024,
    )
    status, body = handle(load_model(small), {**FAST, "loras": [{"url": url}]})
    assert status == 422 and "1024 byte limit" in body["$error"]["message"]


# --- textual-inversion embeddings -----------------------------------------------------------------------------
def test_a_baked_embedding_is_used_by_its_token_in_either_prompt(
    baked: dict[str, Path], sd: LoadedModel, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "ink-style.safetensors"))  # two vectors, A1111's form
    model_dir = tmp_path / "model"
    result = download(
        "--model-dir", str(model_dir), MODEL_ID="tiny-sd", EMBEDDINGS=f"ink-style={tmp_path / 'ink-style.safetensors'}"
    )
    assert result.returncode == 0 and "baked embeddings ink-style" in result.stdout, result.stderr
    model = load_model(Settings(model_dir=model_dir))
    assert model.embeddings == ["ink-style"]
    plain = image(sd, prompt="a lighthouse")
    assert image(model, prompt="a lighthouse") == plain  # no token, no change
    assert image(model, prompt="a lighthouse, ink-style") != image(sd, prompt="a lighthouse, ink-style")
    assert image(model, negative_prompt="ink-style") != image(sd, negative_prompt="ink-style")
    # Weighted (compel encodes it): the token still stands for its two vectors, and weight 1 is no weight.
    assert image(model, prompt="a lighthouse, (ink-style:1.0)") == image(model, prompt="a lighthouse, ink-style")
    weighted = image(model, prompt="a lighthouse, (ink-style:1.3)")
    assert weighted not in (image(sd, prompt="a lighthouse, (ink-style:1.3)"), image(model, prompt="a lighthouse"))
    vae = next((baked["tiny-sd"] / "vae").glob("*.safetensors"))
    refused = download("--model-dir", str(model_dir), MODEL_ID="tiny-sd", EMBEDDINGS=f"bad={vae}")
    assert (
        refused.returncode == 1 and "EMBEDDINGS: bad does not load as a textual-inversion embedding" in refused.stderr
    )


def test_a_stage_encode_after_a_lora_request_reads_the_plain_text_encoder(with_loras: dict, sd: LoadedModel) -> None:
    from sdworker.stages import run_stage

    model = with_loras["model"]
    image(model, loras=[{"name": "ink", "scale": 1.0}])  # ink adapts the text encoder too
    status, after = run_stage(model, "encode", {"prompt": "a lighthouse"})
    assert status == 200
    assert after["embeddings"] == run_stage(sd, "encode", {"prompt": "a lighthouse"})[1]["embeddings"]


# --- the named recipes: tiny-lora and tiny-embedding ----------------------------------------------------------
QUICK_START = {"LORAS": "ink=tiny-lora,fog=tiny-lora", "EMBEDDINGS": "easynegative=tiny-embedding"}


def test_the_quick_start_worker_bakes_the_readmes_loras_and_embedding_and_they_change_the_picture(
    baked: dict[str, Path], sd: LoadedModel, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    result = download("--model-dir", str(model_dir), MODEL_ID="tiny-sd", **QUICK_START)  # as `make run` bakes
    assert result.returncode == 0, result.stderr
    assert "baked loras ink, fog" in result.stdout, result.stdout
    assert "baked embeddings easynegative" in result.stdout, result.stdout
    index = json.loads((model_dir / "loras" / "index.json").read_text())
    assert {name: entry["source"] for name, entry in index.items()} == {"ink": "tiny-lora", "fog": "tiny-lora"}
    assert index["ink"]["sha256"] != index["fog"]["sha256"]  # seeded by the name: two LoRAs
    model = load_model(Settings(model_dir=model_dir))
    assert model.loras == ["ink", "fog"] and model.embeddings == ["easynegative"]
    plain = image(sd)
    assert image(model) == plain  # loaded, and off
    inked = image(model, loras=[{"name": "ink", "scale": 1}])
    assert inked != plain
    both = image(model, loras=[{"name": "ink", "scale": 0.8}, {"name": "fog", "scale": 0.3}])  # the README's
    assert both not in (plain, inked)
    assert image(model, negative_prompt="easynegative") != image(sd, negative_prompt="easynegative")
    readme = {
        "prompt": "a photo of a red scaley ((dragon)) playing a (guitar:1.3) on a [beach]",
        "negative_prompt": "(cartoon:1.2), blurry",
        "loras": [{"name": "ink", "scale": 0.8}],
        "clip_skip": 1,
    }
    assert image(model, **readme) != image(sd, **{key: value for key, value in readme.items() if key != "loras"})


def test_the_named_recipes_are_deterministic_made_for_the_baked_model_and_for_tiny_models_only(
    baked: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from sdworker.errors import WorkerError
    from sdworker.model.bake import bake_named
    from sdworker.model.recipes import make_tiny_embedding, name_seed

    made = {}
    for label, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_tiny_lora(baked["tiny-sd"], tmp_path / f"lora-{label}.safetensors", seed)
        make_tiny_embedding(baked["tiny-sd"], tmp_path / f"embedding-{label}.safetensors", seed)
        made[label] = [(tmp_path / f"{kind}-{label}.safetensors").read_bytes() for kind in ("lora", "embedding")]
    assert made["a"] == made["b"]  # the same seed, the same bytes
    assert all(x != y for x, y in zip(made["a"], made["c"], strict=True))
    assert set(load_file(str(tmp_path / "embedding-a.safetensors"))) == {"emb_params"}

    # tiny-sdxl: LoRA layers for its UNet and both text encoders, the embedding as SDXL's pair; both load.
    sdxl = tmp_path / "sdxl"
    shutil.copytree(baked["tiny-sdxl"], sdxl)
    assert bake_named(sdxl, "loras", {"ink": "tiny-lora"}, None) == ["ink"]
    assert bake_named(sdxl, "embeddings", {"easynegative": "tiny-embedding"}, None) == ["easynegative"]
    parts = {key.split(".")[0] for key in load_file(str(sdxl / "loras" / "ink.safetensors"))}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}
    assert set(load_file(str(sdxl / "embeddings" / "easynegative.safetensors"))) == {"clip_l", "clip_g"}
    make_tiny_lora(baked["tiny-sdxl"], tmp_path / "again.safetensors", name_seed("ink"))
    assert (tmp_path / "again.safetensors").read_bytes() == (sdxl / "loras" / "ink.safetensors").read_bytes()

    real = tmp_path / "real"  # a model that is no tiny recipe: refused, nothing made
    shutil.copytree(baked["tiny-sd"], real)
    manifest = json.loads((real / "sdworker.json").read_text())
    (real / "sdworker.json").write_text(json.dumps({**manifest, "model_id": "someone/model", "source": "hub"}))
    with pytest.raises(WorkerError, match="tiny-lora is a LoRA of random weights for the tiny recipes") as refused:
        bake_named(real, "loras", {"ink": "tiny-lora"}, None)
    assert refused.value.code == "NOT_A_LORA" and not (real / "loras" / "ink.safetensors").exists()
