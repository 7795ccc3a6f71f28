"""Prometheus metrics (prometheus-client), per process: `GET /metrics` on the HTTP server (with an API key), or
on METRICS_PORT without one in any mode (a `--mode worker` process has no other HTTP).

HTTP requests by route and status and their latency; jobs' queue wait and total time by final status; each
pipeline call's inference time and jobs per batch; images made; the model's load time; and, read when scraped,
the job store's queue (jobs by state) and workers (by state), and the GPU's memory in use and at its peak.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))

REQUESTS = Counter("sdworker_http_requests", "HTTP requests answered", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "sdworker_http_request_seconds", "Time to answer an HTTP request", ["method", "route"], buckets=SECONDS
)
QUEUE_WAIT = Histogram("sdworker_job_queue_wait_seconds", "From a job's acceptance to its start", buckets=SECONDS)
JOB_SECONDS = Histogram(
    "sdworker_job_seconds", "From a job's acceptance to its end, by final status", ["status"], buckets=SECONDS
)
INFERENCE = Histogram("sdworker_inference_seconds", "One pipeline call (a batch of jobs)", buckets=SECONDS)
BATCH_JOBS = Histogram(
    "sdworker_batch_jobs", "Jobs in one pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
)
IMAGES = Counter("sdworker_images", "Images made")
MODEL_LOAD = Gauge("sdworker_model_load_seconds", "Time the model took to load, disk to GPU")


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """One HTTP request answered: `route` is the route's template (`/v2/{endpoint_id}/status/{job_id}`)."""
    REQUESTS.labels(method, route, str(status)).inc()
    REQUEST_SECONDS.labels(method, route).observe(seconds)


def observe_job(status: str, created_at: float, started_at: float | None, finished_at: float | None) -> None:
    """One job ended (times are epoch seconds)."""
    if started_at is not None:
        QUEUE_WAIT.observe(max(0.0, started_at - created_at))
    JOB_SECONDS.labels(status).observe(max(0.0, (finished_at or time.time()) - created_at))


class _Live(Collector):
    """What is read when scraped: the queue and the workers from the job store, and the GPU's memory."""

    def __init__(self, stats: Callable[[], dict[str, dict]] | None) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.stats is not None:
            jobs = GaugeMetricFamily("sdworker_jobs", "Jobs in the store by state", labels=["model_key", "state"])
            workers = GaugeMetricFamily("sdworker_workers", "Workers by state", labels=["model_key", "state"])
            try:
                for key, body in self.stats().items():
                    for state, count in body["jobs"].items():
                        jobs.add_metric([key, state], count)
                    for state, count in body["workers"].items():
                        workers.add_metric([key, state], count)
            except Exception:  # the store unreachable: no figures rather than a failed scrape
                pass
            yield jobs
            yield workers
        torch = sys.modules.get("torch")  # only where the model runs: a gateway never imports torch
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            memory = GaugeMetricFamily("sdworker_gpu_memory_bytes", "GPU memory allocated", labels=["device", "kind"])
            for index in range(torch.cuda.device_count()):
                memory.add_metric([str(index), "in_use"], torch.cuda.memory_allocated(index))
                memory.add_metric([str(index), "peak"], torch.cuda.max_memory_allocated(index))
            yield memory


_live: _Live | None = None


def watch_store(stats: Callable[[], dict[str, dict]] | None) -> None:
    """Report the job store's figures when scraped: `stats` answers {model key: RunPod /health body}."""
    global _live
    if _live is None:
        _live = _Live(stats)
        REGISTRY.register(_live)
    else:
        _live.stats = stats


def serve_alone(port: int, host: str) -> Any:
    """/metrics on `port`, without a key (METRICS_PORT), in a thread of its own."""
    watch_store(_live.stats if _live else None)  # the GPU's memory at least
    return start_http_server(port, addr=host)
