"""torch's CPU threads while serving: the same direct request to two workers on tiny-sd, one with torch on every
core, one on the cores less one (the default on a CPU since TORCH_THREADS), side by side.

    python bench/threads.py [--rounds 20] [--size 256] [--steps 20] [--out FILE]

Bakes tiny-sd and starts `python app.py` twice (SQLite store), one with TORCH_THREADS = the cores, one with the
cores less one. Each round sends one direct `POST /` to each, one after the other, in alternating order (safety
checker off), and records the round trip and the worker's own pipeline time ($timings.inference). Prints the
medians, each worker's round trip over its own pipeline time (what serving adds), and the ratio of the two round
trips. Only one server computes at a time: the other waits for its next request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.jobs import KEY, start_tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sdworker.model import bake_model

    cores = len(os.sched_getaffinity(0))
    counts = {"all cores": cores, "cores less one": max(1, cores - 1)}
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    model_dir = bake_model("tiny-sd", work / "models").model_dir
    servers = {name: start_tiny(model_dir, work / name.replace(" ", "-"), n) for name, n in counts.items()}
    body = {
        "prompt": "a lighthouse on a cliff at dawn",
        "num_inference_steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 1,
        "safety_checker": False,
    }
    round_trip: dict[str, list[float]] = {name: [] for name in servers}
    inference: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds + 1):
            order = list(servers) if round_ % 2 else list(reversed(servers))
            for name in order:
                began = time.perf_counter()
                answer = requests.post(servers[name][0], json=body, headers={"X-BANANA-API-KEY": KEY}, timeout=300)
                elapsed = time.perf_counter() - began
                assert answer.status_code == 200, answer.text
                if round_:  # round 0 warms up
                    round_trip[name].append(elapsed * 1000)
                    inference[name].append(answer.json()["$timings"]["inference"])
    finally:
        for _, process in servers.values():
            process.kill()
            process.wait()
    median = {name: round(statistics.median(values), 1) for name, values in round_trip.items()}
    report = {
        "machine": f"{cores} CPU cores, no GPU",
        "model": "tiny-sd",
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "command": " ".join(["python", "bench/threads.py", *sys.argv[1:]]),
        "torch_threads": counts,
        "median_round_trip_ms": median,
        "median_inference_ms": {name: round(statistics.median(v), 1) for name, v in inference.items()},
        "round_trip_over_inference": {
            name: round(statistics.median(t / i for t, i in zip(round_trip[name], inference[name], strict=True)), 3)
            for name in servers
        },
        "default_over_all_cores": round(median["cores less one"] / median["all cores"], 3),
        "rounds_ms": round_trip,
    }
    print(json.dumps({key: value for key, value in report.items() if key != "rounds_ms"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
