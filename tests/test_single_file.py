"""Single-file checkpoints baked by download.py: one original-layout .safetensors file written from tiny-sd (see
single_file.py), read from a local path, an http URL (a real local server) and S3 (moto's server), with the
family configuration from a local folder (MODEL_CONFIG), so nothing is fetched from the hub."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from conftest import download, serve_folder
from safetensors.torch import load_file
from single_file import write_original_checkpoint

from sdworker.config import Settings
from sdworker.handler import handle
from sdworker.model import LoadedModel, load_model, read_manifest

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 9}


@pytest.fixture(scope="module")
def checkpoint(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-sd-original.safetensors"
    write_original_checkpoint(baked["tiny-sd"], path)
    return path


@pytest.fixture
def served(checkpoint: Path) -> Iterator[str]:
    """The checkpoint's folder over plain HTTP on loopback."""
    server = serve_folder(checkpoint.parent)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def same_weights_in_half_precision(model: LoadedModel, original: LoadedModel) -> None:
    """The baked file holds the family's GPU dtype (float16 for SD 1.x): every weight is the original's, rounded."""
    for name in ("unet", "vae", "text_encoder"):
        mine = getattr(model.pipes["text2img"], name).state_dict()
        theirs = getattr(original.pipes["text2img"], name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert torch.equal(mine[key], value.half().float()), (name, key)


def test_a_local_checkpoint_file_is_baked_and_served(
    checkpoint: Path, baked: dict[str, Path], sd: LoadedModel, tmp_path: Path
) -> None:
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model_dir = tmp_path / "m"
    result = download(
        "--model-id",
        str(checkpoint),
        "--model-dir",
        str(model_dir),
        MODEL_CONFIG=str(baked["tiny-sd"]),
        MODEL_SHA256=digest,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(model_dir)
    assert (manifest["source"], manifest["sha256"]) == ("single-file", digest)
    weights = [load_file(path) for path in model_dir.glob("unet/*.safetensors")]
    assert weights and all(t.dtype == torch.float16 for w in weights for t in w.values())  # half the bytes
    model = load_model(Settings(model_dir=model_dir))
    same_weights_in_half_precision(model, sd)
    status, body = handle(model, FAST)
    assert status == 200 and body["$meta"]["family"] == "sd1", body


def test_a_checkpoint_from_an_http_url_and_from_s3(
    checkpoint: Path, served: str, baked: dict[str, Path], s3_endpoint: str, tmp_path: Path
) -> None:
    config = str(baked["tiny-sd"])
    url = f"{served}/{checkpoint.name}"
    assert download("--model-id", url, "--model-dir", str(tmp_path / "h"), MODEL_CONFIG=config).returncode == 0
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in S3_ENV.items() if "KEY" in k})
    s3.create_bucket(Bucket="checkpoints")
    s3.upload_file(str(checkpoint), "checkpoints", f"sd/{checkpoint.name}")
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "MODEL_CONFIG": config}
    result = download("--model-id", f"s3://checkpoints/sd/{checkpoint.name}", "--model-dir", str(tmp_path / "s"), **env)
    assert result.returncode == 0, result.stderr
    http_model, s3_model = (load_model(Settings(model_dir=tmp_path / name)) for name in ("h", "s"))
    assert handle(http_model, FAST)[1]["images"] == handle(s3_model, FAST)[1]["images"]
    missing = download(
        "--model-id", f"{served}/nope.safetensors", "--model-dir", str(tmp_path / "n"), MODEL_CONFIG=config
    )
    assert missing.returncode == 1 and "cannot fetch nope.safetensors" in missing.stderr and "404" in missing.stderr


def test_a_wrong_sha256_a_pickle_or_no_config_is_refused_in_one_line(
    checkpoint: Path, baked: dict[str, Path], tmp_path: Path
) -> None:
    config = str(baked["tiny-sd"])
    wrong = download(  # fresh: all a user would see
        "--model-id",
        str(checkpoint),
        "--model-dir",
        str(tmp_path / "a"),
        fresh=True,
        MODEL_CONFIG=config,
        MODEL_SHA256="0" * 64,
    )
    assert wrong.returncode == 1 and "MODEL_SHA256" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "a").exists()  # nothing half-baked left behind
    pickled = tmp_path / "tiny.ckpt"
    torch.save(load_file(checkpoint), pickled)
    refused = download("--model-id", str(pickled), "--model-dir", str(tmp_path / "b"), MODEL_CONFIG=config)
    assert refused.returncode == 1 and "ALLOW_PICKLE" in refused.stderr
    allowed = download(
        "--model-id", str(pickled), "--model-dir", str(tmp_path / "b"), MODEL_CONFIG=config, ALLOW_PICKLE="1"
    )
    assert allowed.returncode == 0, allowed.stderr
    no_config = download("--model-id", str(checkpoint), "--model-dir", str(tmp_path / "c"))
    assert no_config.returncode == 1 and "MODEL_CONFIG" in no_config.stderr
