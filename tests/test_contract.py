"""The OpenAPI document is the contract: schemathesis fuzzes every documented route of a running server (tiny-sd,
real worker, SQLite) for a bounded time with all its checks, and the server must never answer 5xx, never answer a
status or body the document does not list, and refuse what the document forbids.

Where the document is exact (the operations with no body, and seed 002's GET routes), whatever it calls valid is
also accepted (`positive_data_acceptance`). Elsewhere a request the schema allows may still be refused for reasons
no JSON schema states (a webhook whose host does not resolve to a public address, a size past MAX_PIXELS, steps
past MAX_STEPS, a tensor that is not one, a RunPod `input` whose inside is the handler's), and those refusals
are right: those operations are listed in NOT_EXACT.

The fuzzer has the key for every security scheme the document declares (schemathesis.toml's `auth.openapi`;
seed 002's body key through a hook), and contract_hooks.py records each answer: a request bearing the valid key
where the operation reads it is never a 401, every operation that takes a key is reached with it (some answer
other than 401 and 405), and no open route answers 401.

CONTRACT_SECONDS (default 40) sets the budget; CONTRACT_SEED the seed (default fixed, so a CI run is
reproducible; set another to explore).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import free_port, start_process, wait_for

KEY = "contract-key"
# The operations where a request the document calls valid may rightly be refused (see above): every other one
# runs positive_data_acceptance (a valid request is never a 400 or 422).
NOT_EXACT = r"^/(|infer|stages/.*|v2/[{]endpoint_id[}]/(run|runsync)|start/v4/|check/v4/|generate|img2img)$"
EXACT = f"""
[[operations]]
include-path-regex = "{NOT_EXACT}"
checks = {{ positive_data_acceptance = {{ enabled = false }} }}
"""


@pytest.fixture(scope="module")
def server(baked: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "API_KEYS")},
        "MODEL_ID": "tiny-sd",
        "MODEL_DIR": str(baked["tiny-sd"]),
        "DATA_DIR": str(tmp_path_factory.mktemp("contract")),
        "API_KEYS": KEY,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_STEPS": "4",  # whatever the fuzzer asks, a job stays short
        "MAX_PIXELS": str(128 * 128),
        "MAX_IMAGES": "2",
        "RUNSYNC_WAIT_S": "10",
        "BANANA_WAIT_S": "5",
        "DIRECT_WAIT_S": "20",
    }
    url = f"http://127.0.0.1:{port}"
    process = start_process([sys.executable, "app.py"], f"{url}/health", env)
    wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200)
    yield url
    process.terminate()
    process.wait(10)


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(server: str, tmp_path: Path) -> None:
    seconds = os.environ.get("CONTRACT_SECONDS", "40")
    config = tmp_path / "schemathesis.toml"  # the key in every place a route's security scheme names
    schemes = {"APIKeyHeader": "api_key", "HTTPBearer": "bearer", "APIKeyQuery": "api_key", "SeedApiKey": "api_key"}
    auth = "".join(f'[auth.openapi.{name}]\n{field} = "{KEY}"\n' for name, field in schemes.items())
    config.write_text(auth + EXACT)
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{server}/openapi.json",
        "--max-time",
        seconds,
        "--seed",
        os.environ.get("CONTRACT_SEED", "1"),
        "--request-timeout",
        "30",
        # One worker: with two, hypothesis describes strategies (ast.parse) in two threads at once, which CPython
        # 3.11's parser can fail with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905):
        # a crash of the tool, not a finding about the server.
        "--workers",
        "1",
        "--no-color",
    ]
    log = tmp_path / "answers.jsonl"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "contract_hooks", "CONTRACT_LOG": str(log), "CONTRACT_KEY": KEY}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=float(seconds) + 300, env=env
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-8000:]
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    assert f"Tested: {operations}" in report, report[-3000:]  # every documented route was fuzzed

    answers = [json.loads(line) for line in log.read_text().splitlines()]
    refused = {(a["operation"], a["status"]) for a in answers if a["keyed"] and a["status"] == 401}
    assert not refused, f"a request bearing the valid key, where the document puts it, was refused: {refused}"
    secured = {a["operation"] for a in answers if a["secured"]}
    reached = {a["operation"] for a in answers if a["secured"] and a["keyed"] and a["status"] not in (401, 405)}
    assert secured == reached, f"operations the fuzzer never reached with the key: {sorted(secured - reached)}"
    shut = {a["operation"] for a in answers if not a["secured"] and a["status"] == 401}
    assert not shut, f"open routes that answered 401: {shut}"
