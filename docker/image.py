"""Build the Docker image, and check it the way a user runs it.

    python docker/image.py build [--tag sd-worker] [--base-image IMAGE|standin]   # make image
    python docker/image.py test  [--tag sd-worker:image-test] [--out FILE]         # make image-test

Both first need a Docker engine and a client that builds with BuildKit. Where no engine answers and this is
root, `dockerd` is started (Debian's docker.io installed with apt-get when missing) with no iptables and no
bridge; every build and container here uses the host's network.

build: `docker build` on BASE_IMAGE (the Dockerfile's default unless given; `standin` for the stand-in below),
with MODEL_ID, MODEL_REVISION, MODEL_VARIANT, MODEL_CONFIG, MODEL_SHA256, ALLOW_PICKLE, BAKE_DTYPE, LORAS, EMBEDDINGS,
REFINER_ID, REBAKE from the environment (else the Dockerfile reads build_args.env) and the hub token (HF_TOKEN,
or the one `hf auth login` stored) as the build secret HF_TOKEN.

test: builds MODEL_ID=tiny-sd with a random dummy HF_TOKEN secret, on the default base if it can be pulled,
else on a stand-in made by docker/standin-base.sh (Debian from its mirror, for machines without Docker Hub),
then checks, each a line of output:
- the build's bake saw the secret, and the secret is nowhere in the build log, `docker history`, the image's
  configuration or any byte of any layer (`docker save`, compressed layers decompressed);
- the image holds no tests, benchmarks or CI files, and its worker runs as a user other than root;
- `docker run` to the first image, split into container start, the start before the load, load, first image;
- /health lists the baked model's key (tiny-sd, not build_args.env's model);
- test.py passes: Banana start + long-polled check, a direct call, RunPod runsync;
- xformers' kernels load in the image (`python -m xformers.info`);
- `docker stop` ends the server cleanly (exit status 0) within the grace period;
- `MODE=runpod` with `--test_input` completes its job;
- `TORCH_COMPILE=true` in an image built without a compiler refuses to start, naming COMPILE_TOOLS=1.
It writes the image's size per layer, the cold start and the time of each phase to --out.
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
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import requests

ROOT = Path(__file__).resolve().parent.parent
STANDIN_BASE = "sd-worker-base:bookworm-py3.11"
STOP_GRACE_S = 10
BUILD_TIMEOUT_S = 3600
PROMPT = "a watercolour lighthouse on a cliff at dawn"


class CheckError(Exception):
    """A check failed; the message is the one line printed."""


def say(message: str) -> None:
    """Print one line now (the checks take minutes; each line is progress)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The engine, the client and the base
# --------------------------------------------------------------------------------------------------------------
class Docker:
    """A docker client that builds with BuildKit, talking to a running engine."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """`docker ARGS`, its output captured as text; a failure with `check`, or a timeout, is a CheckError."""
        try:
            result = subprocess.run([self.path, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckError(f"docker {' '.join(args[:3])} ... gave no answer within {timeout:.0f} s") from None
        if check and result.returncode != 0:
            raise CheckError(f"docker {' '.join(args[:3])} ... failed: {result.stderr.strip()[-500:]}")
        return result

    def answers(self) -> bool:
        """Whether an engine answers this client."""
        return self.run("info", check=False, timeout=30).returncode == 0

    def image_bytes(self, tag: str) -> int:
        """The image's size on disk, all layers."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout)


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
            return Docker(path)
        version = subprocess.run([path, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
        major = re.match(r"(\d+)\.", version.stdout.strip())
        if major and int(major.group(1)) < 23:
            return Docker(path)
    return None


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CheckError(f"{' and '.join(packages)} missing: install {' '.join(packages)} (as root), then run again")
    say(f"installing {' '.join(packages)} with apt-get")
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        if subprocess.run(command, env=quiet, capture_output=True, timeout=1200).returncode != 0:
            raise CheckError(f"apt-get could not install {' '.join(packages)}")


def engine() -> Docker:
    """A BuildKit client and a running engine: the ones here if they answer, else dockerd started here."""
    docker = _buildkit_client()
    if docker is not None and docker.answers():
        return docker  # Docker Desktop, a remote DOCKER_HOST, rootless Docker, a system dockerd
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


def _available(docker: Docker, image: str) -> str | None:
    """None when `image` is here or could be pulled, else why not (one line)."""
    if docker.run("image", "inspect", image, check=False).returncode == 0:
        return None
    pulled = docker.run("pull", "-q", image, check=False, timeout=1800)
    return None if pulled.returncode == 0 else (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]


def standin_base(docker: Docker) -> str:
    """The stand-in base, made by docker/standin-base.sh unless it is here already."""
    if docker.run("image", "inspect", STANDIN_BASE, check=False).returncode != 0:
        say(f"making the stand-in base {STANDIN_BASE} from Debian's mirror")
        made = subprocess.run(
            ["bash", str(ROOT / "docker" / "standin-base.sh"), STANDIN_BASE],
            env={**docker.env, "DOCKER": docker.path},
            timeout=1800,
        )
        if made.returncode != 0:
            raise CheckError("docker/standin-base.sh could not make the stand-in base")
    return STANDIN_BASE


def build(docker: Docker, tag: str, base: str, args: dict[str, str], token: str | None, log: Path) -> float:
    """`docker build` of the project; answers its seconds. The token goes in as the build secret HF_TOKEN, through
    the client's environment (never its arguments, which `ps` shows)."""
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
        try:
            result = subprocess.run(
                [docker.path, *command, str(ROOT)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise CheckError(f"docker build did not end within {BUILD_TIMEOUT_S} s") from None
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise CheckError(f"docker build failed after {seconds:.0f} s:\n{tail}")
    return seconds


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------
def _contains(stream: IO[bytes], needle: bytes) -> bool:
    """Whether `needle` is in the stream, read in chunks (a match across two chunks counts); a gzip stream is
    searched decompressed. zstd layers (containerd's image store may write them) cannot be searched here."""
    head = stream.read(4)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise CheckError("the engine saves zstd-compressed layers, which this check cannot search")
    gzip = 16 + zlib.MAX_WBITS
    inflate = zlib.decompressobj(gzip) if head.startswith(b"\x1f\x8b") else None
    tail, chunk = b"", head
    while chunk:
        data = inflate.decompress(chunk) if inflate else chunk
        while inflate and inflate.eof and inflate.unused_data:  # a gzip of several members
            rest, inflate = inflate.unused_data, zlib.decompressobj(gzip)
            data += inflate.decompress(rest)
        if needle in tail + data:
            return True
        tail = (tail + data)[-len(needle) :]
        chunk = stream.read(16 * 2**20)
    return False


def check_secret_absent(docker: Docker, tag: str, token: str, build_log: str) -> float:
    """The bake saw the secret; the secret is in no build log line, no history, no config and no layer byte.
    Answers the seconds the layer scan took."""
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
    save = subprocess.Popen([docker.path, "save", tag], stdout=subprocess.PIPE, env=docker.env)
    assert save.stdout is not None
    scanned = 0
    try:
        with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
            for member in archive:
                content = archive.extractfile(member) if member.isfile() else None
                if content is not None and _contains(content, token.encode()):
                    raise CheckError(f"the HF_TOKEN build secret is in the image, in {member.name}")
                scanned += member.size
        while save.stdout.read(2**20):  # whatever follows the archive's end, so that docker save can exit
            pass
    except BaseException:
        save.kill()
        save.wait()
        raise
    if save.wait(timeout=600) != 0 or scanned == 0:
        raise CheckError("docker save failed: the layers were not scanned")
    return time.monotonic() - started


def check_scanner_finds_a_planted_secret(docker: Docker, base: str) -> None:
    """The layer scan is a check that could pass by reading nothing: show it finds a token planted in a layer."""
    planted = f"hf_planted{secrets.token_hex(16)}"
    tag = f"sd-worker-planted:{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="sd-worker-planted-") as folder:
        Path(folder, "token").write_text(planted)
        Path(folder, "Dockerfile").write_text(f"FROM {base}\nCOPY token /etc/planted\n")
        docker.run("build", "--network", "host", "-q", "-t", tag, folder)
    try:
        check_secret_absent(docker, tag, planted, "HF_TOKEN given")
    except CheckError as found:
        if "/layer.tar" not in str(found) and "blobs/" not in str(found):
            raise
    else:
        raise CheckError("the layer scan did not find a token planted in a layer: it proves nothing")
    finally:
        docker.run("image", "rm", "-f", tag, check=False)


def free_port() -> int:
    """A TCP port free on this machine now (the containers use the host's network)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_log(docker: Docker, name: str) -> str:
    """The last lines the container printed."""
    result = docker.run("logs", "--tail", "30", name, check=False)
    return (result.stdout + result.stderr).strip()


@contextmanager
def container(docker: Docker, *args: str) -> Iterator[str]:
    """A named container from `docker run ARGS` (detached), removed afterwards whatever happened."""
    name = f"sd-worker-test-{secrets.token_hex(4)}"
    try:
        docker.run("run", "-d", "--name", name, "--network", "host", *args)
        yield name
    finally:
        docker.run("rm", "-f", name, check=False)


def wait_exit(docker: Docker, name: str, timeout: float) -> tuple[int, str]:
    """Wait for a container to exit: its exit status and everything it printed."""
    waited = docker.run("wait", name, timeout=timeout)
    logs = docker.run("logs", name, check=False)
    return int(waited.stdout.strip() or -1), logs.stdout + logs.stderr


def started_at(docker: Docker, name: str) -> float:
    """The container's State.StartedAt as a Unix time (Docker gives nanoseconds; Python parses microseconds)."""
    stamp = docker.run("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip()
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def wait_healthy(docker: Docker, name: str, url: str, timeout: float = 300) -> float:
    """Poll GET /health every 50 ms until it answers 200; answers that moment. The container's own state is read
    once a second, to fail fast when it exits."""
    deadline, next_state = time.monotonic() + timeout, 0.0
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return time.time()
        except requests.RequestException:
            pass
        if time.monotonic() > next_state:
            if docker.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
                raise CheckError(f"the container exited before /health answered:\n{container_log(docker, name)}")
            next_state = time.monotonic() + 1
        if time.monotonic() > deadline:
            raise CheckError(f"/health did not answer 200 within {timeout:.0f} s:\n{container_log(docker, name)}")
        time.sleep(0.05)


def first_image(url: str, key: str) -> tuple[float, float]:
    """The first direct call: answers when it ended (Unix time) and the worker's load time ($timings.init, s)."""
    inputs = {"prompt": PROMPT, "num_inference_steps": 20, "seed": 1, "safety_checker": False}
    answer = requests.post(f"{url}/", json=inputs, headers={"X-BANANA-API-KEY": key}, timeout=300)
    ended = time.time()
    try:
        body = answer.json()
        load = body["$timings"]["init"] / 1000
    except (ValueError, KeyError, TypeError):
        raise CheckError(f"the first direct call answered HTTP {answer.status_code}: {answer.text[:300]}") from None
    if answer.status_code != 200 or not body.get("images"):
        raise CheckError(f"the first direct call answered HTTP {answer.status_code}: {str(body)[:300]}")
    return ended, load


def check_serving(docker: Docker, tag: str) -> dict[str, Any]:
    """Run the server as a user would: the cold start, the APIs, xformers, and a clean `docker stop`."""
    port, key = free_port(), "sdw_" + secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    launched = time.time()
    with container(docker, "-e", f"API_KEYS={key}", "-e", f"PORT={port}", tag) as name:
        ready = wait_healthy(docker, name, url)
        answered, load = first_image(url, key)
        process_start = started_at(docker, name)
        # The model loads while the HTTP server starts: "before the load" is what /health waited for besides it.
        cold = {
            "container_start": process_start - launched,
            "start_before_load": ready - process_start - load,
            "load": load,
            "first_image": answered - ready,
            "total": answered - launched,
        }
        say("ok: cold start " + ", ".join(f"{part} {seconds:.2f} s" for part, seconds in cold.items()))

        keys = requests.get(f"{url}/health", timeout=10).json().get("model_keys")
        if keys != ["tiny-sd"]:
            raise CheckError(f"/health lists model keys {keys}, not the baked model's tiny-sd")
        with tempfile.TemporaryDirectory() as out:
            client = [sys.executable, str(ROOT / "test.py"), "--url", url, f"--api-key={key}"]
            smoke = subprocess.run(
                [*client, "--steps", "4", "--timeout", "120", "--out", out], capture_output=True, text=True, timeout=600
            )
        if smoke.returncode != 0 or not smoke.stdout.strip():
            raise CheckError(f"test.py against the container: {smoke.stderr.strip()}")
        say(f"ok: model key tiny-sd; test.py: {smoke.stdout.strip().splitlines()[-1]}")

        info = docker.run("exec", name, "python", "-m", "xformers.info")
        kernels = [k for k in ("cutlassF", "fa2F") if not re.search(rf"{k}\S*:\s+available", info.stdout)]
        if "can't load C++/CUDA extensions" in info.stderr or kernels:
            raise CheckError(f"xformers' kernels do not load in the image ({kernels}): {info.stderr.strip()[-400:]}")
        say("ok: xformers' kernels load (cutlass and flash-attention 2 listed available; no GPU here to run them)")

        stop_started = time.monotonic()
        docker.run("stop", "-t", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 30)
        stop_s = time.monotonic() - stop_started
        code = docker.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        if code != "0" or stop_s >= STOP_GRACE_S:
            raise CheckError(f"docker stop took {stop_s:.1f} s and the server exited with {code} (killed: 137)")
        say(f"ok: docker stop ended the server in {stop_s:.1f} s with exit status 0")
    return {
        "cold_start_s": {part: round(seconds, 3) for part, seconds in cold.items()},
        "docker_stop_s": round(stop_s, 2),
    }


def check_other_starts(docker: Docker, tag: str) -> None:
    """MODE=runpod's local test job completes; TORCH_COMPILE without a compiler is refused with its reason."""
    job = json.dumps({"input": {"prompt": PROMPT, "num_inference_steps": 2, "seed": 3}})
    with container(docker, "-e", "MODE=runpod", tag, "python", "-u", "app.py", "--test_input", job) as name:
        code, logged = wait_exit(docker, name, 300)
    if code != 0 or "Job local_test completed successfully" not in logged:
        raise CheckError(f"MODE=runpod --test_input exited {code}:\n{logged[-1500:]}")
    say("ok: MODE=runpod --test_input completed its job")
    with container(docker, "-e", "TORCH_COMPILE=true", "-e", "API_KEYS=k", "-e", f"PORT={free_port()}", tag) as name:
        code, logged = wait_exit(docker, name, 300)
    if code == 0 or "COMPILE_TOOLS=1" not in logged:
        raise CheckError(f"TORCH_COMPILE=true without a compiler exited {code} without saying why:\n{logged[-800:]}")
    say("ok: TORCH_COMPILE=true without COMPILE_TOOLS=1 refuses to start and names the build argument")


def check_contents(docker: Docker, tag: str) -> None:
    """Only the worker's files in /app, and a user other than root."""
    listing = docker.run("run", "--rm", "--network", "host", tag, "sh", "-c", "id -u; ls -A /app").stdout.split()
    uid, files = listing[0], set(listing[1:])
    unwanted = files & {"tests", "bench", "docker", ".ci", ".git", "node_modules", "Makefile", "requirements-dev.txt"}
    if unwanted or uid == "0":
        raise CheckError(f"the image holds {sorted(unwanted)} or runs as root (uid {uid})")
    say(f"ok: /app holds {sorted(files)}; the worker runs as uid {uid}")


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
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        phases[name] = round(time.monotonic() - mark, 2)
        mark = time.monotonic()

    docker = engine()
    phase("engine")
    base = args.base_image or default_base_image()
    if base == "standin" or (reason := _available(docker, base)) is not None:
        if base != "standin":
            say(f"cannot pull {base} ({reason[:160]}); testing on a stand-in base")
        base = standin_base(docker)
    phase("base")
    token = f"hf_dummy{secrets.token_hex(16)}"
    # REBAKE: the bake runs again with this run's secret, whatever Docker's cache holds from earlier runs.
    build_args = {"MODEL_ID": "tiny-sd", "REBAKE": secrets.token_hex(4)}
    with tempfile.TemporaryDirectory(prefix="sd-worker-image-") as folder:
        log = Path(folder, "build.log")
        build_s = build(docker, args.tag, base, build_args, token, log)
        phase("build")
        size = docker.image_bytes(args.tag)
        say(f"ok: built in {build_s:.0f} s, {size / 1e9:.2f} GB")
        scan_s = check_secret_absent(docker, args.tag, token, log.read_text())
    check_scanner_finds_a_planted_secret(docker, base)
    say(f"ok: the HF_TOKEN secret reached the bake and is in no log, history, config or layer ({scan_s:.0f} s scan;")
    say("    the same scan finds a token planted in a layer)")
    phase("secret_scan")
    check_contents(docker, args.tag)
    served = check_serving(docker, args.tag)
    phase("serve")
    check_other_starts(docker, args.tag)
    phase("other_starts")

    figures = {
        "command": "python docker/image.py test" + (f" --base-image {args.base_image}" if args.base_image else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "docker": docker.run("version", "--format", "{{.Server.Version}}").stdout.strip(),
        "base_image": base,
        "model_id": "tiny-sd",
        "image_bytes": size,
        "layers": layers(docker, args.tag),
        **served,
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
    base = args.base_image or default_base_image()
    if base == "standin":
        base = standin_base(docker)
    elif (reason := _available(docker, base)) is not None:
        raise CheckError(
            f"cannot pull {base} ({reason[:160]}): name a base you can pull with BASE_IMAGE=..., or "
            "BASE_IMAGE=standin for one made from Debian's mirror (see docker/standin-base.sh)"
        )
    names = (
        "MODEL_ID",
        "MODEL_REVISION",
        "MODEL_VARIANT",
        "MODEL_CONFIG",
        "MODEL_SHA256",
        "ALLOW_PICKLE",
        "BAKE_DTYPE",
        "LORAS",
        "EMBEDDINGS",
        "REFINER_ID",
        "REBAKE",
    )
    build_args = {n: os.environ[n] for n in names if os.environ.get(n)}
    with tempfile.TemporaryDirectory(prefix="sd-worker-image-") as folder:
        log = Path(folder, "build.log")
        seconds = build(docker, args.tag, base, build_args, get_token(), log)
        baked = [line for line in log.read_text().splitlines() if " baked " in line or "already baked" in line]
    what = f"; {baked[-1].split(' ', 2)[-1]}" if baked else ""
    say(f"built {args.tag} in {seconds:.0f} s: {docker.image_bytes(args.tag) / 1e9:.2f} GB{what}")
    say(f"run it: docker run --gpus all -p 8000:8000 -e API_KEYS=your-secret-key {args.tag}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: build or test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, tag in (("build", "sd-worker"), ("test", "sd-worker:image-test")):
        each = sub.add_parser(command)
        each.add_argument("--tag", default=tag, help=f"the image's tag (default {tag})")
        each.add_argument("--base-image", help="BASE_IMAGE (default: the Dockerfile's); standin: the stand-in")
    sub.choices["test"].add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    try:
        return test(args) if args.command == "test" else build_command(args)
    except CheckError as failure:
        say(f"FAIL: {failure}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
