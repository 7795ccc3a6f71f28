"""Every setting in one typed place: environment variables first, then `build_args.env`, then defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = "build_args.env"


class Settings(BaseSettings):
    """The worker's settings. Each field is read from the environment variable of the same name, upper case."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, extra="ignore", env_ignore_empty=True, protected_namespaces=())

    # What to bake and where it lives.
    model_id: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hub id, local directory, s3://bucket/prefix, or a built-in recipe (tiny-sd, tiny-sdxl).",
    )
    model_revision: str | None = Field(None, description="Hub branch, tag or commit to bake.")
    model_variant: str | None = Field(None, description="Weight variant to bake, such as fp16.")
    hf_token: SecretStr | None = Field(None, description="Hub token for gated or private models.")
    model_dir: Path = Field(Path("models"), description="Where the baked pipeline is written and loaded from.")

    # How it runs.
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention backend on CUDA.")

    # Limits on what one request may ask.
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(8, ge=1)
    max_side: int = Field(2048, ge=64)
    max_pixels: int = Field(1536 * 1536, ge=64 * 64)
    max_prompt_chars: int = Field(4000, ge=1)
    max_input_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_input_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    image_fetch_timeout: float = Field(15.0, gt=0)
