"""Schemathesis hooks for tests/test_contract.py (SCHEMATHESIS_HOOKS=contract_hooks): for each answer, its
operation, its status, whether the operation declares a security scheme, and whether the request presented the
valid key (CONTRACT_KEY) in a place those schemes name, and nothing else there; one JSON line each in the file
CONTRACT_LOG names."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import schemathesis


def presented(case: schemathesis.Case, request: Any) -> list[str]:
    """The keys `request` presents where its operation's security schemes put them."""
    schemes = case.operation.schema.raw_schema.get("components", {}).get("securitySchemes", {})
    names = {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}
    query = parse_qs(urlsplit(request.url).query)
    keys: list[str] = []
    for scheme in (schemes[name] for name in names):
        if scheme["type"] == "http":  # Bearer
            value = request.headers.get("Authorization")
            if value is not None:
                keys.append(value[7:] if value[:7].lower() == "bearer " else value)
        elif scheme["in"] == "header" and scheme["name"] in request.headers:
            keys.append(request.headers[scheme["name"]])
        elif scheme["in"] == "query":
            keys += query.get(scheme["name"], [])
    return keys


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    """Record the operation (`POST /infer`), its status, and how the request was keyed."""
    keys = presented(case, response.request)
    entry = {
        "operation": case.operation.label,
        "status": response.status_code,
        "secured": bool(case.operation.definition.raw.get("security")),
        "keyed": bool(keys) and all(key == os.environ["CONTRACT_KEY"] for key in keys),
    }
    with open(os.environ["CONTRACT_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\n")
