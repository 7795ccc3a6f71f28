"""download.py: baking from recipes, local directories, S3 (a real moto server) and the hub's file selection."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest
import torch
from conftest import download

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.model import load_model, read_manifest, select_files


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    """download.py (run `fresh`: all a user sees) failed with one line holding `words`, and no traceback."""
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


# --- recipes, idempotency, settings precedence -----------------------------------------------------------------
def test_bake_is_idempotent_and_the_result_loads(tmp_path: Path) -> None:
    first = download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "m"))
    assert first.returncode == 0, first.stderr
    assert "baked tiny-sd" in first.stdout and "MiB" in first.stdout
    manifest = read_manifest(tmp_path / "m")
    second = download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "m"))
    assert second.returncode == 0
    assert "already baked" in second.stdout
    assert read_manifest(tmp_path / "m") == manifest
    model = load_model(Settings(model_dir=tmp_path / "m"))
    assert model.family == "sd1" and model.manifest["source"] == "recipe"


def test_build_args_env_is_read_and_environment_and_flags_override_it(tmp_path: Path) -> None:
    (tmp_path / "build_args.env").write_text("MODEL_ID=tiny-sdxl\nMODEL_DIR=from-file\nMODEL_REVISION=\n")
    assert download(cwd=tmp_path).returncode == 0
    assert read_manifest(tmp_path / "from-file")["model_id"] == "tiny-sdxl"
    assert download(cwd=tmp_path, MODEL_DIR=str(tmp_path / "from-env")).returncode == 0
    assert read_manifest(tmp_path / "from-env")["model_id"] == "tiny-sdxl"
    result = download("--model-id", "tiny-sd", cwd=tmp_path, MODEL_ID="tiny-sdxl", MODEL_DIR=str(tmp_path / "flag"))
    assert result.returncode == 0
    assert read_manifest(tmp_path / "flag")["model_id"] == "tiny-sd"


def test_a_different_model_replaces_the_baked_one(tmp_path: Path) -> None:
    assert download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "m")).returncode == 0
    assert download("--model-id", "tiny-sdxl", "--model-dir", str(tmp_path / "m")).returncode == 0
    assert load_model(Settings(model_dir=tmp_path / "m")).family == "sdxl"
    assert not (tmp_path / "m" / "safety_checker").exists()


def test_a_folder_with_other_files_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "thesis.txt").write_text("years of work")
    result = download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "m"), fresh=True)
    assert_one_line_failure(result, "refusing to overwrite")
    assert (tmp_path / "m" / "thesis.txt").read_text() == "years of work"


def test_a_failed_bake_keeps_the_model_that_was_there(tmp_path: Path, baked: dict[str, Path]) -> None:
    assert download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "m")).returncode == 0
    broken = tmp_path / "broken"
    shutil.copytree(baked["tiny-sdxl"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    result = download("--model-id", str(broken), "--model-dir", str(tmp_path / "m"), fresh=True)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert read_manifest(tmp_path / "m")["model_id"] == "tiny-sd"
    assert load_model(Settings(model_dir=tmp_path / "m")).family == "sd1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


# --- sources ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def messy_source(tmp_path: Path, baked: dict[str, Path]) -> Path:
    """A pipeline folder as the hub often has it: .bin twins, a root checkpoint, an unused folder."""
    source = tmp_path / "source"
    shutil.copytree(baked["tiny-sd"], source)
    (source / "sdworker.json").unlink()
    (source / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (source / "v1-5-pruned.ckpt").write_bytes(b"checkpoint")
    (source / "samples").mkdir()
    (source / "samples" / "cat.png").write_bytes(b"png")
    return source


def test_a_local_directory_is_baked_with_safetensors_only(tmp_path: Path, messy_source: Path) -> None:
    result = download("--model-id", str(messy_source), "--model-dir", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    baked = {p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in baked
    assert not any(name.endswith((".bin", ".ckpt", ".png")) for name in baked)
    assert load_model(Settings(model_dir=tmp_path / "m")).manifest["source"] == "local"


def test_the_fp16_variant_is_baked_alone_and_loads(tmp_path: Path, baked: dict[str, Path]) -> None:
    import torch
    from diffusers import DiffusionPipeline

    source = tmp_path / "source"
    pipe = DiffusionPipeline.from_pretrained(baked["tiny-sd"])
    pipe.save_pretrained(source)  # plain weights ...
    pipe.to(torch.float16).save_pretrained(source, variant="fp16")  # ... and their fp16 twins, as on the hub
    result = download("--model-id", str(source), "--variant", "fp16", "--model-dir", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    weights = sorted(p.name for p in (tmp_path / "m").rglob("*.safetensors"))
    assert weights and all(".fp16." in name for name in weights)
    model = load_model(Settings(model_dir=tmp_path / "m"))
    assert model.manifest["variant"] == "fp16"


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def test_an_s3_prefix_is_baked(tmp_path: Path, messy_source: Path, s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in S3_ENV.items() if "KEY" in k})
    s3.create_bucket(Bucket="weights")
    for path in messy_source.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "weights", f"models/tiny/{path.relative_to(messy_source).as_posix()}")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    result = download("--model-id", "s3://weights/models/tiny", "--model-dir", str(tmp_path / "m"), **env)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "m").rglob("*.bin"))
    model = load_model(Settings(model_dir=tmp_path / "m"))
    assert (model.family, model.manifest["source"]) == ("sd1", "s3")
    missing = download("--model-id", "s3://no-such-bucket/x", "--model-dir", str(tmp_path / "n"), fresh=True, **env)
    assert_one_line_failure(missing, "s3://no-such-bucket/x")


# --- failures that must end in one clear line ------------------------------------------------------------------
def test_no_network_is_one_clear_line(tmp_path: Path) -> None:
    result = download(
        "--model-id",
        "someone/some-model",
        "--model-dir",
        str(tmp_path / "m"),
        fresh=True,
        HF_ENDPOINT="http://127.0.0.1:9",
    )
    assert_one_line_failure(result, "cannot reach the hub", "someone/some-model")
    assert not (tmp_path / "m").exists()


def test_offline_mode_is_one_clear_line(tmp_path: Path) -> None:
    result = download(
        "--model-id", "someone/some-model", "--model-dir", str(tmp_path / "m"), fresh=True, HF_HUB_OFFLINE="1"
    )
    assert_one_line_failure(result, "HF_HUB_OFFLINE")


@pytest.mark.parametrize("model_id", ["not a model id", "./missing-folder", "a/b/c"])
def test_an_unknown_id_is_one_clear_line(tmp_path: Path, model_id: str) -> None:
    assert_one_line_failure(
        download("--model-id", model_id, "--model-dir", str(tmp_path / "m"), fresh=True), "MODEL_ID"
    )


# --- which hub files are baked ---------------------------------------------------------------------------------
SD15_LISTING = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.bin",
]


def test_hub_selection_takes_one_safetensors_file_per_component() -> None:
    fp16 = select_files(SD15_LISTING, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "text_encoder/model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.safetensors" in fp16  # no fp16 safetensors there: the plain one
    assert "tokenizer/vocab.json" in fp16 and "tokenizer/merges.txt" in fp16
    assert not any(f.endswith((".bin", ".ckpt")) or f.startswith("v1-5") for f in fp16)
    assert "unet/diffusion_pytorch_model.non_ema.safetensors" not in fp16
    plain = select_files(SD15_LISTING, None)
    assert "unet/diffusion_pytorch_model.safetensors" in plain
    assert not any(".fp16." in f for f in plain)


def test_hub_selection_handles_sharded_weights() -> None:
    listing = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    assert sorted(select_files(listing, "fp16")) == sorted(listing[:5])
    assert sorted(select_files(listing, None)) == sorted(listing[:2] + listing[5:])


def test_hub_selection_refuses_pickle_only_components() -> None:
    with pytest.raises(WorkerError, match=r"no \.safetensors"):
        select_files(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"], None)
    with pytest.raises(WorkerError, match=r"model_index\.json"):
        select_files(["unet/config.json"], None)


def test_manifest_records_what_was_baked(baked: dict[str, Path]) -> None:
    manifest = json.loads((baked["tiny-sdxl"] / "sdworker.json").read_text())
    assert manifest["model_id"] == "tiny-sdxl" and manifest["files"] > 5 and manifest["bytes"] > 0


def test_bake_dtype_stores_float32_weights_at_half_the_bytes(tmp_path: Path) -> None:
    full = download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "full"))
    half = download("--model-id", "tiny-sd", "--model-dir", str(tmp_path / "half"), BAKE_DTYPE="float16")
    assert full.returncode == half.returncode == 0, half.stderr
    full_bytes, half_bytes = (read_manifest(tmp_path / name)["bytes"] for name in ("full", "half"))
    assert half_bytes < 0.6 * full_bytes, (full_bytes, half_bytes)
    model = load_model(Settings(model_dir=tmp_path / "half"))  # served in float32 on a CPU, from float16 files
    original = load_model(Settings(model_dir=tmp_path / "full"))
    for key, value in original.pipes["text2img"].unet.state_dict().items():
        assert torch.equal(model.pipes["text2img"].unet.state_dict()[key], value.half().float()), key
