"""Prompts as users write them: A1111 weighting (the default), seed 002's weighted sub-prompts, compel's syntax,
prompts past CLIP's 77 tokens, and clip_skip. The tiny models' tokenizers read one token a character, so "past 77
tokens" is a 78-letter prompt. Every image comparison is at one seed: a change in the picture is the prompt's."""

from __future__ import annotations

from pathlib import Path

import pytest
from compel.prompt_parser import Blend
from conftest import batched, png_base64, run_together, same_picture

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.generate import generate
from sdworker.handler import handle
from sdworker.model import LoadedModel, bake_model, load_model
from sdworker.prompts import parse
from sdworker.schema import GenerateInput

FAST = {"num_inference_steps": 2, "seed": 7, "width": 64, "height": 64}
LONG = "a lighthouse on a cliff at dusk, waves, gulls, a lighthouse on a cliff at dusk, waves, gulls"
"""75 letters and commas: 75 tokens, all that one CLIP chunk reads between its start and end markers."""


def answer(model: LoadedModel, **fields: object) -> dict:
    status, body = handle(model, {**FAST, **fields})
    assert status == 200, body
    return body


def image(model: LoadedModel, **fields: object) -> str:
    return answer(model, **fields)["images"][0]["base64"]


def refusal(model: LoadedModel, **fields: object) -> dict:
    status, body = handle(model, {**FAST, **fields})
    assert status == 422, body
    return body["$error"]


def weights(text: str, syntax: str = "a1111") -> list[tuple[str, float]]:
    (prompt,) = parse(text, syntax).prompts
    return [(fragment.text, fragment.weight) for fragment in prompt.children]


# The syntax, as A1111 and seed 002 read it.


def test_a1111_weights_brackets_and_escapes() -> None:
    assert weights("a (red:1.3) cat") == [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]
    assert weights("a (red) cat") == [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]
    assert weights("a ((red)) cat") == weights("a (red:1.21) cat")
    assert weights("a [red] cat") == [("a ", 1.0), ("red", round(1 / 1.1, 6)), (" cat", 1.0)]
    assert weights("((a (red:1.5)) cat)") == [("a ", 1.21), ("red", 1.815), (" cat", 1.1)]
    assert weights(r"a \(red\) cat \[1\]") == [("a (red) cat [1]", 1.0)]
    assert weights("a (red cat") == [("a ", 1.0), ("red cat", 1.1)]  # unclosed: to the end, as A1111 does
    assert weights("time: 10 to 11, a cat:dog") == [("time: 10 to 11, a cat:dog", 1.0)]  # colons are text
    assert weights("(a cat:1.0)") == [("a cat", 1.0)]


def test_seed_002_sub_prompts_blend_by_weight() -> None:
    (blend,) = parse("tabby cat:0.25 white duck:0.75 hybrid", "a1111").prompts
    assert isinstance(blend, Blend)
    assert [prompt.children[0].text for prompt in blend.prompts] == ["tabby cat", "white duck", "hybrid"]
    assert blend.weights == [0.25, 0.75, 1.0]
    assert weights("(a cat:1.3) on a mat") == [("a cat", 1.3), (" on a mat", 1.0)]  # inside brackets: a weight
    assert weights("a cat:0.5") == [("a cat:0.5", 1.0)]  # one sub-prompt alone is the text as written
    assert weights("a clock at 10:30 pm, 16:9 frame") == [("a clock at 10:30 pm, 16:9 frame", 1.0)]  # times, ratios


def test_compel_syntax_and_plain() -> None:
    assert weights("a cat++", "compel") == [("a ", 1.0), ("cat", pytest.approx(1.21))]
    assert weights("a (cat:1.3)", "plain") == [("a (cat:1.3)", 1.0)]


@pytest.mark.parametrize(
    ("text", "syntax", "says"),
    [
        ("a (cat:11)", "a1111", "outside 0..10"),
        ("cat:1 dog:-1", "a1111", "add up to more than 0"),
        ("((((((a))))))", "compel", "nest deeper"),
        ("a cat.swap(dog)", "compel", ".swap()"),
        ("a cat withLora(ink, 1)", "compel", "loras field"),
    ],
)
def test_what_cannot_run_is_a_422_naming_the_field(sd: LoadedModel, text: str, syntax: str, says: str) -> None:
    error = refusal(sd, prompt="a cat", negative_prompt=text, prompt_syntax=syntax)
    assert error["field"] == "negative_prompt" and says in error["message"], error


def test_bad_prompt_syntax_and_clip_skip_are_422s(sd: LoadedModel) -> None:
    assert refusal(sd, prompt="a cat", prompt_syntax="comfy")["field"] == "prompt_syntax"
    assert refusal(sd, prompt="a cat", clip_skip=-1)["field"] == "clip_skip"
    error = refusal(sd, prompt="a cat", clip_skip=5)  # tiny-sd's text encoder has 2 layers
    assert error["field"] == "clip_skip" and "below 2" in error["message"]


# Pixels: SD 1.x.


def test_weights_change_the_picture_as_their_numbers_say(sd: LoadedModel) -> None:
    plain = image(sd, prompt="a red cat")
    assert image(sd, prompt="a red (cat:1.0)") == plain  # weight 1 is no weight
    assert image(sd, prompt="a red (cat)", prompt_syntax="plain") != plain  # brackets read as text
    stronger = image(sd, prompt="a red ((cat))")
    assert stronger != plain
    assert image(sd, prompt="a red (cat:1.21)") == stronger
    assert image(sd, prompt="a red cat++", prompt_syntax="compel") == stronger  # compel's ++ is 1.1 squared
    assert image(sd, prompt="a (red)1.0 cat", prompt_syntax="compel") == plain  # its words keep their spaces
    assert image(sd, prompt="a red [cat]") not in (plain, stronger)
    assert image(sd, prompt=r"a red \(cat\)") == image(sd, prompt="a red (cat)", prompt_syntax="plain")


def test_sub_prompt_weights_are_proportions(sd: LoadedModel) -> None:
    half = image(sd, prompt="tabby cat:0.5 white duck:0.5")
    assert image(sd, prompt="tabby cat:2 white duck:2") == half  # the same proportions
    assert image(sd, prompt="tabby cat:0.25 white duck:0.75") != half


def test_words_past_token_77_change_the_picture_and_are_counted(sd: LoadedModel) -> None:
    short = answer(sd, prompt=LONG)
    assert short["$meta"]["prompt_tokens"] == 75 and short["$meta"]["truncated"] is False
    longer = answer(sd, prompt=LONG + " a red boat in the bay")
    assert longer["$meta"]["prompt_tokens"] == 91 and longer["$meta"]["truncated"] is False
    assert longer["images"][0]["base64"] != short["images"][0]["base64"]
    other = answer(sd, prompt=LONG + " a blue boat in the bay")  # only words past token 77 differ
    assert other["images"][0]["base64"] != longer["images"][0]["base64"]
    # A long negative prompt pads the short prompt to its length, and it is read too.
    negative = image(sd, prompt="a cat", negative_prompt=LONG + " a red boat in the bay")
    assert negative != image(sd, prompt="a cat", negative_prompt=LONG + " a blue boat in the bay")


def test_clip_skip_reads_an_earlier_layer(sd: LoadedModel) -> None:
    plain = image(sd, prompt="a red cat")
    assert image(sd, prompt="a red cat", clip_skip=0) == plain
    skipped = image(sd, prompt="a red cat", clip_skip=1)
    assert skipped != plain
    assert image(sd, prompt="a red (cat:1.0)", clip_skip=1) == skipped
    assert answer(sd, prompt="a cat", clip_skip=1)["$meta"]["clip_skip"] == 1


def test_weights_and_long_prompts_work_in_img2img_and_inpaint(sd: LoadedModel) -> None:
    init = png_base64()
    mask = png_base64(color=(255, 255, 255))
    for task in ({"image": init, "strength": 1.0}, {"image": init, "mask_image": mask, "strength": 1.0}):
        plain = image(sd, prompt="a red cat", **task)
        assert image(sd, prompt="a red (cat:1.0)", **task) == plain
        assert image(sd, prompt="a red (cat:1.4)", **task) != plain
        assert image(sd, prompt=LONG + " red", **task) != image(sd, prompt=LONG + " blue", **task)


def test_weighted_and_long_prompts_batch_when_their_lengths_agree(sd: LoadedModel) -> None:
    model = batched(sd)
    shape = {"width": 64, "height": 64, "num_inference_steps": 3}
    requests = [
        GenerateInput(prompt="a (red:1.3) cat", negative_prompt="blur", seed=1, **shape),
        GenerateInput(prompt="a [blue] dog", negative_prompt="(ugly:1.2)", seed=2, num_images_per_prompt=2, **shape),
        GenerateInput(prompt="a red cat", negative_prompt="blur", seed=3, **shape),  # text: another batch
        GenerateInput(prompt=LONG + " a boat", negative_prompt="blur", seed=4, **shape),  # two chunks: another
        GenerateInput(prompt="a (red:1.3) cat", negative_prompt="blur", seed=5, clip_skip=1, **shape),  # another
    ]
    together = run_together(model, requests)
    assert [together[i].batch for i in range(5)] == [2, 2, 1, 1, 1]
    for index, asked in enumerate(requests):
        same_picture(together[index], generate(model, asked))


# SDXL: two text encoders, pooled embeddings, no negative prompt is zeros.


def test_sdxl_weights_and_long_prompts(sdxl: LoadedModel) -> None:
    plain = image(sdxl, prompt="a red cat")
    assert image(sdxl, prompt="a red (cat:1.0)") == plain
    assert image(sdxl, prompt="a red ((cat))") == image(sdxl, prompt="a red (cat:1.21)") != plain
    # Without a negative prompt SDXL conditions on zeros; a weighted prompt keeps that (same picture as "" is not).
    weighted = image(sdxl, prompt="a red (cat:1.3)")
    assert weighted != image(sdxl, prompt="a red (cat:1.3)", negative_prompt="")
    longer = answer(sdxl, prompt=LONG + " a red boat")
    assert longer["$meta"]["prompt_tokens"] == 83 and not longer["$meta"]["truncated"]
    assert longer["images"][0]["base64"] != image(sdxl, prompt=LONG + " a blue boat")


# T5 families.


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("prompt-families")
    return {
        name: load_model(Settings(model_dir=bake_model(name, root / name).model_dir))
        for name in ("tiny-sd3", "tiny-flux")
    }


def test_flux_takes_weights_and_says_what_t5_cut(t5_models: dict[str, LoadedModel]) -> None:
    flux = t5_models["tiny-flux"]
    plain = image(flux, prompt="a red cat")
    assert image(flux, prompt="a red (cat:1.0)") == plain
    assert image(flux, prompt="a red (cat:1.3)") != plain
    cut = answer(flux, prompt="a cat " + "x" * 100, max_sequence_length=16)
    assert cut["$meta"]["truncated"] is True and cut["$meta"]["prompt_tokens"] > 16
    # Past T5's 16 tokens and CLIP's 77 (which FLUX.1 reads for its pooled embedding), words change nothing.
    assert cut["images"][0]["base64"] == image(flux, prompt="a cat " + "x" * 100 + " y", max_sequence_length=16)
    whole = answer(flux, prompt="a cat", max_sequence_length=16)
    assert whole["$meta"]["truncated"] is False


def test_sd3_reads_brackets_as_text_unless_asked_for_weights(t5_models: dict[str, LoadedModel]) -> None:
    sd3 = t5_models["tiny-sd3"]
    body = answer(sd3, prompt="a cat (orange)")
    assert body["$meta"]["prompt_syntax"] == "plain"
    error = refusal(sd3, prompt="a (cat:1.3)", prompt_syntax="a1111")
    assert error["field"] == "prompt" and "sd3" in error["message"]
    assert answer(sd3, prompt="a cat " * 30, max_sequence_length=32)["$meta"]["truncated"] is True


def test_clip_skip_only_where_the_family_reads_clip_layers(t5_models: dict[str, LoadedModel]) -> None:
    error = refusal(t5_models["tiny-flux"], prompt="a cat", clip_skip=1)
    assert error["field"] == "clip_skip" and "flux" in error["message"]


def test_a_request_error_in_the_prompt_never_reaches_the_model(sd: LoadedModel) -> None:
    with pytest.raises(WorkerError) as caught:
        generate(sd, GenerateInput(prompt="a (cat:20)", **FAST))
    assert caught.value.field == "prompt"


def test_prompt_syntax_default_is_a_setting(baked: dict[str, Path]) -> None:
    plain_default = load_model(Settings(model_dir=baked["tiny-sd"], prompt_syntax="plain"))
    sd_default = load_model(Settings(model_dir=baked["tiny-sd"]))
    assert image(plain_default, prompt="a (cat:1.3)") == image(sd_default, prompt="a (cat:1.3)", prompt_syntax="plain")
    assert answer(plain_default, prompt="a cat")["$meta"]["prompt_syntax"] == "plain"
