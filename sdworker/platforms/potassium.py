"""Potassium's own server, started without its cold-start penalty."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from ..config import Settings


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
    sys.setswitchinterval(1e-5)
    app.serve(host=settings.host, port=settings.port)
