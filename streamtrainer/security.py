"""Kafka security settings: where they come from, which of them are secret, and what is refused.

librdkafka's settings reach a client from, in order of precedence (later wins):

1. ``--kafka-config-file`` — a Java-style ``client.properties`` file;
2. ``--kafka-config KEY=VALUE`` / ``STREAMTRAINER_KAFKA_CONFIG``;
3. ``--kafka-secret-file KEY=PATH`` / ``STREAMTRAINER_KAFKA_SECRET_FILE`` — the value is the content
   of the file (a Kubernetes or Docker secret), without its trailing newline;
4. what the command itself sets (group id, acks, ...).

:func:`resolve` merges the first three; :func:`streamtrainer.connection.client_config` is the only
caller. Values of secret keys (:func:`is_secret`) never reach a log line or an error message: they
are redacted in settings dumps, and :class:`SecretScrubber` removes them from any log record.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from streamtrainer.exceptions import ConfigurationError

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"

# A key is secret when its lower-cased name contains one of these. Erring on the side of redacting:
# librdkafka's own "sensitive" properties (ssl.key.password, ssl.key.pem, ssl_key, ssl.keystore.password,
# sasl.username, sasl.password, sasl.oauthbearer.client.secret, sasl.oauthbearer.config, ...), the Java
# client's (sasl.jaas.config, ssl.truststore.password) and anything that looks like a credential.
SECRET_KEY_MARKERS: tuple[str, ...] = (
    "password",
    "secret",
    "jaas",
    "token",
    "credential",
    "private",
    "ssl.key",
    "ssl_key",
    "keystore",
    "sasl.username",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion",
    "api.key",
    "apikey",
)

# Settings that turn off the verification of the broker's identity.
_FALSE = {"false", "f", "0", "no", "off"}
_INSECURE_HINT = "pass --allow-insecure-tls (STREAMTRAINER_ALLOW_INSECURE_TLS=true) if you really mean it"

# Values shorter than this are not scrubbed from free text (it would garble every log line);
# librdkafka redacts its sensitive properties itself.
_MIN_SCRUBBED_LENGTH = 4


def is_secret(key: str) -> bool:
    """Whether the value of the librdkafka (or Java client) setting ``key`` is a secret."""
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_KEY_MARKERS)


def redact(config: Mapping[str, object]) -> dict[str, object]:
    """``config`` with the value of every secret key replaced by ``[redacted]``."""
    return {key: REDACTED if is_secret(key) else value for key, value in config.items()}


# -- sources -----------------------------------------------------------------------


def read_properties(path: Path) -> dict[str, str]:
    """A Java ``.properties`` file: ``key=value`` (or ``key: value``, ``key value``) lines, ``#`` and
    ``!`` comments, a trailing ``\\`` continues a line, ``\\`` escapes (``\\=``, ``\\:``, ``\\t``,
    ``\\n``, ``\\uXXXX``). Surrounding whitespace of keys and values is dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"--kafka-config-file: cannot read {path}: {_why(error)}") from None
    result: dict[str, str] = {}
    logical = ""
    for raw in text.splitlines():
        line = raw.strip() if not logical else raw.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        if _continues(line):
            logical += line[:-1]
            continue
        logical += line
        key, value = _split_property(logical)
        logical = ""
        if key:
            result[key] = value
    if logical:
        key, value = _split_property(logical)
        if key:
            result[key] = value
    return result


def _continues(line: str) -> bool:
    backslashes = len(line) - len(line.rstrip("\\"))
    return backslashes % 2 == 1


def _split_property(line: str) -> tuple[str, str]:
    index = 0
    while index < len(line) and line[index] not in "=: \t\f":
        index += 2 if line[index] == "\\" else 1
    rest = line[index:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return _unescape(line[:index]), _unescape(rest.rstrip())


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            nxt = text[index + 1]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[index + 2 : index + 6]):
                out.append(chr(int(text[index + 2 : index + 6], 16)))
                index += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def read_secret_file(key: str, path: Path) -> str:
    """The secret in ``path`` (one trailing newline, as ``echo`` or an editor leaves it, is dropped)."""
    try:
        value = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"--kafka-secret-file {key}: cannot read {path}: {_why(error)}") from None
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigurationError(f"--kafka-secret-file {key}: {path} is empty")
    return value


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


# sasl.jaas.config (Java): PlainLoginModule / ScramLoginModule required username="..." password="...";
_JAAS_OPTION = re.compile(r"""(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([^\s;]+))""")


def _translate_jaas(config: dict[str, str]) -> None:
    """librdkafka has no ``sasl.jaas.config``: take username and password from a Java client's."""
    jaas = config.pop("sasl.jaas.config", None)
    if jaas is None:
        return
    options: dict[str, str] = {}
    for match in _JAAS_OPTION.finditer(jaas):
        name, double, single, bare = match.groups()
        value = double if double is not None else single if single is not None else bare
        options[name] = re.sub(r"\\(.)", r"\1", value or "")
    if "username" not in options or "password" not in options:
        raise ConfigurationError(
            "sasl.jaas.config is a Java client setting: only a PlainLoginModule or ScramLoginModule "
            "with username and password is understood; set librdkafka's sasl.* settings instead"
        )
    config.setdefault("sasl.username", options["username"])
    config.setdefault("sasl.password", options["password"])


def resolve(
    *,
    config_file: Path | None,
    kafka_config: Mapping[str, str],
    secret_files: Mapping[str, Path],
) -> dict[str, str]:
    """The user's librdkafka settings: properties file < ``kafka_config`` < secret files."""
    config: dict[str, str] = {}
    if config_file is not None:
        config.update(read_properties(config_file))
    config.update(kafka_config)
    for key, path in secret_files.items():
        config[key] = read_secret_file(key, Path(path))
    _translate_jaas(config)
    remember_secrets(value for key, value in config.items() if is_secret(key))
    return config


# -- refusals ------------------------------------------------------------------------


def insecure_tls_settings(config: Mapping[str, object]) -> list[str]:
    """The settings in ``config`` that disable the verification of the broker's certificate or name."""
    found = []
    verification = config.get("enable.ssl.certificate.verification")
    if verification is not None and str(verification).strip().lower() in _FALSE:
        found.append(f"enable.ssl.certificate.verification={verification}")
    algorithm = config.get("ssl.endpoint.identification.algorithm")
    if algorithm is not None and str(algorithm).strip().lower() in ("none", ""):
        found.append(f"ssl.endpoint.identification.algorithm={algorithm}")
    return found


def check_tls(config: dict[str, object], *, allow_insecure: bool) -> None:
    """Refuse settings that turn off TLS verification unless ``allow_insecure``.

    Java's way to turn off host name verification, an empty ``ssl.endpoint.identification.algorithm``,
    becomes librdkafka's ``none`` when allowed.
    """
    insecure = insecure_tls_settings(config)
    if not insecure:
        return
    if not allow_insecure:
        raise ConfigurationError(
            f"{' and '.join(insecure)} turns off verification of the broker's identity; {_INSECURE_HINT}"
        )
    if str(config.get("ssl.endpoint.identification.algorithm", "x")).strip() == "":
        config["ssl.endpoint.identification.algorithm"] = "none"
    _warn_once(f"TLS verification of the broker is off ({', '.join(insecure)}): --allow-insecure-tls")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


# -- keeping secrets out of logs -------------------------------------------------------

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def remember_secrets(values: Iterable[str]) -> None:
    """Scrub these values from every log record (and error line) from now on."""
    global _pattern  # noqa: PLW0603 - one process-wide set, read lock-free by the log filter
    new = {value for value in values if len(value) >= _MIN_SCRUBBED_LENGTH}
    with _secrets_lock:
        if new <= _secrets:
            return
        _secrets.update(new)
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(value) for value in ordered))


def scrub(text: str) -> str:
    """``text`` with every known secret value replaced by ``[redacted]``."""
    pattern = _pattern
    if pattern is None:
        return text
    return pattern.sub(REDACTED, text)


class SecretScrubber(logging.Filter):
    """A logging filter that removes known secret values from a record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not ours
            return True
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


SCRUBBER = SecretScrubber()


def install_log_scrubbing(*loggers: logging.Logger) -> None:
    """Attach the scrubber to the root logger's handlers and to ``loggers`` (idempotent)."""
    for handler in logging.getLogger().handlers:
        if SCRUBBER not in handler.filters:
            handler.addFilter(SCRUBBER)
    for each in loggers:
        if SCRUBBER not in each.filters:
            each.addFilter(SCRUBBER)
