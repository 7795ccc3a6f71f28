"""Build the Docker image, and check it the way a user runs it.

    python docker/image.py build [--tag sd-worker] [--base-image IMAGE]    # make image
    python docker/image.py test  [--tag sd-worker:image-test] [--out FILE]  # make image-test

Both first make sure a Docker engine answers: where none does and this is root, `dockerd` is started (installed
with apt-get when missing) with no iptables and no bridge, and every build and container here uses the host's
network. Then the base: BASE_IMAGE (the Dockerfile's default unless given) is used if present or pullable, else
a stand-in is made with docker/standin-base.sh (Debian from its mirror, for machines without Docker Hub).

build: `docker build` with MODEL_ID, MODEL_REVISION and MODEL_VARIANT from the environment (else the Dockerfile
reads build_args.env) and the hub token (HF_TOKEN, or the one `huggingface-cli login` stored) as the build
secret HF_TOKEN.

test: builds MODEL_ID=tiny-sd with a random dummy HF_TOKEN secret, then checks, each a line of output:
- the build's bake saw the secret, and the secret is nowhere in the build log, `docker history`, the image's
  configuration or any byte of any layer (`docker save`);
- the image holds no tests, benchmarks or CI files, and its worker runs as a user other than root;
- `docker run` to the first image, split into container start, python start + imports, load and first image;
- /health lists the baked model's key (tiny-sd, not build_args.env's model);
- test.py passes: Banana start + long-polled check, a direct call, RunPod runsync;
- xformers' kernels load in the image (`python -m xformers.info`);
- `MODE=runpod` with `--test_input` completes its job;
- `TORCH_COMPILE=true` in an image built without a compiler refuses to start, naming COMPILE_TOOLS=1;
- `docker stop` ends the server cleanly (exit status 0) within the grace period.
It writes the image's size per layer, the cold start and the times of each phase to --out.
Exit status 0 when every check passes, 1 with `FAIL: ...` otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
STANDIN_BASE = "sd-worker-base:bookworm-py3.11"
STOP_GRACE_S = 10
PROMPT = "a watercolour lighthouse on a cliff at dawn"


class CheckError(Exception):
    """A check failed; the message is the one line printed."""


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The engine and the client
# --------------------------------------------------------------------------------------------------------------
class Docker:
    """A docker client that builds with BuildKit, talking to a running engine."""

    def __init__(self, path: str, env: dict[str, str]) -> None:
        self.path = path
        self.env = {**os.environ, **env}

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """`docker ARGS`, its output captured as text; a failure with `check` raises with the command's stderr."""
        result = subprocess.run([self.path, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CheckError(f"docker {' '.join(args[:3])} ... failed: {result.stderr.strip()[-500:]}")
        return result

    def answers(self) -> bool:
        return self.run("info", check=False, timeout=30).returncode == 0


def _clients() -> Iterator[str]:
    seen = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder, "docker")
        if path.is_file() and os.access(path, os.X_OK) and (real := path.resolve()) not in seen:
            seen.add(real)
            yield str(path)


def _buildkit_client() -> Docker | None:
    """The first docker client on PATH that builds with BuildKit: one with the buildx plugin, or one older than
    23.0, whose BuildKit is built in (Debian's docker.io 20.10)."""
    for path in _clients():
        if subprocess.run([path, "buildx", "version"], capture_output=True).returncode == 0:
            return Docker(path, {"DOCKER_BUILDKIT": "1"})
        version = subprocess.run([path, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        major = re.match(r"(\d+)\.", version.stdout.strip())
        if major and int(major.group(1)) < 23:
            return Docker(path, {"DOCKER_BUILDKIT": "1"})
    return None


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CheckError(f"{' and '.join(packages)} missing: install {' '.join(packages)} (as root), then run again")
    say(f"installing {' '.join(packages)} with apt-get")
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        if subprocess.run(command, env=quiet, capture_output=True).returncode != 0:
            raise CheckError(f"apt-get could not install {' '.join(packages)}")


def engine() -> Docker:
    """A BuildKit client and a running engine, started here when none answers."""
    docker = _buildkit_client()
    if docker is None or not shutil.which("dockerd"):
        _apt_install("docker.io")
        docker = _buildkit_client()
    if docker is None:
        raise CheckError("no docker client here builds with BuildKit: install the buildx plugin")
    if docker.answers():
        return docker
    if os.geteuid() != 0:
        raise CheckError("no Docker engine answers: start dockerd (or run this as root to have it started)")
    log = Path(tempfile.gettempdir(), "sd-worker-dockerd.log")
    say(f"starting dockerd (its log: {log.name} in the temp folder)")
    with log.open("ab") as out:
        subprocess.Popen(
            ["dockerd", "--iptables=false", "--bridge=none"], stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while not docker.answers():
        if time.monotonic() > deadline:
            raise CheckError(f"dockerd did not answer within 60 s: {log.read_text()[-500:]}")
        time.sleep(0.5)
    return docker


def default_base_image() -> str:
    """The Dockerfile's own BASE_IMAGE default."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    if not match:
        raise CheckError("the Dockerfile has no ARG BASE_IMAGE=... default")
    return match.group(1)


def base_image(docker: Docker, wanted: str | None) -> str:
    """`wanted` (default: the Dockerfile's) when it is here or can be pulled, else the stand-in, made if need be."""
    image = wanted or default_base_image()
    if docker.run("image", "inspect", image, check=False).returncode == 0:
        return image
    pulled = docker.run("pull", "-q", image, check=False, timeout=900)
    if pulled.returncode == 0:
        return image
    reason = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
    say(f"cannot pull {image} ({reason[:160]}); building on a stand-in base, {STANDIN_BASE}")
    if docker.run("image", "inspect", STANDIN_BASE, check=False).returncode != 0:
        made = subprocess.run(
            ["bash", str(ROOT / "docker" / "standin-base.sh"), STANDIN_BASE],
            env={**docker.env, "DOCKER": docker.path},
            timeout=1800,
        )
        if made.returncode != 0:
            raise CheckError("docker/standin-base.sh could not make the stand-in base")
    return STANDIN_BASE


def build(docker: Docker, tag: str, base: str, args: dict[str, str], token: str | None, log: Path) -> float:
    """`docker build` of the project; answers its seconds. The token goes in as the build secret HF_TOKEN."""
    command = ["build", "--network", "host", "--progress", "plain", "-t", tag, "--build-arg", f"BASE_IMAGE={base}"]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    env = dict(docker.env)
    env.pop("HF_TOKEN", None)
    if token:
        command += ["--secret", "id=HF_TOKEN,env=HF_TOKEN"]
        env["HF_TOKEN"] = token
    say(f"docker build -t {tag} on {base} ({', '.join(f'{k}={v}' for k, v in args.items()) or 'build_args.env'})")
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run([docker.path, *command, str(ROOT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise CheckError(f"docker build failed after {seconds:.0f} s:\n{tail}")
    return seconds


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------
def secret_absent(docker: Docker, tag: str, token: str, build_log: str) -> float:
    """The bake saw the secret; the secret is in no build log line, no history, no config and no layer byte."""
    if "HF_TOKEN given" not in build_log:
        raise CheckError("download.py did not see the HF_TOKEN build secret, so its absence proves nothing")
    places = {
        "the build log": build_log,
        "docker history": docker.run("history", "--no-trunc", tag).stdout,
        "the image's configuration": docker.run("image", "inspect", tag).stdout,
    }
    for place, text in places.items():
        if token in text:
            raise CheckError(f"the HF_TOKEN build secret is in {place}")
    started = time.monotonic()
    needle = token.encode()
    save = subprocess.Popen([docker.path, "save", tag], stdout=subprocess.PIPE, env=docker.env)
    tail, scanned = b"", 0
    assert save.stdout is not None
    while chunk := save.stdout.read(16 * 2**20):
        if needle in tail + chunk:
            save.kill()
            raise CheckError(f"the HF_TOKEN build secret is in the image's layers (byte {scanned})")
        scanned += len(chunk)
        tail = chunk[-len(needle) :]
    if save.wait() != 0 or scanned == 0:
        raise CheckError("docker save failed: the layers were not scanned")
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_at(docker: Docker, container: str) -> float:
    """The container's State.StartedAt as a Unix time (Docker gives nanoseconds; Python parses microseconds)."""
    stamp = docker.run("inspect", "--format", "{{.State.StartedAt}}", container).stdout.strip()
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def serve_and_measure(docker: Docker, tag: str, name: str, port: int, key: str) -> dict[str, float]:
    """`docker run` the server, wait for /health, make the first image; answer the cold start's parts in s."""
    launched = time.time()
    docker.run("run", "-d", "--name", name, "--network", "host", "-e", f"API_KEYS={key}", "-e", f"PORT={port}", tag)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if docker.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            raise CheckError(f"the container exited before /health answered:\n{container_log(docker, name)}")
        if time.monotonic() > deadline:
            raise CheckError(f"/health did not answer 200 within 300 s:\n{container_log(docker, name)}")
        time.sleep(0.05)
    ready = time.time()
    inputs = {"prompt": PROMPT, "num_inference_steps": 20, "seed": 1, "safety_checker": False}
    answer = requests.post(f"{url}/", json=inputs, headers={"X-BANANA-API-KEY": key}, timeout=300)
    first = time.time()
    body = answer.json()
    if answer.status_code != 200 or not body.get("images"):
        raise CheckError(f"the first direct call answered HTTP {answer.status_code}: {str(body)[:300]}")
    process_start = started_at(docker, name)
    load = body["$timings"]["init"] / 1000
    return {
        "container_start": process_start - launched,
        "python_start_and_imports": ready - process_start - load,
        "load": load,
        "first_image": first - ready,
        "total": first - launched,
    }


def container_log(docker: Docker, name: str) -> str:
    result = docker.run("logs", "--tail", "30", name, check=False)
    return (result.stdout + result.stderr).strip()


def layers(docker: Docker, tag: str) -> list[dict[str, Any]]:
    """Each layer that holds bytes, newest first: its size and the step that made it."""
    rows = docker.run("history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", tag)
    found = []
    for line in rows.stdout.splitlines():
        size, _, step = line.partition("\t")
        if int(size or 0) > 0:
            found.append({"bytes": int(size), "step": " ".join(step.split())[:160]})
    return found


def test(args: argparse.Namespace) -> int:
    """Build the tiny-sd image with a dummy secret and run every check on it; write the figures."""
    phases: dict[str, float] = {}
    marks = time.monotonic()

    def phase(name: str) -> None:
        nonlocal marks
        phases[name] = round(time.monotonic() - marks, 2)
        marks = time.monotonic()

    docker = engine()
    phase("engine")
    base = base_image(docker, args.base_image)
    phase("base")
    token = f"hf_dummy{secrets.token_hex(16)}"
    build_log = Path(tempfile.mkdtemp(prefix="sd-worker-image-")) / "build.log"
    # REBAKE: the bake runs again with this run's secret, whatever Docker's cache holds from earlier runs.
    build_args = {"MODEL_ID": "tiny-sd", "REBAKE": secrets.token_hex(4)}
    build_s = build(docker, args.tag, base, build_args, token, build_log)
    phase("build")
    say(f"ok: built in {build_s:.0f} s")
    scan_s = secret_absent(docker, args.tag, token, build_log.read_text())
    say(f"ok: the HF_TOKEN secret reached the bake and is in no log, history, config or layer ({scan_s:.0f} s scan)")
    size = int(docker.run("image", "inspect", "--format", "{{.Size}}", args.tag).stdout)
    found = layers(docker, args.tag)
    listing = docker.run("run", "--rm", "--network", "host", args.tag, "sh", "-c", "id -u; ls -A /app").stdout.split()
    uid, files = listing[0], set(listing[1:])
    unwanted = files & {"tests", "bench", "docker", ".ci", ".git", "node_modules", "Makefile", "requirements-dev.txt"}
    if unwanted or uid == "0":
        raise CheckError(f"the image holds {sorted(unwanted)} or runs as root (uid {uid})")
    say(f"ok: {size / 1e9:.2f} GB in {len(found)} layers; /app holds {sorted(files)}; the worker runs as uid {uid}")
    phase("inspect")

    name = f"sd-worker-test-{secrets.token_hex(4)}"
    port, key = free_port(), secrets.token_urlsafe(16)
    try:
        cold = serve_and_measure(docker, args.tag, name, port, key)
        say("ok: cold start " + ", ".join(f"{part} {seconds:.2f} s" for part, seconds in cold.items()))
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        if health.get("model_keys") != ["tiny-sd"]:
            raise CheckError(f"/health lists model keys {health.get('model_keys')}, not the baked model's tiny-sd")
        with tempfile.TemporaryDirectory() as out:
            client = [sys.executable, str(ROOT / "test.py"), "--url", f"http://127.0.0.1:{port}", "--api-key", key]
            smoke = subprocess.run(
                [*client, "--steps", "4", "--timeout", "120", "--out", out],
                capture_output=True,
                text=True,
                timeout=600,
            )
        if smoke.returncode != 0:
            raise CheckError(f"test.py against the container: {smoke.stderr.strip()}")
        say(f"ok: model key tiny-sd; test.py: {smoke.stdout.strip().splitlines()[-1]}")
        info = docker.run("exec", name, "python", "-m", "xformers.info")
        if "can't load C++/CUDA extensions" in info.stderr or not re.search(r"cutlassF\S*:\s+available", info.stdout):
            raise CheckError(f"xformers' kernels do not load in the image: {info.stderr.strip()[-400:]}")
        say("ok: xformers' CUDA kernels load (cutlass and flash-attention 2 listed available)")
        stop_started = time.monotonic()
        docker.run("stop", "-t", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
        stop_s = time.monotonic() - stop_started
        code = docker.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        if code != "0" or stop_s >= STOP_GRACE_S:
            raise CheckError(f"docker stop took {stop_s:.1f} s and the server exited with {code} (killed: 137)")
        say(f"ok: docker stop ended the server in {stop_s:.1f} s with exit status 0")
    finally:
        docker.run("rm", "-f", name, check=False)
    phase("serve")

    job = json.dumps({"input": {"prompt": PROMPT, "num_inference_steps": 2, "seed": 3}})
    runpod = docker.run(
        "run", "--rm", "--network", "host", "-e", "MODE=runpod", args.tag, "python", "-u", "app.py",
        "--test_input", job, check=False, timeout=300,
    )  # fmt: skip
    logged = runpod.stdout + runpod.stderr
    if runpod.returncode != 0 or "Job local_test completed successfully" not in logged:
        raise CheckError(f"MODE=runpod --test_input exited {runpod.returncode}:\n{logged[-1500:]}")
    say("ok: MODE=runpod --test_input completed its job")
    refused = docker.run(
        "run", "--rm", "--network", "host", "-e", "TORCH_COMPILE=true", "-e", "API_KEYS=k", args.tag,
        check=False, timeout=300,
    )  # fmt: skip
    if refused.returncode == 0 or "COMPILE_TOOLS=1" not in refused.stdout + refused.stderr:
        raise CheckError(f"TORCH_COMPILE=true without a compiler exited {refused.returncode} without saying why")
    say("ok: TORCH_COMPILE=true without COMPILE_TOOLS=1 refuses to start and names the build argument")
    phase("runpod")

    figures = {
        "command": "python docker/image.py test" + (f" --base-image {args.base_image}" if args.base_image else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "docker": docker.run("version", "--format", "{{.Server.Version}}").stdout.strip(),
        "base_image": base,
        "model_id": "tiny-sd",
        "image_bytes": size,
        "layers": found,
        "cold_start_s": {part: round(seconds, 3) for part, seconds in cold.items()},
        "docker_stop_s": round(stop_s, 2),
        "phases_s": phases,
        "note": "CPU, no GPU: the cold start is of the tiny-sd random-weight model in fp32.",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        say(f"wrote {args.out}")
    say("PASS: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items()))
    return 0


def build_command(args: argparse.Namespace) -> int:
    """`make image`: the model of the environment or build_args.env, the hub token as the build secret."""
    from huggingface_hub import get_token

    docker = engine()
    base = base_image(docker, args.base_image)
    names = ("MODEL_ID", "MODEL_REVISION", "MODEL_VARIANT", "REBAKE")
    build_args = {n: os.environ[n] for n in names if os.environ.get(n)}
    log = Path(tempfile.mkdtemp(prefix="sd-worker-image-")) / "build.log"
    seconds = build(docker, args.tag, base, build_args, get_token(), log)
    size = int(docker.run("image", "inspect", "--format", "{{.Size}}", args.tag).stdout)
    baked = [line for line in log.read_text().splitlines() if " baked " in line or "already baked" in line]
    what = f"; {baked[-1].split(' ', 2)[-1]}" if baked else ""
    say(f"built {args.tag} in {seconds:.0f} s: {size / 1e9:.2f} GB{what}")
    say(f"run it: docker run --gpus all -p 8000:8000 -e API_KEYS=your-secret-key {args.tag}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, tag in (("build", "sd-worker"), ("test", "sd-worker:image-test")):
        each = sub.add_parser(command)
        each.add_argument("--tag", default=tag, help=f"the image's tag (default {tag})")
        each.add_argument("--base-image", help="BASE_IMAGE (default: the Dockerfile's, else the stand-in)")
    sub.choices["test"].add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    try:
        return test(args) if args.command == "test" else build_command(args)
    except CheckError as failure:
        say(f"FAIL: {failure}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
