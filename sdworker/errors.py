"""The one error type: every failure a client can see has a code, a message and, for bad input, a field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerError(Exception):
    """A failure with a stable code a client can branch on.

    `status` is the HTTP status a platform should answer with: 422 for bad input (not 400, which Banana's v6
    client retries for five minutes), other 4xx for refusals, 5xx for the worker's fault.
    """

    code: str
    message: str
    field: str | None = None
    status: int = 422

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        """The `$error` body clients receive; never a traceback."""
        return {"code": self.code, "message": self.message, "field": self.field}


def failure(status: int, body: object) -> dict | None:
    """The `$error` of a handler's `(status, body)` answer, or None when it succeeded. A failure without an
    `$error` body (a handler that answered otherwise) becomes HANDLER_ERROR."""
    error = body.get("$error") if isinstance(body, dict) else None
    if status < 400 and not error:
        return None
    if isinstance(error, dict):
        return error
    return {"code": "HANDLER_ERROR", "message": str(body)[:500], "field": None}


def describe(error: dict) -> str:
    """An `$error` body as one line: `CODE: message (field f)`, as RunPod's `error` and Banana's message show it."""
    field = f" (field {error['field']})" if error.get("field") else ""
    return f"{error.get('code', 'ERROR')}: {error.get('message', '')}{field}"
