"""Webhook delivery from the job store's outbox.

A job's end and its webhook are written in one step (SQLite transaction, Redis MULTI), so a webhook is never lost
between the two: whatever process holds the store (server, gateway or worker, any number of them on one Redis)
takes due deliveries from the outbox and POSTs them, each on its own thread, so one slow or dead target delays
no other. A delivery stays in the outbox until a 2xx answer or until its tries run out; a sender killed mid-way
leaves it leased, and it is due again when the lease ends. Delivery is at least once: `X-Webhook-Id` is the same
on every try, for receivers that must not act twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import requests

from .. import urls
from ..config import Settings
from . import Delivery, JobStore

log = logging.getLogger("sdworker")

POLL_S = 0.25
"""How often the outbox is read when it had nothing due: the most a webhook waits after its job ends."""


class WebhookOutbox:
    """Delivers the store's due webhooks, WEBHOOK_CONCURRENCY at once, with WEBHOOK_RETRIES further tries."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self.lease_s = 3 * settings.webhook_timeout_s + 10  # longer than one try: connect, send, read the answer
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")
        self._sending: set[str] = set()  # deliveries this process sends now
        self._lock = threading.Lock()
        self._freed = threading.Event()

    def start(self, stop: threading.Event) -> threading.Thread:
        """Deliver on a daemon thread until `stop` is set; what is left stays in the outbox for the next start."""
        thread = threading.Thread(target=self.run_forever, args=(stop,), name="webhook-outbox", daemon=True)
        thread.start()
        return thread

    def run_forever(self, stop: threading.Event) -> None:
        """Take due deliveries whenever a sender is free, until `stop` is set."""
        backoff = 0.0
        while not stop.is_set():
            with self._lock:
                free = self.settings.webhook_concurrency - len(self._sending)
            if free <= 0:
                self._freed.wait(POLL_S)
                self._freed.clear()
                continue
            try:
                due = self.store.claim_deliveries(free, self.lease_s)
                backoff = 0.0
            except Exception as err:  # the store is down: its deliveries wait there
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("webhooks: job store error, retrying in %.1f s: %s: %s", backoff, type(err).__name__, err)
                stop.wait(backoff)
                continue
            for delivery in due:
                with self._lock:
                    if delivery.id in self._sending:  # its lease ran out while this process still sends it
                        continue
                    self._sending.add(delivery.id)
                self._pool.submit(self._try, delivery)
            if len(due) < free:
                stop.wait(POLL_S)

    def _try(self, delivery: Delivery) -> None:
        """One try of one delivery, then off the outbox, or due again after a doubling delay."""
        try:
            delivered = post(delivery, self.settings)
            delivery.attempts += 1
            retry_at = None
            if not delivered and delivery.attempts <= self.settings.webhook_retries:
                retry_at = time.time() + self.settings.webhook_retry_delay_s * 2 ** (delivery.attempts - 1)
            elif not delivered:
                log.error(
                    "webhook for job %s to %s given up after %d tries",
                    delivery.job_id,
                    urlsplit(delivery.url).hostname,
                    delivery.attempts,
                )
            self.store.settle_delivery(delivery, retry_at)
        except Exception as err:  # the store is down: the lease ends and the delivery is due again
            log.error("webhook for job %s: %s: %s", delivery.job_id, type(err).__name__, err)
        finally:
            with self._lock:
                self._sending.discard(delivery.id)
            self._freed.set()


def sign(data: bytes, timestamp: str, settings: Settings) -> str | None:
    """`sha256=<hex>`: HMAC-SHA256 of `<timestamp>.<body>` with WEBHOOK_SECRET, or None when unset."""
    if settings.webhook_secret is None:
        return None
    key = settings.webhook_secret.get_secret_value().encode()
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + data, hashlib.sha256).hexdigest()


def post(delivery: Delivery, settings: Settings) -> bool:
    """POST the delivery's body once, through the URL guard (no redirects); True on a 2xx answer."""
    data = json.dumps(delivery.body).encode()
    target = urlsplit(delivery.url).hostname  # logs name the host only: the URL may hold a token
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Webhook-Timestamp": timestamp, "X-Webhook-Id": delivery.id}
    if signature := sign(data, timestamp, settings):
        headers["X-Webhook-Signature"] = signature
    try:
        with urls.session(settings) as guarded:
            response = guarded.post(
                delivery.url,
                data=data,
                headers=headers,
                timeout=settings.webhook_timeout_s,
                allow_redirects=False,
                stream=True,  # the answer's body is not read
            )
            response.close()
    except (requests.RequestException, OSError, ValueError) as err:  # refused or unreachable alike
        log.warning("webhook to %s failed: %s (try %d)", target, type(err).__name__, delivery.attempts + 1)
        return False
    if response.status_code < 300:
        return True
    log.warning("webhook to %s answered %s (try %d)", target, response.status_code, delivery.attempts + 1)
    return False
