"""RunPod serverless: app.py's init and handler as a `runpod.serverless` worker.

RunPod's platform queues the jobs and scales the workers; this process loads the model once, then takes
WORKER_CONCURRENCY jobs at a time (default 2 x MAX_BATCH; the GPU runs one batch at a time), or one at a time
when streaming. `python app.py --mode runpod` starts it; RunPod's own flags work as documented:
`--test_input '{"input": {...}}'` (or a `test_input.json` in the working directory) runs one job locally and
exits 0 or 1, and `--rp_serve_api` serves RunPod's development API.

With RUNPOD_STREAM=true the handler is a generator: it yields `{"step", "total", "preview"?}` chunks while the
model denoises (a small JPEG of the latents every RUNPOD_PREVIEW_EVERY steps; 0 for none) and then the answer,
so `/stream` shows the image forming and `/runsync` still gets everything (`return_aggregate_stream`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..config import Settings
from ..errors import describe, failure
from ..generate import preview_hook, step_hook
from ..images import latent_preview
from ..jobs.worker import Runner
from .potassium import AppRunner

log = logging.getLogger("sdworker")
PROGRESS_INTERVAL_S = 1.0  # each update is an HTTP call from a new thread in runpod's SDK: at most one a second


def make_handler(runner: Runner, route: str = "/") -> Callable[[dict], Awaitable[dict]]:
    """The RunPod handler: `job["input"]` through app.py's handler. Bad input and failures return `{"error"}`
    with the worker's code and message (the job is FAILED with a readable reason); after CUDA out-of-memory the
    worker also asks RunPod to replace it (`refresh_worker`).

    It is async and runs the work in a thread, so that with WORKER_CONCURRENCY 2 the next job starts denoising
    while this one encodes and uploads its images; the GPU runs one batch at a time (see MAX_BATCH)."""
    import runpod

    on_runpod = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))  # unset in local runs: no progress calls

    def run(job: dict) -> dict:
        last = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if on_runpod and (now - last >= PROGRESS_INTERVAL_S or step == total):
                last = now
                runpod.serverless.progress_update(job, {"step": step, "total": total})

        token = step_hook.set(on_step)
        try:
            return answer(*runner(route, job.get("input")))
        finally:
            step_hook.reset(token)

    async def handler(job: dict) -> dict:
        return await asyncio.to_thread(run, job)

    return handler


def answer(status: int, body: Any) -> dict:
    """The handler's `(status, body)` as RunPod wants it: the body, or `{"error": "CODE: message (field f)"}`."""
    error = failure(status, body)
    if error is None:
        return body
    result: dict[str, Any] = {"error": describe(error), "$error": error}
    if error["code"] == "OUT_OF_MEMORY":
        result["refresh_worker"] = True  # RunPod replaces the worker after this job: a clean CUDA context
    return result


def make_stream_handler(runner: Runner, family: str, every: int, route: str = "/") -> Callable[[dict], Iterator[dict]]:
    """A generator handler: step chunks (with a latent preview every `every` steps) while the model runs in a
    thread of its own, then the answer."""

    def handler(job: dict) -> Iterator[dict]:
        chunks: queue.Queue[dict | None] = queue.Queue()
        result: dict[str, dict] = {}

        def on_latents(step: int, total: int, latents: Any) -> None:
            chunk: dict[str, Any] = {"step": step, "total": total}
            due = every and (step % every == 0 or step == total)
            if due and (preview := latent_preview(latents, family)) is not None:
                chunk["preview"] = preview
            chunks.put(chunk)

        def work() -> None:
            token = preview_hook.set(on_latents)
            try:
                result["answer"] = answer(*runner(route, job.get("input")))
            finally:
                preview_hook.reset(token)
                chunks.put(None)

        threading.Thread(target=work, name=f"job-{job.get('id')}", daemon=True).start()
        while (chunk := chunks.get()) is not None:
            yield chunk
        yield result.get("answer") or {"error": "INTERNAL_ERROR: the job ended without an answer"}

    return handler


BLOB = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


def quiet_sdk_log() -> None:
    """RunPod's SDK prints each local test's whole result, base64 images and all, and logs at DEBUG unless told:
    long base64 runs become their length, and the level is INFO unless RUNPOD_LOG_LEVEL (or RUNPOD_DEBUG_LEVEL)
    says otherwise. Its lines are its own (print, not logging): this wraps its logger's one method."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    if not (os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL")):
        RunPodLogger.level = "INFO"
    if getattr(RunPodLogger.log, "shortened", False):
        return
    original = RunPodLogger.log

    def log(self: Any, message: Any, message_level: str = "INFO", job_id: Any = None) -> None:
        text = BLOB.sub(lambda blob: f"<{len(blob.group())} base64 characters>", str(message))
        original(self, text, message_level, job_id)

    log.shortened = True  # type: ignore[attr-defined]
    RunPodLogger.log = log  # type: ignore[method-assign]


def serve(app: Any, settings: Settings) -> None:
    """Load the model, then hand jobs from RunPod to app.py's handler until RunPod stops the worker."""
    import runpod

    quiet_sdk_log()
    runner = AppRunner(app)
    runner.load()
    log.info("RunPod worker ready (model key %s)", settings.model_keys()[0])
    if not settings.runpod_stream:
        concurrency = settings.jobs_in_flight()
        runpod.serverless.start({"handler": make_handler(runner), "concurrency_modifier": lambda _: concurrency})
        return
    model = (runner.context or {}).get("model")
    family = model.row.kin if model is not None else "sd1"
    handler = make_stream_handler(runner, family, settings.runpod_preview_every)
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
