# ruff: noqa: N815 (the field names are the wire names clients read: delayTime, callID, ...)
"""What the job server answers, as the OpenAPI document shows it: each route's bodies and every status it can give.

These models document; the routes build their answers themselves (so nothing a client reads is filtered out),
and the contract test (tests/test_contract.py) checks with schemathesis that every answer fits what is written here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema

from ..schema import DecodeInput, DenoiseInput, EncodeImageInput, EncodeInput, GenerateInput


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a sentence, and the request field at fault (when one is)."""

    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every error: `$error`, and `error`, the message alone (RunPod clients print it)."""

    model_config = ConfigDict(populate_by_name=True)
    error: str | None = None
    detail: ErrorDetail = Field(alias="$error")


class JobRef(BaseModel):
    """A queued job, or a job's new state after cancel or retry."""

    id: str
    status: str


class JobStatus(BaseModel):
    """RunPod's status body (also the webhook body): output once completed, error once failed."""

    id: str
    status: str = Field(description="IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED or TIMED_OUT")
    delayTime: int | None = Field(None, description="ms in the queue")
    executionTime: int | None = Field(None, description="ms running")
    progress: dict[str, int] | None = Field(None, description="{step, total} while running")
    output: Any = Field(None, description="the handler's answer, once COMPLETED")
    error: str | None = None
    retries: int | None = None
    workerId: str | None = None


class StreamAnswer(BaseModel):
    """RunPod's stream body: while the job runs, `{"output": {"progress": {"step", "total"}}}` for each new step;
    then the output, handed out once."""

    id: str
    status: str
    stream: list[dict[str, Any]]


class Purged(BaseModel):
    """How many queued jobs purge-queue cancelled."""

    removed: int
    status: str


class EndpointHealth(BaseModel):
    """RunPod's endpoint health: job counts and workers."""

    jobs: dict[str, int]
    workers: dict[str, int]


class BananaAnswer(BaseModel):
    """A Banana v4 answer. A failure says "error" in `message` (the client raises on it)."""

    id: str
    message: str
    created: int
    apiVersion: str
    callID: str | None
    finished: bool
    modelOutputs: list[Any] | None
    status: str | None = None
    progress: dict[str, int] | None = None


class BananaRefusal(BananaAnswer):
    """A Banana call refused before it became a job (a body that is not a call): the Banana answer and `$error`."""

    model_config = ConfigDict(populate_by_name=True)
    detail: ErrorDetail = Field(alias="$error")


class Health(BaseModel):
    """Readiness: 200 `ready`; 503 `loading`, `draining` or `store unavailable`."""

    status: str
    model_keys: list[str]


class PotassiumStatus(BaseModel):
    """Potassium's status body."""

    gpu_available: bool
    sequence_number: int
    idle_time: int
    inference_time: int


ERROR_MEANING = {
    400: "Malformed JSON, or JSON nested deeper than 64 levels (INVALID_JSON)",
    401: "Missing or invalid API key",
    403: "An accepted key that may not see this: every key's counts need an admin key when there are several",
    404: "No such endpoint or job, or a job of another API key",
    409: "Not possible in the job's state",
    413: "Body over MAX_BODY_BYTES",
    422: "Invalid input: `$error.field` names the field and the limit",
    429: "Queue full (MAX_QUEUE), or this key's share of it (MAX_QUEUED_PER_KEY); retry after Retry-After",
    500: "Internal error (logged; no details in the answer)",
    502: "An upstream store (S3) refused the images",
    503: "Draining (SIGTERM), job store unreachable, or queue full on direct calls; retry after Retry-After",
    504: "The job outlasted the call's wait; it goes on",
}


def responses(*statuses: int, ok: type[BaseModel] | None = None, **extra: Any) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route: its success body (when it has a model) and each error status it can give."""
    documented: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        documented[200] = {"model": ok, **extra}
    for status in statuses:
        documented[status] = {"model": ErrorBody, "description": ERROR_MEANING[status]}
        if status in (429, 503):
            documented[status]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
    return documented


# Request bodies: the direct routes' (POST / and the stages) as the document shows them. pydantic reads JSON in lax
# mode, as the docs say (`"width": "64"` is 64, `"refiner": "yes"` true): the document says so too, so that what it
# calls invalid is refused. Limits that depend on settings (MAX_STEPS, MAX_PIXELS) are checked past the schema.
NUMBER_TEXT = r"^\s*[+-]?[0-9_.]+([eE][+-]?[0-9]+)?\s*$"
BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0")


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


class LaxJsonSchema(GenerateJsonSchema):
    """A model's JSON schema as pydantic's lax mode reads a body: numbers and booleans may come as text."""

    def int_schema(self, schema: Any) -> dict[str, Any]:
        return {"anyOf": [super().int_schema(schema), {"type": "string", "pattern": NUMBER_TEXT}]}

    def float_schema(self, schema: Any) -> dict[str, Any]:
        return {"anyOf": [super().float_schema(schema), {"type": "string", "pattern": NUMBER_TEXT}]}

    def bool_schema(self, schema: Any) -> dict[str, Any]:
        words = "|".join(_any_case(word) for word in BOOL_WORDS)
        return {"anyOf": [{"type": "boolean"}, {"enum": [0, 1]}, {"type": "string", "pattern": f"^(?:{words})$"}]}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s lax JSON schema with its definitions inlined (a request body's schema stands alone)."""
    schema = model.model_json_schema(schema_generator=LaxJsonSchema)
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def direct_body(route: str) -> dict[str, Any]:
    """The request body of app.py's handler route `route`: exact for this template's routes (a generation
    request, or docker-diffusers-api's modelInputs and callInputs, on `/`; each stage's input), else any object."""
    models: dict[str, type[BaseModel]] = {
        "/stages/encode": EncodeInput,
        "/stages/encode_image": EncodeImageInput,
        "/stages/denoise": DenoiseInput,
        "/stages/decode": DecodeInput,
    }
    if route == "/":
        legacy = {
            "type": "object",
            "title": "docker-diffusers-api's body",
            "properties": {"modelInputs": {"type": "object"}, "callInputs": {"type": ["object", "null"]}},
            "required": ["modelInputs"],
            "additionalProperties": False,
        }
        schema: dict[str, Any] = {"anyOf": [body_schema(GenerateInput), legacy]}
    elif route in models:
        schema = body_schema(models[route])
    else:
        schema = {"type": "object"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
