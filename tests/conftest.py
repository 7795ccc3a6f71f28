"""Shared fixtures: the tiny recipes baked once per session with the real baking code, loaded once."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.server
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import pytest
import requests
from PIL import Image

from sdworker.batching import Batcher
from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.generate import Generation, generate
from sdworker.model import LoadedModel, bake_model, load_model
from sdworker.model.recipes import make_tiny_lora
from sdworker.schema import GenerateInput

ROOT = Path(__file__).resolve().parent.parent
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""pytest-xdist's processes running the suite side by side (`make test` runs one per core), 1 without it."""
# Alone, the tests run torch on every core, as before TORCH_THREADS existed (the worker's default leaves one to
# serving): the tiny models' many short calls finish sooner so. Beside other xdist workers, each takes its share of
# the cores, so that they do not fight over them. test_operations checks the default itself.
os.environ.setdefault("TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

# The tiny recipes' code: a change to how they are built or baked makes a new cache key, so never a stale bake.
RECIPE_KEY = hashlib.sha256(
    b"".join((ROOT / "sdworker" / "model" / name).read_bytes() for name in ("recipes.py", "bake.py"))
).hexdigest()[:12]


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder made once per test session by `make(folder)`, whichever xdist worker asks first; the others wait
    for it and then share it. It lives beside the workers' own temp folders, keyed by the recipes' code."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"shared-{RECIPE_KEY}" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder) + ".lock"):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding a `slow` check run first, in their order, the rest after them in theirs: xdist hands out whole
    files as workers free up, so the longest start at once rather than last, beside nothing."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The baked folder of a tiny recipe by name, baked once per session (by whichever test asks first) with the
    real baking code. Tests read it; one that changes a model copies it first."""

    def baked_recipe(name: str) -> Path:
        return shared(tmp_path_factory, name, lambda folder: bake_model(name, folder / "model")) / "model"

    return baked_recipe


@pytest.fixture(scope="session")
def baked(recipe: Callable[[str], Path]) -> dict[str, Path]:
    """tiny-sd and tiny-sdxl, the recipes most tests serve."""
    return {name: recipe(name) for name in ("tiny-sd", "tiny-sdxl")}


@pytest.fixture(scope="session")
def lora_baked(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd baked by download.py with two random LoRAs: `ink` (UNet and text encoder) and `fog` (UNet only)."""

    def make(root: Path) -> None:
        ink = make_tiny_lora(baked["tiny-sd"], root / "ink.safetensors", seed=1)
        fog = make_tiny_lora(baked["tiny-sd"], root / "fog.safetensors", seed=2, text_encoders=False)
        result = download("--model-dir", str(root / "model"), MODEL_ID="tiny-sd", LORAS=f"ink={ink},fog={fog}")
        assert result.returncode == 0, result.stderr

    return shared(tmp_path_factory, "lora-baked", make) / "model"


@pytest.fixture(scope="session")
def sd(baked: dict[str, Path]) -> LoadedModel:
    return load_model(Settings(model_dir=baked["tiny-sd"]))


@pytest.fixture(scope="session")
def sdxl(baked: dict[str, Path]) -> LoadedModel:
    return load_model(Settings(model_dir=baked["tiny-sdxl"]))


def decode(data: str) -> Image.Image:
    """A response's base64 image, opened."""
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True)))


def png_base64(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> str:
    """A solid-colour PNG as base64, for img2img and inpaint inputs."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAKE_VARIABLES = ("MODEL_", "HF_", "REFINER_", "LORAS", "EMBEDDINGS", "BAKE_")


def download(*args: str, cwd: Path = ROOT, fresh: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run download.py's `main` as a build does, in `cwd`, with only the MODEL_*, HF_* (...) variables given; what
    it printed and its exit status, as from a process.

    In this process by default: the libraries are imported already, which saves each call ten seconds of imports.
    With `fresh`, in a new interpreter: for what the hub's library reads from the environment at import
    (HF_ENDPOINT, HF_HUB_OFFLINE), and for the exact output a user sees, library warnings included."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(BAKE_VARIABLES)}
    if fresh:
        return subprocess.run(
            [sys.executable, str(ROOT / "download.py"), *args],
            cwd=cwd,
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
    if any(key.startswith("HF_") for key in env):
        raise ValueError("HF_* variables are read when huggingface_hub is imported: download(..., fresh=True)")
    spec = importlib.util.spec_from_file_location("download", ROOT / "download.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key in set(os.environ) - set(clean):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(cwd)
        try:
            code = script.main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    return subprocess.CompletedProcess(["download.py", *args], code, out.getvalue(), err.getvalue())


def same_picture(a: Any, b: Any) -> None:
    """Equal seeds and equal pixels, save for float rounding: a batch's kernels add up in another order, which
    moves a few values by one level (of 255); a different seed changes nearly every value."""
    assert a.seeds == b.seeds
    for x, y in zip(a.images, b.images, strict=True):
        x, y = np.asarray(x, dtype=int), np.asarray(y, dtype=int)
        assert np.abs(x - y).max() <= 1
        assert (x != y).mean() < 0.001


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float = 60) -> object:
    """Poll `check` until it answers something truthy, and answer that; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting")


def start_workers(env: dict[str, str], count: int) -> list[subprocess.Popen]:
    """`count` processes of `python app.py --mode worker` on `env` (REDIS_URL set), their output dropped: they
    have no HTTP, so whoever starts them waits for the gateway's /health to count them."""
    return [
        subprocess.Popen(
            [sys.executable, "app.py", "--mode", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for _ in range(count)
    ]


def start_process(args: list[str], url: str, env: dict[str, str], timeout: float = 120) -> subprocess.Popen:
    """Start a server process and wait until `url` answers; fail with its output if it dies first.

    What it prints is read all along into `process.output` (a list of lines): a pipe nobody reads fills up after
    64 KiB and then blocks the server in the middle of a log line."""
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.output = []  # type: ignore[attr-defined]
    process.reader = threading.Thread(  # type: ignore[attr-defined]
        target=lambda: process.output.extend(iter(process.stdout.readline, "")), daemon=True
    )
    process.reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{args} exited with {process.returncode}:\n{output_of(process)}")
        try:
            requests.get(url, timeout=1)
            return process
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy to answer in 1 s
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"{args} did not answer at {url} within {timeout} s")


def output_of(process: subprocess.Popen, timeout: float = 10) -> str:
    """Everything a process from `start_process` printed, once it has exited."""
    process.wait(timeout)
    process.reader.join(timeout)  # type: ignore[attr-defined]
    return "".join(process.output)  # type: ignore[attr-defined]


def start_redis(folder: Path, port: int, persistent: bool = True) -> subprocess.Popen:
    """A real redis-server on loopback, its files in `folder`; with `persistent`, an append-only file (what the
    worker asks of a production Redis), else nothing on disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    keep = ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent else ["--appendonly", "no"]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *keep, "--dir", str(folder)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


class HookTarget(http.server.ThreadingHTTPServer):
    """A real webhook receiver on loopback: records each POST as (path, headers, JSON body) in `received`.
    `/hang...` paths answer only after `hang_s` seconds; `/fail...` paths answer 500."""

    daemon_threads = True
    hang_s = 30.0

    def __init__(self, port: int = 0) -> None:
        self.received: list[tuple[str, dict[str, str], dict]] = []
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.startswith("/hang"):
                    time.sleep(target.hang_s)
                else:
                    target.received.append((self.path, dict(self.headers), body))
                self.send_response(500 if self.path.startswith("/fail") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict]:
        """The bodies received at `path`."""
        return [body for got, _, body in self.received if got == path]

    def close(self) -> None:
        """Stop answering and free the port."""
        self.shutdown()
        self.server_close()


def serve_folder(folder: Path) -> http.server.ThreadingHTTPServer:
    """A static-file HTTP server for `folder` on a loopback port, running; `close()` it with shutdown()."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hooks() -> Iterator[HookTarget]:
    """A webhook receiver for one test."""
    target = HookTarget()
    yield target
    target.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session, on a free port."""
    port = free_port()
    process = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API: moto's server mode on a loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "-m", "moto.server", "-p", str(port)], url, dict(os.environ))
    yield url
    process.terminate()
    process.wait(10)


def batched(model: LoadedModel, max_jobs: int = 4, max_images: int = 8) -> LoadedModel:
    """The same loaded pipelines behind a batcher of its own."""
    return dataclasses.replace(model, batcher=Batcher(max_jobs, max_images))


def run_together(
    model: LoadedModel, requests: list[GenerateInput], hooks: dict[int, Callable[[int, int], None]] | None = None
) -> dict[int, Generation | WorkerError]:
    """Hold the model with one job until every request waits for it, then let them all go at once."""
    gate, results = threading.Event(), {}
    returned = {}

    def hold(step: int, total: int) -> None:
        gate.wait()

    def call(index: int, request: GenerateInput) -> None:
        try:
            results[index] = generate(model, request, (hooks or {}).get(index))
        except WorkerError as err:
            results[index] = err
        returned[index] = time.monotonic()

    holding = GenerateInput(prompt="hold", width=64, height=64, num_inference_steps=3)
    holder = threading.Thread(target=generate, args=(model, holding, hold), daemon=True)
    holder.start()
    threads = []
    try:
        wait_for(lambda: model.batcher._busy)
        for index, request in enumerate(requests):  # one at a time, so the queue order is the list's
            threads.append(threading.Thread(target=call, args=(index, request), daemon=True))
            threads[-1].start()
            wait_for(lambda n=index + 1: len(model.batcher._waiting) == n)
    finally:
        gate.set()
    for thread in [holder, *threads]:
        thread.join(timeout=120)
    run_together.returned = returned  # type: ignore[attr-defined]  # when each caller got its answer
    return results


# The keys of the files sharing `quick_start_worker`, one each: a file's jobs, results and refusals are its own.
SHARED_KEYS = {"smoke": "smoke-test-key", "octoai": "octo-key", "operations": "operations-secret-key"}


@dataclasses.dataclass
class Worker:
    """A running `python app.py`: its base URL and what it has printed so far (for failure messages)."""

    url: str
    output: list[str]

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self.output[-lines:])


@pytest.fixture(scope="session")
def quick_start_worker(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """`python app.py` on tiny-sd with every setting at its default (SQLite, the quick start's worker), started
    once per xdist worker and shared by the files that need nothing else, each with its key in SHARED_KEYS."""
    process, url = start_worker(
        baked["tiny-sd"], tmp_path_factory.mktemp("quick-start"), ",".join(SHARED_KEYS.values())
    )
    wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, timeout=120)  # loaded: ready
    yield Worker(url, process.output)  # type: ignore[attr-defined]
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def start_worker(model_dir: Path, data: Path, api_keys: str, **extra: str) -> tuple[subprocess.Popen, str]:
    """`python app.py` (HTTP and the worker, SQLite unless REDIS_URL is given) on a baked tiny-sd, on a free
    loopback port, once /health answers; answers the process and its base URL."""
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "API_KEYS")},
        "MODEL_ID": "tiny-sd",
        "MODEL_DIR": str(model_dir),
        "DATA_DIR": str(data),
        "API_KEYS": api_keys,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        **extra,
    }
    url = f"http://127.0.0.1:{port}"
    return start_process([sys.executable, "app.py"], f"{url}/health", env), url
