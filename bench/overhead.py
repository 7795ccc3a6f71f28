"""Serving overhead: a request through each way in, over the bare pipeline call with the same inputs.

    python bench/overhead.py [--rounds 30] [--size 256] [--steps 20] [--threads 1] [--out FILE]

Bakes tiny-sd, loads it in this process for the bare `pipe(...)` call, and starts `python app.py` (SQLite
store) for the rest. Each round times, one after another so that noise hits all alike: the bare pipeline,
a direct POST /, Banana start-only + long-polled check, and RunPod /runsync. After one warm-up round it prints
the medians and each one's ratio to the bare call. The requests turn the safety checker off so that both sides
do the same work, save for what serving adds: PNG encoding, base64, the queue and HTTP.

Both sides run torch on `--threads` threads (default 1): on a GPU machine the CPU is free for HTTP and
encoding while the GPU computes, and one torch thread leaves the other core to the serving threads, as there.
With both cores busy with torch, the HTTP side and torch's threads steal from each other and the figure is
noise. The ratio quoted is the median over rounds of each round's time over that round's bare call.
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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from sdworker.config import Settings
    from sdworker.model import bake_model, load_model

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model_dir = bake_model("tiny-sd", work / "models").model_dir
    model = load_model(Settings(model_dir=model_dir))
    inputs = {
        "prompt": "a lighthouse",
        "num_inference_steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 1,
        "safety_checker": False,
    }

    url, server = start_tiny(model_dir, work, args.threads)
    session = requests.Session()

    def bare() -> None:
        with torch.inference_mode():
            model.pipes["text2img"](
                prompt=inputs["prompt"],
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                generator=torch.Generator("cpu").manual_seed(1),
            )

    def direct() -> None:
        assert session.post(url, json=inputs, headers={"X-BANANA-API-KEY": KEY}, timeout=120).status_code == 200

    def start_check() -> None:
        body = {"apiKey": KEY, "modelKey": "tiny-sd", "modelInputs": inputs, "startOnly": True}
        call_id = session.post(f"{url}/start/v4/", json=body, timeout=120).json()["callID"]
        check = {"apiKey": KEY, "callID": call_id, "longPoll": True}
        assert session.post(f"{url}/check/v4/", json=check, timeout=120).json()["message"] == "success"

    def runsync() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        answer = session.post(f"{url}/v2/tiny-sd/runsync", json={"input": inputs}, headers=headers, timeout=120)
        assert answer.json()["status"] == "COMPLETED"

    calls = {"bare pipeline": bare, "direct": direct, "start/check long-poll": start_check, "runpod runsync": runsync}
    try:
        times: dict[str, list[float]] = {name: [] for name in calls}
        for round_ in range(args.rounds + 1):
            for name, call in calls.items():
                began = time.perf_counter()
                call()
                if round_:  # round 0 warms up
                    times[name].append(time.perf_counter() - began)
    finally:
        server.kill()
        server.wait()
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    bare = times["bare pipeline"]
    ratios = {
        name: statistics.median(t / b for t, b in zip(values, bare, strict=True)) for name, values in times.items()
    }
    report = {
        "machine": f"{os.cpu_count()} CPU cores" + (", CUDA" if torch.cuda.is_available() else ", no GPU"),
        "model": "tiny-sd",
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "command": " ".join(["python", "bench/overhead.py", *sys.argv[1:]]),
        "median_ms": {name: round(value, 1) for name, value in medians.items()},
        "ratio_to_bare": {name: round(value, 3) for name, value in ratios.items()},
        "rounds_ms": {name: [round(value * 1000, 1) for value in values] for name, values in times.items()},
        "targets": {"direct": 1.05, "start/check long-poll": 1.10},
    }
    print(f"{'way in':<24}{'median ms':>12}{'x bare':>9}{'target':>9}")
    for name, value in medians.items():
        target = report["targets"].get(name)
        print(f"{name:<24}{value:>12.1f}{ratios[name]:>9.3f}{'' if target is None else f'<= {target:.2f}':>9}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
