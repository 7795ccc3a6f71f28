"""What drives app.py: each platform receives the app (its init and handlers) at run time.

`run(app)` is `python app.py`: it picks the mode from `--mode`, else MODE, else runpod on RunPod serverless, else
serve (MODE_HELP says what each runs); RunPod's own flags (--test_input, --rp_serve_api, ...) pass through to its
SDK in runpod mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from typing import Any, NoReturn

log = logging.getLogger("sdworker")
MODE_HELP = {
    "serve": "HTTP job server and a worker in one process (default): direct calls, Banana, RunPod v2, the seeds' APIs",
    "gateway": "the HTTP job server only, no model: workers elsewhere take its jobs from Redis (REDIS_URL)",
    "worker": "the model and the worker loop only, no HTTP: takes jobs from Redis (REDIS_URL)",
    "potassium": "Potassium's own server, for platforms built on it",
    "runpod": "a RunPod serverless worker (the default on RunPod serverless); RunPod's flags pass through",
}
MODES = tuple(MODE_HELP)


def run(app: Any, argv: list[str] | None = None) -> None:
    """Serve a Potassium app in the mode asked for."""
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve app.py's Stable Diffusion worker. Modes:\n"
        + "\n".join(f"  {mode:<10} {text}" for mode, text in MODE_HELP.items()),
        epilog="Every setting is an environment variable (MODEL_DIR, API_KEYS, PORT, MAX_BATCH, REDIS_URL, ...), also "
        "read from build_args.env: docs/settings.md lists each with its default, sdworker/config.py "
        "defines them. python download.py bakes MODEL_ID first; python test.py --help smoke-tests a deployment.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, help="default: MODE, else runpod on RunPod serverless, else serve")
    args, rest = parser.parse_known_args(argv)  # the rest is for RunPod's SDK in --mode runpod

    from .. import logs, metrics
    from ..config import Settings
    from ..errors import WorkerError
    from ..manifest import check_model_id

    try:
        settings = Settings(**({"mode": args.mode} if args.mode else {}))
    except WorkerError as err:  # one line naming the setting, not a traceback
        parser.exit(2, f"error: {err.message}\n")
    logs.setup(settings)
    if settings.mode != "gateway":  # before anything starts: a worker of the wrong model must not serve at all
        try:
            check_model_id(settings.model_dir)
        except WorkerError as err:
            parser.exit(2, f"error: {err.message}\n")
    if settings.metrics_port:  # any mode: a worker process has no other HTTP
        try:
            metrics.serve_alone(settings.metrics_port, settings.host)
        except OSError as err:
            where = f"{settings.host}:{settings.metrics_port}"
            parser.exit(1, f"error: cannot serve metrics on {where} (METRICS_PORT): {err.strerror or err}\n")
    if settings.mode == "potassium":
        from .potassium import serve

        return serve(app, settings)
    if rest and settings.mode != "runpod":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if settings.mode == "runpod":
        from .runpod import serve as serve_runpod

        return serve_runpod(app, settings)
    if settings.mode in ("gateway", "worker") and settings.redis_url is None:
        parser.exit(2, f"error: --mode {settings.mode} shares jobs through Redis: set REDIS_URL\n")
    if settings.mode == "gateway" and settings.api_keys is None:
        # A key made per gateway would work on one gateway only, behind a load balancer at random.
        parser.exit(2, "error: --mode gateway needs API_KEYS, the same on every gateway\n")

    if settings.redis_url is not None and not settings.whole() and not settings.model_key:
        # Workers claim jobs by model key: on a shared queue a denoise job could reach an encode worker.
        parser.exit(
            2,
            f"error: STAGES={settings.stages} with REDIS_URL: give each stage's workers a MODEL_KEY of their own, "
            "so that each claims only its stage's jobs\n",
        )

    from ..jobs import open_store
    from ..jobs.webhooks import WebhookOutbox
    from ..jobs.worker import Worker
    from .potassium import AppRunner

    try:
        store = open_store(settings)
    except WorkerError as err:
        parser.exit(1, f"error: {err.message}\n")
    except Exception as err:  # an unreachable Redis, an unwritable DATA_DIR
        parser.exit(1, f"error: cannot open the job store: {type(err).__name__}: {err}\n")
    metrics.watch_store(lambda: {key: store.stats(key) for key in settings.model_keys()})
    runner = AppRunner(app)
    model_key = settings.model_keys()[0]
    worker = Worker(store, runner, settings, model_key)
    loaded = threading.Event()
    stop = threading.Event()
    WebhookOutbox(store, settings).start(threading.Event())  # until the process ends: nothing pending is lost

    def load_then_work(stop: threading.Event) -> None:
        try:
            runner.load()
        except Exception as err:
            # A worker without its model can do nothing; exit so the platform restarts or reports it.
            log.critical("init failed, exiting: %s", err)
            os._exit(1)
        loaded.set()
        worker.run_forever(stop)

    def drain_then_stop() -> None:
        worker.drain(settings.shutdown_grace_s)
        stop.set()

    if settings.mode == "worker":

        def on_sigterm(*_: Any) -> None:
            log.info("SIGTERM: taking no new jobs; running ones get %g s to finish", settings.shutdown_grace_s)
            threading.Thread(target=drain_then_stop, daemon=True).start()

        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, on_sigterm)
        load_then_work(stop)
        _leave()

    import uvicorn

    from .server import DrainingServer, create_server

    try:  # before the model loads: a busy port is said at once, not after minutes of loading
        listening = _bind(settings.host, settings.port)
    except OSError as err:
        parser.exit(1, f"error: cannot listen on {settings.host}:{settings.port} (PORT): {err.strerror or err}\n")
    worker_thread = threading.Thread(target=load_then_work, args=(stop,), name="worker", daemon=True)
    if settings.mode == "serve":
        worker_thread.start()
    log.info(
        "mode %s; model keys %s; listening on %s:%s", settings.mode, settings.model_keys(), settings.host, settings.port
    )

    def ready() -> bool:
        return settings.mode == "gateway" or (loaded.is_set() and worker_thread.is_alive())

    try:
        server = create_server(settings, store, runner.routes, ready)
    except WorkerError as err:
        parser.exit(1, f"error: {err.message}\n")

    if settings.idle_shutdown_s and settings.mode == "serve":
        from .octoai import watch_idle

        watch_idle(server.state.jobs, settings.idle_shutdown_s)

    def drain() -> None:
        server.state.jobs.draining = True
        log.info("SIGTERM: taking no new jobs; running ones get %g s to finish", settings.shutdown_grace_s)
        if settings.mode == "serve":
            drain_then_stop()

    # No access log: a direct call may carry its key in the query string (BANANA_SERVER=...?apiKey=...).
    config = uvicorn.Config(
        server,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_level="warning",
        log_config=None,  # uvicorn's lines go through this log (its format, its filters), not handlers of their own
        timeout_graceful_shutdown=5,  # long-polls still open after the drain get this long
    )
    DrainingServer(config, drain).run(sockets=[listening])
    stop.set()
    _leave()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT for uvicorn to serve on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _leave() -> NoReturn:
    """Exit 0 after a shutdown. A job handed back after the grace period may still be computing on its thread:
    leave without the interpreter's teardown, which aborts under a thread inside torch. Every job is in the
    store already (SQLite's committed writes are in its WAL; closing it under a running thread could not be
    safer)."""
    logging.shutdown()
    os._exit(0)
