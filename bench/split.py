"""Seed 001's split stages: bytes on the wire per stage, and the split's overhead over an all-in-one call.

    python bench/split.py [--rounds 10] [--size 256] [--steps 20] [--threads 1] [--inpaint] [--out FILE]

Bakes tiny-sd and starts `python app.py` (all stages served) once. Each round times, one after the other, a
direct `POST /` and encode -> denoise -> decode through `/stages/*` with the same inputs (safety checker off on
both; with --inpaint, an image and a mask, which the split sends through encode_image first), and records the
JSON bytes each stage sends and receives. Prints the medians and the split's ratio to the
direct call. tiny-sd's text embeddings are 32 wide; the bytes the real models' tensors take (fp16, base64) are
computed from their shapes beside the measured ones.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
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

REAL = {  # tensors (shape, bytes per value) seed 001's stages carry for one 512 (SD 1.5) or 1024 (SDXL) image, fp16
    "sd1.5 512x512": {
        "embeddings": [((1, 77, 768), 2), ((1, 77, 768), 2)],
        "latents": [((1, 4, 64, 64), 2)],
        "inpaint image_latents": [((1, 8, 64, 64), 2), ((1, 8, 64, 64), 2), ((1, 1, 64, 64), 1)],
    },
    "sdxl 1024x1024": {
        "embeddings": [((1, 77, 2048), 2), ((1, 77, 2048), 2), ((1, 1280), 2), ((1, 1280), 2)],
        "latents": [((1, 4, 128, 128), 2)],
        # SDXL's pipelines encode images with the VAE upcast to float32
        "inpaint image_latents": [((1, 8, 128, 128), 4), ((1, 8, 128, 128), 4), ((1, 1, 128, 128), 1)],
    },
}


def base64_bytes(tensors: list[tuple[tuple[int, ...], int]]) -> int:
    """`tensors` (shape, bytes per value) as base64 (the safetensors header aside)."""
    raw = sum(size * math.prod(shape) for shape, size in tensors)
    return (raw + 2) // 3 * 4


def png(size: int, mask: bool) -> str:
    """A test image (a gradient) or mask (a white square in the middle) as base64 PNG."""
    from PIL import Image

    if mask:
        image = Image.new("L", (size, size), 0)
        image.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    else:
        image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--inpaint", action="store_true", help="inpaint an image instead of text-to-image")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sdworker.model import bake_model

    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    model_dir = bake_model("tiny-sd", work / "models").model_dir
    url, server = start_tiny(model_dir, work, args.threads)
    session = requests.Session()
    headers = {"X-BANANA-API-KEY": KEY}
    shape = {"num_inference_steps": args.steps, "width": args.size, "height": args.size, "seed": 1}
    prompt = "a lighthouse on a cliff at dawn"
    wire: dict[str, list[int]] = {}

    def post(path: str, body: dict) -> dict:
        answer = session.post(f"{url}{path}", json=body, headers=headers, timeout=300)
        assert answer.status_code == 200, answer.text
        wire[path] = [len(json.dumps(body)), len(answer.content)]
        return answer.json()

    image = {"image": png(args.size, False), "mask_image": png(args.size, True)} if args.inpaint else {}

    def direct() -> None:
        post("/", {"prompt": prompt, **shape, **image, "safety_checker": False})

    def split() -> None:
        embeddings = post("/stages/encode", {"prompt": prompt})["embeddings"]
        carried = {}
        if image:
            carried = {"image_latents": post("/stages/encode_image", image)["image_latents"]}
        latents = post("/stages/denoise", {"embeddings": embeddings, **shape, **carried})["latents"]
        post("/stages/decode", {"latents": latents, "safety_checker": False})

    times: dict[str, list[float]] = {"direct": [], "split": []}
    try:
        for round_ in range(args.rounds + 1):
            for name, call in (("direct", direct), ("split", split)):
                began = time.perf_counter()
                call()
                if round_:  # round 0 warms up
                    times[name].append(time.perf_counter() - began)
    finally:
        server.kill()
        server.wait()
    ratio = statistics.median(s / d for s, d in zip(times["split"], times["direct"], strict=True))
    report = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "model": "tiny-sd",
        "task": "inpaint" if args.inpaint else "text2img",
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "command": " ".join(["python", "bench/split.py", *sys.argv[1:]]),
        "median_ms": {name: round(statistics.median(values) * 1000, 1) for name, values in times.items()},
        "split_over_direct": round(ratio, 3),
        "bytes_in_out": {path: sizes for path, sizes in wire.items() if path != "/"},
        "real_model_tensor_bytes_base64": {
            model: {name: base64_bytes(shapes) for name, shapes in tensors.items()} for model, tensors in REAL.items()
        },
        "rounds_ms": {name: [round(value * 1000, 1) for value in values] for name, values in times.items()},
    }
    print(json.dumps({key: value for key, value in report.items() if key != "rounds_ms"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
