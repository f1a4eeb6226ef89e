"""Security settings as a platform engineer meets them: properties files, secret files, TLS refusals.

Real processes, a real broker, a real TLS endpoint (a TLS proxy in front of the test broker, with
certificates made by the ``openssl`` command); nothing of Kafka is mocked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamtrainer.broker import EmbeddedBroker
from streamtrainer.connection import admin_client, check_reachable, client_config
from streamtrainer.exceptions import BrokerUnavailableError, ConfigurationError
from streamtrainer.security import is_secret, read_properties, redact, scrub
from streamtrainer.settings import KafkaSettings, WorkerSettings, env_name
from tests.test_cli import run_cli

ENV_SECRET = "env-secret-Q7f3v"
PROPS_SECRET = "props-secret-Z9k2w"
FILE_SECRET = "file-secret-M4x8y"
SECRETS = (ENV_SECRET, PROPS_SECRET, FILE_SECRET)


@pytest.fixture()
def secret_sources(tmp_path: Path) -> dict[str, Any]:
    """A secret in each place one can come from: environment, properties file, secret file."""
    properties = tmp_path / "client.properties"
    properties.write_text(
        "# what a Kafka user already has\n"
        "security.protocol = PLAINTEXT\n"
        f"ssl.key.password={PROPS_SECRET}\n"
        "debug=all\n"
    )
    secret = tmp_path / "kafka-password"
    secret.write_text(FILE_SECRET + "\n")  # as `echo secret > file` or a Kubernetes secret leaves it
    return {
        "properties": properties,
        "secret": secret,
        "env": {env_name("kafka_config"): json.dumps({"sasl.oauthbearer.client.secret": ENV_SECRET})},
    }


def test_secrets_from_env_properties_and_secret_files_reach_librdkafka(
    secret_sources: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in secret_sources["env"].items():  # type: ignore[attr-defined]
        monkeypatch.setenv(name, value)
    # load: the environment is read as the CLI reads it (settings built in code do not read it).
    settings = KafkaSettings.load(
        {
            "bootstrap_servers": "127.0.0.1:1",
            "kafka_config_file": secret_sources["properties"],
            "kafka_secret_file": {"sasl.password": secret_sources["secret"]},
        }
    )
    config = client_config(settings, **{"group.id": "g"})
    assert config["sasl.oauthbearer.client.secret"] == ENV_SECRET
    assert config["ssl.key.password"] == PROPS_SECRET
    assert config["sasl.password"] == FILE_SECRET
    assert config["security.protocol"] == "PLAINTEXT"
    assert config["debug"] == "all"
    assert config["group.id"] == "g"
    # Held, but never shown: repr, str, redacted(), the digest recorded in checkpoints.
    for shown in (repr(settings), str(settings), json.dumps(settings.redacted()), settings.digest()):
        for secret in SECRETS:
            assert secret not in shown
    assert settings.redacted()["kafka_config"] == {"sasl.oauthbearer.client.secret": "[redacted]"}
    assert scrub(f"x {FILE_SECRET} y {PROPS_SECRET}") == "x [redacted] y [redacted]"


def test_precedence_file_then_kafka_config_then_secret_files_then_flags(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text(
        "bootstrap.servers=from-file:9092\nclient.id=from-file\nlinger.ms=1\nsasl.password=from-file\n"
    )
    secret = tmp_path / "pw"
    secret.write_text("from-secret-file")
    settings = KafkaSettings(
        kafka_config_file=properties,
        kafka_config={"client.id": "from-kafka-config", "sasl.password": "from-kafka-config"},
        kafka_secret_file={"sasl.password": secret},
    )
    config = client_config(settings, **{"linger.ms": 5})
    assert config["bootstrap.servers"] == "from-file:9092"  # no --bootstrap-servers: the file's
    assert config["client.id"] == "from-kafka-config"
    assert config["sasl.password"] == "from-secret-file"
    assert config["linger.ms"] == 5
    flagged = KafkaSettings(bootstrap_servers="flag:9092", kafka_config_file=properties)
    assert client_config(flagged)["bootstrap.servers"] == "flag:9092"


def test_java_client_properties_are_understood(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text(
        "! Confluent Cloud style\n"
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism: PLAIN\n"
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required \\\n"
        '    username="API-KEY" password="s3cr3t\\=pw";\n'
        "\n"
        "   # indented comment\n"
    )
    assert read_properties(properties)["sasl.mechanism"] == "PLAIN"
    config = client_config(KafkaSettings(bootstrap_servers="b:9092", kafka_config_file=properties))
    assert "sasl.jaas.config" not in config
    assert (config["sasl.username"], config["sasl.password"]) == ("API-KEY", "s3cr3t=pw")


def test_secret_keys_are_recognised() -> None:
    for key in (
        "sasl.password",
        "sasl.username",
        "sasl.jaas.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.truststore.password",
        "ssl_key",
        "SASL.PASSWORD",
    ):
        assert is_secret(key), key
    for key in ("security.protocol", "ssl.ca.location", "sasl.mechanism", "debug", "client.id"):
        assert not is_secret(key), key
    assert redact({"sasl.password": "x", "debug": "all"}) == {"sasl.password": "[redacted]", "debug": "all"}


def test_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"--kafka-config-file: cannot read .*missing\.properties"):
        client_config(
            KafkaSettings(bootstrap_servers="b:1", kafka_config_file=tmp_path / "missing.properties")
        )
    with pytest.raises(ConfigurationError, match=r"--kafka-secret-file sasl\.password: cannot read"):
        client_config(
            KafkaSettings(bootstrap_servers="b:1", kafka_secret_file={"sasl.password": tmp_path / "nope"})
        )
    result = run_cli(
        "worker",
        "--topic",
        "t",
        "--bootstrap-servers",
        "b:1",
        "--kafka-secret-file",
        f"sasl.password={tmp_path}/x",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "streamtrainer: error: --kafka-secret-file sasl.password: cannot read"
    )


def test_no_secret_in_any_output_of_a_debug_worker_run(
    secret_sources: dict[str, Any],
    bootstrap: str,
    topic_factory: Callable[..., str],
    group_id: str,
    tmp_path: Path,
) -> None:
    topic = topic_factory(partitions=1)
    env: dict[str, str] = dict(secret_sources["env"])  # type: ignore[call-overload]
    common = [
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--kafka-config-file",
        str(secret_sources["properties"]),
        "--kafka-secret-file",
        f"sasl.password={secret_sources['secret']}",
        "--log-level",
        "debug",
        "--metrics-port",
        "-1",
    ]
    produced = run_cli("produce", *common, "--max-records", "300", "--synthetic-task", "binary", env=env)
    assert produced.returncode == 0, produced.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    run_log = tmp_path / "run.jsonl"
    trained = run_cli(
        "worker",
        *common,
        "--group",
        group_id,
        "--model",
        "logistic",
        "--max-records",
        "300",
        "--session-timeout-ms",
        "6000",
        "--checkpoint-dir",
        str(checkpoints),
        "--run-log",
        str(run_log),
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "trained 300 record(s)" in trained.stdout
    # librdkafka really was debugging, and dumped its configuration (redacted).
    assert "Client configuration:" in trained.stderr
    assert "sasl.password = [redacted]" in trained.stderr
    failed = run_cli(
        "worker", *common[2:], "--bootstrap-servers", "127.0.0.1:1", "--startup-timeout-s", "1", env=env
    )
    assert failed.returncode == 1
    assert "cannot reach Kafka" in failed.stderr
    helps = [run_cli(command, "--help", env=env) for command in ("worker", "produce", "replay", "demo")]
    files = [path for path in [run_log, *checkpoints.rglob("*")] if path.is_file()]
    assert any(path.suffix == ".json" for path in files)
    outputs = [produced, trained, failed, *helps]
    for secret in SECRETS:
        for result in outputs:
            assert secret not in result.stdout + result.stderr, (result.args, secret)
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


# -- TLS ------------------------------------------------------------------------------


@dataclass
class Certificates:
    ca: Path
    server_cert: Path  # for localhost and 127.0.0.1
    server_key: Path
    wrong_name_cert: Path  # for kafka.example.com only
    wrong_name_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    directory = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=streamtrainer test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        cwd=directory,
    )  # fmt: skip
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("wrong", "DNS:kafka.example.com")):
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory
        )
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=directory,
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        wrong_name_cert=directory / "wrong.pem",
        wrong_name_key=directory / "wrong.key",
    )


class TlsProxy:
    """A TLS endpoint on loopback that forwards the decrypted bytes to a plaintext broker.

    A dedicated Tansu advertises the proxy's address, so every connection librdkafka makes (the
    bootstrap one, then the broker's) goes through TLS. ``use`` changes the certificate presented."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.upstream: tuple[str, int] | None = None
        self.handshake_errors: list[str] = []
        self.context: ssl.SSLContext | None = None

    def use(self, cert: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.context = context
        self.handshake_errors.clear()

    def serve_forever(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        assert self.context is not None and self.upstream is not None
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.handshake_errors.append(str(error))
            raw.close()
            return
        broker = socket.create_connection(self.upstream)
        threading.Thread(target=_pump, args=(tls, broker), daemon=True).start()
        _pump(broker, tls)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for each in (source, sink):
        with contextlib.suppress(OSError):
            each.shutdown(socket.SHUT_RDWR)


class _AdvertisedBroker(EmbeddedBroker):
    def __init__(self, advertised: str) -> None:
        super().__init__()
        self.advertised = advertised

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--advertised-listener-url") + 1] = f"tcp://{self.advertised}"
        return command


@pytest.fixture(scope="module")
def tls_endpoint(certificates: Certificates) -> Iterator[TlsProxy]:
    proxy = TlsProxy()
    proxy.use(certificates.server_cert, certificates.server_key)
    with _AdvertisedBroker(proxy.address) as broker:
        proxy.upstream = (broker.host, broker.port)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            yield proxy
        finally:
            proxy.listener.close()


@contextlib.contextmanager
def tls_proxy(endpoint: TlsProxy, cert: Path, key: Path) -> Iterator[TlsProxy]:
    endpoint.use(cert, key)
    yield endpoint


def _tls_settings(address: str, **kafka_config: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=address,
        kafka_config={"security.protocol": "SSL", **kafka_config},
        startup_timeout_s=3,
    )


def _reach(settings: KafkaSettings) -> None:
    check_reachable(admin_client(settings), settings)


def test_tls_with_the_right_ca_and_name_reaches_the_broker(
    certificates: Certificates, tls_endpoint: TlsProxy
) -> None:
    with tls_proxy(tls_endpoint, certificates.server_cert, certificates.server_key) as proxy:
        _reach(_tls_settings(proxy.address, **{"ssl.ca.location": str(certificates.ca)}))


def test_tls_unknown_ca_is_refused_with_a_clear_error(
    certificates: Certificates, tls_endpoint: TlsProxy
) -> None:
    with (
        tls_proxy(tls_endpoint, certificates.server_cert, certificates.server_key) as proxy,
        pytest.raises(BrokerUnavailableError) as refused,
    ):
        _reach(_tls_settings(proxy.address))  # no ssl.ca.location: the system's CAs
    message = str(refused.value)
    assert message.startswith(f"cannot reach Kafka at {proxy.address}")
    assert "ssl://" in message and "SSL routines::certificate verify failed" in message, message


def test_tls_wrong_host_name_is_refused(certificates: Certificates, tls_endpoint: TlsProxy) -> None:
    with (
        tls_proxy(tls_endpoint, certificates.wrong_name_cert, certificates.wrong_name_key) as proxy,
        pytest.raises(BrokerUnavailableError) as refused,
    ):
        # The certificate is trusted but names kafka.example.com; endpoint identification is
        # librdkafka's default (https), said here explicitly.
        _reach(
            _tls_settings(
                proxy.address,
                **{
                    "ssl.ca.location": str(certificates.ca),
                    "ssl.endpoint.identification.algorithm": "https",
                },
            )
        )
    message = str(refused.value)
    assert "ssl://" in message and "SSL routines::certificate verify failed" in message, message


@pytest.mark.parametrize(
    "insecure",
    [
        {"enable.ssl.certificate.verification": "false"},
        {"ssl.endpoint.identification.algorithm": "none"},
    ],
)
def test_tls_verification_off_needs_the_insecure_flag(
    insecure: dict[str, str], certificates: Certificates, tls_endpoint: TlsProxy
) -> None:
    ((key, value),) = insecure.items()
    with pytest.raises(
        ConfigurationError, match=f"{key}={value} turns off verification.*--allow-insecure-tls"
    ):
        client_config(_tls_settings("127.0.0.1:1", **insecure))
    # The CLI refuses it before connecting anywhere: one line, exit 2.
    result = run_cli(
        "worker", "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--kafka-config", f"{key}={value}"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"streamtrainer: error: {key}={value} turns off verification of the broker's identity; "
        "pass --allow-insecure-tls (STREAMTRAINER_ALLOW_INSECURE_TLS=true) if you really mean it"
    ]
    # With the flag it is accepted: an untrusted certificate, or the wrong name, is let through.
    cert, cert_key = (
        (certificates.server_cert, certificates.server_key)
        if key == "enable.ssl.certificate.verification"
        else (certificates.wrong_name_cert, certificates.wrong_name_key)
    )
    extra = {} if key == "enable.ssl.certificate.verification" else {"ssl.ca.location": str(certificates.ca)}
    with tls_proxy(tls_endpoint, cert, cert_key) as proxy:
        allowed = KafkaSettings(
            bootstrap_servers=proxy.address,
            kafka_config={"security.protocol": "SSL", **insecure, **extra},
            allow_insecure_tls=True,
            startup_timeout_s=5,
        )
        _reach(allowed)  # a refused handshake would raise BrokerUnavailableError


def test_insecure_flag_is_a_worker_flag_and_env() -> None:
    settings = WorkerSettings(topic="t", allow_insecure_tls=True)  # type: ignore[call-arg]
    assert settings.allow_insecure_tls
    help_text = run_cli("worker", "--help").stdout
    assert "--allow-insecure-tls" in help_text
    assert "--kafka-config-file" in help_text and "--kafka-secret-file" in help_text
