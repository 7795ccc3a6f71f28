"""Every setting in one typed place: environment variables first, then `build_args.env`, then secret files, then
defaults. Secret files are Docker's and Kubernetes' (`/run/secrets/HF_TOKEN`, `/run/secrets/API_KEYS`, ...): a
build secret or a mounted secret is read there, so it never has to be an environment variable."""

from __future__ import annotations

import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import WorkerError
from .manifest import read_manifest

ENV_FILE = "build_args.env"
RUNPOD_SERVERLESS = ("RUNPOD_ENDPOINT_ID", "RUNPOD_WEBHOOK_GET_JOB")
"""Set by RunPod on its serverless workers (not on its pods): MODE defaults to runpod there."""
SECRETS_DIR = Path("/run/secrets")


class Settings(BaseSettings):
    """The worker's settings. Each field is read from the environment variable of the same name, upper case."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        # Only where the folder exists: pydantic-settings warns about a missing one at every start.
        secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None,
        extra="ignore",
        env_ignore_empty=True,
        protected_namespaces=(),
        populate_by_name=True,
    )

    # What to bake and where it lives.
    model_id: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hub id, local directory, s3://bucket/prefix, or a built-in recipe (tiny-sd, tiny-sdxl).",
    )
    model_revision: str | None = Field(None, description="Hub branch, tag or commit to bake.")
    model_variant: str | None = Field(None, description="Weight variant to bake, such as fp16.")
    refiner_id: str | None = Field(None, description="An SDXL refiner to bake beside the base, in MODEL_DIR/refiner.")
    model_config_id: str | None = Field(
        None,
        validation_alias=AliasChoices("MODEL_CONFIG", "model_config_id"),
        description="A single-file MODEL_ID's family configuration: a diffusers repo or folder.",
    )
    model_sha256: str | None = Field(None, description="Pins a single-file MODEL_ID's download.")
    allow_pickle: bool = Field(False, description="Bake pickled checkpoints (.ckpt, .pt, .bin), which can run code.")
    loras: str | None = Field(None, description="LoRAs to bake beside the model: name=source,name=source.")
    embeddings: str | None = Field(
        None, description="Textual-inversion embeddings to bake: name=source,...; a prompt uses each by its name."
    )
    bake_dtype: Literal["float16", "bfloat16"] | None = Field(
        None, description="Store float32 weights in this dtype when baking: half the bytes in the image."
    )
    hf_token: SecretStr | None = Field(None, description="Hub token for gated or private models.")
    model_dir: Path = Field(Path("models"), description="Where the baked pipeline is written and loaded from.")

    # How it runs.
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights' dtype at load: auto is the family's GPU dtype on CUDA, float32 elsewhere."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch's threads on a CPU device; default: the cores less one, at least 1."
    )
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, with the job id.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics here without a key (any mode); else on PORT, with one."
    )
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention backend on CUDA.")

    # Speed options, each applied at load (bench/gpu.py measures every one; see the README's Performance section).
    max_batch: int = Field(
        1, ge=1, le=64, description="Jobs of the same shape run together as one batch, up to this many."
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels-last memory format.")
    fuse_qkv: bool = Field(False, description="Fuse the attention q/k/v projections into one matmul.")
    torch_compile: bool = Field(
        False, description="torch.compile the UNet and VAE decoder; compiled at start, cached in DATA_DIR."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when TORCH_COMPILE (max-autotune: faster, compiles for minutes)."
    )
    vae_tiling: bool = Field(False, description="Decode large images tile by tile (less memory, slight seams).")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less memory).")
    tf32: bool = Field(False, description="Allow TF32 for fp32 matmuls and convolutions on NVIDIA GPUs.")

    # Memory options for models larger than the GPU (a little slower each; measured on a GPU only).
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none", description="Weight-only quantization of the UNet or transformer with torchao: int8 or fp8 weights."
    )
    enable_model_cpu_offload: bool = Field(
        False, description="Keep each component in host memory until it runs (for models larger than the GPU)."
    )

    # Limits on what one request may ask.
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(8, ge=1)
    max_side: int = Field(2048, ge=64)
    max_pixels: int = Field(1536 * 1536, ge=64 * 64)
    max_prompt_chars: int = Field(4000, ge=1)
    prompt_syntax: Literal["a1111", "compel", "plain"] = Field(
        "a1111", description="How prompts are read when a request does not say: A1111 weights, compel's, or as text."
    )
    max_input_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_input_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    image_fetch_timeout: float = Field(15.0, gt=0, description="Seconds an image URL's whole download may take.")
    allow_lora_urls: bool = Field(False, description="Let requests name LoRAs by URL (public hosts only).")
    max_lora_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest LoRA file a request may name.")
    lora_fetch_timeout: float = Field(120.0, gt=0, description="Seconds a LoRA URL's whole download may take.")
    lora_cache_bytes: int = Field(
        4 * 1024**3, ge=0, description="Disk for LoRAs fetched by URL (DATA_DIR/lora-cache), least recent out first."
    )
    max_loaded_loras: int = Field(
        8, ge=1, description="LoRAs fetched by URL held loaded at once, least recently used out first."
    )

    # URLs a request names (images, masks, webhooks) are fetched only from public addresses (sdworker/urls.py).
    allow_private_urls: bool = Field(
        False, description="Let request URLs reach loopback and private addresses (self-hosted use, tests)."
    )
    allowed_url_hosts: str | None = Field(
        None, description="Host names request URLs may reach whatever they resolve to, comma-separated."
    )

    # The job server (python app.py): who may call, which model, where jobs live.
    mode: Literal["serve", "gateway", "worker", "potassium", "runpod"] = Field(
        default_factory=lambda: "runpod" if any(os.environ.get(name) for name in RUNPOD_SERVERLESS) else "serve",
        description="serve: HTTP and a worker in one process; gateway: HTTP only; worker: model only; "
        "potassium: Potassium's server; runpod: a RunPod serverless worker (the default on RunPod serverless).",
    )
    api_keys: SecretStr | None = Field(None, description="Accepted API keys, comma-separated; one is made if unset.")
    admin_api_keys: SecretStr | None = Field(
        None, description="Keys that also see and manage every key's jobs, comma-separated (accepted keys too)."
    )
    model_key: str | None = Field(None, description="Model key(s) this deployment answers to; default from MODEL_ID.")
    data_dir: Path = Field(Path("data"), description="The SQLite job store and the generated API key.")
    redis_url: SecretStr | None = Field(None, description="redis://... to queue jobs in Redis for many workers.")
    redis_allow_volatile: bool = Field(
        False, description="Start even when Redis keeps nothing on disk (no AOF, no RDB): a restart loses every job."
    )
    max_queue: int = Field(
        100, ge=1, description="Jobs queued or running per model key; past it, new ones are refused."
    )
    banana_wait_s: float = Field(50.0, ge=0, description="How long start/v4 and a long-polled check/v4 wait.")
    runsync_wait_s: float = Field(90.0, ge=0, description="How long /runsync waits before answering IN_PROGRESS.")
    direct_wait_s: float = Field(600.0, gt=0, description="How long a direct POST / waits for its job.")
    stages: str = Field(
        "all",
        pattern=r"^\s*(all|(encode|denoise|decode)(\s*,\s*(encode|denoise|decode))*)\s*$",
        description="all, or some of encode, denoise, decode (comma-separated): the split stages (seed 001) this "
        "worker loads and serves.",
    )
    idle_shutdown_s: float | None = Field(
        None, gt=0, description="serve mode: exit 0 after this long with no request and no job (default off)."
    )
    result_ttl_s: int = Field(1800, ge=1, description="How long a finished job's result is kept.")
    runsync_result_ttl_s: int = Field(60, ge=1, description="How long a /runsync result is kept.")
    job_ttl_s: int = Field(86400, ge=1, description="Default for policy.ttl: a job not started by then times out.")
    execution_timeout_s: float = Field(600.0, gt=0, description="Default for policy.executionTimeout.")
    lease_s: float = Field(10.0, gt=0, description="A running job whose worker is silent this long runs elsewhere.")
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM: no new jobs; running ones get this long to finish, then go back to the queue.",
    )
    max_attempts: int = Field(2, ge=1, description="Runs of one job before a lost worker fails it for good.")
    webhook_secret: SecretStr | None = Field(None, description="Signs webhook bodies (HMAC-SHA256) when set.")
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_retries: int = Field(2, ge=0, description="Further tries after a failed webhook delivery.")
    webhook_retry_delay_s: float = Field(10.0, ge=0, description="Wait before the first retry; doubles after each.")
    webhook_concurrency: int = Field(16, ge=1, le=256, description="Webhooks sent at once, each target on its own.")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body accepted.")

    # RunPod serverless (--mode runpod).
    runpod_stream: bool = Field(False, description="Stream step chunks and latent previews, then the answer.")
    runpod_preview_every: int = Field(5, ge=0, description="A preview every N steps when streaming; 0: none.")
    worker_concurrency: int | None = Field(
        None,
        ge=1,
        le=128,
        validation_alias=AliasChoices("WORKER_CONCURRENCY", "RUNPOD_CONCURRENCY"),
        description="Jobs in flight per worker (default 2 x MAX_BATCH): a batch denoises while the one before "
        "encodes and uploads. The GPU runs one batch at a time.",
    )

    # Images to S3 (any S3-compatible store). RunPod's BUCKET_* names and the AWS standard ones are accepted too.
    output_type: Literal["base64", "s3"] = Field("base64", description="Default delivery of images.")
    s3_bucket: str | None = Field(None, validation_alias=AliasChoices("S3_BUCKET", "BUCKET_NAME"))
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL", "AWS_ENDPOINT_URL")
    )
    s3_access_key_id: str | None = Field(
        None, validation_alias=AliasChoices("S3_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
    )
    s3_secret_access_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("S3_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    s3_region: str | None = Field(None, validation_alias=AliasChoices("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"))
    s3_prefix: str = Field("outputs/", description="Key prefix for uploaded images.")
    s3_url_expires_s: int = Field(3600, ge=1, le=604800, description="Lifetime of presigned URLs (SigV4: 7 days).")

    def __init__(self, **values: Any) -> None:
        """Read the settings; a bad one is a WorkerError (INVALID_SETTINGS) of one line naming the environment
        variable as it was written, its value and what it accepts."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _settings_error(err) from None

    @model_validator(mode="after")
    def _s3_output_has_a_bucket(self) -> Settings:
        if self.output_type == "s3" and not self.s3_bucket:
            raise ValueError("OUTPUT_TYPE=s3 needs S3_BUCKET (or BUCKET_NAME): the images would have nowhere to go")
        return self

    def private_data_dir(self) -> Path:
        """DATA_DIR, made if missing and readable by this user only (0700): it holds prompts, images, webhook
        URLs, signed output URLs and the generated API key."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.data_dir.chmod(0o700)
        except OSError as err:  # a volume this user does not own: say so rather than refuse to start
            logging.getLogger("sdworker").warning("cannot make DATA_DIR %s private: %s", self.data_dir, err)
        return self.data_dir

    def jobs_in_flight(self) -> int:
        """How many jobs one worker holds at once: WORKER_CONCURRENCY, else two batches' worth."""
        return self.worker_concurrency or 2 * self.max_batch

    def served_model_id(self) -> str:
        """The model this deployment serves: the one baked in MODEL_DIR (its manifest), else MODEL_ID.

        In an image the baked manifest is the truth: MODEL_ID was a build argument, and the environment at run
        time may not name it (or may still name build_args.env's default).
        """
        baked = read_manifest(self.model_dir)
        return str(baked["model_id"]) if baked and baked.get("model_id") else self.model_id

    def served_stages(self) -> tuple[str, ...]:
        """The split stages STAGES names: encode, denoise and decode, all three by default."""
        names = {name.strip() for name in self.stages.split(",") if name.strip()}
        return tuple(stage for stage in ("encode", "denoise", "decode") if not names - {"all"} or stage in names)

    def whole(self) -> bool:
        """Whether this worker serves whole generations (STAGES names every stage, or all)."""
        return len(self.served_stages()) == 3

    def model_keys(self) -> list[str]:
        """The model keys jobs may name: MODEL_KEY (comma-separated), else one derived from the served model."""
        if self.model_key:
            return [key.strip() for key in self.model_key.split(",") if key.strip()]
        return [re.sub(r"[^a-z0-9]+", "-", self.served_model_id().lower()).strip("-") or "model"]


REWORDED = {
    "string_pattern_mismatch",
    "literal_error",
    "int_parsing",
    "int_from_float",
    "float_parsing",
    "bool_parsing",
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
}
"""Pydantic's errors that say less than what the setting accepts: reworded as what it accepts."""


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a setting is read from: its aliases, else its name, upper case."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices]
    return [str(alias or name).upper()]


def _accepts(field: FieldInfo) -> str:
    """What a setting accepts, in words."""
    kind = field.annotation
    args = [kind]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if typing.get_origin(args[0]) is Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(args[0]))
    if args[0] is bool:
        return "true or false"
    if args[0] in (int, float):
        bounds = {type(item).__name__: item for item in field.metadata}
        low = next(
            (
                f"{word} {getattr(bounds[key], attr)}"
                for key, attr, word in (("Ge", "ge", "at least"), ("Gt", "gt", "above"))
                if key in bounds
            ),
            "",
        )
        high = next(
            (
                f"{word} {getattr(bounds[key], attr)}"
                for key, attr, word in (("Le", "le", "at most"), ("Lt", "lt", "below"))
                if key in bounds
            ),
            "",
        )
        number = "a whole number" if args[0] is int else "a number"
        return " ".join(part for part in (number, low, "and" if low and high else "", high) if part)
    return field.description or "see the Settings table in README.md"


def _settings_error(err: ValidationError) -> WorkerError:
    """A settings error as one line: `PORT='abc': a whole number at least 1 and at most 65535`."""
    problem = err.errors()[0]
    loc = [str(part) for part in problem["loc"]]
    message = str(problem["msg"]).removeprefix("Value error, ")
    fields = Settings.model_fields
    name = next((key for key, field in fields.items() if loc and loc[0].upper() in env_names(key, field)), None)
    if name is None:  # a check across settings: its message names them
        return WorkerError("INVALID_SETTINGS", message)
    written = {key.upper(): key for key in os.environ}
    variable = next((env for env in env_names(name, fields[name]) if env in written), env_names(name, fields[name])[0])
    value = problem.get("input")
    shown = f"{variable}={value!r}" if isinstance(value, str | int | float) else variable
    if problem["type"] in REWORDED:
        message = f"takes {_accepts(fields[name])}"
    return WorkerError("INVALID_SETTINGS", f"{shown}: {message}", variable)
