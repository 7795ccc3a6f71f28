"""Schemathesis hooks for tests/test_contract.py (SCHEMATHESIS_HOOKS=contract_hooks).

Seed 002's POST routes take their key in the body, where no security scheme can say so: a valid case gets the key
(CONTRACT_KEY) there. For each answer, a JSON line in the file CONTRACT_LOG names: its operation, its status,
whether the operation takes a key, and whether the request presented the valid key where the operation reads one,
and nothing else there."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import schemathesis

BODY_KEYED = ("/generate", "/img2img")  # seed 002: `api_key` in the body


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
    if case.operation.path in BODY_KEYED and isinstance(case.body, dict) and "api_key" in case.body:
        keys.append(case.body["api_key"])
    return keys


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """A valid case of a body-keyed route bears the key, as its clients' requests do."""
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if case.operation.path in BODY_KEYED and isinstance(case.body, dict) and positive:
        case.body["api_key"] = os.environ["CONTRACT_KEY"]
    return case


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    """Record the operation (`POST /infer`), its status, and how the request was keyed."""
    keys = presented(case, response.request)
    entry = {
        "operation": case.operation.label,
        "status": response.status_code,
        "secured": bool(case.operation.definition.raw.get("security")) or case.operation.path in BODY_KEYED,
        "keyed": bool(keys) and all(key == os.environ["CONTRACT_KEY"] for key in keys),
    }
    with open(os.environ["CONTRACT_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\n")
