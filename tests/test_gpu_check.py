"""The prepared GPU check (bench/gpu_check.sh) proved on the CPU: GPU_CHECK_DRY=1 runs its every step on tiny-sd
at tiny sizes, with the `python` it is given, and its report has every section, each step passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_dry_run_of_the_gpu_check_passes_every_step_and_reports_them(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["machine"]["device"].startswith("CPU")
    assert "bench/gpu_check.sh" in report["command"]
    for name in ("cuda_tests", "steps", "throughput", "cold_start"):
        assert report[name]["status"] == "passed", (
            name,
            report[name],
            (tmp_path / "out" / f"{name}.log").read_text()[-3000:],
        )
        assert 0 <= report[name]["seconds"] <= 240
    tests = report["cuda_tests"]["result"]
    assert tests["counts"]["failed"] == 0 and tests["counts"]["passed"] >= 9
    rows = [row for part in report["steps"]["result"] for row in part["rows"]]
    assert rows and all(row["s_per_image"] > 0 and "error" not in row for row in rows)
    assert {(row["max_batch"], row["clients"]) for row in report["throughput"]["result"]["rows"]} == {
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    }
    assert report["cold_start"]["result"]["median_s"]["worker"]["total"] > 0
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| cuda_tests | passed |" in table and "| sd15 | 64 | baseline | 1 |" in table


def test_a_step_that_fails_or_runs_out_of_time_is_reported_and_the_report_still_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    steps = [
        {"step": "cuda_tests", "rc": 1, "seconds": 3, "limit_s": 60},
        {"step": "steps", "rc": 124, "seconds": 150, "limit_s": 150},
    ]
    (out / "steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    result = subprocess.run([sys.executable, "bench/gpu_report.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda_tests"]["status"] == "failed" and report["steps"]["status"] == "timed out"
    assert report["throughput"]["status"] == "not run"
