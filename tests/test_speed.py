"""Speed without surprises: dynamic batching (jobs of the same shape that wait for the model run as one batch,
each with its own seeds, and come out as the pictures they would have been alone) and the speed options."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import batched, run_together, same_picture

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.generate import generate
from sdworker.model import LoadedModel, load_model
from sdworker.schema import GenerateInput

SHAPE = {"width": 64, "height": 64, "num_inference_steps": 3}


@pytest.mark.parametrize("model_name", ["sd", "sdxl"])
def test_waiting_jobs_of_one_shape_run_as_one_batch_and_match_their_solo_runs(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    model = batched(request.getfixturevalue(model_name))
    requests = [
        GenerateInput(prompt="a cat", negative_prompt="blur", seed=5, **SHAPE),
        GenerateInput(prompt="a dog", negative_prompt="ugly", seed=2**64 - 1, num_images_per_prompt=2, **SHAPE),
        GenerateInput(prompt="a fox", negative_prompt="", seed=77, scheduler="Euler a", **SHAPE),  # another shape
        GenerateInput(prompt="the sea", seed=11, **SHAPE),  # no negative prompt: another shape on SDXL
        GenerateInput(prompt="a hill", negative_prompt="dark", seed=12, **{**SHAPE, "width": 72}),  # another size
    ]
    together = run_together(model, requests)
    assert [together[i].batch for i in range(5)] == [2, 2, 1, 1, 1]
    for index, asked in enumerate(requests):
        alone = generate(model, asked)
        assert alone.batch == 1
        same_picture(together[index], alone)
    other_seed = generate(model, requests[0].model_copy(update={"seed": 6}))
    assert (np.asarray(other_seed.images[0]) != np.asarray(together[0].images[0])).mean() > 0.5


def test_a_batch_holds_at_most_max_batch_jobs_and_max_images(sd: LoadedModel) -> None:
    requests = [GenerateInput(prompt=f"p{i}", seed=i, **SHAPE) for i in range(3)]
    results = run_together(batched(sd, max_jobs=2), requests)
    assert [results[i].batch for i in range(3)] == [2, 2, 1]
    requests = [
        GenerateInput(prompt=f"p{i}", seed=i, num_images_per_prompt=n, **SHAPE) for i, n in enumerate([3, 2, 1])
    ]
    results = run_together(batched(sd, max_images=4), requests)
    assert [results[i].batch for i in range(3)] == [2, 1, 2]  # 3 + 1 images fit in four; 3 + 2 do not


def test_a_cancelled_job_leaves_the_rest_of_its_batch_alone(sd: LoadedModel) -> None:
    def cancel_at_two(step: int, total: int) -> None:
        if step == 2:
            raise WorkerError("CANCELLED", "the job was cancelled", status=409)

    requests = [GenerateInput(prompt=f"p{i}", seed=i, **SHAPE) for i in range(2)]
    model = batched(sd)
    results = run_together(model, requests, {0: cancel_at_two})
    assert isinstance(results[0], WorkerError) and results[0].code == "CANCELLED"
    assert results[1].batch == 2
    same_picture(results[1], generate(model, requests[1]))


def test_a_job_that_breaks_its_batch_fails_alone_and_the_others_are_rerun(sd: LoadedModel) -> None:
    def broken(step: int, total: int) -> None:
        raise RuntimeError("a bug in one job's callback")

    requests = [GenerateInput(prompt=f"p{i}", seed=i, **SHAPE) for i in range(3)]
    model = batched(sd)
    results = run_together(model, requests, {1: broken})
    assert isinstance(results[1], WorkerError) and results[1].code == "PIPELINE_ERROR"
    for index in (0, 2):
        assert results[index].batch == 1  # run again, alone
        same_picture(results[index], generate(model, requests[index]))


def test_waiting_callers_return_as_soon_as_their_batch_is_done(sd: LoadedModel) -> None:
    """A caller whose job ran in another caller's batch gets its answer then, not after the next batch."""
    model = batched(sd, max_jobs=2)
    halfway: list[float] = []

    def slow_progress(step: int, total: int) -> None:
        if step == total // 2:
            halfway.append(time.monotonic())

    requests = [
        GenerateInput(prompt="a", seed=1, **SHAPE),
        GenerateInput(prompt="b", seed=2, **SHAPE),
        GenerateInput(prompt="slow", seed=3, **{**SHAPE, "num_inference_steps": 60}),
    ]
    results = run_together(model, requests, {2: slow_progress})
    assert [results[i].batch for i in range(3)] == [2, 2, 1]
    returned = run_together.returned
    assert returned[0] < halfway[0] and returned[1] < halfway[0]


def applied(model: LoadedModel, option: str) -> bool:
    """Whether the loaded pipeline shows `option` in effect."""
    unet, vae = model.pipes["text2img"].unet, model.pipes["text2img"].vae
    return {
        "channels_last": lambda: unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
        "fuse_qkv": lambda: any(getattr(module, "fused_projections", False) for module in unet.modules()),
        "vae_slicing": lambda: vae.use_slicing,
        "torch_compile": lambda: unet._compiled_call_impl is not None,
    }[option]()


@pytest.mark.parametrize("option", ["channels_last", "fuse_qkv", "vae_slicing"])
def test_each_speed_option_is_applied_and_keeps_the_picture_of_a_seed(baked: dict, option: str) -> None:
    """A speed option changes how the same arithmetic is laid out, not the image a seed gives."""
    request = GenerateInput(prompt="a lighthouse", seed=42, num_images_per_prompt=2, **SHAPE)
    plain_model = load_model(Settings(model_dir=baked["tiny-sd"]))
    faster_model = load_model(Settings(model_dir=baked["tiny-sd"], **{option: True}))
    assert applied(faster_model, option) and not applied(plain_model, option)
    same_picture(generate(faster_model, request), generate(plain_model, request))


def test_torch_compile_without_a_compiler_is_refused_at_start_naming_the_setting(
    baked: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image has no compiler unless built with COMPILE_TOOLS=1: the worker says so instead of failing in the
    middle of the compile."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, g++ or clang
    for variable in ("CC", "CXX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WorkerError) as refused:
        load_model(Settings(model_dir=baked["tiny-sd"], torch_compile=True, data_dir=tmp_path))
    assert refused.value.field == "TORCH_COMPILE" and "COMPILE_TOOLS=1" in refused.value.message


def test_torch_compile_keeps_the_picture_and_caches_its_kernels_in_the_data_dir(
    baked: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # restored after the test
    request = GenerateInput(prompt="a lighthouse", seed=42, **SHAPE)
    plain = generate(load_model(Settings(model_dir=baked["tiny-sd"])), request)
    model = load_model(Settings(model_dir=baked["tiny-sd"], torch_compile=True, data_dir=tmp_path))
    assert applied(model, "torch_compile")
    same_picture(generate(model, request), plain)
    assert any((tmp_path / "torch-compile").rglob("*.py")), "no compiled kernels in DATA_DIR/torch-compile"
