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

    # Each group's first field starts a section of docs/settings.md's table (GROUPS below), in this order.
    # What to bake and where it lives.
    model_id: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hub id, local directory, s3://bucket/prefix, one checkpoint file (path, URL, s3://, hub file), "
        "or a tiny recipe (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, tiny-flux-schnell).",
    )
    model_revision: str | None = Field(None, description="Hub branch, tag or commit to bake; unset: the default one.")
    model_variant: str | None = Field(
        None,
        description="Weight variant to bake (fp16 in build_args.env); components without it get their plain weights.",
    )
    refiner_id: str | None = Field(
        None, description="An SDXL refiner to bake beside the base, in MODEL_DIR/refiner (tiny-sdxl-refiner in tests)."
    )
    model_config_id: str | None = Field(
        None,
        validation_alias=AliasChoices("MODEL_CONFIG", "model_config_id"),
        description="A single-file MODEL_ID's family configuration: a diffusers repo or folder.",
    )
    model_sha256: str | None = Field(
        None, description="The sha256 a single-file MODEL_ID's download must have (a mismatch stops the build)."
    )
    allow_pickle: bool = Field(
        False, description="Bake pickled checkpoints (.ckpt, .pt, .pth, .bin), which can run code when read."
    )
    loras: str | None = Field(
        None,
        description=(
            "LoRAs to bake beside the model: name=source,... (hub repo, URL, s3://, path; safetensors only;"
            " tiny-lora on a tiny recipe)."
        ),
    )
    embeddings: str | None = Field(
        None,
        description=(
            "Textual-inversion embeddings to bake: name=source,... (tiny-embedding on a tiny recipe); a prompt uses"
            " each by its name."
        ),
    )
    bake_dtype: Literal["float16", "bfloat16"] | None = Field(
        None,
        description="Store float32 weights in this dtype when baking: half the bytes in the image, the values a GPU "
        "runs anyway (single files are always stored in their family's GPU dtype).",
    )
    hf_token: SecretStr | None = Field(
        None,
        description="Hub token for gated or private models: pass it as a build secret (read from "
        "/run/secrets/HF_TOKEN), never a build arg.",
    )
    model_dir: Path = Field(
        Path("models"), description="Where the pipeline is baked and loaded from (/models in the image)."
    )

    # How it runs.
    mode: Literal["serve", "gateway", "worker", "potassium", "runpod"] = Field(
        default_factory=lambda: "runpod" if any(os.environ.get(name) for name in RUNPOD_SERVERLESS) else "serve",
        description="serve: HTTP and a worker in one process; gateway: HTTP only; worker: model only; "
        "potassium: Potassium's server; runpod: a RunPod serverless worker. Unset: runpod on RunPod serverless "
        "(RUNPOD_ENDPOINT_ID set), else serve. The same as --mode; python app.py --help says what each runs.",
    )
    host: str = Field("0.0.0.0", description="The address python app.py listens on.")
    port: int = Field(8000, ge=1, le=65535, description="The port python app.py listens on.")
    device: str | None = Field(None, description="torch device; unset: cuda when available, else cpu.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights' dtype at load: auto is the family's GPU dtype on CUDA, float32 elsewhere."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch's threads on a CPU device; unset: the cores less one, at least 1 (unless OMP_NUM_THREADS "
        "is set). The core left free serves HTTP, encoding and the queue (bench/threads.py).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one JSON object per line (time, level, logger, message, job_id while a job runs, "
        "exception).",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port without a key, in any mode (a --mode worker process has no other "
        "HTTP); unset: on PORT, with a key.",
    )
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa",
        description="Attention backend on CUDA: sdpa (PyTorch's fused attention) or xformers (in the image; "
        "elsewhere pip install -r requirements-cuda.txt).",
    )
    stages: str = Field(
        "all",
        pattern=r"^\s*(all|(encode|denoise|decode)(\s*,\s*(encode|denoise|decode))*)\s*$",
        description="all, or some of encode, denoise, decode (comma-separated): the split stages (seed 001) this "
        "worker loads and serves.",
    )
    idle_shutdown_s: float | None = Field(
        None,
        gt=0,
        description="serve mode: exit 0 after this many seconds with no keyed request and no job; unset: never.",
    )

    # Speed options, each applied at load (bench/gpu.py measures every one; see docs/performance.md).
    max_batch: int = Field(
        1,
        ge=1,
        le=64,
        description="Jobs of the same shape that wait for the GPU run as one batch, up to this many (and MAX_IMAGES "
        "images).",
    )
    worker_concurrency: int | None = Field(
        None,
        ge=1,
        le=128,
        validation_alias=AliasChoices("WORKER_CONCURRENCY", "RUNPOD_CONCURRENCY"),
        description="Jobs in flight per worker (unset: 2 x MAX_BATCH): a batch denoises while the one before "
        "encodes and uploads. The GPU runs one batch at a time. Jobs downloading URLs come on top (MAX_FETCHES).",
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels-last memory format.")
    fuse_qkv: bool = Field(
        False, description="Fuse the attention q/k/v projections into one matmul (not with ATTENTION=xformers)."
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the UNet and VAE decoder at start, kernels cached in DATA_DIR/torch-compile; needs "
        "a C compiler (the image: --build-arg COMPILE_TOOLS=1).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when TORCH_COMPILE (max-autotune: faster, compiles for minutes)."
    )
    vae_tiling: bool = Field(False, description="Decode large images tile by tile (less memory, slight seams).")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less memory).")
    tf32: bool = Field(False, description="Allow TF32 for fp32 matmuls and convolutions on NVIDIA GPUs.")

    # Memory options for models larger than the GPU (a little slower each; measured on a GPU only).
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="Weight-only quantization of the UNet or transformer with torchao: about half its memory at "
        "fp16/bf16, pixels move slightly (the image installs torchao; elsewhere pip install torchao==0.18.0).",
    )
    quantize_text_encoders: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="The same torchao quantization for the text encoders (Qwen-Image's 7B, Z-Image's and "
        "FLUX.2 [klein]'s Qwen3, T5-XXL): about half their memory; prompts read slightly differently.",
    )
    layerwise_casting: Literal["none", "fp8"] = Field(
        "none",
        description="Store the UNet's or transformer's weights in float8 (e4m3) and cast each layer up to the model's "
        "dtype as it runs (diffusers' layerwise casting; norms and embeddings kept): about half its memory at "
        "bf16, pixels move slightly; not with QUANTIZE.",
    )
    enable_model_cpu_offload: bool = Field(
        False,
        description="Keep each component in host memory until it runs: a model larger than the GPU fits, slower; "
        "GPU only.",
    )
    group_offload: Literal["none", "block", "leaf"] = Field(
        "none",
        description="Keep the weights in host memory and copy each block (or layer) to the GPU as it runs, the next "
        "one's copy overlapping on a CUDA stream (diffusers' group offloading): less GPU memory than "
        "ENABLE_MODEL_CPU_OFFLOAD, faster than sequential offload; GPU only, not with it.",
    )

    # Limits on what one request may ask.
    max_steps: int = Field(150, ge=1, description="Most num_inference_steps a request may ask.")
    max_images: int = Field(8, ge=1, description="Most num_images_per_prompt a request may ask.")
    max_side: int = Field(2048, ge=64, description="Largest width or height.")
    max_pixels: int = Field(1536 * 1536, ge=64 * 64, description="Largest width x height (1536 x 1536).")
    max_prompt_chars: int = Field(4000, ge=1, description="Longest prompt or negative prompt, in characters.")
    prompt_syntax: Literal["a1111", "compel", "plain"] = Field(
        "a1111", description="How prompts are read when a request does not say: A1111 weights, compel's, or as text."
    )
    max_input_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest input image, encoded.")
    max_reference_images: int = Field(
        4, ge=1, le=16, description="Most reference images an edit request may send (each model has its own limit too)."
    )
    max_input_image_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Largest input image, decoded (4096 x 4096)."
    )
    image_fetch_timeout: float = Field(15.0, gt=0, description="Seconds an image URL's whole download may take.")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 past it).")
    allow_lora_urls: bool = Field(False, description="Let requests name LoRAs by URL (public hosts only).")
    max_lora_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest LoRA file a request may name.")
    lora_fetch_timeout: float = Field(120.0, gt=0, description="Seconds a LoRA URL's whole download may take.")
    lora_cache_bytes: int = Field(
        4 * 1024**3, ge=0, description="Disk for LoRAs fetched by URL (DATA_DIR/lora-cache), least recent out first."
    )
    max_loaded_loras: int = Field(
        8, ge=1, description="LoRAs fetched by URL held loaded at once, least recently used out first."
    )

    # URLs a request names (images, masks, webhooks, LoRAs) are fetched only from public addresses (sdworker/urls.py).
    allow_private_urls: bool = Field(
        False,
        description="Let request URLs (images, masks, webhooks, LoRAs) reach loopback and private addresses "
        "(self-hosted use, tests).",
    )
    allowed_url_hosts: str | None = Field(
        None, description="Host names request URLs may reach whatever they resolve to, comma-separated."
    )

    # The job server (python app.py): who may call, which model, where jobs live.
    api_keys: SecretStr | None = Field(
        None,
        description="Accepted API keys, comma-separated; each key sees only its own jobs. Unset: one is made at "
        "first start, printed once and kept in DATA_DIR/api_key. `none`: no key is asked (a worker behind a "
        "private network), said in a warning at every start.",
    )
    admin_api_keys: SecretStr | None = Field(
        None, description="Keys that also see, cancel and purge every key's jobs, comma-separated (accepted keys too)."
    )
    model_key: str | None = Field(
        None,
        description="The model key(s) jobs may name, comma-separated (a gateway may serve several); unset: from the "
        "baked model's id, else MODEL_ID.",
    )
    data_dir: Path = Field(
        Path("data"),
        description="The SQLite job store and the generated API key; made readable by the server's user only "
        "(0700, files 0600).",
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://...: jobs in Redis, for gateways and workers on many machines."
    )
    redis_allow_volatile: bool = Field(
        False, description="Start even when Redis keeps nothing on disk (no AOF, no RDB): a restart loses every job."
    )
    max_queue: int = Field(
        100, ge=1, description="Jobs queued or running per model key; past it, new ones are refused."
    )
    max_queued_per_key: int | None = Field(
        None,
        ge=1,
        description="Jobs one API key may have queued or running per model key; past it a 429 with Retry-After. "
        "Unset: MAX_QUEUE with one accepted key, a quarter of it with more.",
    )
    max_fetches: int = Field(
        16,
        ge=1,
        le=256,
        description="URL downloads (images, masks, LoRAs) one worker runs at once, all keys together; a download "
        "holds no place on the model.",
    )
    max_fetches_per_key: int = Field(
        2,
        ge=1,
        description="URL downloads one API key runs at once on a worker; its next job that names a URL waits in "
        "the queue while other keys' jobs go ahead.",
    )
    banana_wait_s: float = Field(50.0, ge=0, description="How long start/v4 and a long-polled check/v4 wait.")
    runsync_wait_s: float = Field(90.0, ge=0, description="How long /runsync waits before answering IN_PROGRESS.")
    direct_wait_s: float = Field(600.0, gt=0, description="How long a direct POST / waits for its job.")
    result_ttl_s: int = Field(1800, ge=1, description="How long a finished job's result is kept.")
    runsync_result_ttl_s: int = Field(
        60, ge=1, description="How long the result of a /runsync or a direct call is kept."
    )
    job_ttl_s: int = Field(86400, ge=1, description="Default for policy.ttl: a job not started by then times out.")
    execution_timeout_s: float = Field(
        600.0, gt=0, description="Default for policy.executionTimeout: a job running longer ends as TIMED_OUT."
    )
    lease_s: float = Field(10.0, gt=0, description="A running job whose worker is silent this long runs elsewhere.")
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM: no new jobs; running ones get this long to finish, then go back to the queue.",
    )
    max_attempts: int = Field(2, ge=1, description="Runs of one job before a lost worker fails it for good.")

    # Webhooks: a job's end POSTed where it asked, from the job store's outbox.
    webhook_secret: SecretStr | None = Field(
        None, description="Signs webhook bodies (HMAC-SHA256, X-Webhook-Signature) when set."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds each try of a webhook delivery may take.")
    webhook_retries: int = Field(2, ge=0, description="Further tries after a failed webhook delivery.")
    webhook_retry_delay_s: float = Field(10.0, ge=0, description="Wait before the first retry; doubles after each.")
    webhook_concurrency: int = Field(16, ge=1, le=256, description="Webhooks sent at once, each target on its own.")

    # RunPod serverless (--mode runpod).
    runpod_stream: bool = Field(
        False, description="--mode runpod: stream step chunks and latent previews, then the answer."
    )
    runpod_preview_every: int = Field(5, ge=0, description="A preview every N steps when streaming; 0: none.")

    # Images to S3 (any S3-compatible store). RunPod's BUCKET_* names and the AWS standard ones are accepted too.
    output_type: Literal["base64", "s3"] = Field(
        "base64", description="Where images go unless a request says: base64 in the answer, or s3 (needs S3_BUCKET)."
    )
    s3_bucket: str | None = Field(
        None, validation_alias=AliasChoices("S3_BUCKET", "BUCKET_NAME"), description="The bucket for s3 output."
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="Any S3-compatible endpoint (R2, Spaces, MinIO); unset: AWS.",
    )
    s3_access_key_id: str | None = Field(
        None,
        validation_alias=AliasChoices("S3_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        description="The upload and signing key's id; unset: boto3's own credentials.",
    )
    s3_secret_access_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("S3_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        description="The upload and signing key's secret; unset: boto3's own credentials.",
    )
    s3_region: str | None = Field(
        None,
        validation_alias=AliasChoices("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
        description="The bucket's region; unset: from the endpoint URL, else us-east-1.",
    )
    s3_prefix: str = Field("outputs/", description="Key prefix for uploaded images.")
    s3_url_expires_s: int = Field(
        3600, ge=1, le=604800, description="Lifetime of presigned URLs, at most 7 days (SigV4's limit)."
    )

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

    def keyless(self) -> bool:
        """API_KEYS=none: every caller is let in without a key, and all share one owner."""
        return self.api_keys is not None and self.api_keys.get_secret_value().strip().lower() == "none"

    def queued_per_key(self) -> int:
        """How many jobs one key may have queued or running: MAX_QUEUED_PER_KEY, else all of MAX_QUEUE when one
        key is accepted, a quarter of it when more are (so that no key can fill the queue for the others)."""
        if self.max_queued_per_key is not None:
            return self.max_queued_per_key
        keys = [
            key
            for secret in (None if self.keyless() else self.api_keys, self.admin_api_keys)
            if secret is not None
            for key in secret.get_secret_value().split(",")
            if key.strip()
        ]
        return self.max_queue if len(set(keys)) <= 1 else max(1, self.max_queue // 4)

    def jobs_in_flight(self) -> int:
        """How many jobs one worker holds at once besides those downloading their URLs (up to MAX_FETCHES more):
        WORKER_CONCURRENCY, else two batches' worth."""
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


def _accepts(field: FieldInfo, other: str | None = None) -> str:
    """What a setting accepts, in words; `other` for text (else the field's description)."""
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
    return other or field.description or "see the settings table in docs/settings.md"


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


# --- docs/settings.md's table, generated from the fields above (tests/test_docs.py checks the two agree) ---------
GROUPS = {
    "model_id": "What to bake and where it lives",
    "mode": "How it runs",
    "max_batch": "Speed",
    "quantize": "Memory, for models larger than the GPU",
    "max_steps": "Limits on what one request may ask",
    "allow_private_urls": "URLs in requests",
    "api_keys": "Keys, jobs and queues",
    "webhook_secret": "Webhooks",
    "runpod_stream": "RunPod serverless",
    "output_type": "Images to S3",
}
"""The table's sections: each starts at its first field and runs to the next one's, in Settings' order."""
TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def _shown_default(name: str, field: FieldInfo) -> str:
    """A setting's default as an operator writes it: `none`, `false`, 8, `models`, bytes with their unit."""
    if field.default_factory is not None:
        return "see meaning"
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and name.endswith("_bytes"):
        units = [(unit, power) for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)) if value % 2**power == 0]
        return f"{value} ({value >> units[0][1]} {units[0][0]})" if value and units else str(value)
    return str(value) if isinstance(value, int | float) else f"`{value}`"


def settings_table() -> str:
    """Every setting as Markdown: a table per group of its variables (aliases in brackets), default, what it takes
    (as a bad value's error says it) and what it means (the field's description)."""
    out = []
    for name, field in Settings.model_fields.items():
        if name in GROUPS:
            out += ["", f"### {GROUPS[name]}", "", "| setting | default | takes | meaning |", "|---|---|---|---|"]
        first, *aliases = (f"`{env}`" for env in env_names(name, field))
        variable = f"{first} ({', '.join(aliases)})" if aliases else first
        kind = "a folder" if field.annotation is Path else "text"
        cells = (variable, _shown_default(name, field), _accepts(field, kind), field.description or "")
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out).lstrip("\n") + "\n"


def write_settings_table(path: Path) -> None:
    """Put settings_table() between the markers of `path` (docs/settings.md)."""
    head, rest = path.read_text().split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n\n{settings_table()}\n{TABLE_END}{tail}")


if __name__ == "__main__":  # python -m sdworker.config [--write docs/settings.md]
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_settings_table(Path(sys.argv[2] if len(sys.argv) > 2 else "docs/settings.md"))
    else:
        print(settings_table(), end="")
