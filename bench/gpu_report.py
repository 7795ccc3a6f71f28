"""The GPU check's report: bench/gpu_check.sh's step outputs in $OUT, merged into one JSON and one Markdown table.

    python bench/gpu_report.py LOGS

Reads LOGS/steps.jsonl (each step's exit status and seconds), LOGS/install.log (the wheels' install and its
preflight), LOGS/cuda_tests.xml (pytest's JUnit report), LOGS/steps*.json (bench/gpu.py), LOGS/throughput.json and
LOGS/cold_start.json, and writes LOGS/gpu_check.json (sections `install`, `cuda_tests`, `steps`, `throughput`,
`cold_start`, with the machine and the exact command) and LOGS/gpu_check.md. A step that failed, ran out of time
or was skipped for want of time is reported as such, with what it wrote before.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> dict[str, Any] | None:
    """pytest's JUnit XML: counts, and each test that did not pass with its message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    cases = root.iter("testcase")
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname', '')}.{case.get('name', '')}".rsplit(".", 1)[-1]
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        # `is not None`: an element without children is false, and <failure> has none.
        kind = {"failure": "failed", "error": "failed", "skipped": "skipped"}.get(
            problem.tag if problem is not None else "", "passed"
        )
        detail = (problem.get("message") or "")[:300] if problem is not None else ""
        outcome[kind].append(f"{name}: {detail}" if detail else name)
    return {"counts": {kind: len(names) for kind, names in outcome.items()}, **outcome}


def _machine() -> dict[str, Any]:
    """The device, torch and CUDA versions and Python; what torch cannot tell is left None (the report is still
    written)."""
    found: dict[str, Any] = {"device": None, "torch": None, "cuda": None, "python": platform.python_version()}
    try:
        import torch

        found.update(torch=torch.__version__, cuda=torch.version.cuda)
        cuda = torch.cuda.is_available()
        found["device"] = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    except Exception as err:  # a broken CUDA must not cost the report
        found["error"] = f"{type(err).__name__}: {err}"[:300]
    return found


def report(out: Path) -> dict[str, Any]:
    """Every section of the check, from what its steps left in `out`."""
    lines = (out / "steps.jsonl").read_text().splitlines() if (out / "steps.jsonl").exists() else []
    steps = {entry["step"]: entry for entry in map(json.loads, filter(None, lines))}

    def section(step: str, data: Any) -> dict[str, Any]:
        run = steps.get(step, {"rc": None, "seconds": None})
        status = "passed" if run["rc"] == 0 else "timed out" if run["rc"] in (124, 137) else "failed"
        if run["rc"] is None:
            status = f"skipped: {run['skipped']}" if run.get("skipped") else "not run"
        return {"status": status, "rc": run["rc"], "seconds": run.get("seconds"), "result": data}

    install_log = out / "install.log"
    install = None
    if install_log.exists():
        lines = install_log.read_text().splitlines()
        install = {
            "problems": [line.removeprefix("problem: ") for line in lines if line.startswith("problem: ")],
            "from_image": [
                line.removeprefix("from the image: ") for line in lines if line.startswith("from the image")
            ],
        }

    speed = [_json(path) for path in sorted(out.glob("steps*.json"))]
    return {
        "command": os.environ.get("GPU_CHECK_COMMAND", "bash bench/gpu_check.sh"),
        "dry_run": os.environ.get("GPU_CHECK_DRY") == "1",
        "machine": _machine(),
        "install": section("install", install),
        "cuda_tests": section("cuda_tests", _tests(out / "cuda_tests.xml")),
        # Step 2 runs as several steps (one per model or two): each one's status, and every row they wrote.
        "steps": {
            **section("steps", [data for data in speed if data]),
            "parts": {
                name: {key: section(name, None)[key] for key in ("status", "seconds")}
                for name in steps
                if name.startswith("steps")
            },
        },
        "throughput": section("throughput", _json(out / "throughput.json")),
        "cold_start": section("cold_start", _json(out / "cold_start.json")),
    }


def markdown(data: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = [
        f"# GPU check on {data['machine']['device']}" + (" (dry run)" if data["dry_run"] else ""),
        "",
        f"torch {data['machine']['torch']}, CUDA {data['machine']['cuda']}, Python {data['machine']['python']}. "
        f"Command: `{data['command']}`",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    for name in ("install", "cuda_tests", "steps", "throughput", "cold_start"):
        lines.append(f"| {name} | {data[name]['status']} | {data[name]['seconds']} |")
    for name, part in data["steps"].get("parts", {}).items():
        lines.append(f"| step 2: {name} | {part['status']} | {part['seconds']} |")
    install = data["install"]["result"]
    if install:
        lines += ["", *[f"- install problem: {problem}" for problem in install["problems"]]]
    tests = data["cuda_tests"]["result"]
    if tests:
        lines += ["", f"Device tests: {tests['counts']}", *[f"- failed: {name}" for name in tests["failed"]]]
    rows = [row for report in data["steps"]["result"] for row in report.get("rows", [])]
    if rows:
        lines += [
            "",
            "| model | size | option | batch | s/image | steps/s | peak GiB | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row.get('model')} | {row.get('size')} | {row.get('option')} | {row.get('batch', '-')} | "
                f"{row.get('s_per_image', '-')} | {row.get('steps_per_s', '-')} | {row.get('peak_gib', '-')} | "
                f"{' '.join(str(row.get('error') or row.get('skipped') or '').split())} |"
            )
    throughput = (data["throughput"]["result"] or {}).get("rows", [])
    if throughput:
        lines += ["", "| MAX_BATCH | clients | images/s | p50 ms | p95 ms | jobs/batch |", "|---|---|---|---|---|---|"]
        for row in throughput:
            lines.append(
                f"| {row['max_batch']} | {row['clients']} | {row['images_per_s']} | {row['p50_ms']} | "
                f"{row['p95_ms']} | {row['mean_batch_jobs']} |"
            )
    cold = data["cold_start"]["result"]
    if cold:
        lines += ["", f"Cold start, median seconds: {json.dumps(cold.get('median_s'))}"]
        if cold.get("raw_read"):
            lines.append(f"Raw read of the same bytes: {json.dumps(cold['raw_read'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1])
    data = report(out)
    (out / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
