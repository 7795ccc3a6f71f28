"""The prepared GPU check (bench/gpu_check.sh) proved on the CPU: GPU_CHECK_DRY=1 runs its every step on tiny-sd
at tiny sizes, with the `python` it is given, and its report has every section, each step passed. Its wheels
(`make gpu-wheels`) are every package requirements.txt pins beside torch and the GPU image's own, for Python 3.12,
within what one call carries; and a rehearsal on a Python that holds only torch and what the GPU image holds
installs the same pins from wheels, as the real run does, and passes every step on them alone.

The whole dry run takes minutes, so it runs as the rehearsal (which proves strictly more than a dry run with the
suite's own Python): the install once, then the steps on what it installed, a few per test (GPU_CHECK_STEPS), each
test reading the report of its own steps; a short dry run with the suite's Python shows that without wheels
nothing is installed."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import gpu_wheels

SECTIONS = ("cuda_tests", "steps", "throughput", "cold_start")


def run_check(tmp_path: Path, sections: tuple[str, ...] = SECTIONS, **env: str) -> dict[str, Any]:
    """bench/gpu_check.sh's dry run; the report from what came back in OUT (and nothing else came back), each of
    `sections` passed."""
    env = {"GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"), **env}
    env.setdefault("PYTHON", sys.executable)
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The GPU machine sends back at most 8 files: the check leaves three.
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "gpu_check.json",
        "gpu_check.md",
        "gpu_check_logs.tar.gz",
    ]
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as logs:
        names = {Path(name).name for name in logs.getnames()}
    assert {"steps.jsonl", *(f"{name}.log" for name in sections)} <= names
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    for name in sections:
        assert report[name]["status"] == "passed", (
            name,
            report[name],
            (tmp_path / "work" / "logs" / f"{name}.log").read_text()[-3000:],
        )
        assert 0 <= report[name]["seconds"] <= 240
    return report


def _gpu_image_python(root: Path) -> Path:
    """A Python like the GPU machine's: a bare virtualenv that sees torch (with its own dependencies) and, of what
    the GPU image holds, what the check takes from it (numpy, pillow, scipy, hf-xet, pytest), and nothing else."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    image = root / "image"
    image.mkdir()
    env = gpu_wheels.target_environment(sys.version_info[:2])
    names = {*gpu_wheels.closure(["torch", "pytest"], env), *gpu_wheels.FROM_IMAGE, "packaging"}
    for name in names:
        distribution = metadata.distribution(name)
        for file in distribution.files or []:
            top = file.parts[0]
            if top != ".." and not (image / top).exists():
                (image / top).symlink_to(Path(distribution.locate_file(top)))
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site / "gpu-image.pth").write_text(f"{image}\n")
    return root / "venv" / "bin" / "python"


@pytest.fixture(scope="module")
def models(recipe: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The check's model cache holding the suite's own bakes of the recipes it serves: its download.py calls find
    them baked (download.py baking each is tested on its own, in test_download)."""
    cache = tmp_path_factory.mktemp("gpu-check-models")
    for name in ("tiny-sd", "tiny-sd3", "tiny-flux-schnell"):
        (cache / name).symlink_to(recipe(name), target_is_directory=True)
    return cache


@dataclass(frozen=True)
class Rehearsal:
    """The GPU machine's Python with the check's pins installed from wheels, and the install step's report."""

    python: Path
    site: Path  # where the install step put the pins (first on PYTHONPATH, as the check puts it)
    report: dict[str, Any]
    logs: Path


@pytest.fixture(scope="module")
def rehearsal(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Rehearsal:
    """The install as the GPU machine runs it: on a Python that holds only torch and what the GPU image holds, the
    same pins installed from wheels (downloaded for this machine's Python). The steps then run on what it
    installed, a few at a time (each test below), as the check runs them after its install."""
    tmp_path = tmp_path_factory.mktemp("rehearsal")
    python = _gpu_image_python(tmp_path / "gpu")
    imports = [python, "-c", "import torch, numpy, pytest; import diffusers"]
    assert subprocess.run(imports, capture_output=True).returncode != 0  # nothing of the project's is there yet
    wheels = tmp_path / "wheels"
    gpu_wheels.download(wheels, sys.version_info[:2])
    report = run_check(
        tmp_path,
        ("install",),
        PYTHON=str(python),
        GPU_CHECK_WHEELS=str(wheels),
        GPU_CHECK_STEPS="install",
        GPU_CHECK_CACHE=str(models),
    )
    return Rehearsal(python, tmp_path / "work" / "site", report, tmp_path / "work" / "logs")


def dry_run(rehearsal: Rehearsal, models: Path, tmp_path: Path, steps: str, sections: tuple[str, ...]) -> dict:
    """The dry run of `steps` on the rehearsal's installed pins alone."""
    env = {"PYTHON": str(rehearsal.python), "PYTHONPATH": str(rehearsal.site), "GPU_CHECK_CACHE": str(models)}
    report = run_check(tmp_path, sections, GPU_CHECK_STEPS=steps, **env)
    bakes = (tmp_path / "work" / "logs" / "bake.log").read_text()  # the suite's bakes, found by download.py
    assert bakes.count("is already baked") == 3, bakes[-2000:]
    assert report["dry_run"] and report["machine"]["device"].startswith("CPU")
    assert "bench/gpu_check.sh" in report["command"]
    return report


@pytest.mark.slow
def test_rehearsal_the_wheels_install_beside_torch_alone(rehearsal: Rehearsal) -> None:
    report = rehearsal.report  # the dry-run tests below run their steps on what it installed, alone
    assert report["install"]["status"] == "passed", (rehearsal.logs / "install.log").read_text()[-3000:]
    assert report["install"]["result"]["problems"] == []
    from_image = " ".join(report["install"]["result"]["from_image"])
    assert "filelock" in from_image and "numpy" in from_image


@pytest.mark.slow
def test_the_dry_run_of_the_device_tests_and_the_sd15_steps_passes_and_reports_them(
    rehearsal: Rehearsal, models: Path, tmp_path: Path
) -> None:
    report = dry_run(rehearsal, models, tmp_path, "cuda_tests steps", ("cuda_tests", "steps"))
    tests = report["cuda_tests"]["result"]
    assert tests["counts"]["failed"] == 0 and tests["counts"]["passed"] >= 9
    rows = [row for part in report["steps"]["result"] for row in part["rows"]]
    assert rows and all(row["s_per_image"] > 0 and "error" not in row for row in rows)
    assert {row["model"] for row in rows} == {"sd15"}
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| cuda_tests | passed |" in table and "| sd15 | 64 | baseline | 1 |" in table


@pytest.mark.slow
def test_the_dry_run_of_throughput_and_cold_start_passes_and_reports_them(
    rehearsal: Rehearsal, models: Path, tmp_path: Path
) -> None:
    report = dry_run(rehearsal, models, tmp_path, "throughput cold_start", ("throughput", "cold_start"))
    assert {(row["max_batch"], row["clients"]) for row in report["throughput"]["result"]["rows"]} == {
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    }
    cold = report["cold_start"]["result"]
    assert cold["median_s"]["worker"]["total"] > 0
    assert cold["raw_read"]["median_s"] > 0 and cold["raw_read"]["worker_load_over_raw_read"] > 0


@pytest.mark.slow
def test_the_dry_run_of_the_sd35_flux_and_memory_steps_passes_and_reports_them(
    rehearsal: Rehearsal, models: Path, tmp_path: Path
) -> None:
    report = dry_run(rehearsal, models, tmp_path, "steps_sd35 steps_flux steps_memory", ())
    assert set(report["steps"]["parts"]) == {"steps_sd35", "steps_flux", "steps_memory"}
    assert all(part["status"] == "passed" for part in report["steps"]["parts"].values()), report["steps"]["parts"]
    rows = [row for part in report["steps"]["result"] for row in part["rows"]]
    drawn = [row for row in rows if row["model"] != "sd15"]
    assert drawn and all(row["s_per_image"] > 0 and "error" not in row for row in drawn)
    assert {row["model"] for row in drawn} == {"sd35m", "flux"}
    memory = {row["option"]: row for row in rows if row["model"] == "sd15"}
    for option, setting in (("quantize_int8", "quantize"), ("layerwise_fp8", "layerwise_casting")):
        # torchao came with the wheels; the 8-bit weights are seen on the loaded denoiser
        assert memory[option]["s_per_image"] > 0 and memory[option]["applied"] == {setting: True}, memory[option]
    for option in ("group_offload_block", "group_offload_leaf", "cpu_offload"):  # a GPU's alone, refused by name
        assert "runs on cpu" in memory[option]["skipped"], memory[option]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| sd15 | 64 | layerwise_fp8 | 1 |" in table


def test_a_step_that_fails_runs_out_of_time_or_finds_no_time_left_is_reported(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    steps = [
        {"step": "cuda_tests", "rc": 1, "seconds": 3, "limit_s": 60},
        {"step": "steps", "rc": 124, "seconds": 150, "limit_s": 150},
        {"step": "cold_start", "rc": None, "skipped": "9 s left of the 500 s budget"},
    ]
    (logs / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    (logs / "cuda_tests.xml").write_text(  # as pytest --junitxml writes one failure, one skip and one pass
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_device" name="test_a"><failure message="assert 1 == 2">trace</failure>'
        '</testcase><testcase classname="tests.test_device" name="test_b">'
        '<skipped type="pytest.skip" message="needs a GPU">reason</skipped></testcase>'
        '<testcase classname="tests.test_device" name="test_c" /></testsuite></testsuites>'
    )
    result = subprocess.run(
        [sys.executable, "bench/gpu_report.py", str(logs)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((logs / "gpu_check.json").read_text())
    assert report["cuda_tests"]["status"] == "failed" and report["steps"]["status"] == "timed out"
    tests = report["cuda_tests"]["result"]
    assert tests["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert tests["failed"] == ["test_a: assert 1 == 2"] and tests["skipped"] == ["test_b: needs a GPU"]
    assert report["throughput"]["status"] == "not run"
    assert report["cold_start"]["status"] == "skipped: 9 s left of the 500 s budget"


def test_the_gpu_wheels_pin_requirements_txt_closure_beside_torch_and_the_gpu_image(tmp_path: Path) -> None:
    # bench/gpu-wheels.txt is what `pins` writes from the installed versions, which are requirements.txt's.
    assert gpu_wheels.read_pins() == gpu_wheels.wanted_pins(), "run: python bench/gpu_wheels.py pins"
    pins = gpu_wheels.read_pins()
    assert {"diffusers", "transformers", "potassium", "fastapi", "uvicorn", "xformers"} <= set(pins)
    assert not {"torch", "numpy", "pillow", "scipy", "runpod", "filelock", "sympy"} & set(pins)
    for name, version in gpu_wheels._pinned(ROOT / "requirements.txt").items():
        if name in pins:
            assert pins[name] == version


def test_make_gpu_wheels_brings_one_wheel_per_pin_for_python_312_within_the_call_limit(tmp_path: Path) -> None:
    dest = tmp_path / "wheels"
    gpu_wheels.download(dest)
    assert gpu_wheels.check(dest) == []  # the size limit among the rest
    # A missing wheel and a second version are each named.
    wheel = next(dest.glob("diffusers-*.whl"))
    wheel.rename(tmp_path / wheel.name)
    (dest / "redis-7.0.0-py3-none-any.whl").write_bytes(b"")
    problems = gpu_wheels.check(dest)
    assert "no wheel of diffusers==0.42.1" in problems
    assert any(problem.startswith("two versions of redis") for problem in problems)


def test_a_dry_run_with_the_python_it_is_given_installs_nothing(models: Path, tmp_path: Path) -> None:
    report = run_check(tmp_path, (), GPU_CHECK_STEPS="steps_sd35", GPU_CHECK_CACHE=str(models))  # its shortest
    assert report["install"]["status"] == "not run"
    assert report["steps"]["parts"]["steps_sd35"]["status"] == "passed"
    assert {report[name]["status"] for name in ("cuda_tests", "throughput", "cold_start")} == {"not run"}
