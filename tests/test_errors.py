"""Bad input: a 4xx naming the field and the limit, and the worker goes on serving."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import png_base64
from pydantic import ValidationError

from sdworker.errors import WorkerError
from sdworker.handler import handle
from sdworker.model import LoadedModel
from sdworker.schema import GenerateInput, LoraChoice, RequestModel, parse_request

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2}
NOT_AN_IMAGE = base64.b64encode(b"this is text, not a picture").decode()

CASES = [
    # (payload, code, field, words the message must contain)
    ({"num_inference_steps": 2}, "INVALID_INPUTS", "prompt", "required"),
    ({"input": FAST}, "INVALID_INPUTS", "input", "/v2/{model key}/run"),  # a RunPod body sent to POST /
    ({**FAST, "prompt": ""}, "INVALID_INPUTS", "prompt", "at least 1"),
    ({**FAST, "prompt": "x" * 4001}, "INVALID_INPUTS", "prompt", "4000"),
    ({**FAST, "num_inference_steps": 0}, "INVALID_INPUTS", "num_inference_steps", "greater than or equal to 1"),
    ({**FAST, "num_inference_steps": 151}, "INVALID_INPUTS", "num_inference_steps", "at most 150"),
    ({**FAST, "num_inference_steps": "many"}, "INVALID_INPUTS", "num_inference_steps", "integer"),
    ({**FAST, "guidance_scale": 51}, "INVALID_INPUTS", "guidance_scale", "less than or equal to 50"),
    ({**FAST, "width": 500}, "INVALID_INPUTS", "width", "multiple of 8"),
    ({**FAST, "height": 32}, "INVALID_INPUTS", "height", "greater than or equal to 64"),
    ({**FAST, "width": 4096}, "INVALID_INPUTS", "width", "at most 2048"),
    ({**FAST, "width": 2048, "height": 2048}, "INVALID_INPUTS", "width", "2359296"),
    ({**FAST, "num_images_per_prompt": 9}, "INVALID_INPUTS", "num_images_per_prompt", "at most 8"),
    ({**FAST, "seed": True}, "INVALID_INPUTS", "seed", "integer"),
    ({**FAST, "seed": -5}, "INVALID_INPUTS", "seed", "greater than or equal to 0"),
    ({**FAST, "strength": 0, "image": png_base64()}, "INVALID_INPUTS", "strength", "greater than 0"),
    ({**FAST, "strength": 1.5, "image": png_base64()}, "INVALID_INPUTS", "strength", "less than or equal to 1"),
    ({**FAST, "strength": 0.1, "image": png_base64()}, "INVALID_INPUTS", "strength", "at least 1 step"),
    ({**FAST, "output_format": "gif"}, "INVALID_INPUTS", "output_format", "png"),
    ({**FAST, "output_quality": 0}, "INVALID_INPUTS", "output_quality", "greater than or equal to 1"),
    ({**FAST, "num_inference_step": 20}, "INVALID_INPUTS", "num_inference_step", "Extra inputs"),
    ({**FAST, "image": NOT_AN_IMAGE}, "INVALID_IMAGE", "image", "not an image"),
    ({**FAST, "image": "%%% not base64 %%%"}, "INVALID_IMAGE", "image", "neither base64"),
    ({**FAST, "image": "A" * (15 * 1024 * 1024)}, "INVALID_INPUTS", "image", "byte limit"),
    ({**FAST, "mask_image": png_base64()}, "INVALID_INPUTS", "image", "inpaint needs an image"),
    ({**FAST, "pipeline": "img2img"}, "INVALID_INPUTS", "image", "img2img needs an image"),
    ({**FAST, "pipeline": "inpaint", "image": png_base64()}, "INVALID_INPUTS", "mask_image", "needs a mask_image"),
    ({**FAST, "pipeline": "text2img", "image": png_base64()}, "INVALID_INPUTS", "image", "not text2img"),
    ({**FAST, "pipeline": "StableDiffusionUpscalePipeline"}, "NO_SUCH_PIPELINE", "pipeline", "known:"),
    ({**FAST, "model_id": "someone/else"}, "MODEL_MISMATCH", "model_id", "serves 'tiny-sd'"),
    ([FAST], "INVALID_INPUTS", None, "JSON object"),
    (None, "INVALID_INPUTS", None, "JSON object"),
    ({"modelInputs": "a cat"}, "INVALID_INPUTS", "modelInputs", "JSON object"),
    ({"modelInputs": FAST, "extra": 1}, "INVALID_INPUTS", "extra", "unknown key"),
    ({"modelInputs": {**FAST, "width": 12}}, "INVALID_INPUTS", "modelInputs.width", "greater than or equal to 64"),
    ({"modelInputs": FAST, "callInputs": {"train": "dreambooth"}}, "INVALID_INPUTS", "callInputs.train", "unknown"),
    ({"modelInputs": FAST, "callInputs": {"PIPELINE": "Nope"}}, "NO_SUCH_PIPELINE", "callInputs.PIPELINE", "Nope"),
    ({"modelInputs": FAST, "callInputs": {"MODEL_ID": "x/y"}}, "MODEL_MISMATCH", "callInputs.MODEL_ID", "x/y"),
    (
        {"modelInputs": {**FAST, "scheduler": "DDIM"}, "callInputs": {"SCHEDULER": "PLMS"}},
        "INVALID_INPUTS",
        "callInputs.SCHEDULER",
        "disagree",
    ),
    (
        {"modelInputs": FAST, "callInputs": {"safety_checker": "maybe"}},
        "INVALID_INPUTS",
        "callInputs.safety_checker",
        "boolean",
    ),
]


@pytest.mark.parametrize(("payload", "code", "field", "words"), CASES)
def test_bad_input_names_the_field_and_the_limit(sd: LoadedModel, payload, code, field, words) -> None:
    status, body = handle(sd, payload)
    assert status == 422, body
    assert body == {"$error": {"code": code, "message": body["$error"]["message"], "field": field}}
    assert words in body["$error"]["message"]


def test_huge_input_images_are_refused_before_decoding(sd: LoadedModel) -> None:
    status, body = handle(sd, {**FAST, "image": png_base64(4200, 4200, (0, 0, 0))})
    assert status == 422
    assert body["$error"]["field"] == "image"
    assert "16777216 pixels" in body["$error"]["message"]


def test_build_time_call_inputs_are_accepted(sd: LoadedModel) -> None:
    call_inputs = {
        "MODEL_ID": "tiny-sd",
        "MODEL_PRECISION": "fp16",
        "MODEL_REVISION": "fp16",
        "xformers_memory_efficient_attention": True,
        "streamEvents": True,  # progress is on the status routes already
    }
    status, body = handle(sd, {"modelInputs": FAST, "callInputs": call_inputs})
    assert status == 200, body


def test_the_legacy_inpaint_pipeline_name_runs_inpaint(sd: LoadedModel) -> None:
    """docker-diffusers-api's test sends diffusers' old StableDiffusionInpaintPipelineLegacy: the same inpaint."""
    inputs = {**FAST, "seed": 4, "image": png_base64(), "mask_image": png_base64(color=(255, 255, 255))}
    answers = [
        handle(sd, {"modelInputs": inputs, "callInputs": {"PIPELINE": name}})
        for name in ("StableDiffusionInpaintPipelineLegacy", "StableDiffusionInpaintPipeline")
    ]
    assert [status for status, _ in answers] == [200, 200], answers
    assert answers[0][1]["image_base64"] == answers[1][1]["image_base64"]


def test_the_worker_serves_after_every_kind_of_bad_input(sd: LoadedModel) -> None:
    for payload, *_ in CASES:
        handle(sd, payload)
    status, body = handle(sd, FAST)
    assert status == 200 and body["image_base64"]


def _number_fields(model: type[RequestModel]) -> list[str]:
    """The fields of a request model that take a float."""
    return [name for name, info in model.model_fields.items() if "float" in str(info.annotation)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_refused_naming_the_field(value: float) -> None:
    """JSON parsers read NaN and Infinity; every float a request model takes refuses them, where it would have
    compared false with its bounds and let the default or a NaN picture through."""
    models = [model for model in _request_models() if _number_fields(model)]
    assert {GenerateInput, LoraChoice} <= set(models)
    for model in models:
        for name in _number_fields(model):
            with pytest.raises(ValidationError) as refused:
                model.model_validate({name: value}, strict=False)
            assert any(error["loc"] == (name,) and error["type"] == "finite_number" for error in refused.value.errors())
    for body in ({"prompt": "a", "guidance_scale": value}, {"modelInputs": {"prompt": "a", "eta": value}}):
        with pytest.raises(WorkerError) as refused_request:
            parse_request(json.loads(json.dumps(body)))  # as the JSON parser reads it
        assert refused_request.value.field in ("guidance_scale", "modelInputs.eta")
        assert "finite number" in refused_request.value.message


def _request_models() -> list[type[RequestModel]]:
    """Every model a request is read with: RequestModel's subclasses, wherever they live."""
    import sdworker.platforms.dockerized  # the modules defining them
    import sdworker.platforms.octoai
    import sdworker.stages.wire  # noqa: F401

    found, pending = [], [RequestModel]
    while pending:
        for subclass in pending.pop().__subclasses__():
            found.append(subclass)
            pending.append(subclass)
    return found


def test_a_job_stopped_while_running_is_logged_as_stopped_not_refused(
    sd: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    def cancel(step: int, total: int) -> None:
        raise WorkerError("CANCELLED", "the job was cancelled", status=409)

    with caplog.at_level("INFO", logger="sdworker"):
        status, body = handle(sd, FAST, on_step=cancel)
        refused, _ = handle(sd, {**FAST, "width": 999})
    assert (status, body["$error"]["code"], refused) == (409, "CANCELLED", 422)
    lines = [record.getMessage() for record in caplog.records]
    assert "job stopped: CANCELLED the job was cancelled" in lines, lines
    assert any(line.startswith("request refused: INVALID_INPUTS") for line in lines), lines
