"""One request schema for every platform: the inputs a generation takes, their types, ranges and limits.

Two shapes arrive: a flat object of inputs, and docker-diffusers-api's
`{"modelInputs": {...}, "callInputs": {"MODEL_ID", "PIPELINE", "SCHEDULER", "safety_checker"}}`.
Both become one `GenerateInput`; errors name the field the way the client wrote it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import Settings
from .errors import WorkerError

MAX_SEED = 2**64 - 1


def _pipeline_tasks() -> dict[str, str | None]:
    """Every pipeline class the family table names -> the task it runs; None for a class that runs more than one
    (FLUX.2's, FLUX.1 Kontext's: text2img or edit), whose task comes from the images a request gives."""
    from .model.families import FAMILIES  # no torch: the family table is data

    tasks: dict[str, str | None] = {}
    for family in FAMILIES.values():
        for task, name in family.pipelines.items():
            tasks[name] = task if tasks.get(name, task) == task else None
    return tasks


# Pipeline names clients send (docker-diffusers-api's PIPELINE) -> the task they stand for: the tasks' own names,
# every class the family table names, and diffusers' AutoPipelines and older names.
PIPELINES: dict[str, str | None] = {
    "AutoPipelineForText2Image": "text2img",
    "AutoPipelineForImage2Image": "img2img",
    "AutoPipelineForInpainting": "inpaint",
    "StableDiffusionInpaintPipelineLegacy": "inpaint",  # diffusers' old one: docker-diffusers-api's test sends it
    **_pipeline_tasks(),
    "text2img": "text2img",
    "txt2img": "text2img",
    "img2img": "img2img",
    "inpaint": "inpaint",
    "edit": "edit",
}
# callInputs -> input field.
CALL_INPUTS = {
    "MODEL_ID": "model_id",
    "PIPELINE": "pipeline",
    "SCHEDULER": "scheduler",
    "safety_checker": "safety_checker",
    "output": "output",
}
# callInputs docker-diffusers-api clients send that choose nothing here, accepted and not used: fixed when the image
# is built, or streamEvents (a job's progress is on its status and stream routes already).
BUILD_TIME_CALL_INPUTS = {
    "MODEL_PRECISION",
    "MODEL_REVISION",
    "MODEL_URL",
    "xformers_memory_efficient_attention",
    "streamEvents",
}


def invalid_text(value: Any, path: str = "") -> str | None:
    """Where `value` (a parsed JSON body or part of one) holds a string that is not Unicode text, else None: a lone
    UTF-16 surrogate, which a JSON `\\ud800` escape can carry and no store, log or answer can write. The path is
    as the client wrote it (`input.prompt`, `loras[0].name`); a bad key is named by its parent."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if invalid_text(key) is not None:
                return f"{path or 'body'} (one of its keys)"
            if (found := invalid_text(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := invalid_text(item, f"{path}[{index}]")) is not None:
                return found
    return None


def refuse_invalid_text(payload: Any) -> None:
    """A 422 naming the field when `payload` holds a string that is not Unicode text (see `invalid_text`)."""
    if (where := invalid_text(payload)) is not None:
        raise WorkerError("INVALID_INPUTS", f"{where} is not valid Unicode text (it holds a lone surrogate)", where)


class RequestModel(BaseModel):
    """What a request may carry: unknown fields, NaN, Infinity and text that is not Unicode (a lone surrogate) are
    refused, naming the field. JSON parsers let all three through; a NaN compares false with every bound, and a
    lone surrogate fails only where the job is stored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        if (where := invalid_text(value)) is not None:
            inside = f" at {where}" if where != "body" else ""
            raise ValueError(f"is not valid Unicode text{inside} (it holds a lone surrogate)")
        return value


class OutputTarget(RequestModel):
    """Where the images go: back in the answer as base64, or to S3 with a presigned URL in the answer."""

    type: Literal["base64", "s3"] = "base64"
    prefix: str | None = Field(
        None, max_length=256, pattern=r"^[A-Za-z0-9._/-]*$", description="Key prefix under S3_PREFIX."
    )
    expires: int | None = Field(None, ge=1, le=604800, description="Presigned URL lifetime, s (default setting).")
    fallback: bool = Field(False, description="If the upload fails, answer base64 instead of an error.")

    @field_validator("prefix")
    @classmethod
    def _inside_the_prefix(cls, value: str | None) -> str | None:
        if value and (".." in value or value.startswith("/")):
            raise ValueError("prefix may not contain '..' or start with '/'")
        return value


class LoraChoice(RequestModel):
    """One baked LoRA to apply, and how strongly."""

    name: str | None = Field(None, min_length=1, max_length=64, description="A LoRA baked with LORAS.")
    url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://", description="A LoRA's .safetensors URL (ALLOW_LORA_URLS)."
    )
    scale: float = Field(1.0, ge=-4, le=4, description="Its weight; 0 is the plain model.")

    @model_validator(mode="after")
    def _name_or_url(self) -> LoraChoice:
        if (self.name is None) == (self.url is None):
            raise ValueError("give a LoRA's name or its url, one of them")
        return self


class GenerateInput(RequestModel):
    """What one generation may ask, with diffusers' names. Unknown fields are refused, not ignored."""

    model_config = ConfigDict(protected_namespaces=())

    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    prompt_syntax: Literal["a1111", "compel", "plain"] | None = Field(
        None, description="a1111: (word:1.3), [word], a:0.25 b:0.75; compel: word++, .blend(); default PROMPT_SYNTAX."
    )
    clip_skip: int | None = Field(
        None, ge=0, le=11, description="CLIP layers to skip before the one read (A1111's 'Clip skip 2' is 1)."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, description="Denoising steps (limit: MAX_STEPS); default: the family's (50 for SD, 4 distilled)."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Classifier-free guidance; <= 1 turns it off; default: the family's."
    )
    true_cfg_scale: float | None = Field(
        None, ge=0, le=50, description="qwenimage: its pipeline's name for guidance_scale (give one of the two)."
    )
    eta: float | None = Field(None, ge=0, le=1, description="DDIM's eta (sd1, sd2, sdxl): 0 is deterministic.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=1024, description="T5 / LLM prompt tokens (not sd1, sd2, sdxl); default: the family's."
    )
    loras: list[LoraChoice] | None = Field(
        None, max_length=8, description='Baked LoRAs to apply: [{"name": "ink", "scale": 0.8}].'
    )
    refiner: bool = Field(False, description="SDXL text2img: finish with the refiner baked beside the base.")
    high_noise_frac: float | None = Field(
        None, gt=0, lt=1, description="With refiner: the share of the steps the base runs (default 0.8)."
    )
    width: int | None = Field(None, ge=64, description="Multiple of 8; default: the model's native size.")
    height: int | None = Field(None, ge=64, description="Multiple of 8; default: the model's native size.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="0 to 2**64-1; null, false or -1: random.")
    num_images_per_prompt: int = Field(1, ge=1, description="Images to make (limit: MAX_IMAGES).")
    scheduler: str | None = Field(None, description="diffusers class or A1111 name; default: the baked one.")
    image: str | None = Field(
        None, validation_alias=AliasChoices("image", "init_image"), description="img2img / inpaint input."
    )
    mask_image: str | None = Field(None, description="Inpainting mask: white is repainted.")
    images: list[str] | None = Field(
        None, min_length=1, description="edit: reference images, each as `image` (limit: MAX_REFERENCE_IMAGES)."
    )
    strength: float = Field(0.8, gt=0, le=1, description="How far img2img / inpaint may move from the image.")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = Field(
        90, ge=1, le=100, validation_alias=AliasChoices("output_quality", "quality"), description="jpeg / webp."
    )
    safety_checker: bool = Field(True, description="Run the model's safety checker, when it has one.")
    pipeline: str | None = Field(None, description="Task or pipeline class; default: from the inputs given.")
    model_id: str | None = Field(None, description="Must name the baked model when given.")
    output: OutputTarget | None = Field(None, description='{"type": "s3"} uploads; default: OUTPUT_TYPE.')

    @field_validator("seed", mode="before")
    @classmethod
    def _random_seed(cls, value: Any) -> Any:
        if value is True:
            raise ValueError("seed must be an integer, null or false")
        return None if value is False or value == -1 else value

    @field_validator("output_format", mode="before")
    @classmethod
    def _format_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpeg" if value == "jpg" else value
        return value

    @property
    def task(self) -> str:
        """text2img, img2img, inpaint or edit: from `pipeline` when given, else from the images given."""
        if self.pipeline and (named := PIPELINES[self.pipeline]) is not None:
            return named
        if self.images:
            return "edit"
        return "inpaint" if self.mask_image else "img2img" if self.image else "text2img"


# The split stages' bodies (sdworker/stages/): each endpoint's, checked on arrival; the tensors inside are
# checked by sdworker/stages/wire.py.
class EncodeInput(RequestModel):
    """`POST /stages/encode`."""

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    prompt_syntax: str | None = None
    clip_skip: int | None = None
    loras: list[LoraChoice] | None = Field(None, description="As a generation names them: their text-encoder part.")


class EncodeImageInput(RequestModel):
    """`POST /stages/encode_image`: img2img's or inpaint's image, on the VAE's worker."""

    image: str = Field(min_length=1, validation_alias=AliasChoices("image", "init_image"))
    mask_image: str | None = None
    width: int | None = None
    height: int | None = None


class DenoiseInput(RequestModel):
    """`POST /stages/denoise`: the embeddings from encode, and what a generation takes besides its prompt."""

    embeddings: str = Field(min_length=1, description="encode's answer: base64 of a safetensors file")
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_images_per_prompt: int = 1
    scheduler: str | None = None
    eta: float | None = None
    loras: list[LoraChoice] | None = Field(None, description="As a generation names them: their UNet part.")
    image_latents: str | None = Field(None, description="img2img / inpaint: encode_image's answer")
    strength: float | None = None


class DecodeInput(RequestModel):
    """`POST /stages/decode`: the latents from denoise."""

    latents: str = Field(min_length=1, description="denoise's answer: base64 of a safetensors file")
    output_format: str = "png"
    output_quality: int = 90
    safety_checker: bool = True


def parse_request(payload: Any) -> tuple[GenerateInput, dict[str, str]]:
    """Validate a request body of either shape.

    Returns the input and a map from input field to the field as the client wrote it (`modelInputs.width`,
    `callInputs.SCHEDULER`), so that later errors name what the client sent.
    """
    if not isinstance(payload, dict):
        raise WorkerError("INVALID_INPUTS", "the request body must be a JSON object")
    if isinstance(payload.get("input"), dict) and "prompt" not in payload:
        raise WorkerError(
            "INVALID_INPUTS",
            'input: {"input": ...} is a RunPod body, for POST /v2/{model key}/run or /runsync; this route takes the '
            "inputs themselves",
            "input",
        )
    where: dict[str, str] = {}
    if "modelInputs" in payload or "callInputs" in payload:
        for key in payload:
            if key not in ("modelInputs", "callInputs"):
                raise WorkerError("INVALID_INPUTS", f"unknown key {key!r} beside modelInputs and callInputs", key)
        model_inputs, call_inputs = payload.get("modelInputs"), payload.get("callInputs") or {}
        for name, value in (("modelInputs", model_inputs), ("callInputs", call_inputs)):
            if not isinstance(value, dict):
                raise WorkerError("INVALID_INPUTS", f"{name} must be a JSON object", name)
        data = dict(model_inputs)
        where = {key: f"modelInputs.{key}" for key in data}
        for key, value in call_inputs.items():
            if key in BUILD_TIME_CALL_INPUTS:
                continue
            if key not in CALL_INPUTS:
                known = ", ".join([*CALL_INPUTS, *sorted(BUILD_TIME_CALL_INPUTS)])
                raise WorkerError("INVALID_INPUTS", f"unknown call input {key!r}; known: {known}", f"callInputs.{key}")
            name = CALL_INPUTS[key]
            if name in data and data[name] != value:
                raise WorkerError(
                    "INVALID_INPUTS", f"callInputs.{key} and modelInputs.{name} disagree", f"callInputs.{key}"
                )
            data[name] = value
            where[name] = f"callInputs.{key}"
    else:
        data = payload
    try:
        request = GenerateInput.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        inner = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"][1:])
        field = (where.get(name, name) + inner) or None  # loras[0].scale, as the client wrote it
        got = f" (got {first['input']!r:.60})" if first["type"] != "missing" else ""
        raise WorkerError("INVALID_INPUTS", f"{field}: {first['msg']}{got}", field) from None
    if request.pipeline is not None and request.pipeline not in PIPELINES:
        raise WorkerError(
            "NO_SUCH_PIPELINE",
            f"unknown pipeline {request.pipeline!r}; known: {', '.join(PIPELINES)}",
            where.get("pipeline", "pipeline"),
        )
    return request, where


def check_limits(request: GenerateInput, settings: Settings) -> None:
    """Refuse what is well-formed but beyond this deployment's limits, or inconsistent with the task."""

    def fail(field: str, message: str) -> None:
        raise WorkerError("INVALID_INPUTS", message, field)

    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field) or ""
        if len(text) > settings.max_prompt_chars:
            fail(field, f"{field} has {len(text)} characters; the limit is {settings.max_prompt_chars}")
    if (request.num_inference_steps or 1) > settings.max_steps:
        fail("num_inference_steps", f"num_inference_steps must be at most {settings.max_steps}")
    if request.num_images_per_prompt > settings.max_images:
        fail("num_images_per_prompt", f"num_images_per_prompt must be at most {settings.max_images}")
    for field in ("width", "height"):
        side = getattr(request, field)
        if side is not None and side % 8:
            fail(field, f"{field} must be a multiple of 8 (got {side})")
    check_size(request.width or 64, request.height or 64, settings)
    encoded_limit = settings.max_input_image_bytes * 4 // 3 + 1024
    for field in ("image", "mask_image"):
        value = getattr(request, field)
        if value is not None and len(value) > encoded_limit:
            fail(field, f"{field} is larger than the {settings.max_input_image_bytes} byte limit")
    if len(request.images or []) > settings.max_reference_images:
        fail("images", f"images: at most {settings.max_reference_images} reference images (MAX_REFERENCE_IMAGES)")
    for index, value in enumerate(request.images or []):
        if len(value) > encoded_limit:
            fail(f"images[{index}]", f"images[{index}] is larger than the {settings.max_input_image_bytes} byte limit")
    task = request.task
    if task == "edit" and (request.image or request.mask_image):
        fail("image" if request.image else "mask_image", "edit takes its pictures in images, without image or a mask")
    if request.images and task != "edit":
        fail("images", f"images are the reference images of an edit, not of {task}")
    if task == "text2img" and (request.image or request.mask_image):
        fail("image", "image and mask_image are for img2img and inpaint, not text2img")
    if task in ("img2img", "inpaint") and not request.image:
        fail("image", f"{task} needs an image")
    if task == "inpaint" and not request.mask_image:
        fail("mask_image", "inpaint needs a mask_image")
    if task == "img2img" and request.mask_image:
        fail("mask_image", "mask_image is for inpaint, not img2img")
    if task in ("img2img", "inpaint") and int((request.num_inference_steps or 1) * request.strength) < 1:
        fail("strength", "strength x num_inference_steps must be at least 1 step")


def check_size(width: int, height: int, settings: Settings) -> None:
    """Refuse an output size beyond MAX_SIDE or MAX_PIXELS."""
    for field, side in (("width", width), ("height", height)):
        if side > settings.max_side:
            raise WorkerError("INVALID_INPUTS", f"{field} must be at most {settings.max_side} (got {side})", field)
    if width * height > settings.max_pixels:
        raise WorkerError(
            "INVALID_INPUTS", f"width x height is {width * height} pixels; the limit is {settings.max_pixels}", "width"
        )
