"""Images to S3 (or any S3-compatible store): upload with boto3, answer a presigned GET URL.

A presigned GET only works if the signing key may also `s3:GetObject` on the bucket.
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any

from .config import Settings
from .errors import WorkerError

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _region_of(endpoint_url: str | None) -> str | None:
    """The region named in an endpoint URL (`...s3.<region>...`, `<region>.digitaloceanspaces.com`), as RunPod's
    rp_upload reads it."""
    if not endpoint_url:
        return None
    host = endpoint_url.split("://", 1)[-1].split("/", 1)[0]
    if ".s3." in host:
        return host.split(".s3.", 1)[1].split(".", 1)[0]
    if host.endswith(".digitaloceanspaces.com"):
        return host.split(".")[-3]
    return None


@functools.cache
def _client(endpoint_url: str | None, key_id: str | None, secret: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=region or _region_of(endpoint_url) or "us-east-1",
        config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}),
    )


def upload_image(data: bytes, fmt: str, settings: Settings, prefix: str | None, expires: int | None) -> dict:
    """Upload one encoded image; answers `{"url", "bucket", "key", "expires_at"}`.

    Raises WorkerError UPLOAD_FAILED (502) with the reason when the store refuses or cannot be reached, and
    S3_NOT_CONFIGURED (500) when no bucket is set."""
    if not settings.s3_bucket:
        raise WorkerError("S3_NOT_CONFIGURED", "output type s3 needs S3_BUCKET (or BUCKET_NAME) set", "output", 500)
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    client = _client(settings.s3_endpoint_url, settings.s3_access_key_id, secret, settings.s3_region)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    key = f"{settings.s3_prefix}{prefix or ''}{day}/{uuid.uuid4().hex}.{fmt.replace('jpeg', 'jpg')}"
    expires = expires or settings.s3_url_expires_s
    try:
        client.put_object(Bucket=settings.s3_bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": settings.s3_bucket, "Key": key}, ExpiresIn=expires
        )
    except Exception as err:  # botocore's ClientError, EndpointConnectionError, NoCredentialsError, ...
        reason = getattr(err, "response", {}).get("Error", {}).get("Code") or type(err).__name__
        raise WorkerError(
            "UPLOAD_FAILED", f"could not upload the image to bucket {settings.s3_bucket!r}: {reason}", "output", 502
        ) from None
    return {"url": url, "bucket": settings.s3_bucket, "key": key, "expires_at": int(time.time()) + expires}
