"""Where the test suite's time goes: one or more pytest JUnit files (`make test ARGS="--junitxml=run.xml"`), each
summed per test file, with the run's wall time, test count and slowest tests, as JSON; two files side by side
give the before/after of a change to the suite.

    python bench/suite.py before=old.xml after=new.xml --wall before=1574 after=420 --out bench/results/suite-cpu.json

JUnit's time of a test is its setup, call and teardown together; with pytest-xdist the per-file sums add up the
workers' time, so their total is more than the wall time by about the number of workers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def summarise(path: Path) -> dict[str, Any]:
    """A JUnit file's tests: counts by outcome, seconds per test file, the slowest tests."""
    cases = ET.parse(path).getroot().iter("testcase")
    per_file: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    tests = []
    for case in cases:
        seconds = float(case.get("time", 0))
        name = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        per_file[name.split("::")[0]] += seconds
        outcomes[outcome] += 1
        tests.append((seconds, name))
    tests.sort(reverse=True)
    return {
        "tests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "test_seconds": round(sum(per_file.values()), 1),
        "over_60_s": [name for seconds, name in tests if seconds > 60],
        "per_file_s": {name: round(seconds, 1) for name, seconds in per_file.most_common()},
        "slowest_s": {name: round(seconds, 1) for seconds, name in tests[:15]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="label=junit.xml")
    parser.add_argument("--wall", nargs="*", default=[], help="label=seconds: pytest's own wall time of each run")
    parser.add_argument("--note", default="", help="the machine and the commands, kept in the JSON")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    walls = dict(item.split("=", 1) for item in args.wall)
    report: dict[str, Any] = {"note": args.note, "runs": {}}
    for item in args.runs:
        label, path = item.split("=", 1)
        report["runs"][label] = {"wall_s": float(walls[label]) if label in walls else None, **summarise(Path(path))}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
