"""Cold start: process start to first image, in parts, for the worker against a naive diffusers script.

    python bench/coldstart.py [--runs 5] [--size 256] [--steps 20] [--model-dir DIR] [--no-server] [--out FILE]

Each run starts fresh Python processes on the same baked model (tiny-sd baked into a temporary directory, or
`--model-dir`, any directory `python download.py` baked, for a GPU box with a full-size model):
- worker: the imports app.py's handler path does (torch, diffusers, `sdworker.config/handler/model`), then
  `load_model(Settings(model_dir=...))`, then the first `handle(model, {...})`, which answers with a PNG in base64;
- naive: `import torch; from diffusers import DiffusionPipeline`, then
  `DiffusionPipeline.from_pretrained(dir, dtype=fp16 on CUDA else fp32).to(device)`, then one `pipe(...)` whose
  image is saved as PNG into memory;
- server (on by default, `--no-server` to skip): `python app.py` from Popen to the first 200 from GET /health
  (which answers 200 once the model is loaded; polled every 50 ms), then the first direct POST / with the same
  inputs. Its load is the `$timings.init` of that first answer, and "python start + imports" is the rest of the
  time to /health (which also holds the HTTP server's and the job store's start).

The parent takes `time.time()` just before Popen and the child takes it as its first statement, then after its
imports, after the load and after the first image, so "python start" is the interpreter's own start-up. Every
part runs in the same order on both sides; diffusers imports lazily, so some of transformers' import lands in
"load" on both sides alike; the table also gives the worker's own clock (`$timings.init`) on a line of its own.
On CUDA both children synchronize after the load so that no pending copy moves into "first image".

Fairness of the comparison:
- The safety checker: the worker loads it with the pipeline (it runs on its own after generation, so that each
  request may turn it on or off) and the requests here turn it off (`"safety_checker": false`). The naive
  script therefore loads the pipeline as it comes, checker included (the same bytes read), and sets
  `pipe.safety_checker = None` after the load, which is exactly what the worker does to its pipelines: both
  read the checker's weights and neither runs it. (A naive script that passed `safety_checker=None` to
  from_pretrained would read fewer bytes: about 1.2 GB less for SD 1.5 in fp32, 0.6 GB in fp16.)
- Same prompt, size, steps, guidance (7.5, both defaults), baked scheduler, seed (a CPU generator), and no
  progress bars on either side. The worker also encodes base64 and builds its JSON answer; the naive side
  only encodes the PNG.
- The worker reads its other settings from the environment and build_args.env, as app.py does; with the
  defaults no speed option (torch.compile, channels-last, ...) is on.
- The naive script passes the baked weights' variant (from sdworker.json) so that it reads the same files.

Runs are warm-page-cache: the first, discarded, warm-up round reads the model files and compiles the .pyc files,
and every later process finds torch's libraries and the weights in the OS page cache. Dropping the cache
(`echo 3 > /proc/sys/vm/drop_caches`) would need root and would slow everything else on the machine, so this
bench does not; a truly cold disk adds the time to read `bytes read` from it to "load" on both sides (and the
time to read torch's shared libraries to "imports"). The kinds alternate within each round so that noise hits
all alike; nothing is dropped but the warm-up round, and the table gives the median of each part over the runs
(so the parts' medians need not add up to the median total).

Beside them, each round first reads the same weight files whole (`raw_read`: unbuffered, into one buffer, in the
same page-cache state), the floor under any load of those bytes; the report gives its median, its MB/s and the
worker's load as a multiple of it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a lighthouse"
SEED = 1
PARTS = ("python_start", "imports", "load", "first_image", "total")
MARK = "COLDSTART "


def _child(
    up: float, kind: str, model_dir: str, variant: str | None, prompt: str, seed: int, size: int, steps: int
) -> None:
    """The cold-started process (its source is passed with `python -c`): prints its timestamps as one JSON line.

    `up` is `time.time()` taken by the first statement of the program, before this function was even defined.
    """
    import json
    import sys
    import time

    stamps = {"up": up}
    report: dict = {"kind": kind}
    if kind == "worker":
        import torch
        from diffusers import DiffusionPipeline  # what load_model uses, imported up front as the naive side does

        from sdworker.config import Settings
        from sdworker.handler import handle
        from sdworker.model import load_model

        stamps["imports"] = time.time()
        model = load_model(Settings(model_dir=model_dir))
        if model.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps["load"] = time.time()
        inputs = {
            "prompt": prompt,
            "num_inference_steps": steps,
            "width": size,
            "height": size,
            "seed": seed,
            "safety_checker": False,
        }
        status, body = handle(model, inputs)
        stamps["first_image"] = time.time()
        if status != 200:
            raise RuntimeError(f"the worker answered {status}: {body}")
        device = model.device
        report.update(load_bytes=model.load_bytes, load_ms=model.load_ms, timings=body["$timings"])
    else:
        import io

        import torch
        from diffusers import DiffusionPipeline

        stamps["imports"] = time.time()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype, variant=variant).to(device)
        pipe.safety_checker = None  # loaded, as the worker does, but not run: the worker's requests turn it off
        pipe.set_progress_bar_config(disable=True)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps["load"] = time.time()
        image = pipe(
            prompt,
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        image.save(io.BytesIO(), "PNG")
        stamps["first_image"] = time.time()
    report.update(
        stamps=stamps,
        device=device,
        gpu=torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        torch=torch.__version__,
        diffusers=sys.modules["diffusers"].__version__,
    )
    print("COLDSTART " + json.dumps(report), flush=True)


def run_child(kind: str, model_dir: Path, variant: str | None, size: int, steps: int) -> dict[str, Any]:
    """Cold-start one `kind` ("worker" or "naive") process; its parts in seconds and what it reported."""
    arguments = ", ".join(repr(value) for value in (kind, str(model_dir), variant, PROMPT, SEED, size, steps))
    program = f"import time; _up = time.time()\n{inspect.getsource(_child)}\n_child(_up, {arguments})\n"
    began = time.time()
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"the {kind} process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(lines[-1].removeprefix(MARK))
    report["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine, just after the run
    stamps = report["stamps"]
    report["parts_s"] = {
        "python_start": stamps["up"] - began,
        "imports": stamps["imports"] - stamps["up"],
        "load": stamps["load"] - stamps["imports"],
        "first_image": stamps["first_image"] - stamps["load"],
        "total": stamps["first_image"] - began,
    }
    del report["stamps"]
    return report


def run_server(model_dir: Path, model_id: str, data_dir: Path, size: int, steps: int) -> dict[str, Any]:
    """Cold-start `python app.py`: seconds to the first 200 from /health, then to the first direct POST / image."""
    import requests

    from bench.jobs import KEY, start

    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "MODE")}
    env.update(MODEL_ID=model_id, MODEL_DIR=str(model_dir), API_KEYS=KEY, HOST="127.0.0.1", DATA_DIR=str(data_dir))
    inputs = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "width": size,
        "height": size,
        "seed": SEED,
        "safety_checker": False,
    }
    began = time.time()
    url, server = start(env)
    healthy = time.time()
    try:
        answer = requests.post(url, json=inputs, headers={"X-BANANA-API-KEY": KEY}, timeout=600)
        first_image = time.time()
        if answer.status_code != 200:
            raise RuntimeError(f"app.py answered {answer.status_code}: {answer.text[:500]}")
        timings = answer.json()["$timings"]
    finally:
        server.kill()
        server.wait()
    load = timings["init"] / 1000
    return {
        "parts_s": {
            "python_start_imports_serve": healthy - began - load,
            "load": load,
            "health_200": healthy - began,
            "first_image": first_image - healthy,
            "total": first_image - began,
        },
        "timings": timings,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def raw_read(files: list[Path]) -> float:
    """Seconds to read `files` whole, unbuffered into one 16 MiB buffer: the floor under any load of them."""
    buffer = memoryview(bytearray(16 * 1024**2))
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    return time.perf_counter() - started


def _median(runs: list[dict[str, Any]], part: str) -> float:
    return statistics.median(run["parts_s"][part] for run in runs)


def summarize(runs: dict[str, list[dict[str, Any]]], load_bytes: int) -> dict[str, Any]:
    """Medians of each part per kind, the worker's and naive's load throughput, and the naive/worker ratios."""
    medians: dict[str, dict[str, float]] = {
        kind: {part: _median(kind_runs, part) for part in kind_runs[0]["parts_s"]}
        for kind, kind_runs in runs.items()
        if kind_runs
    }
    summary: dict[str, Any] = {
        "median_s": {kind: {part: round(value, 3) for part, value in parts.items()} for kind, parts in medians.items()},
        "load_mb_per_s": {
            kind: round(load_bytes / 1e6 / medians[kind]["load"], 1) for kind in ("worker", "naive") if kind in medians
        },
        "naive_over_worker": {
            part: round(medians["naive"][part] / medians["worker"][part], 3)
            for part in PARTS
            if medians["worker"][part] > 0
        },
        # What load_model times itself (`$timings.init`): its load without the imports it does first.
        "worker_own_load_ms": round(statistics.median(run["load_ms"] for run in runs["worker"]), 1),
        "loadavg_1m_range": [
            min(run["loadavg_1m"] for kind_runs in runs.values() for run in kind_runs),
            max(run["loadavg_1m"] for kind_runs in runs.values() for run in kind_runs),
        ],
    }
    return summary


def print_table(summary: dict[str, Any], load_bytes: int) -> None:
    """Rows are the parts; columns the worker, naive and naive/worker; then the server's own lines."""
    median, ratio = summary["median_s"], summary["naive_over_worker"]
    print(f"{'part (median s)':<22}{'worker':>10}{'naive':>10}{'naive/worker':>14}")
    for part in PARTS:
        print(f"{part:<22}{median['worker'][part]:>10.3f}{median['naive'][part]:>10.3f}{ratio.get(part, 0):>14.3f}")
    print(f"{'bytes read':<22}{load_bytes / 1e6:>9.1f}M{load_bytes / 1e6:>9.1f}M")
    speed = summary["load_mb_per_s"]
    print(f"{'load MB/s':<22}{speed['worker']:>10.1f}{speed['naive']:>10.1f}{speed['naive'] / speed['worker']:>14.3f}")
    raw = summary["raw_read"]
    print(
        f"{'raw read of the bytes':<22}{raw['median_s']:>10.3f}  ({raw['mb_per_s']:.0f} MB/s; the worker's load is "
        f"{raw['worker_load_over_raw_read']:.2f}x it)"
    )
    print(f"\nthe worker's own load_ms ($timings.init): {summary['worker_own_load_ms'] / 1000:.3f} s")
    low, high = summary["loadavg_1m_range"]
    print(f"1-minute load average after the runs: {low} to {high} ({os.cpu_count()} cores)")
    if "server" in median:
        server = median["server"]
        print(
            f"python app.py: /health 200 after {server['health_200']:.3f} s (load {server['load']:.3f} s, "
            f"python start + imports + serving start {server['python_start_imports_serve']:.3f} s); "
            f"first POST / image {server['first_image']:.3f} s later; total {server['total']:.3f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured rounds, after one discarded warm-up round")
    parser.add_argument(
        "--warm-up", action=argparse.BooleanOptionalAction, default=True, help="the discarded warm-up round first"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-dir", type=Path, help="a baked model directory; default: bake tiny-sd to a temp dir")
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True, help="also time app.py")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    from sdworker.model import bake_model, read_manifest, weight_bytes, weight_files

    work = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    try:
        model_dir = args.model_dir.resolve() if args.model_dir else bake_model("tiny-sd", work / "models").model_dir
        manifest = read_manifest(model_dir)
        if manifest is None:
            parser.error(f"no baked model (sdworker.json) in {model_dir}")
        variant, model_id = manifest.get("weights_variant"), manifest.get("model_id", "model")
        load_bytes = weight_bytes(model_dir)
        kinds = ["worker", "naive", *(["server"] if args.server else [])]
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        reads: list[float] = []
        for round_ in range(0 if args.warm_up else 1, args.runs + 1):
            read_s = raw_read(weight_files(model_dir))
            if round_:
                reads.append(read_s)
            for kind in kinds:
                if kind == "server":
                    result = run_server(model_dir, model_id, work / f"data-{round_}", args.size, args.steps)
                else:
                    result = run_child(kind, model_dir, variant, args.size, args.steps)
                if round_:  # round 0 warms up the page cache and the .pyc files
                    runs[kind].append(result)
            done = "warm-up" if not round_ else f"run {round_}/{args.runs}"
            totals = ", ".join(f"{kind} {runs[kind][-1]['parts_s']['total']:.2f} s" for kind in kinds if round_)
            print(f"{done} {totals}".rstrip(), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarize(runs, load_bytes)
    read_s = statistics.median(reads)
    summary["raw_read"] = {
        "median_s": round(read_s, 4),
        "mb_per_s": round(load_bytes / 1e6 / read_s, 1),
        "worker_load_over_raw_read": round(summary["median_s"]["worker"]["load"] / read_s, 2),
    }
    first = runs["worker"][0]
    report = {
        "command": " ".join(["python", "bench/coldstart.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores, {first['gpu'] or 'no GPU'}",
        "device": first["device"],
        "torch": first["torch"],
        "diffusers": first["diffusers"],
        "model": model_id,
        "weights_variant": variant,
        "load_bytes": load_bytes,
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "page_cache": "warm (one discarded warm-up round; caches not dropped)" if args.warm_up else "as found",
        **summary,
        "raw": {
            kind: [
                {**run, "parts_s": {part: round(value, 4) for part, value in run["parts_s"].items()}}
                for run in kind_runs
            ]
            for kind, kind_runs in runs.items()
        },
    }
    print_table(summary, load_bytes)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
