"""Smoke test of a running deployment: one generation through each API, images checked and saved, timings printed.

    python test.py --url http://localhost:8000 --api-key KEY [--model-key KEY] [--prompt "..."] [--steps 25]
                   [--seed 42] [--out outputs] [--timeout 600]
    python test.py --split ENCODE_URL DENOISE_URL DECODE_URL --api-key KEY [...]
    python test.py ... --image photo.png [--strength 0.6]          # img2img instead of text-to-image

It calls the worker three ways, as the clients in the wild do:
  1. Banana v4: POST /start/v4/ (startOnly), then POST /check/v4/ with longPoll until the call is done;
  2. a direct call: POST / with the key in X-BANANA-API-KEY;
  3. RunPod v2: POST /v2/{model-key}/runsync, then GET /v2/{model-key}/status/{id} while the job is still
     running when runsync answers (it waits RUNSYNC_WAIT_S, 90 s by default).
The model key is --model-key, else the first one GET /health lists. With --split it instead runs seed 001's three
stages, each on its own worker (STAGES=encode, denoise, decode; or one URL three times), and prints the bytes each
stage sends and receives. With --image each call is img2img from that picture (through the stages: the decode
worker's /stages/encode_image first, whose image latents go to denoise).

Exits 0 when every call answered with valid images, 1 with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image

BANANA_PENDING = ("", "running")
RUNPOD_PENDING = ("IN_QUEUE", "IN_PROGRESS")
POLL_INTERVAL_S = 0.5


class SmokeError(Exception):
    """A check failed; the message is the one line printed before exiting."""


@dataclass
class StepResult:
    """What one API call (or start and poll) took and gave back."""

    name: str
    round_trip_s: float
    output: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)


@dataclass
class Client:
    """The deployment under test: its base URL, the API key, and how long each step may take."""

    url: str
    api_key: str
    timeout: float
    session: requests.Session = field(default_factory=requests.Session)

    def call(self, method: str, path: str, deadline: float, **kwargs: Any) -> tuple[int, Any]:
        """Send one request and answer (HTTP status, JSON body); no answer or a non-JSON one is a failure."""
        url = self.url + path
        timeout = max(1.0, deadline - time.monotonic())
        try:
            response = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.Timeout:
            raise SmokeError(f"{method} {path}: no answer within {timeout:.0f} s") from None
        except requests.ConnectionError:
            raise SmokeError(f"cannot reach {self.url} ({method} {path}): is the server up at that URL?") from None
        except requests.RequestException as err:
            raise SmokeError(f"{method} {path}: {type(err).__name__}: {err}") from None
        try:
            return response.status_code, response.json()
        except ValueError:
            snippet = " ".join(response.text.split())[:200]
            raise SmokeError(f"{method} {path}: HTTP {response.status_code}, not JSON: {snippet!r}") from None


def describe_error(status: int, body: Any) -> str:
    """A failed answer as one line: the HTTP status and the worker's $error (code, message, field)."""
    error = body.get("$error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"HTTP {status}: {str(body)[:300]}"
    where = f" (field {error['field']})" if error.get("field") else ""
    reason = f"HTTP {status} {error.get('code', 'ERROR')}: {error.get('message', '')}{where}"
    if status == 401:
        reason = f"the server refused the API key: {reason}"
    return reason


def model_key_from_health(client: Client) -> str:
    """The first model key GET /health lists; a loading server (503) lists them too."""
    deadline = time.monotonic() + min(client.timeout, 30)
    status, body = client.call("GET", "/health", deadline)
    keys = body.get("model_keys") if isinstance(body, dict) else None
    if status not in (200, 503) or not keys:
        raise SmokeError(f"GET /health answered HTTP {status} without model_keys; pass --model-key")
    note = "" if status == 200 else " (the calls below wait while it loads its model)"
    print(f"health: {body.get('status')}; model keys {keys}{note}")
    return keys[0]


def banana(client: Client, model_key: str, inputs: dict[str, Any]) -> StepResult:
    """Banana v4: start the call with startOnly, then long-poll check/v4 until it succeeds or fails."""
    started = time.monotonic()
    deadline = started + client.timeout
    body = {
        "id": str(uuid.uuid4()),
        "created": int(time.time()),
        "apiKey": client.api_key,
        "modelKey": model_key,
        "modelInputs": inputs,
        "startOnly": True,
    }
    status, answer = client.call("POST", "/start/v4/", deadline, json=body)
    start_s = time.monotonic() - started
    message = banana_message("start/v4", status, answer)
    call_id = answer.get("callID")
    if not call_id:
        raise SmokeError(f"start/v4 answered {message!r} without a callID")
    checks = 0
    while message in BANANA_PENDING:
        if time.monotonic() >= deadline:
            raise SmokeError(f"banana call {call_id} still {answer.get('status')} after {client.timeout:g} s")
        check = {
            "id": str(uuid.uuid4()),
            "created": int(time.time()),
            "apiKey": client.api_key,
            "modelKey": model_key,
            "callID": call_id,
            "longPoll": True,
        }
        status, answer = client.call("POST", "/check/v4/", deadline, json=check)
        message = banana_message("check/v4", status, answer)
        checks += 1
    outputs = answer.get("modelOutputs")
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
        raise SmokeError(f"check/v4 answered success for {call_id} without modelOutputs[0]")
    notes = [f"callID {call_id}", f"start {start_s * 1000:.0f} ms", f"{checks} long-poll check(s)"]
    return StepResult("banana", time.monotonic() - started, outputs[0], notes)


def banana_message(route: str, status: int, answer: Any) -> str:
    """The `message` of a Banana answer; an HTTP error or a message saying "error" is a failure."""
    if status != 200 or not isinstance(answer, dict) or "message" not in answer:
        raise SmokeError(f"{route}: {describe_error(status, answer)}")
    message = str(answer["message"])
    if message == "error: invalid apiKey":
        raise SmokeError(f"the server refused the API key ({route}: {message})")
    if "error" in message.lower():
        raise SmokeError(f"{route}: {message}")
    if message not in (*BANANA_PENDING, "success"):
        raise SmokeError(f"{route}: unexpected message {message!r}")
    return message


def direct(client: Client, inputs: dict[str, Any]) -> StepResult:
    """A direct call: POST / with the key in X-BANANA-API-KEY, answered when the image is made."""
    started = time.monotonic()
    headers = {"X-BANANA-API-KEY": client.api_key}
    status, answer = client.call("POST", "/", started + client.timeout, json=inputs, headers=headers)
    if status != 200 or not isinstance(answer, dict) or "$error" in answer:
        raise SmokeError(f"POST /: {describe_error(status, answer)}")
    return StepResult("direct", time.monotonic() - started, answer)


def runpod(client: Client, model_key: str, inputs: dict[str, Any]) -> StepResult:
    """RunPod v2: /runsync, then poll /status while the job is not yet final (COMPLETED or a failure)."""
    started = time.monotonic()
    deadline = started + client.timeout
    headers = {"Authorization": f"Bearer {client.api_key}"}
    base = f"/v2/{model_key}"
    status, answer = client.call("POST", f"{base}/runsync", deadline, json={"input": inputs}, headers=headers)
    if status != 200 or not isinstance(answer, dict) or not answer.get("id"):
        raise SmokeError(f"POST {base}/runsync: {describe_error(status, answer)}")
    job_id, polls = answer["id"], 0
    while answer.get("status") in RUNPOD_PENDING:
        if time.monotonic() >= deadline:
            raise SmokeError(f"runpod job {job_id} still {answer['status']} after {client.timeout:g} s")
        time.sleep(POLL_INTERVAL_S)
        status, answer = client.call("GET", f"{base}/status/{job_id}", deadline, headers=headers)
        if status != 200 or not isinstance(answer, dict):
            raise SmokeError(f"GET {base}/status/{job_id}: {describe_error(status, answer)}")
        polls += 1
    if answer.get("status") != "COMPLETED":
        reason = answer.get("error") or "no error given"
        raise SmokeError(f"runpod job {job_id} ended {answer.get('status')}: {reason}")
    if not isinstance(answer.get("output"), dict):
        raise SmokeError(f"runpod job {job_id} is COMPLETED without an output")
    notes = [f"job {job_id}", f"{polls} status poll(s)"]
    notes += [f"{name} {answer[key]} ms" for name, key in (("queued", "delayTime"), ("ran", "executionTime"))]
    return StepResult("runpod", time.monotonic() - started, answer["output"], notes)


# What each stage takes of what the earlier ones answered.
TAKES = {"encode": (), "encode_image": (), "denoise": ("embeddings", "image_latents"), "decode": ("latents",)}


def split(urls: list[str], api_key: str, timeout: float, inputs: dict[str, Any]) -> StepResult:
    """Seed 001's stages: POST /stages/encode, /stages/denoise and /stages/decode, on three workers; with an image,
    /stages/encode_image on the decode worker (the VAE's) before denoise."""
    started = time.monotonic()
    headers = {"X-BANANA-API-KEY": api_key}
    notes, answer = [], {}
    encode_url, denoise_url, decode_url = urls
    calls = [(encode_url, "encode", {"prompt": inputs["prompt"]}, "embeddings")]
    if "image" in inputs:
        calls.append((decode_url, "encode_image", {"image": inputs["image"]}, "image_latents"))
    generation = {key: value for key, value in inputs.items() if key not in ("prompt", "image")}
    calls += [(denoise_url, "denoise", generation, "latents"), (decode_url, "decode", {}, None)]
    carried: dict[str, Any] = {}
    for url, stage, body, produces in calls:
        client = Client(url=url.rstrip("/"), api_key=api_key, timeout=timeout)
        sent = {**body, **{name: carried[name] for name in TAKES[stage] if name in carried}}
        step_started = time.monotonic()
        status, answer = client.call("POST", f"/stages/{stage}", step_started + timeout, json=sent, headers=headers)
        if status != 200 or not isinstance(answer, dict) or "$error" in answer:
            raise SmokeError(f"POST {url}/stages/{stage}: {describe_error(status, answer)}")
        size_in, size_out = len(json.dumps(sent)), len(json.dumps(answer))
        notes.append(f"{stage} {size_in} B in, {size_out} B out, {(time.monotonic() - step_started) * 1000:.0f} ms")
        if produces:
            carried[produces] = answer[produces]
    return StepResult("split", time.monotonic() - started, answer, notes)


def read_image(path: Path) -> str:
    """The picture at `path` as base64, once Pillow has read it as an image."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (OSError, SyntaxError) as err:
        raise SmokeError(f"--image {path}: not a readable picture: {type(err).__name__}: {err}") from None
    return base64.b64encode(data).decode("ascii")


def save_images(step: StepResult, out: Path) -> None:
    """Check each image of the answer decodes to the size it claims, and save it under `out`."""
    images = step.output.get("images")
    if "$error" in step.output:
        raise SmokeError(f"{step.name}: {describe_error(200, step.output)}")
    if not isinstance(images, list) or not images:
        raise SmokeError(f"{step.name}: the answer holds no images")
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        try:
            data = base64.b64decode(image["base64"], validate=True)
            with Image.open(io.BytesIO(data)) as decoded:
                size = decoded.size
                decoded.verify()
        except (KeyError, TypeError, binascii.Error, OSError, SyntaxError) as err:
            raise SmokeError(f"{step.name}: image {index} does not decode: {type(err).__name__}: {err}") from None
        claimed = (image.get("width"), image.get("height"))
        if size != claimed:
            raise SmokeError(f"{step.name}: image {index} is {size[0]}x{size[1]}, the answer says {claimed}")
        extension = str(image.get("format", "png")).replace("jpeg", "jpg")
        path = out / f"{step.name}-{index}-seed-{image.get('seed')}.{extension}"
        path.write_bytes(data)
        step.saved.append(path)


def report(step: StepResult) -> None:
    """Print one step: round trip, the worker's own timings, and where its images went."""
    timings = step.output.get("$timings") or {}
    worker = ", ".join(f"{name} {value}{'' if name.endswith('bytes') else ' ms'}" for name, value in timings.items())
    worker = worker or "none reported"
    print(f"{step.name}: round trip {step.round_trip_s * 1000:.0f} ms" + "".join(f"; {note}" for note in step.notes))
    print(f"  worker timings: {worker}")
    for path in step.saved:
        print(f"  saved {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the worker's base URL")
    parser.add_argument(
        "--split", nargs=3, metavar=("ENCODE_URL", "DENOISE_URL", "DECODE_URL"), help="run seed 001's three stages"
    )
    parser.add_argument("--api-key", required=True, help="one of the server's API_KEYS")
    parser.add_argument("--model-key", help="model key for Banana's modelKey and RunPod's /v2/{key}; default: /health")
    parser.add_argument("--prompt", default="a watercolour lighthouse on a cliff at dawn")
    parser.add_argument("--steps", type=int, default=25, help="num_inference_steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--image", type=Path, help="img2img from this picture (PNG, JPEG, WebP) instead of text only")
    parser.add_argument("--strength", type=float, help="with --image: how far from it (0 to 1; the worker's default)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds each of the three calls may take (at least the server's RUNSYNC_WAIT_S, 90 s by default)",
    )
    args = parser.parse_args(argv)
    if args.strength is not None and args.image is None:
        parser.error("--strength is img2img's: give --image too")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the three calls in turn; stop at the first failure with its reason."""
    args = parse_args(argv)
    client = Client(url=args.url.rstrip("/"), api_key=args.api_key, timeout=args.timeout)
    inputs: dict[str, Any] = {"prompt": args.prompt, "num_inference_steps": args.steps, "seed": args.seed}
    started = time.monotonic()
    try:
        if args.image:
            inputs["image"] = read_image(args.image)
            if args.strength is not None:
                inputs["strength"] = args.strength
        if args.split:
            steps: list[Callable[[], StepResult]] = [lambda: split(args.split, args.api_key, args.timeout, inputs)]
        else:
            model_key = args.model_key or model_key_from_health(client)
            steps = [
                lambda: banana(client, model_key, inputs),
                lambda: direct(client, inputs),
                lambda: runpod(client, model_key, inputs),
            ]
        saved = 0
        for step in steps:
            result = step()
            save_images(result, args.out)
            report(result)
            saved += len(result.saved)
    except SmokeError as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("FAIL: interrupted", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    what = "the three stages" if args.split else f"{len(steps)} APIs"
    print(f"PASS: {what} answered; {saved} image(s) saved in {args.out}; {elapsed:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
