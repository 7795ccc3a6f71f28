"""Where a command's CPU goes, process by process: every Python process it starts records its CPU time, its
arguments, whether it imported torch and diffusers, and the test that started it (PYTEST_CURRENT_TEST).

    python bench/processes.py -- .venv/bin/python -m pytest -n auto --dist loadfile -q

A `sitecustomize.py` put first on PYTHONPATH writes each process's record every second and at exit (so a process
killed with -9 keeps its last second), then the table sums them by script and by test file. Only processes that
inherit PYTHONPATH are seen: the test helpers pass the environment on, a few tests that build one from scratch do
not.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RECORDER = """
import atexit, json, os, sys, threading, time
_folder, _started = os.environ["SDW_PROCESS_LOG"], time.time()
def _write():
    times = os.times()
    record = {"argv": sys.argv, "cpu_s": times.user + times.system, "wall_s": time.time() - _started,
              "torch": "torch" in sys.modules, "diffusers": "diffusers" in sys.modules,
              "test": os.environ.get("PYTEST_CURRENT_TEST", "")}
    with open(os.path.join(_folder, f"{os.getpid()}.json"), "w") as file:
        json.dump(record, file)
def _every_second():
    while True:
        time.sleep(1)
        try:
            _write()
        except Exception:
            pass
threading.Thread(target=_every_second, daemon=True).start()
atexit.register(_write)
"""

SCRIPTS = ("app.py", "download.py", "gpu.py", "throughput.py", "coldstart.py", "test.py", "schemathesis")


def kind(argv: list[str]) -> str:
    """What a process was: the project's script it ran, pytest, an xdist worker, or its first argument."""
    line = " ".join(argv)
    if argv[:1] == ["-c"]:
        return "xdist worker (-c)"
    return next((script for script in SCRIPTS if script in line), "pytest" if "pytest" in line else line[:50])


def summary(records: list[dict]) -> str:
    """The table: CPU seconds by kind of process, then the child processes' CPU by the test file that started them."""
    by_kind: dict[str, list[dict]] = collections.defaultdict(list)
    for record in records:
        by_kind[kind(record["argv"])].append(record)
    lines = [f"{len(records)} processes, {sum(r['cpu_s'] for r in records):.0f} s of CPU", ""]
    lines.append(f"{'process':32} {'count':>6} {'cpu s':>8} {'with diffusers':>15}")
    for name, group in sorted(by_kind.items(), key=lambda item: -sum(r["cpu_s"] for r in item[1])):
        cpu = sum(r["cpu_s"] for r in group)
        lines.append(f"{name:32} {len(group):6} {cpu:8.0f} {sum(r['diffusers'] for r in group):15}")
    by_file: collections.Counter[str] = collections.Counter()
    for record in records:
        if record["test"] and kind(record["argv"]) != "xdist worker (-c)":
            by_file[record["test"].split("::")[0]] += record["cpu_s"]
    lines += ["", f"{'child processes of':45} {'cpu s':>8}"]
    lines += [f"{name:45} {cpu:8.0f}" for name, cpu in by_file.most_common()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    parser.add_argument("--out", type=Path, help="also write every process's record here (JSON)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with tempfile.TemporaryDirectory(prefix="sdw-processes-") as folder:
        site, log = Path(folder, "site"), Path(folder, "log")
        site.mkdir()
        log.mkdir()
        (site / "sitecustomize.py").write_text(RECORDER)
        path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        code = subprocess.run(command, env={**os.environ, "PYTHONPATH": path, "SDW_PROCESS_LOG": str(log)}).returncode
        records = []
        for file in log.glob("*.json"):
            try:
                records.append(json.loads(file.read_text()))
            except ValueError:  # written at the moment the process ended
                continue
    print(summary(records))
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
