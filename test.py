"""Smoke test of a running deployment: one generation, images saved, timings printed.

    python test.py --url http://localhost:8000 [--api-key KEY] [--prompt "..."] [--steps 25] [--out outputs]

Exits 0 when the worker answered with valid images, 1 (with the reason) otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import requests
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    """Call the worker once and check what comes back."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the worker's base URL")
    parser.add_argument("--api-key", help="sent as X-BANANA-API-KEY where the deployment asks for one")
    parser.add_argument("--prompt", default="a watercolour lighthouse on a cliff at dawn")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="outputs", help="folder for the images")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    headers = {"X-BANANA-API-KEY": args.api_key} if args.api_key else {}
    request = {"prompt": args.prompt, "num_inference_steps": args.steps, "seed": args.seed}
    started = time.perf_counter()
    try:
        response = requests.post(args.url.rstrip("/") + "/", json=request, headers=headers, timeout=args.timeout)
        body = response.json()
    except (requests.RequestException, ValueError) as err:
        print(f"FAIL: no JSON answer from {args.url}: {err.__class__.__name__}: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or "$error" in body:
        print(f"FAIL: HTTP {response.status_code}: {json.dumps(body.get('$error', body))[:500]}", file=sys.stderr)
        return 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in body.get("images", []):
        data = base64.b64decode(image["base64"])
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.verify()
        path = out / f"seed-{image['seed']}.{image['format'].replace('jpeg', 'jpg')}"
        path.write_bytes(data)
        print(f"saved {path} ({image['width']}x{image['height']})")
    if not body.get("images"):
        print("FAIL: the answer holds no images", file=sys.stderr)
        return 1
    print(f"round trip: {elapsed * 1000:.0f} ms; worker timings (ms): {json.dumps(body.get('$timings', {}))}")
    print(f"meta: {json.dumps(body.get('$meta', {}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
