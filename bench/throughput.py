"""Throughput under load: N concurrent clients against the server, with and without dynamic batching.

    python bench/throughput.py [--clients 1 4 16] [--batch 1 4] [--calls 16] [--size 256] [--steps 20]
                               [--rounds 2] [--threads 1] [--model-dir DIR] [--out FILE]

Starts one `python app.py` (SQLite store, one worker) per MAX_BATCH value, all at once, and warms each up.
Then, `--rounds` times, for each N and each server in turn, N client threads each send `--calls` / N direct
`POST /` calls one after another (same shape, each its own prompt and seed): a wave. The table gives, per
server and N, the median over rounds of the wave's images per second and of its p50 and p95 call latency,
and the mean number of jobs per batch the answers report (`$meta.batch_jobs`). Interleaving the servers'
waves keeps the comparison fair on a machine whose speed drifts. Without `--model-dir`
it bakes tiny-sd and runs on the CPU; give a full-size baked model on a GPU box for the figure that matters.
On a CPU the server's torch runs on `--threads` threads (default 1), leaving a core to HTTP, the queue and
encoding, as a GPU machine's CPU is left free while the GPU computes (bench/overhead.py says more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.jobs import KEY, start  # noqa: E402


def wave(url: str, clients: int, per_client: int, inputs: dict) -> dict:
    """`clients` threads, each sending `per_client` calls in a row; images/s, latency and batch sizes."""
    latencies: list[float] = []
    batches: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        session = requests.Session()
        for call in range(per_client):
            body = {**inputs, "prompt": f"a lighthouse, take {number}.{call}", "seed": number * 1000 + call}
            began = time.perf_counter()
            answer = session.post(url, json=body, headers={"X-BANANA-API-KEY": KEY}, timeout=600)
            took = time.perf_counter() - began
            with lock:
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                latencies.append(took)
                batches.append(answer.json()["$meta"]["batch_jobs"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} calls failed, first: {failures[0]}")
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "images": len(latencies),
        "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000, 1),
        "mean_batch_jobs": round(statistics.mean(batches), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="MAX_BATCH values to compare")
    parser.add_argument("--calls", type=int, default=16, help="calls in each wave, shared among its clients")
    parser.add_argument("--rounds", type=int, default=2, help="waves per configuration; the table gives medians")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads on a CPU")
    parser.add_argument("--model-dir", type=Path, help="a baked model (default: tiny-sd, baked now)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from sdworker.model import bake_model, read_manifest

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    model_dir = args.model_dir or bake_model("tiny-sd", work / "models").model_dir
    model_id = (read_manifest(model_dir) or {}).get("model_id", "tiny-sd")
    inputs = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "safety_checker": False}
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "MODE")}
    env.update(MODEL_ID=model_id, MODEL_DIR=str(model_dir), API_KEYS=KEY, HOST="127.0.0.1")
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(args.threads)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    waves: dict[tuple[int, int], list[dict]] = {}

    def summary() -> dict:
        """The report of the waves so far: written after each, so that a run cut short keeps what it measured."""
        rows = []
        for (max_batch, clients), results in waves.items():
            median = {
                key: round(statistics.median(r[key] for r in results), 3)
                for key in ("images_per_s", "p50_ms", "p95_ms")
            }
            batch_jobs = statistics.mean(r["mean_batch_jobs"] for r in results)
            rows.append({"max_batch": max_batch, "clients": clients, **median, "mean_batch_jobs": round(batch_jobs, 2)})
        rows.sort(key=lambda row: (row["max_batch"], row["clients"]))
        return {
            "machine": f"{os.cpu_count()} CPU cores, " + (gpu or "no GPU"),
            "model": model_id,
            "size": args.size,
            "steps": args.steps,
            "calls_per_wave": args.calls,
            "rounds": args.rounds,
            "waves": [{"max_batch": mb, "clients": c, **r} for (mb, c), results in waves.items() for r in results],
            "torch_threads": None if gpu else args.threads,
            "command": " ".join(["python", "bench/throughput.py", *sys.argv[1:]]),
            "rows": rows,
        }

    def save() -> None:
        if args.out:
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(summary(), indent=2) + "\n")
            partial.replace(args.out)

    servers = {}  # all up at once, so that their waves interleave and a slow spell of the machine hits all alike
    try:
        for max_batch in args.batch:
            servers[max_batch] = start({**env, "MAX_BATCH": str(max_batch), "DATA_DIR": str(work / f"d{max_batch}")})
            wave(servers[max_batch][0], 1, 1, inputs)  # warm-up
        for round_ in range(args.rounds):
            for clients in args.clients:
                for max_batch, (url, _) in servers.items():
                    result = wave(url, clients, max(1, args.calls // clients), inputs)
                    waves.setdefault((max_batch, clients), []).append(result)
                    print(json.dumps({"round": round_ + 1, "max_batch": max_batch, **result}), flush=True)
                    save()
    finally:
        for _, server in servers.values():
            server.kill()
            server.wait()
    rows = summary()["rows"]
    print(f"\n{'MAX_BATCH':>9}{'clients':>9}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'jobs/batch':>12}")
    for row in rows:
        print(
            f"{row['max_batch']:>9}{row['clients']:>9}{row['images_per_s']:>10.3f}{row['p50_ms']:>10.0f}"
            f"{row['p95_ms']:>10.0f}{row['mean_batch_jobs']:>12.2f}"
        )
    by_clients = {(row["max_batch"], row["clients"]): row["images_per_s"] for row in rows}
    base = min(args.batch)
    for max_batch in args.batch:
        if max_batch != base:
            for clients in args.clients:
                ratio = by_clients[(max_batch, clients)] / by_clients[(base, clients)]
                print(f"MAX_BATCH={max_batch} over MAX_BATCH={base} at {clients} clients: {ratio:.2f}x images/s")
    save()


if __name__ == "__main__":
    main()
