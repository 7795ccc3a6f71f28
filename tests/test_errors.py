"""Bad input: a 4xx naming the field and the limit, and the worker goes on serving."""

from __future__ import annotations

import base64

import pytest
from conftest import png_base64

from sdworker.handler import handle
from sdworker.model import LoadedModel

FAST = {"prompt": "a lighthouse", "num_inference_steps": 2}
NOT_AN_IMAGE = base64.b64encode(b"this is text, not a picture").decode()

CASES = [
    # (payload, code, field, words the message must contain)
    ({"num_inference_steps": 2}, "INVALID_INPUTS", "prompt", "required"),
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
    }
    status, body = handle(sd, {"modelInputs": FAST, "callInputs": call_inputs})
    assert status == 200, body


def test_the_worker_serves_after_every_kind_of_bad_input(sd: LoadedModel) -> None:
    for payload, *_ in CASES:
        handle(sd, payload)
    status, body = handle(sd, FAST)
    assert status == 200 and body["image_base64"]
