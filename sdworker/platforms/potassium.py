"""Potassium: its own server (started without its cold-start penalty), and app.py's handlers run without it."""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import os
import sys
import uuid
from typing import Any

from ..config import Settings
from ..errors import WorkerError


def serve(app: Any, settings: Settings) -> None:
    """Serve a Potassium app on HOST:PORT.

    Potassium 0.5.0 runs init() in a worker thread while its main thread spins until init is done. Each time
    init gives up the GIL for file I/O it then waits a whole switch interval (5 ms) to get it back, which made
    loading the tiny model take 34 s instead of 0.1 s here. A short switch interval while init runs removes
    that; the default comes back as soon as init returns. If init fails the process exits with status 1,
    where Potassium alone would hang.
    """
    default = sys.getswitchinterval()
    init = app._init_func  # Potassium keeps the registered init here (0.5.0, pinned)

    @functools.wraps(init)
    def init_then_restore(*args: Any) -> dict:
        try:
            return init(*args)
        except Exception as err:
            # Potassium would wait forever for a worker whose init failed; exit so the platform sees it.
            logging.getLogger("sdworker").critical("init failed, exiting: %s", err)
            os._exit(1)
        finally:
            sys.setswitchinterval(default)

    app._init_func = init_then_restore
    _require_keys(app, settings)
    # Potassium gives werkzeug's access log a handler of its own when it has none, and werkzeug's lines reach the
    # root's too: each request logged twice. A do-nothing handler keeps Potassium's away; the root's logs it once.
    logging.getLogger("werkzeug").addHandler(logging.NullHandler())
    sys.setswitchinterval(1e-5)
    app.serve(host=settings.host, port=settings.port)


def _require_keys(app: Any, settings: Settings) -> None:
    """With API_KEYS (or ADMIN_API_KEYS) set, app.py's routes on Potassium's server take only calls bearing one,
    as the job server's do: `X-BANANA-API-KEY`, `Authorization: Bearer` or `?apiKey=`. Its warm-up and status
    routes stay open, as on the job server. Without keys the server is open, as Potassium is (it expects a
    gateway in front), or with API_KEYS=none: that is said at every start."""
    secrets = [value.get_secret_value() for value in (settings.api_keys, settings.admin_api_keys) if value]
    keys = [key.strip().encode() for value in secrets for key in value.split(",") if key.strip()]
    log = logging.getLogger("sdworker")
    if not keys or settings.keyless():
        log.warning("--mode potassium without API keys: anyone who reaches port %s can call the model", settings.port)
        return
    from flask import jsonify, request

    def check_key() -> Any:
        if request.method != "POST" or request.path in ("/_k/warmup",):
            return None
        auth = request.headers.get("Authorization", "")
        given = (
            request.headers.get("X-BANANA-API-KEY")
            or (auth[7:].strip() if auth[:7].lower() == "bearer " else None)
            or request.args.get("apiKey")
            or ""
        ).encode()
        if any([hmac.compare_digest(given, key) for key in keys]):
            return None
        error = WorkerError("UNAUTHORIZED", "missing or invalid API key (X-BANANA-API-KEY header)", status=401)
        return jsonify({"error": error.message, "$error": error.to_dict()}), 401

    app._flask_app.before_request(check_key)


class AppRunner:
    """A Potassium app's init and handlers, run without Potassium's server: what the job server and the
    RunPod worker drive."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.context: dict | None = None

    @property
    def routes(self) -> dict[str, bool]:
        """Each route app.py registered, and whether it is a background one (answered `{"started": true}`)."""
        return {route: endpoint.type.value == "BACKGROUND" for route, endpoint in self.app._endpoints.items()}

    def load(self) -> None:
        """Run app.py's init once (loads the model)."""
        init = self.app._init_func
        self.context = init() if len(inspect.signature(init).parameters) == 0 else init(0)

    def __call__(self, route: str, payload: Any) -> tuple[int, Any]:
        """Run a route's handler on `payload`: (HTTP status, JSON body). Never raises."""
        from potassium import Request
        from potassium.types import RequestHeaders

        # The handler gets no client headers: Potassium 0.5.0 prints every header it is asked for, keys included.
        request = Request(id=str(uuid.uuid4()), headers=RequestHeaders({}), json=payload)
        try:
            response = self.app._endpoints[route].func(self.context, request)
        except Exception:
            logging.getLogger("sdworker").exception("the handler for %s raised", route)
            return 500, {"$error": WorkerError("INTERNAL_ERROR", "internal error; see the worker's log").to_dict()}
        if response is None:  # a background handler
            return 200, {"started": True}
        body = response.json
        if body is None and response.body:
            error = WorkerError("NOT_JSON", f"the handler for {route} answered a body that is not JSON", status=500)
            return 500, {"$error": error.to_dict()}
        return response.status, body
