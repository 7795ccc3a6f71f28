"""The URL guard: request URLs reach public addresses only, in one bounded fetch, and a slow one delays nobody.

Every target here is a real HTTP server on loopback that counts the connections it accepts, so "refused" means
the server never heard from the worker, not just that an error came back.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import png_base64

from sdworker.config import Settings
from sdworker.errors import WorkerError
from sdworker.handler import handle
from sdworker.jobs import Delivery, Job
from sdworker.jobs.sqlite_store import SQLiteStore
from sdworker.jobs.webhooks import post
from sdworker.jobs.worker import Worker
from sdworker.model import LoadedModel
from sdworker.urls import check_url, embedded_ipv4, fetch

PNG = base64.b64decode(png_base64(72, 64))
FAST = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 1}


class Target(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that records every connection and path: /input.png, /redirect (302 to the URL in
    `redirect_to`) and /drip (an image that arrives one byte every 0.2 s)."""

    daemon_threads = True
    redirect_to = ""

    def __init__(self) -> None:
        self.connections, self.paths = 0, []
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                target.paths.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", target.redirect_to)
                    self.end_headers()
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    try:
                        for byte in PNG:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)

            def do_POST(self) -> None:
                self.do_GET()

        super().__init__(("127.0.0.1", 0), Handler)

    def verify_request(self, request: object, client_address: object) -> bool:
        self.connections += 1
        return True

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def with_settings(model: LoadedModel, **changes: object) -> LoadedModel:
    """The same loaded model, serving with other settings."""
    return dataclasses.replace(model, settings=model.settings.model_copy(update=changes))


def refused(model: LoadedModel, url: str, field: str = "image") -> dict:
    status, body = handle(model, {**FAST, field: url, **({"image": png_base64()} if field != "image" else {})})
    assert status == 422, body
    return body["$error"]


def test_private_addresses_in_every_spelling_are_refused_before_any_connection(sd: LoadedModel, target: Target) -> None:
    port = target.port
    urls = [
        f"http://127.0.0.1:{port}/input.png",
        f"http://localhost:{port}/input.png",
        f"http://2130706433:{port}/input.png",  # 127.0.0.1 as one number
        f"http://0x7f000001:{port}/input.png",  # in hex
        f"http://0177.0.0.1:{port}/input.png",  # in octal
        f"http://127.1:{port}/input.png",
        f"http://[::ffff:127.0.0.1]:{port}/input.png",  # IPv4-mapped IPv6
        f"http://[::1]:{port}/input.png",
        f"http://0.0.0.0:{port}/input.png",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata address
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://100.64.0.1/x.png",  # shared address space
        "http://[fd00::1]/x.png",  # unique-local
        "http://[fe80::1]/x.png",  # link-local
        "http://224.0.0.1/x.png",  # multicast
        "http://240.0.0.1/x.png",  # reserved
        "http://no-such-host.invalid/x.png",  # unreachable: the same answer as refused
    ]
    errors = [refused(sd, url) for url in urls]
    assert {error["code"] for error in errors} == {"IMAGE_FETCH_FAILED"}
    assert len({error["message"] for error in errors}) == 1, "the answer must not tell refused from unreachable"
    assert all(str(port) not in error["message"] and "127" not in error["message"] for error in errors)
    assert refused(sd, f"http://127.0.0.1:{port}/input.png", "mask_image")["field"] == "mask_image"
    assert target.connections == 0 and target.paths == []


def test_named_hosts_and_allow_private_urls_let_loopback_through(sd: LoadedModel, target: Target) -> None:
    url = f"http://127.0.0.1:{target.port}/input.png"
    named, anything = (
        with_settings(sd, allowed_url_hosts="example.org, 127.0.0.1"),
        with_settings(sd, allow_private_urls=True),
    )
    for model in (named, anything):
        status, body = handle(model, {**FAST, "image": url})
        assert status == 200, body
    assert target.paths == ["/input.png", "/input.png"]


def test_a_redirect_from_an_allowed_host_to_a_private_one_is_refused(sd: LoadedModel, target: Target) -> None:
    target.redirect_to = f"http://127.0.0.1:{target.port}/input.png"
    model = with_settings(sd, allowed_url_hosts="localhost")
    assert refused(model, f"http://localhost:{target.port}/redirect")["code"] == "IMAGE_FETCH_FAILED"
    assert target.paths == ["/redirect"]  # the redirect was asked for; its private target never was


def test_a_slow_url_is_cut_off_at_the_fetch_timeout_with_the_same_error(sd: LoadedModel, target: Target) -> None:
    model = with_settings(sd, allow_private_urls=True, image_fetch_timeout=1.5)
    started = time.monotonic()
    error = refused(model, f"http://127.0.0.1:{target.port}/drip")
    # A byte every 0.2 s never trips a read timeout: only a deadline on the whole download ends it.
    assert time.monotonic() - started < 6 and error["code"] == "IMAGE_FETCH_FAILED"


def test_a_check_that_raises_ends_a_fetch_in_progress(target: Target) -> None:
    """What a job's cancellation and execution timeout do to its download."""
    settings = Settings(allow_private_urls=True, image_fetch_timeout=60)
    started = time.monotonic()

    def check() -> None:
        if time.monotonic() - started > 0.5:
            raise WorkerError("CANCELLED", "the job was cancelled", status=409)

    with pytest.raises(WorkerError) as ended:
        fetch(f"http://127.0.0.1:{target.port}/drip", "image", settings, 10**6, "IMAGE_FETCH_FAILED", check)
    assert ended.value.code == "CANCELLED" and time.monotonic() - started < 5


def test_a_job_fetching_a_slow_url_does_not_hold_up_the_job_behind_it(
    sd: LoadedModel, target: Target, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_batch=1, allow_private_urls=True)
    model = with_settings(sd, allow_private_urls=True, image_fetch_timeout=4)
    store = SQLiteStore(settings)
    worker = Worker(store, lambda route, payload: handle(model, payload), settings, "m")
    stop = threading.Event()
    threading.Thread(target=worker.run_forever, args=(stop,), daemon=True).start()
    try:
        slow, _ = store.submit(Job(model_key="m", input={**FAST, "image": f"http://127.0.0.1:{target.port}/drip"}))
        deadline = time.monotonic() + 30
        while "/drip" not in target.paths and time.monotonic() < deadline:
            time.sleep(0.05)
        fast, _ = store.submit(Job(model_key="m", input=FAST))
        done = store.wait(fast.id, 30)
        assert done.status == "COMPLETED"
        assert store.get(slow.id).status == "IN_PROGRESS", "the fast job waited for the slow download"
        failed = store.wait(slow.id, 30)
        assert failed.status == "FAILED" and failed.output["$error"]["code"] == "IMAGE_FETCH_FAILED"
    finally:
        stop.set()
        store.close()


def test_a_webhook_to_a_private_address_is_refused_when_checked_and_when_sent(target: Target) -> None:
    settings = Settings(webhook_retries=0)
    url = f"http://127.0.0.1:{target.port}/hook"
    for spelled in (url, f"http://2130706433:{target.port}/hook", "http://169.254.169.254/hook", "ftp://example.org/"):
        with pytest.raises(WorkerError) as refused_now:
            check_url(spelled, "webhook", settings)
        assert refused_now.value.field == "webhook" and refused_now.value.status == 422
    delivery = Delivery(job_id="job", url=url, body={"id": "job", "status": "COMPLETED"})
    assert not post(delivery, settings)
    assert target.connections == 0
    assert post(delivery, settings.model_copy(update={"allow_private_urls": True}))
    assert target.paths == ["/hook"]


def test_a_url_that_does_not_parse_is_refused_like_any_other() -> None:
    settings = Settings()
    for broken in ("http://[", "https://host:port/", "http://[::1"):
        with pytest.raises(WorkerError) as refused:
            check_url(broken, "webhook", settings)
        assert refused.value.code == "INVALID_URL" and refused.value.field == "webhook"
        with pytest.raises(WorkerError) as failed:
            fetch(broken, "image", settings, 1024, "IMAGE_FETCH_FAILED")
        assert failed.value.code == "IMAGE_FETCH_FAILED" and failed.value.field == "image"


def _ipv6_forms(v4: str) -> dict[str, str]:
    """Every IPv6 spelling that carries the IPv4 address `v4`, by name."""
    number = int(ipaddress.IPv4Address(v4))
    high, low = f"{number >> 16:x}", f"{number & 0xFFFF:x}"
    client = ~number & 0xFFFFFFFF  # Teredo stores its client's address inverted; its server here is public
    return {
        "compatible": f"::{v4}",
        "mapped": f"::ffff:{v4}",
        "translated": f"::ffff:0:{v4}",
        "6to4": f"2002:{high}:{low}::1",
        "nat64": f"64:ff9b::{v4}",
        "teredo": f"2001:0:4136:e378:8000:63bf:{client >> 16:x}:{client & 0xFFFF:x}",
    }


@pytest.mark.parametrize("v4", ["127.0.0.1", "169.254.169.254", "10.0.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0"])
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(v4: str) -> None:
    settings = Settings(webhook_retries=0)
    forms = {**_ipv6_forms(v4), "nat64 local use": "64:ff9b:1::808:808"}
    for name, address in forms.items():
        url = f"http://[{address}]:8080/x.png"
        with pytest.raises(WorkerError) as refused_now:
            check_url(url, "webhook", settings)
        assert refused_now.value.code == "INVALID_URL", name
        with pytest.raises(WorkerError) as failed:
            fetch(url, "image", settings, 1024, "IMAGE_FETCH_FAILED")
        assert failed.value.code == "IMAGE_FETCH_FAILED", name
        assert not post(Delivery(job_id="job", url=url, body={"id": "job"}), settings), name


def test_ipv6_forms_that_carry_a_public_ipv4_address_pass_the_check_where_they_can_route() -> None:
    """The compatible, mapped and translated forms of a public address pass; 6to4, NAT64 and Teredo addresses go
    through relays, which requests-hardened refuses whatever they carry."""
    for name, address in _ipv6_forms("8.8.8.8").items():
        assert embedded_ipv4(ipaddress.IPv6Address(address))[-1] == ipaddress.IPv4Address("8.8.8.8"), name
        url = f"http://[{address}]/hook"
        if name in ("compatible", "mapped", "translated"):
            check_url(url, "webhook", Settings())  # refusing would raise
        else:
            with pytest.raises(WorkerError):
                check_url(url, "webhook", Settings())
