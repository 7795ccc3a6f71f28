"""One key cannot stall the others: key A's hanging image URLs and its burst of queued jobs delay key B's job by
about one job, on the SQLite store (one process) and on Redis (a gateway and two workers)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from conftest import free_port, serve_folder, start_process, start_workers, wait_for
from PIL import Image

KEYS = {"a": "fair-key-a", "b": "fair-key-b"}
TEXT = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 1}
A_HANGING, A_QUEUED = 20, 200


class Hanging:
    """A listener that takes every connection and never answers: the slowest image URL there is."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow.png"
        self.held: list[socket.socket] = []
        self.lock, self.closed = threading.Lock(), False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:  # shut
                return
            with self.lock:
                if self.closed:
                    conn.close()
                    return
                self.held.append(conn)

    def close(self) -> None:
        """Drop every connection and stop listening: the downloads fail at once. Shutting the listener first
        wakes the blocked accept (closing it alone would leave it listening)."""
        with self.lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            for conn in self.held:
                conn.close()


def call(url: str, key: str, method: str, path: str, **kwargs) -> dict:
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    response = requests.request(method, f"{url}/v2/tiny-sd/{path}", headers=headers, timeout=120, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def b_job_seconds(url: str, image_url: str) -> float:
    """Key B's one job, an image to edit from a URL that answers at once: seconds until it has completed."""
    started = time.monotonic()
    body = call(url, "b", "POST", "runsync", json={"input": {**TEXT, "image": image_url, "strength": 0.5}})
    assert body["status"] == "COMPLETED", body
    return time.monotonic() - started


@pytest.fixture(scope="module")
def image_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 64), (90, 140, 200)).save(folder / "fast.png")
    server = serve_folder(folder)
    yield f"http://127.0.0.1:{server.server_address[1]}/fast.png"
    server.shutdown()


@pytest.fixture(params=["sqlite", "redis"])
def cluster(request: pytest.FixtureRequest, baked: dict[str, Path], tmp_path: Path, redis_url: str) -> Iterator[str]:
    """One server on SQLite, or a gateway and two workers on Redis: A's downloads hang for the whole test."""
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("API_KEYS", "REDIS_URL")},
        "MODEL_ID": "tiny-sd",
        "MODEL_DIR": str(baked["tiny-sd"]),
        "DATA_DIR": str(tmp_path / "data"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_KEYS": ",".join(KEYS.values()),
        "ALLOW_PRIVATE_URLS": "1",
        "IMAGE_FETCH_TIMEOUT": "120",
        "MAX_QUEUE": "1000",
        "MAX_QUEUED_PER_KEY": "500",
    }
    url, processes = f"http://127.0.0.1:{port}", []
    if request.param == "sqlite":
        processes.append(start_process([sys.executable, "app.py"], f"{url}/health", env))
    else:
        redis.Redis.from_url(redis_url).flushdb()
        env["REDIS_URL"] = redis_url
        processes += start_workers(env, 2)
        processes.append(start_process([sys.executable, "app.py", "--mode", "gateway"], f"{url}/health", env))
        wait_for(lambda: call(url, "a", "GET", "health")["workers"]["idle"] == 2, timeout=120)
    try:
        yield url
    finally:
        for process in processes:
            process.kill()
            process.wait(10)


def test_one_keys_hanging_urls_and_queued_burst_delay_another_keys_job_by_about_one_job(
    cluster: str, image_url: str
) -> None:
    url = cluster
    b_job_seconds(url, image_url)  # warm: the first run of a process pays for more than the model
    alone = min(b_job_seconds(url, image_url) for _ in range(3))

    hanging = Hanging()
    try:
        slow = [
            call(url, "a", "POST", "run", json={"input": {**TEXT, "image": hanging.url}})["id"]
            for _ in range(A_HANGING)
        ]
        wait_for(lambda: len(hanging.held) >= 2)  # A's downloads have begun, and hang
        behind_urls = b_job_seconds(url, image_url)
        running = sum(call(url, "a", "GET", f"status/{job}")["status"] == "IN_PROGRESS" for job in slow)
    finally:
        hanging.close()
    wait_for(lambda: all(call(url, "a", "GET", f"status/{job}")["status"] == "FAILED" for job in slow), timeout=120)

    for _ in range(A_QUEUED):
        call(url, "a", "POST", "run", json={"input": TEXT})
    waiting = call(url, "a", "GET", "health")["jobs"]["inQueue"]
    behind_queue = b_job_seconds(url, image_url)
    left = call(url, "a", "GET", "health")["jobs"]["inQueue"]
    call(url, "a", "POST", "purge-queue")

    print(
        f"\nfairness ({url}): key B's job alone {alone:.2f} s; behind {A_HANGING} hanging URLs of key A "
        f"({running} downloading) {behind_urls:.2f} s; behind {waiting} queued jobs of key A {behind_queue:.2f} s "
        f"({left} still queued when it ended)"
    )
    assert behind_urls < alone + 5, f"{behind_urls:.1f} s behind A's hanging URLs; {alone:.1f} s alone"
    assert waiting >= A_QUEUED - 20 and left >= A_QUEUED - 60, "A's burst should still be queued: it was not a test"
    assert behind_queue < 4 * alone + 5, f"{behind_queue:.1f} s behind A's {waiting} queued jobs; {alone:.1f} s alone"
