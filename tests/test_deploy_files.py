"""The files the ecosystem looks for: RunPod Hub's `.runpod/hub.json` and `tests.json` and the root `handler.py`,
`compose.yaml`, and the Kubernetes example under `deploy/kubernetes/` with its KEDA autoscaler.

Each is checked against the code it configures, not against a copy of it: setting names, defaults and values
against `Settings`; the modes, and the settings each mode needs, against `python app.py`'s own start-up checks;
the Hub's test inputs against the request schema; Kubernetes objects against Kubernetes' schemas (offline, with
kubernetes-validate); the queue KEDA watches against the job store's names, and against how the store fills and
empties it on a real redis-server.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import annotated_types
import kubernetes_validate
import pytest
import redis
import yaml
from pydantic import AliasChoices

import sdworker.jobs
import sdworker.platforms.runpod
from sdworker.config import Settings
from sdworker.jobs import Job
from sdworker.jobs.redis_store import RedisStore, _queue_key
from sdworker.jobs.worker import Worker
from sdworker.platforms import MODES, run
from sdworker.schema import parse_request

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / ".runpod"
KUBERNETES = ROOT / "deploy" / "kubernetes"
# Kubernetes versions the manifests must fit: an older one still in wide use, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def setting_names() -> dict[str, str]:
    """Every environment variable Settings reads -> its field: the field's name upper-cased, and its aliases."""
    names = {}
    for field_name, field in Settings.model_fields.items():
        names[field_name.upper()] = field_name
        alias = field.validation_alias
        for choice in alias.choices if isinstance(alias, AliasChoices) else [alias]:
            if isinstance(choice, str):
                names[choice.upper()] = field_name
    return names


SETTINGS = setting_names()


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings as a process whose environment holds exactly `env` (of the settings) reads them."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def build_args() -> dict[str, str]:
    """build_args.env: what the image bakes when no build argument is given."""
    pairs = (line.split("=", 1) for line in (ROOT / "build_args.env").read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.lstrip().startswith("#")}


class StoreOpenedError(Exception):
    """Raised where `python app.py` opens its job store: every check of its settings has passed by then."""


def starts(monkeypatch: pytest.MonkeyPatch, mode: str, env: dict[str, str]) -> Settings:
    """Run `python app.py --mode MODE` with exactly `env` up to the point it opens the job store, and answer the
    settings it got there. A setting the mode needs but lacks fails the test (app.py's message is in its stderr)."""
    reached: list[Settings] = []

    def open_store(settings: Settings) -> None:
        reached.append(settings)
        raise StoreOpenedError

    settings_from(monkeypatch, env)
    monkeypatch.setattr(sdworker.jobs, "open_store", open_store)
    with pytest.raises(SystemExit) as stopped:
        run(object(), ["--mode", mode])
    assert reached, f"--mode {mode} stopped before opening its job store (exit status {stopped.value.code})"
    return reached[0]


def mode_of(command: list[str]) -> str:
    """The mode a command line runs app.py in."""
    assert command[:3] == ["python", "-u", "app.py"] and "--mode" in command, command
    mode = command[command.index("--mode") + 1]
    assert mode in MODES, f"{command} names no mode of app.py ({', '.join(MODES)})"
    return mode


# --------------------------------------------------------------------------------------------------------------
# RunPod Hub: .runpod/hub.json, .runpod/tests.json, handler.py
# --------------------------------------------------------------------------------------------------------------
def hub() -> dict[str, Any]:
    return json.loads((HUB / "hub.json").read_text())


def hub_tests() -> dict[str, Any]:
    return json.loads((HUB / "tests.json").read_text())


def env_text(value: Any, spec: dict[str, Any]) -> str:
    """A value as RunPod puts it in the environment: booleans as the input's trueValue/falseValue."""
    if isinstance(value, bool):
        return spec.get("trueValue", "true") if value else spec.get("falseValue", "false")
    return str(value)


def test_hub_json_has_what_the_hub_reads() -> None:
    listing = hub()
    assert {"title", "description", "type", "category", "config"} <= listing.keys()
    assert listing["type"] == "serverless" and listing["category"] == "image"
    config = listing["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] >= 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 15  # image and weights
    assert all(re.fullmatch(r"-?[A-Z][A-Za-z0-9_ -]+", pool.strip()) for pool in config["gpuIds"].split(","))
    assert all(re.fullmatch(r"\d+\.\d+", version) for version in config["allowedCudaVersions"])
    for entry in config["env"]:
        assert entry.keys() in ({"key", "value"}, {"key", "input"}), entry


def test_hub_env_names_real_settings_with_their_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variable the Hub sets or offers is a setting; each offered default is the setting's own default and
    each option, bound and preset a value the worker accepts, read from the environment as RunPod sets it."""
    config = hub()["config"]
    inputs = {}

    def read(key: str, value: str) -> Settings:
        return settings_from(monkeypatch, {"S3_BUCKET": "a-bucket", key: value})  # OUTPUT_TYPE=s3 needs a bucket

    for entry in config["env"]:
        key = entry["key"]
        assert key in SETTINGS, f"hub.json sets {key}, which is no setting of sdworker.config.Settings"
        field_name, field = SETTINGS[key], Settings.model_fields[SETTINGS[key]]
        if "value" in entry:
            read(key, entry["value"])
            continue
        spec = inputs[key] = entry["input"]
        assert spec["name"] and spec["description"], key
        assert spec["type"] in ("string", "number", "boolean"), key
        if field.default is None:
            assert spec.get("default", "") == "", f"{key} has no default; hub.json offers {spec['default']!r}"
            assert getattr(read(key, ""), field_name) is None  # RunPod's empty value is no value
        else:
            assert "default" in spec, f"{key}: hub.json offers no default; the worker's is {field.default!r}"
            got = getattr(read(key, env_text(spec["default"], spec)), field_name)
            assert got == field.default, f"{key}: hub.json's default reads {got!r}, the worker's is {field.default!r}"
        if spec["type"] == "boolean":
            assert isinstance(spec["default"], bool)
            assert (spec["trueValue"], spec["falseValue"]) == ("true", "false"), key
        for option in spec.get("options", []):
            read(key, option["value"])  # raises on a value the worker refuses
        if "options" in spec:
            assert spec.get("default") in [option["value"] for option in spec["options"]], key
        if spec["type"] == "number":
            for bound in ("min", "max"):
                if bound in spec:
                    read(key, str(spec[bound]))
            ge = [c.ge for c in field.metadata if isinstance(c, annotated_types.Ge)]
            le = [c.le for c in field.metadata if isinstance(c, annotated_types.Le)]
            assert not ge or spec.get("min", float("-inf")) >= ge[0], f"{key}: min below the worker's {ge[0]}"
            assert not le or spec.get("max", float("inf")) <= le[0], f"{key}: max above the worker's {le[0]}"
    for preset in config.get("presets", []):
        for key, value in preset["defaults"].items():
            assert key in inputs, f"preset {preset['name']!r} sets {key}, which hub.json does not offer"
            read(key, env_text(value, inputs[key]))


def test_the_hub_runs_the_worker_in_runpod_mode_and_offers_no_build_time_setting() -> None:
    """The Hub runs the image's own command, `python -u app.py`, whose mode MODE chooses: hub.json and the
    release test set MODE=runpod. The model is baked when the image is built: an offered MODEL_ID (or any other
    bake setting) could only make the worker refuse to start; the description names the baked model instead."""
    assert re.search(r'^CMD \["python", "-u", "app.py"\]$', (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    listing, tests = hub(), hub_tests()
    static = {entry["key"]: entry["value"] for entry in listing["config"]["env"] if "value" in entry}
    assert static.get("MODE") == "runpod"
    assert {entry["key"]: entry["value"] for entry in tests["config"]["env"]}.get("MODE") == "runpod"
    baked = {*build_args(), "HF_TOKEN", "MODEL_DIR", "MODEL_ID", "BAKE_DTYPE", "ALLOW_PICKLE"}
    offered = {entry["key"] for entry in listing["config"]["env"]}
    assert not offered & baked, f"hub.json offers build-time settings {sorted(offered & baked)}"
    assert build_args()["MODEL_ID"] in listing["description"], "the description must name the baked MODEL_ID"


def test_the_hub_release_tests_send_inputs_the_worker_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    tests = hub_tests()
    assert tests["tests"], "tests.json runs no test"
    for test in tests["tests"]:
        assert test["name"] and isinstance(test["timeout"], int) and test["timeout"] >= 60_000  # ms, a cold start
        parse_request(test["input"])  # raises WorkerError naming the field on input the worker would refuse
    config = tests["config"]
    assert config["gpuCount"] >= 1 and config["gpuTypeId"].startswith("NVIDIA ")
    assert config["allowedCudaVersions"] == hub()["config"]["allowedCudaVersions"]
    settings_from(monkeypatch, {entry["key"]: entry["value"] for entry in config["env"]})
    assert {entry["key"] for entry in config["env"]} <= SETTINGS.keys()


def test_handler_py_starts_the_runpod_worker_as_app_py_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing handler.py starts nothing; running it is `python app.py --mode runpod`, whatever MODE or --mode
    say, and RunPod's own flags pass through to its SDK."""
    served: list[tuple[Any, Settings]] = []
    monkeypatch.setattr(sdworker.platforms.runpod, "serve", lambda app, settings: served.append((app, settings)))
    threads = set(threading.enumerate())
    import app
    import handler

    started = [thread.name for thread in set(threading.enumerate()) - threads if not thread.daemon]
    assert not served and not started, "importing handler.py started something"
    assert handler.app is app.app

    settings_from(monkeypatch, {"MODE": "serve"})
    monkeypatch.setattr(sys, "argv", ["handler.py", "--mode", "gateway", "--test_input", '{"input": {}}'])
    runpy.run_path(str(ROOT / "handler.py"), run_name="__main__")
    assert len(served) == 1
    assert served[0][0] is app.app and served[0][1].mode == "runpod"
    assert sys.argv[-2:] == ["--test_input", '{"input": {}}']  # left for RunPod's SDK, which reads sys.argv


# --------------------------------------------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------------------------------------------
COMPOSE_ENV = {"API_KEYS": "compose-test-key"}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error}, with `env` as the environment."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in env and (env[name] or ":" not in operator):
            return env[name]
        assert "?" not in operator, f"compose.yaml needs {name}: {rest}"
        return rest

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()), COMPOSE_ENV)


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1.27+, which reads this file format), where installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid_for_docker_compose() -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose): compose's "
            "own check of compose.yaml did not run; the other compose tests check its structure"
        )
    environ = {name: value for name, value in os.environ.items() if name not in SETTINGS}  # as on a clean shell
    check = [*command, "-f", str(ROOT / "compose.yaml"), "config", "-q"]
    result = subprocess.run(check, env={**environ, **COMPOSE_ENV}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    refused = subprocess.run(check, env=environ, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "API_KEYS" in refused.stderr, "compose.yaml must refuse to run without API_KEYS"


def test_compose_services_run_real_modes_with_the_settings_each_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert {"redis", "gateway", "worker"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["redis"]["healthcheck"]["test"]
    for name, expected in (("gateway", "gateway"), ("worker", "worker")):
        service = services[name]
        assert mode_of(service["command"]) == expected
        env = {key: str(value) for key, value in service["environment"].items()}
        assert env.keys() <= SETTINGS.keys(), f"{name} sets {sorted(env.keys() - SETTINGS.keys())}: no settings"
        settings = starts(monkeypatch, expected, env)
        assert urlsplit(settings.redis_url.get_secret_value()).hostname == "redis"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["image"] == services["gateway"]["image"] and service["build"]["context"] == "."

    gateway = services["gateway"]
    assert any("/health" in part for part in gateway["healthcheck"]["test"])
    assert [port.split(":")[-1] for port in gateway["ports"]] == [str(Settings.model_fields["port"].default)]
    # Without API_KEYS the gateway does not start (each gateway would make its own key).
    without_keys = {key: str(value) for key, value in gateway["environment"].items() if key != "API_KEYS"}
    settings_from(monkeypatch, without_keys)
    with pytest.raises(SystemExit) as stopped:
        run(object(), ["--mode", "gateway"])
    assert stopped.value.code == 2

    worker = services["worker"]
    assert {"ports", "container_name"}.isdisjoint(worker), "a worker with a fixed name or port cannot be scaled"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) > Settings.model_fields["shutdown_grace_s"].default


# --------------------------------------------------------------------------------------------------------------
# deploy/kubernetes/
# --------------------------------------------------------------------------------------------------------------
def manifests() -> list[dict[str, Any]]:
    """Every object of every manifest, examples included."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def pod_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The settings a Deployment's container gets: env, envFrom ConfigMaps and Secrets, and Secrets mounted
    at /run/secrets (the worker reads each file there as the setting it is named after)."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_maps, secrets = objects("ConfigMap"), objects("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]]["stringData"])
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == "/run/secrets":
            env.update(secrets[volumes[mount["name"]]["secret"]["secretName"]]["stringData"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable["value"]
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_fit_kubernetes_schemas(version: str) -> None:
    """Every object but KEDA's (a custom resource, checked below) against Kubernetes' own schemas, strict: an
    unknown or misspelt field fails."""
    checked, problems = 0, []
    for doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(part) for part in err.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {err.message}")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 8


def test_kubernetes_gateway_and_worker_run_real_modes_with_the_settings_each_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployments, services = objects("Deployment"), objects("Service")
    (redis_service,) = (s for s in services.values() if s["spec"]["selector"] == {"app.kubernetes.io/name": "redis"})
    assert "--appendonly" in objects("StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    namespaces = {doc["metadata"].get("namespace") for doc in manifests() if doc["kind"] != "Namespace"}
    assert namespaces == set(objects("Namespace")), "every object in the one namespace the manifests make"

    for name in ("gateway", "worker"):
        deployment = deployments[name]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = pod_env(deployment)
        assert env.keys() <= SETTINGS.keys(), f"{name} sets {sorted(env.keys() - SETTINGS.keys())}: no settings"
        settings = starts(monkeypatch, mode_of(container["command"]), env)
        assert settings.mode == name
        redis_at = urlsplit(settings.redis_url.get_secret_value())
        assert redis_at.hostname == redis_service["metadata"]["name"]
        assert redis_at.port == redis_service["spec"]["ports"][0]["port"]
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_grace_s
    assert pod_env(deployments["gateway"])["MODEL_KEY"] == pod_env(deployments["worker"])["MODEL_KEY"]

    (gateway,) = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports[gateway["readinessProbe"]["httpGet"]["port"]] == Settings.model_fields["port"].default
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert services["gateway"]["spec"]["ports"][0]["targetPort"] in ports
    for service in services.values():  # each Service selects the pods of a workload
        workloads = [*deployments.values(), *objects("StatefulSet").values()]
        labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
        assert any(service["spec"]["selector"].items() <= label.items() for label in labels), service
    (worker,) = deployments["worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "ports" not in worker and "readinessProbe" not in worker  # --mode worker serves no HTTP


def test_keda_scales_the_workers_from_zero_on_the_queue_they_read() -> None:
    """The ScaledObject (a KEDA custom resource, so no Kubernetes schema) targets the worker Deployment, may go to
    zero, and watches the stream the workers claim from: sdw:queue:<MODEL_KEY>, by the job store's own naming."""
    (scaled,) = objects("ScaledObject").values()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
             "initialCooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"}  # fmt: skip
    assert spec.keys() <= known, f"unknown ScaledObject fields {sorted(spec.keys() - known)}"
    deployments = objects("Deployment")
    target = deployments[spec["scaleTargetRef"]["name"]]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert mode_of(target["spec"]["template"]["spec"]["containers"][0]["command"]) == "worker"
    assert scaled["metadata"]["namespace"] == target["metadata"]["namespace"]
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA's trigger metadata is strings only"
    assert metadata["stream"] == _queue_key(pod_env(target)["MODEL_KEY"])
    assert "consumerGroup" not in metadata, "the store reads no consumer group: KEDA would count nothing pending"
    assert int(metadata["streamLength"]) > 0  # XLEN: jobs waiting and running
    redis_service = objects("Service")["redis"]
    host, port = metadata["address"].rsplit(":", 1)
    meta = redis_service["metadata"]
    assert host == f"{meta['name']}.{meta['namespace']}.svc.cluster.local", "KEDA's operator is in another namespace"
    assert int(port) == redis_service["spec"]["ports"][0]["port"]


def test_the_stream_keda_reads_counts_waiting_and_running_jobs_and_empties(redis_url: str) -> None:
    """What scaling from zero rests on, with the real store: a waiting job is in the stream (XLEN) and counted
    queued, a running one stays in it and is counted running, and an ended job leaves the stream."""
    model_key = f"keda-{uuid.uuid4().hex[:8]}"
    stream, client = _queue_key(model_key), redis.Redis.from_url(redis_url)
    store = RedisStore(Settings(redis_url=redis_url))
    try:
        job, _ = store.submit(Job(model_key=model_key, input={"prompt": "a"}))
        assert client.xlen(stream) == 1 and store.stats(model_key)["jobs"]["inQueue"] == 1
        worker = Worker(store, lambda route, payload: (200, {"images": []}), store.settings, model_key)
        claimed = store.claim(model_key, worker.id, timeout=1)
        assert claimed.id == job.id
        assert client.xlen(stream) == 1 and store.stats(model_key)["jobs"]["inProgress"] == 1
        worker.run_job(claimed)
        assert store.get(job.id).status == "COMPLETED"
        assert client.xlen(stream) == 0 and store.stats(model_key)["jobs"]["inProgress"] == 0
    finally:
        client.delete(stream)
        store.close()
