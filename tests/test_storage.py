"""Images to S3: uploads to a real S3 endpoint (moto's server mode), fetched back through the presigned URL."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import requests
from conftest import ROOT
from pydantic import SecretStr

from sdworker.config import Settings
from sdworker.handler import handle
from sdworker.model import LoadedModel

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 11}
CREDENTIALS = {"S3_ACCESS_KEY_ID": "testing", "S3_SECRET_ACCESS_KEY": "testing", "S3_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="sd-images")
    return "sd-images"


def with_s3(model: LoadedModel, s3_endpoint: str, bucket: str | None, **settings: object) -> LoadedModel:
    """The same loaded model, with S3 settings as a deployment would set them."""
    values = {
        "s3_endpoint_url": s3_endpoint,
        "s3_bucket": bucket,
        "s3_access_key_id": "testing",
        "s3_secret_access_key": SecretStr("testing"),
        "s3_region": "us-east-1",
        **settings,
    }
    return dataclasses.replace(model, settings=model.settings.model_copy(update=values))


def test_an_s3_output_is_a_presigned_url_with_the_same_bytes(sd: LoadedModel, s3_endpoint: str, bucket: str) -> None:
    model = with_s3(sd, s3_endpoint, bucket)
    status, inline = handle(model, FAST)
    assert status == 200
    status, uploaded = handle(model, {**FAST, "output": {"type": "s3", "prefix": "tests/"}})
    assert status == 200, uploaded
    image = uploaded["images"][0]
    assert "base64" not in image and "image_base64" not in uploaded and uploaded["image_url"] == image["url"]
    assert image["bucket"] == bucket and image["key"].startswith("outputs/tests/") and image["key"].endswith(".png")
    fetched = requests.get(image["url"], timeout=30)
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert fetched.content == base64.b64decode(inline["images"][0]["base64"])
    assert uploaded["$timings"]["upload"] > 0


def test_output_type_s3_can_be_the_default_and_a_url_can_expire(sd: LoadedModel, s3_endpoint: str, bucket: str) -> None:
    model = with_s3(sd, s3_endpoint, bucket, output_type="s3")
    status, body = handle(model, {**FAST, "output": {"type": "s3", "expires": 60}, "num_images_per_prompt": 2})
    assert status == 200 and len(body["images"]) == 2 and "X-Amz-Expires=60" in body["images"][1]["url"]
    status, body = handle(model, FAST)
    assert status == 200 and body["images"][0]["url"].startswith(s3_endpoint)


def test_a_failed_upload_is_an_error_unless_base64_is_allowed(sd: LoadedModel, s3_endpoint: str) -> None:
    model = with_s3(sd, s3_endpoint, "no-such-bucket")
    status, body = handle(model, {**FAST, "output": {"type": "s3"}})
    assert status == 502 and body["$error"]["code"] == "UPLOAD_FAILED" and body["$error"]["field"] == "output"
    assert "no-such-bucket" in body["$error"]["message"] and "NoSuchBucket" in body["$error"]["message"]
    status, body = handle(model, {**FAST, "output": {"type": "s3", "fallback": True}})
    assert status == 200 and body["images"][0]["base64"] and body["upload_error"]["code"] == "UPLOAD_FAILED"


def test_s3_without_a_bucket_or_with_a_bad_prefix_says_which(sd: LoadedModel, s3_endpoint: str) -> None:
    status, body = handle(with_s3(sd, s3_endpoint, None), {**FAST, "output": {"type": "s3"}})
    assert status == 422 and body["$error"]["code"] == "S3_NOT_CONFIGURED" and "S3_BUCKET" in body["$error"]["message"]
    assert body["$error"]["field"] == "output.type"
    status, body = handle(sd, {**FAST, "output": {"type": "s3", "prefix": "../elsewhere/"}})
    assert status == 422 and body["$error"]["field"] == "output.prefix"


def test_runpods_bucket_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://sd-images.s3.eu-west-1.amazonaws.com")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "hush-hush")
    settings = Settings()
    assert settings.s3_endpoint_url.endswith("amazonaws.com") and settings.s3_access_key_id == "key-id"
    assert settings.s3_secret_access_key.get_secret_value() == "hush-hush" and "hush-hush" not in repr(settings)


def test_a_runpod_job_can_deliver_to_s3(baked: dict, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    shutil.copy(ROOT / "test_input.json", tmp_path)
    env = {
        **os.environ,
        **CREDENTIALS,
        "MODEL_DIR": str(baked["tiny-sd"]),
        "BUCKET_ENDPOINT_URL": s3_endpoint,
        "S3_BUCKET": bucket,
    }
    job = {"input": {**FAST, "output": {"type": "s3"}}}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--mode", "runpod", "--test_input", json.dumps(job)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logged = result.stdout + result.stderr
    assert result.returncode == 0, logged
    url = logged.split("'url': '", 1)[1].split("'", 1)[0]
    assert requests.get(url, timeout=30).content.startswith(b"\x89PNG")
