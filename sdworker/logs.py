"""The worker's log: one line per event, as text or (LOG_FORMAT=json) one JSON object per line with the job id,
never a secret, and without the libraries' warnings that are nobody's fault.

`setup()` runs when app.py is imported (text, before the settings are read) and again once they are
(`setup(settings)`): the format, and the secrets to blank out of every line.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
"""The job being run in this thread, for the JSON lines (set by `running`)."""

NOISE = (
    # transformers 5, once per image processor, on every start: the PIL fallback is what the worker wants.
    "requires torchvision",
    # diffusers' from_pipe casts shared components with .to(): an empty list of modules, six times per start.
    "that should be kept in float32: []",
    # The safety checker runs on its own after generation (per request), so the pipelines are built without it.
    "You have disabled the safety checker",
    # peft, when a second baked LoRA is loaded beside the first: exactly what the worker does.
    "Already found a `peft_config` attribute",
    # A long prompt goes through compel in 77-token chunks; CLIP's tokenizer warns of what is not truncated.
    "Token indices sequence length is longer than the specified maximum",
    # The URL guard's library, beside the worker's own line refusing the URL (which names the field).
    "Forbidden IP address",
)
"""Library messages that say nothing to an operator of this worker: dropped from the log, each for its reason."""

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_secrets: list[str] = []
QUERY_KEY = re.compile(r"((?:apiKey|api_key)=)[^&\s\"']*")
"""A key in a URL's query (`?apiKey=...`, seed 002's `api_key`), accepted or not: blanked in every line."""
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal colours (werkzeug's access line colours errors): not for a log file."""


class _Quiet(logging.Filter):
    """Drops the library messages in NOISE and blanks every configured secret out of what is left."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = original = record.getMessage()
        if any(text in message for text in NOISE):
            return False
        for secret in _secrets:
            if secret in message:
                message = message.replace(secret, "***")
        message = COLOUR.sub("", QUERY_KEY.sub(r"\1***", message))
        if message != original:
            record.msg, record.args = message, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job id when a job is running, and the
    exception's traceback (in the line, not after it) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (current := job_id.get()) is not None:
            line["job_id"] = current
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(settings: Settings | None = None) -> None:
    """Log to stderr at INFO: text, or JSON lines with LOG_FORMAT=json; library noise dropped, secrets blanked.
    Python warnings go through the log too, so they are formatted, filtered and blanked alike."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(logging.INFO)
    json_lines = settings is not None and settings.log_format == "json"
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT))
        if not any(isinstance(existing, _Quiet) for existing in handler.filters):
            handler.addFilter(_Quiet())
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=r".*Already found a `peft_config` attribute.*")
    if settings is not None:
        _secrets[:] = sorted(_secret_values(settings), key=len, reverse=True)


def adopt_library_logs() -> None:
    """diffusers' and transformers' messages through this log (formatted, filtered, blanked) rather than their own
    handlers, which print past it. Called as they are first imported (the loader), not earlier: importing them
    costs seconds."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()


def _secret_values(settings: Settings) -> set[str]:
    """Every secret a setting holds: API keys one by one (API_KEYS=none holds none), tokens, passwords in URLs."""
    values: set[str] = set()
    names = ["api_keys", "admin_api_keys", "hf_token", "webhook_secret", "s3_secret_access_key"]
    if settings.keyless():
        names.remove("api_keys")
    for name in names:
        secret = getattr(settings, name, None)
        if secret is not None:
            values.update(part.strip() for part in secret.get_secret_value().split(","))
    if settings.redis_url is not None:
        url = settings.redis_url.get_secret_value()
        if match := re.match(r"^\w+://[^:/@]*:([^@]+)@", url):  # its password, wherever it shows alone
            values.add(match.group(1))
    return {value for value in values if len(value) >= 4}


@contextmanager
def running(job: str) -> Iterator[None]:
    """Lines logged while `job` runs carry its id (JSON lines)."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)
