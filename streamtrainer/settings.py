"""Every option of streamtrainer, its default, its help text and its environment name.

This is the only place configuration is defined. Each field of a settings class
is read, in order of precedence, from a command-line flag (the CLI builds its
flags from these fields), the command's own ``STREAMTRAINER_<COMMAND>_<FIELD>``
environment variable (``STREAMTRAINER_WORKER_SEED``), the shared
``STREAMTRAINER_<FIELD>`` one, a ``--config`` TOML file (its command's section,
then ``[kafka]``, then top-level keys), then the default below. A list is written the same way in a flag and a
variable (``a,b``, or JSON), and as a native array in the file. Settings objects
are frozen: a running worker never sees its configuration change.

Only :meth:`_Settings.load` (what the CLI calls) reads the environment and a
``--config`` file. Settings built in code (``WorkerSettings(topic="t")``, in a
user's process or in streamtrainer's own, such as the demo's worker) take their
arguments and the defaults, nothing else: a ``STREAMTRAINER_*`` variable meant for
a command-line worker on the same host never changes an embedded one.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import tomllib
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamtrainer.exceptions import ConfigurationError
from streamtrainer.records.model_version import DEFAULT_INLINE_LIMIT_BYTES
from streamtrainer.security import redact
from streamtrainer.training import catalog
from streamtrainer.training.catalog import Task

ENV_PREFIX = "STREAMTRAINER_"

Codec = Literal["json", "binary"]
ModelName = str  # linear | logistic | softmax | mlp | package.module:factory
# Literal types for the flags' choices; tests/test_catalog.py holds them equal to the catalog's.
OptimizerName = Literal["sgd", "adam", "adagrad"]
LossName = Literal["auto", "mse", "l1", "bce", "ce", "audit"]
OffsetReset = Literal["earliest", "latest"]
LogLevel = Literal["debug", "info", "warning", "error"]

# The learner's own defaults (training.LearnerConfig; a test holds them equal): not imported from
# there, as that would import torch (1-2 s) before a usage error could be reported.
DEFAULT_OPTIMIZER: OptimizerName = "adagrad"
DEFAULT_LR = 0.1
# The compaction schedule of an mlp or a custom model (the field defaults are the linear models'):
# on the quality bench's nonlinear tuning streams (5,000 records, bench/quality.py --grid), every
# 500 records for 10 epochs over the last 2,000 took the mlp from 74.3% to 78.0% (rbf_drift), 86.8%
# to 87.5% (agrawal_drift) and MAE 1.38 to 1.23 (friedman). It costs ~40 record-steps of epochs per
# record online: an mlp worker trades throughput for learning within a few thousand records; set
# --compaction-every-records 2000 --compaction-epochs 3 for the linear models' schedule.
NONLINEAR_COMPACTION: dict[str, int] = {"compaction_every_records": 500, "compaction_epochs": 10}


class _Settings(BaseSettings):
    # enable_decoding=False: a list or dict variable is parsed by _parse_collections below (a,b or
    # JSON), as a flag is, not as JSON only. validate_by_name: a renamed field's old variable is an
    # alias (AliasChoices), and its name still validates.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
        enable_decoding=False,
        validate_by_name=True,
        validate_by_alias=True,
    )

    # The command's section of a --config file ([worker], ...); None: a shared group of settings.
    config_section: ClassVar[str | None] = None
    # Old public names kept for a release as hidden aliases (flag, variable, file key): old -> new.
    # An old name that is still another command's setting (produce's seed, now synthetic_seed) is
    # an alias only where it is this command's own: its flag, its section, its command's variable.
    renamed: ClassVar[dict[str, str]] = {}
    # The commands these settings are for, as STREAMTRAINER_<SCOPE>_<FIELD> variables scope them
    # ("DLQ_INSPECT": the [dlq] section's STREAMTRAINER_DLQ_ is the worker's dlq_* settings).
    env_scopes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > the command's variables (when a command is loading) > the shared
        variables > the --config file (when one is loading) > defaults. Outside :meth:`load`
        (settings built in code): the arguments and the defaults only."""
        if not _READING_SOURCES.get():
            return (init_settings,)
        scope = _ENV_SCOPE.get()
        command_env = (_CommandEnvSource(settings_cls, scope),) if scope is not None else ()
        sources = (init_settings, *command_env, env_settings, dotenv_settings, file_secret_settings)
        path = _CONFIG_FILE.get()
        if path is None:
            return sources
        return (*sources, _ConfigFileSource(settings_cls, path))

    @classmethod
    def load(cls, flags: dict[str, Any], config_file: Path | None = None, scope: str | None = None) -> Self:
        """The settings from these flags, the environment (``scope``'s variables first, e.g.
        ``WORKER``; default: the class's first) and ``config_file`` (a TOML file), in that order.

        What the CLI calls; the one way to read the environment (``cls(**values)`` does not).
        """
        scope = scope or (cls.env_scopes[0] if cls.env_scopes else None)
        with _loading_config_file(config_file), _loading_scope(scope), _reading_sources():
            return cls(**flags)

    @field_validator("*", mode="before")
    @classmethod
    def _parse_collections(cls, value: Any, info: ValidationInfo) -> Any:
        """A list as ``a,b`` or JSON, a dict as ``K=V,K=V`` or a JSON object: the same in a flag and a
        variable; in the file, a native array or table (its scalar values made strings)."""
        name = info.field_name
        field = cls.model_fields.get(name) if name is not None else None
        kind = _collection_kind(field.annotation) if field is not None else None
        if kind is None or value is None:
            return value
        return parse_collection(kind, value)

    def digest(self) -> str:
        """A short, stable hash of the configuration (recorded with checkpoints).

        Hashed without the secrets: rotating a password is not a change of configuration, and a hash
        of a short password could be brute-forced."""
        canonical = json.dumps(self.redacted(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to print or log: secret librdkafka values are masked."""
        return _redact_dump(self.model_dump(mode="json"))

    def __repr_args__(self) -> Any:
        # repr() and str() of settings (a log line, a traceback) never show a secret either.
        for name, value in super().__repr_args__():
            yield name, (redact(value) if name in _KAFKA_CONFIG_FIELDS and isinstance(value, dict) else value)


# Settings whose values are librdkafka settings (keyed by librdkafka property names).
_KAFKA_CONFIG_FIELDS = frozenset({"kafka_config"})


def _redact_dump(dumped: dict[str, Any]) -> dict[str, Any]:
    for name in _KAFKA_CONFIG_FIELDS & dumped.keys():
        if isinstance(dumped[name], dict):
            dumped[name] = redact(dumped[name])
    return dumped


def _collection_kind(annotation: Any) -> type | None:
    """list or dict for a (possibly optional) list or dict field, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    origin = typing.get_origin(annotation)
    return origin if origin in (list, dict) else None


def parse_collection(kind: type, value: Any) -> Any:
    """A list or dict setting from a flag's values, a variable's string or a file's array or table.

    A string is JSON if it starts with ``[`` or ``{``, else comma-separated items: ``a,b`` for a
    list, ``K=V,K=V`` for a dict (a piece without ``=`` continues the previous value, so
    ``bootstrap.servers=a:9092,b:9092`` keeps both servers). Errors never show the value (a secret)."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                "not valid JSON (expected a,b or a JSON list / K=V,K=V or a JSON object)"
            ) from None
        if not isinstance(value, kind):
            raise ValueError(f"expected a JSON {'list' if kind is list else 'object'}")
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        return [part.strip() for item in items for part in _pieces(item) if part.strip()]
    if isinstance(value, dict):
        return {str(key): _scalar_text(item) for key, item in value.items()}
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        return value
    result: dict[str, str] = {}
    last: str | None = None
    for item in items:
        for piece in str(item).split(","):
            key, sep, text = piece.partition("=")
            if sep and key.strip():
                last = key.strip()
                result[last] = text
            elif last is not None and not sep:
                result[last] += "," + piece
            elif piece.strip():
                raise ValueError("expected KEY=VALUE[,KEY=VALUE...] or a JSON object")
    return result


def _pieces(item: Any) -> list[str]:
    return str(item).split(",") if isinstance(item, str) else [str(item)]


def _scalar_text(value: Any) -> Any:
    """A TOML table's value as librdkafka takes it: true/false, numbers as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _env_aliases(name: str, *old: str) -> AliasChoices:
    """The variable of a renamed field: its own name first, then the old one (deprecated)."""
    return AliasChoices(f"{ENV_PREFIX}{name.upper()}", *(f"{ENV_PREFIX}{o.upper()}" for o in old))


class KafkaSettings(_Settings):
    """How to reach the Kafka cluster (shared by every command that talks to it)."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers, host:port[,host:port]. "
        "Unset: commands that can (demo) start the embedded broker.",
    )
    kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka settings, KEY=VALUE[,KEY=VALUE] (repeatable; env: the same or a "
        "JSON object). Override --kafka-config-file.",
    )
    kafka_config_file: Path | None = Field(
        default=None,
        description="librdkafka settings from a Java-style client.properties file (key=value lines, "
        "# comments), e.g. security.protocol, ssl.*, sasl.*.",
    )
    kafka_secret_file: dict[str, Path] = Field(
        default_factory=dict,
        description="KEY=PATH: the librdkafka setting KEY is the content of the file PATH (a Kubernetes "
        "or Docker secret, trailing newline dropped), e.g. sasl.password=/run/secrets/kafka-password "
        "(repeatable; env: KEY=PATH,... or a JSON object). Overrides --kafka-config.",
    )
    allow_insecure_tls: bool = Field(
        default=False,
        description="Allow enable.ssl.certificate.verification=false and "
        "ssl.endpoint.identification.algorithm=none (refused otherwise).",
    )
    startup_timeout_s: float = Field(
        default=15.0, gt=0, description="Give up if the broker cannot be reached in this time."
    )


class MetricsSettings(_Settings):
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the Prometheus endpoint binds to (0.0.0.0 to expose it).",
    )
    metrics_port: int = Field(
        default=9464, ge=-1, le=65535, description="Prometheus port; 0 picks a free one, -1 disables."
    )
    log_level: LogLevel = Field(default="info", description="Log level.")


class ProducerSettings(KafkaSettings, MetricsSettings):
    """`streamtrainer produce`."""

    config_section: ClassVar[str | None] = "produce"
    env_scopes: ClassVar[tuple[str, ...]] = ("PRODUCE",)
    # The generator's seed and task are the data's, not a model's (the worker's --seed, --task).
    renamed: ClassVar[dict[str, str]] = {
        "count": "max_records",
        "seed": "synthetic_seed",
        "task": "synthetic_task",
    }

    topic: str = Field(description="Topic to publish to.")
    metrics_port: int = Field(
        default=9465, ge=-1, le=65535, description="Prometheus port; 0 picks a free one, -1 disables."
    )
    source: str = Field(
        default="synthetic", description="synthetic | csv:PATH | jsonl:PATH | - (stdin, JSON lines)."
    )
    max_records: int | None = Field(
        default=None,
        ge=0,
        validation_alias=_env_aliases("max_records", "count"),
        description="Stop after publishing this many records (default: all; synthetic: 10000).",
    )
    rate: float | None = Field(
        default=None, gt=0, description="Records per second (default: as fast as possible)."
    )
    skip: int = Field(
        default=0,
        ge=0,
        description=(
            "Resume after this source position, unread: N lines of a JSON-lines file (blank ones "
            "too), N rows after a CSV header, N synthetic records. A run prints the N to resume with."
        ),
    )
    codec: Codec = Field(default="json", description="Wire format of the records.")
    label: str | None = Field(default=None, description="CSV: the label column.")
    key_column: str | None = Field(default=None, description="CSV: the column used as record key.")
    features: list[str] | None = Field(
        default=None,
        description="CSV: the feature columns, in this order (default: every column but the label, the "
        "key and --ignore-columns).",
    )
    ignore_columns: list[str] | None = Field(
        default=None, description="CSV: columns that are not features (an id, a text column)."
    )
    partitions: int | None = Field(
        default=None, ge=1, description="Create the topic with this many partitions if it is missing."
    )
    # Synthetic generator.
    synthetic_task: Task = Field(default="regression", description="Synthetic task: the labels generated.")
    n_features: int = Field(default=8, ge=1, description="Synthetic feature dimension.")
    n_classes: int = Field(default=3, ge=2, description="Synthetic multi-class: number of classes.")
    nonlinear: bool = Field(default=False, description="Synthetic: a concept no linear model separates.")
    noise: float = Field(default=0.1, ge=0, description="Synthetic label noise (std, or flip probability).")
    synthetic_seed: int = Field(default=0, description="Synthetic random seed (of the data, not a model's).")
    drift: Literal["none", "abrupt", "gradual"] = Field(
        default="none", description="Synthetic concept drift."
    )
    drift_at: int = Field(default=0, ge=0, description="Synthetic: record index where drift starts.")
    drift_width: int = Field(default=1000, ge=1, description="Synthetic gradual drift: records it takes.")
    n_keys: int = Field(default=0, ge=0, description="Synthetic: number of distinct record keys (0: no key).")
    progress: bool | None = Field(default=None, description="Progress bar (default: when on a terminal).")


class ModelSettings(_Settings):
    """The model and how it learns: shared by the worker and replay."""

    model: ModelName = Field(
        default="linear", description="linear | logistic | softmax | mlp | package.module:factory."
    )
    task: Task | None = Field(
        default=None,
        description="regression | binary | multiclass (default: from the model: linear, logistic, "
        "softmax; required for mlp and a custom model).",
    )
    loss: LossName = Field(default="auto", description="Loss (auto: mse, bce or ce by task).")
    # Chosen on the quality bench's tuning datasets (bench/quality.py, docs/quality.md): with
    # standardized features and labels, Adagrad at 0.1 was best or within 0.5 pp of the best of
    # sgd/adagrad/adam x 3-4 rates on each, where sgd 0.01 (the old default) lost up to 2 pp and
    # sgd 0.1 diverged on a regression: the adaptive, normalized update Vowpal Wabbit defaults to.
    optimizer: OptimizerName = Field(default=DEFAULT_OPTIMIZER, description="Optimizer.")
    lr: float = Field(default=DEFAULT_LR, gt=0, description="Learning rate.")
    hidden: int = Field(default=128, ge=1, description="mlp: hidden units.")
    n_features: int | None = Field(
        default=None, ge=1, description="Feature dimension (default: from the first record)."
    )
    feature_names: list[str] | None = Field(
        default=None, description="Feature order for object-form features (default: first record's)."
    )
    n_classes: int | None = Field(default=None, ge=2, description="multiclass: number of classes.")
    standardize: bool = Field(default=True, description="Feature standardization (running mean/variance).")
    standardize_target: bool = Field(
        default=True,
        description="Regression: learn the label standardized online (running mean/variance); predictions "
        "and losses stay in the label's units, so a label around 43 or 43,000 needs no tuning.",
    )
    seed: int = Field(default=0, description="Seed for model initialisation (and replay's shuffles).")
    device: str = Field(default="cpu", description="Torch device.")
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="Intra-op threads of torch and of the compiled loop's BLAS (1: best beside the broker).",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Cache of the compiled training loops (numba, in <cache-dir>/numba) and of a custom "
        "module's compiled step graphs (<cache-dir>/graphs); never in the installed package (default: "
        "NUMBA_CACHE_DIR's parent if set, else $XDG_CACHE_HOME/streamtrainer or ~/.cache/streamtrainer).",
    )

    @model_validator(mode="after")
    def _check_model(self) -> Self:
        # A test-only model ("audit", tests/test_crash_recovery.py) is accepted, never offered.
        if self.model not in catalog.MODELS and ":" not in self.model:
            raise ValueError(
                f"model {self.model!r} is neither built in ({', '.join(sorted(catalog.offered_models()))}) "
                f"nor {catalog.FACTORY_FORM}"
            )
        if ":" in self.model:
            _check_factory(self.model)
        _check_device("--device", self.device)
        if self.task is None and catalog.implied_task(self.model) is None:
            # Guessing would be worse than asking: 0/1 labels trained as a regression (the old
            # default) look like learning and are not what was meant.
            raise ValueError(f"--model {self.model} needs --task (regression, binary or multiclass)")
        if self.resolved_task == "multiclass" and self.n_classes is None:
            raise ValueError("a multiclass model needs n_classes (--n-classes)")
        return self

    @property
    def resolved_task(self) -> Task:
        """The task trained: ``task``, or the one the built-in model implies (regression otherwise)."""
        if self.task is not None:
            return self.task
        return catalog.implied_task(self.model) or "regression"


def _check_factory(spec: str) -> None:
    """A ``package.module:factory`` model is imported and its call checked before anything connects."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"--model {spec!r}: cannot import {module_name!r} ({error}); the module must be importable: "
            "install it, or put its folder on PYTHONPATH"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name!r} has no callable {attribute!r}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a callable without a signature (a builtin): it is called as it is
    try:
        signature.bind(n_features=1, n_outputs=1)
    except TypeError as error:
        raise ValueError(
            f"--model {spec!r}: the factory must accept the keywords n_features= and n_outputs= ({error})"
        ) from None


def _check_device(flag: str, device: str) -> None:
    """A torch device that this machine and this torch build have; torch is imported for any but cpu."""
    if device == "cpu":
        return
    # Imported here (1-2 s): only when a device other than the CPU is asked for.
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{flag} {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cpu":
        return
    try:
        # Creating a tensor there is the one check every device type answers the same way.
        torch.empty(0, device=parsed)
    except (AssertionError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{flag} {device!r} is not available here (torch {torch.__version__}: {reason})"
        ) from None


class ErrorBudgetSettings(_Settings):
    """How many records that cannot be trained on a run tolerates (shared by the worker and replay)."""

    errors_tolerance: Literal["none", "budget", "all"] = Field(
        default="budget",
        description="Records that cannot be trained on are dead-lettered; then: none: stop at the first; "
        "budget: stop once more than --error-budget of the last --error-budget-window records were; "
        "all: never stop (Kafka Connect's errors.tolerance).",
    )
    error_budget: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Largest share of invalid or refused records tolerated over the window (exit 3 past it).",
    )
    error_budget_window: int = Field(
        default=1000, ge=1, description="Records consumed over which --error-budget is measured."
    )


class WorkerSettings(KafkaSettings, MetricsSettings, ModelSettings, ErrorBudgetSettings):
    """`streamtrainer worker`."""

    config_section: ClassVar[str | None] = "worker"
    env_scopes: ClassVar[tuple[str, ...]] = ("WORKER",)

    topic: str = Field(description="Topic to train from.")
    group: str = Field(default="streamtrainer", description="Consumer group id.")
    fused: bool = Field(
        default=True,
        description="Compiled per-record loops for the built-in models on the CPU (off: autograd).",
    )
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="Clip each update's gradient to this norm (default: no clipping)."
    )
    spike_factor: float | None = Field(
        default=None,
        gt=1,
        description="Skip the update of a record whose loss exceeds this multiple of the running loss "
        "(e.g. 20; default: off).",
    )
    max_consecutive_skips: int = Field(
        default=100,
        ge=1,
        description="After this many skipped updates in a row, roll back to the last checkpoint.",
    )
    lr_backoff: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="When the model diverges (refused records pass on the last checkpoint's model), roll "
        "back and multiply the learning rate by this.",
    )
    max_lr_backoffs: int = Field(
        default=5,
        ge=0,
        description="Stop with an error after this many learning-rate backoffs in a row that never get "
        "the model past the records where it diverged.",
    )
    update_batch: int = Field(
        default=1,
        ge=1,
        description="Records per optimizer step: 1 is strict per-record learning; B>1 micro-batches.",
    )
    prequential_window: int = Field(
        default=1000,
        ge=1,
        description="Records in the progressive metrics' window (reported beside the whole run's).",
    )
    poll_batch: int = Field(
        default=10_000,
        ge=1,
        description="Most records taken from the consumer per poll (and trained per update call); "
        "fewer while updates are slow (a poll's update aims at 0.1 s) and never past the next compaction.",
    )
    overlap: bool = Field(
        default=True,
        description="Run each polled batch's compiled training loop in a background thread while "
        "the next one is polled (same updates in the same order). --no-overlap keeps it on the poll "
        "loop's thread (bench/README.md has the figures).",
    )
    auto_offset_reset: OffsetReset = Field(
        default="earliest", description="Where a partition with no committed offset starts."
    )
    session_timeout_ms: int = Field(default=10000, ge=1000, description="Consumer group session timeout.")
    checkpoint_dir: Path = Field(
        default=Path("checkpoints"), description="This worker's checkpoints (one directory per worker)."
    )
    checkpoint_every_records: int = Field(
        default=100_000, ge=1, description="Checkpoint after this many records."
    )
    checkpoint_interval_s: float = Field(default=30.0, gt=0, description="Checkpoint at least this often.")
    checkpoint_keep: int = Field(default=3, ge=1, description="Checkpoints kept on disk.")
    fresh: bool = Field(default=False, description="Ignore existing checkpoints and start a new model.")
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = Field(
        default="cooperative-sticky",
        description="cooperative-sticky (incremental rebalances), or the eager range / roundrobin.",
    )
    group_instance_id: str | None = Field(
        default=None,
        description=(
            "Static group membership id: a restarted worker gets its partitions back "
            "(Apache Kafka; on the embedded Tansu broker it can wedge the group)."
        ),
    )
    max_records: int | None = Field(
        default=None, ge=1, description="Stop after consuming this many records (trained or dead-lettered)."
    )
    max_seconds: float | None = Field(default=None, gt=0, description="Stop after this many seconds.")
    stop_at_end: bool = Field(
        default=False,
        description="A bounded run: stop (checkpoint, commit, exit 0) once every assigned partition is "
        "read up to the end offset it had when assigned (a member with no partition waits: add "
        "--max-seconds).",
    )
    admin_endpoints: bool = Field(
        default=False,
        description="Serve the admin endpoints (POST /compact) on the metrics port; off, they answer 404. "
        "They have no authentication: enable them only where the port is not reachable by others.",
    )
    metrics_linger_s: float = Field(
        default=20.0,
        ge=0,
        description="After stopping on an error (the error budget), keep /metrics up this long so "
        "Prometheus scrapes why (when the metrics endpoint is on).",
    )
    run_log: Path | None = Field(
        default=None, description="Append a JSON line of run statistics here every second."
    )
    dlq_topic: str | None = Field(
        default=None, description="Dead-letter topic for records that cannot be trained on (<topic>.dlq)."
    )
    dlq_kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka settings for the dead-letter producer only, KEY=VALUE (e.g. another "
        "bootstrap.servers).",
    )
    max_value_bytes: int = Field(
        default=1_048_576, ge=1, description="Larger record values are dead-lettered as oversize."
    )
    predictions_topic: str | None = Field(
        default=None,
        description="Write each trained record's test-then-train prediction (made before its update) "
        "here, keyed like its input, JSON; exactly once, visible when its checkpoint commits "
        "(docs/predictions-and-versions.md).",
    )
    publish_models: bool = Field(
        default=False,
        description="Publish model versions (a manifest and the safetensors artifact) to the compacted "
        "models topic at checkpoints (--models-topic, default <topic>.models).",
    )
    models_topic: str | None = Field(
        default=None,
        description="The compacted models topic (default <topic>.models); naming it turns "
        "--publish-models on.",
    )
    model_name: str | None = Field(
        default=None, description="The models topic's record key for this model (default: the topic's name)."
    )
    models_every_checkpoints: int = Field(
        default=1,
        ge=1,
        description="Publish the checkpoints whose version is a multiple of N (1: every checkpoint).",
    )
    models_inline_limit_bytes: int = Field(
        default=DEFAULT_INLINE_LIMIT_BYTES,
        ge=0,
        description="Artifacts up to this size go inline in the models topic's record; larger ones are "
        "written to <checkpoint-dir>/versions/ and the record carries their file:// uri.",
    )
    models_keep_files: int = Field(
        default=10,
        ge=1,
        description="Artifact files kept in <checkpoint-dir>/versions/ (the newest N; not expired with "
        "checkpoints).",
    )
    worker_id: str | None = Field(
        default=None, description="Names this worker in dead-letter headers (default: host and a random id)."
    )
    init_from: Path | None = Field(
        default=None,
        description="Start a new model from the newest checkpoint in this directory (e.g. a replay's), "
        "when this worker has no checkpoint of its own.",
    )
    compaction: bool = Field(
        default=True, description="Batch epochs over the consumed log (off: strict online learning only)."
    )
    compaction_every_records: int | None = Field(
        default=2000,
        ge=1,
        description="Compact the consumed log into batch epochs every N records (an mlp or custom "
        "model: 500).",
    )
    compaction_interval_s: float | None = Field(
        default=None, gt=0, description="Also compact at least this often (seconds)."
    )
    compaction_window: int = Field(
        default=2000, ge=1, description="Records per compaction: the last W records consumed."
    )
    compaction_since_previous: bool = Field(
        default=False,
        description="Compact every record since the previous compaction instead of the last W.",
    )
    compaction_dedupe: bool = Field(
        default=False, description="Keep only the last record per key (Kafka log-compaction semantics)."
    )
    compaction_epochs: int = Field(
        default=3, ge=1, description="Epochs per compaction (an mlp or custom model: 10)."
    )
    compaction_batch_size: int = Field(default=8, ge=1, description="Mini-batch size in compaction epochs.")
    compaction_lr: float | None = Field(
        default=None,
        gt=0,
        description="Learning rate of compaction epochs (default: --lr). Slow online learners (an mlp, "
        "a small --lr) gain from a larger one, e.g. --lr times the batch size.",
    )
    compaction_device: str | None = Field(
        default=None, description="Torch device for compaction epochs (default: --device), e.g. cuda."
    )
    compaction_dir: Path | None = Field(
        default=None,
        description="Where consumed records spill to disk (default: <checkpoint-dir>/compaction-store).",
    )
    compaction_memory_records: int = Field(
        default=50000, ge=1, description="Consumed records kept in memory before spilling to disk."
    )
    compaction_retain_records: int | None = Field(
        default=1_000_000, ge=1, description="Most consumed records kept on disk for compaction."
    )
    compaction_retain_bytes: int | None = Field(
        default=None, ge=1, description="Most bytes of consumed records kept on disk for compaction."
    )
    drift_detector: Literal["page-hinkley", "none"] = Field(
        default="page-hinkley",
        description="Drift detector on the prequential loss: each detection is counted "
        "(streamtrainer_drift_detections_total) and, with compaction on, compacts the records since "
        "the estimated change point (reason drift).",
    )
    drift_delta: float = Field(
        default=0.3,
        ge=0,
        description="Page-Hinkley delta: the rise of the loss per record taken for noise, in mean losses "
        "(the detector sees each loss over the mean loss since its last detection, clipped at 5).",
    )
    drift_threshold: float = Field(
        default=50.0,
        gt=0,
        description="Page-Hinkley threshold (lambda): the accumulated rise of the loss that is a drift, "
        "in mean losses.",
    )
    drift_min_instances: int = Field(
        default=30,
        ge=1,
        description="Records the detector sees (after a start or a detection) before it tests.",
    )
    drift_every_records: int = Field(
        default=1000,
        ge=1,
        description="A detected drift compacts at the next multiple of N records trained since the last "
        "compaction (polls end there, so a restarted worker compacts where an uninterrupted one would).",
    )

    distributed: bool = Field(
        default=False,
        description="One model across the ranks of a torchrun launch (torch.distributed, gloo): partition "
        "p is trained by rank p mod WORLD_SIZE and the ranks average their models every few records "
        "(--average-every-records, --average-interval-s); rank 0 checkpoints and commits. Launch: "
        "torchrun --nproc-per-node=N -m streamtrainer worker --distributed ...",
    )
    # ~0.5 ms per round for a d=16 MLP on 2 gloo ranks (design notes, "Scale-out"), and a few ms of
    # ranks reaching the round at different moments: every 100,000 records of the group (~0.1-0.3 s
    # at this machine's rates) keeps the overhead near 2% (docs/semantics.md, "One model").
    average_every_records: int = Field(
        default=100_000,
        ge=1,
        description="--distributed: average about every N records the group trains (paced by the last "
        "round's rate, so every rank agrees when without talking).",
    )
    average_interval_s: float = Field(
        default=5.0, gt=0, description="--distributed: average at least this often (seconds)."
    )
    # Every rank's fresh model pays the cold start (the first few hundred records cost ~25% of a
    # 1.5M-record stream's whole prequential loss on one worker): two ranks learning apart pay it
    # twice, +10.6% on that stream at K=100,000. Averaging after every step of each rank until the
    # group has trained 2,000 records brings it to +1.4% (python -m bench.distributed quality).
    average_warmup_records: int = Field(
        default=2_000,
        ge=0,
        description="--distributed: a new model (no checkpoint yet) is averaged after every step of "
        "each rank (one record, or one --batch-size) until the group has trained N records; 0: off.",
    )
    average_reduction: Literal["mean", "sum"] = Field(
        default="mean",
        description="--distributed: mean (the ranks' models weighted by the records each trained) or "
        "sum (the round's start plus every rank's update: exact for models whose updates add up, "
        "such as counts).",
    )
    collective_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="--distributed: a rank that does not reach a round (or the start) within this many "
        "seconds fails the others, and torchrun restarts the group from the last checkpoint.",
    )

    @model_validator(mode="before")
    @classmethod
    def _compaction_defaults_of_the_model(cls, data: Any) -> Any:
        """A model with a hidden layer compacts more often and longer, unless told otherwise."""
        if isinstance(data, dict) and data.get("distributed") and data.get("compaction") is None:
            # Not yet with --distributed (a rank's epochs over its own records would stall the
            # rounds and train the group's model on one rank's share): off unless asked for.
            data["compaction"] = False
        if isinstance(data, dict) and catalog.is_nonlinear(str(data.get("model", "linear"))):
            for name, value in NONLINEAR_COMPACTION.items():
                if data.get(name) is None and name not in data:
                    data[name] = value
        return data

    @model_validator(mode="after")
    def _check_compaction(self) -> WorkerSettings:
        if self.model == "audit" and self.compaction:
            # The audit model's weights are the sum of the records applied once each; batch epochs
            # would apply them again and hide exactly what it is there to show.
            raise ValueError("the audit model counts each record exactly once: use --no-compaction")
        if self.distributed and self.compaction:
            raise ValueError("compaction is not supported with --distributed yet: use --no-compaction")
        if self.predictions_topic is not None and self.distributed:
            # Not yet: only rank 0 checkpoints, so each rank's predictions would have to commit when
            # a round tells it rank 0's checkpoint holds their records (docs/semantics.md).
            raise ValueError("--predictions-topic is not supported with --distributed yet")
        outputs = {self.predictions_topic, self.resolved_models_topic} - {None}
        wanted = (self.predictions_topic is not None) + self.publishes_models
        if self.topic in outputs or len(outputs) < wanted:
            raise ValueError("--predictions-topic, --models-topic and --topic must name different topics")
        if self.compaction and self.compaction_device is not None:
            _check_device("--compaction-device", self.compaction_device)
        retained = self.compaction_memory_records + (self.compaction_retain_records or 0)
        if self.compaction and self.compaction_retain_bytes is None and retained < self.compaction_window:
            raise ValueError(
                f"compaction_window {self.compaction_window} is more than the store keeps "
                f"({self.compaction_memory_records} in memory + {self.compaction_retain_records} on disk)"
            )
        return self

    @property
    def publishes_models(self) -> bool:
        """Whether checkpoints are published to the models topic (--publish-models or --models-topic)."""
        return self.publish_models or self.models_topic is not None

    @property
    def resolved_models_topic(self) -> str | None:
        """The models topic (None: not publishing): --models-topic, else ``<topic>.models``."""
        if not self.publishes_models:
            return None
        return self.models_topic or f"{self.topic}.models"

    @property
    def resolved_model_name(self) -> str:
        """The models topic's record key: --model-name, else the input topic's name."""
        return self.model_name or self.topic


class ReplaySettings(KafkaSettings, ModelSettings, ErrorBudgetSettings):
    """`streamtrainer replay`: train a model in epochs on a bounded, recorded range of a topic."""

    # from_: validated by name in code, by STREAMTRAINER_FROM in the environment (a Python keyword).
    config_section: ClassVar[str | None] = "replay"
    env_scopes: ClassVar[tuple[str, ...]] = ("REPLAY",)
    renamed: ClassVar[dict[str, str]] = {"end_idle_s": "idle_s"}

    topic: str | None = Field(default=None, description="Topic to read (required unless --manifest).")
    from_: str = Field(
        default="earliest",
        validation_alias=f"{ENV_PREFIX}FROM",
        description="Range start: earliest | P:O,... (partition:offset) | ISO-8601 time (no zone: UTC).",
    )
    to: str = Field(
        default="end",
        description="Range end (exclusive): end (the end of the log when reading finishes) | P:O,... | "
        "ISO-8601 time.",
    )
    epochs: int = Field(default=5, ge=1, description="Passes over the range.")
    batch_size: int = Field(default=256, ge=1, description="Records per optimizer step.")
    out: Path = Field(
        description="Output directory: checkpoints/ and manifest.json (records spill to shards/ meanwhile)."
    )
    init_from: Path | None = Field(
        default=None,
        description="Start from the newest valid checkpoint in this directory (a worker's or a replay's).",
    )
    holdout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Fraction of the range held out for evaluation."
    )
    manifest: Path | None = Field(
        default=None,
        description="Replay exactly the topic, range and seed of this manifest.json (config: its "
        "values unless given).",
    )
    memory_records: int = Field(
        default=50000, ge=1, description="Records kept in memory while reading; the rest spill to disk."
    )
    idle_s: float = Field(
        default=1.0,
        gt=0,
        validation_alias=_env_aliases("idle_s", "end_idle_s"),
        description="--to end: reading stops once no record arrived for this long.",
    )
    progress: bool | None = Field(default=None, description="Progress bars (default: when on a terminal).")
    log_level: LogLevel = Field(default="info", description="Log level.")

    @model_validator(mode="after")
    def _check_topic(self) -> ReplaySettings:
        if self.manifest is None and not self.topic:
            raise ValueError("--topic is required (or --manifest)")
        return self


class DeadLetterSettings(KafkaSettings):
    """`streamtrainer dlq inspect|redrive`: the records a worker could not train on."""

    config_section: ClassVar[str | None] = "dlq"
    env_scopes: ClassVar[tuple[str, ...]] = ("DLQ_INSPECT", "DLQ_REDRIVE")
    renamed: ClassVar[dict[str, str]] = {"limit": "max_records"}

    topic: str = Field(description="The source topic whose dead letters to read.")
    dlq_topic: str | None = Field(default=None, description="Dead-letter topic (default: <topic>.dlq).")
    reason: list[str] | None = Field(
        default=None,
        description="Only records dead-lettered for these reasons (e.g. non_finite; repeatable).",
    )
    source_offsets: list[str] | None = Field(
        default=None,
        description="Only these source records, as PARTITION:OFFSET (repeatable); any not found is "
        "reported, and redrive then exits 1.",
    )
    group: list[str] | None = Field(
        default=None, description="Only records dead-lettered by these consumer groups (repeatable)."
    )
    force: bool = Field(
        default=False, description="redrive: publish records redriven already, too (they are skipped)."
    )
    max_records: int | None = Field(
        default=None,
        ge=1,
        validation_alias=_env_aliases("max_records", "limit"),
        description="Stop after this many records (redrive: source records).",
    )
    idle_s: float = Field(
        default=30.0, gt=0, description="Reading fails if nothing arrived for this long before the end."
    )
    log_level: LogLevel = Field(default="warning", description="Log level.")


class DemoSettings(MetricsSettings, KafkaSettings):
    """`streamtrainer demo`: producer and worker on one topic, on the embedded broker by default."""

    config_section: ClassVar[str | None] = "demo"
    env_scopes: ClassVar[tuple[str, ...]] = ("DEMO",)

    topic: str = Field(default="streamtrainer-demo", description="Demo topic.")
    records: int = Field(default=60000, ge=1000, description="Records to produce and train.")
    partitions: int = Field(
        default=1,
        ge=1,
        description="Partitions of the demo topic (1 keeps the order: the drift shows where it happens).",
    )
    task: Task = Field(default="binary", description="Synthetic task of the demo.")
    n_features: int = Field(default=8, ge=1, description="Feature dimension.")
    codec: Codec = Field(default="json", description="Wire format.")
    rate: float | None = Field(
        default=3000,
        gt=0,
        description="Producer rate (records/s): the stream arrives at a pace you can watch. The worker "
        "trains far faster; raise it to see how fast.",
    )
    live: bool | None = Field(default=None, description="Live terminal view (default: on a terminal).")
    out_dir: Path = Field(default=Path("runs/demo"), description="Where the demo writes its run log.")
    compaction: bool = Field(
        default=True, description="Compaction epochs in the demo's worker (off: online learning only)."
    )


# The promotion gate's figures (training.progressive.TASK_METRICS): lower is better for these, higher
# for the others (accuracy, r2, roc_auc, macro_f1). Listed here, not imported: no torch before a
# usage error.
GATE_LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
GATE_FIGURES = frozenset({"loss", "mae", "rmse", "r2", "accuracy", "roc_auc", "macro_f1"})
GATE_SCOPES = ("run", "window")


class ServeSettings(KafkaSettings):
    """`streamtrainer serve`: HTTP predictions from the newest model version that passes the gate."""

    config_section: ClassVar[str | None] = "serve"
    env_scopes: ClassVar[tuple[str, ...]] = ("SERVE",)

    checkpoint_dir: Path | None = Field(
        default=None,
        description="Serve the newest valid checkpoint of this directory (a worker's --checkpoint-dir, "
        "read without its lock) and each newer one.",
    )
    models_topic: str | None = Field(
        default=None,
        description="Serve the newest version of --model-name from this compacted models topic "
        "(read_committed, from its beginning) and each newer one; needs --bootstrap-servers.",
    )
    model_name: str | None = Field(
        default=None,
        description="The models topic's key to serve (default: the topic's name without its "
        "'.models' suffix: the input topic's name, as the worker publishes it).",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 to expose it).")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="--checkpoint-dir: look for a newer checkpoint this often."
    )
    gate_metric: str = Field(
        default="auto",
        description="The prequential figure a new version is judged by: run.<figure> or "
        "window.<figure> (loss, mae, rmse, r2, accuracy, roc_auc, macro_f1); auto: window.rmse for a "
        "regression, window.loss (log loss) for a classification; none: every newer version is served.",
    )
    gate_margin: float = Field(
        default=0.05,
        ge=0,
        description="A new version is served unless its --gate-metric is worse than the served "
        "version's by more than this fraction of it (0.05: 5%).",
    )
    log_level: LogLevel = Field(default="info", description="Log level.")

    @field_validator("gate_metric")
    @classmethod
    def _check_gate_metric(cls, value: str) -> str:
        if value in ("auto", "none"):
            return value
        scope, _, figure = value.partition(".")
        if scope not in GATE_SCOPES or figure not in GATE_FIGURES:
            raise ValueError(
                f"{value!r}: use auto, none, or run.<figure> / window.<figure> with a figure of "
                f"{', '.join(sorted(GATE_FIGURES))}"
            )
        return value

    @model_validator(mode="after")
    def _check_source(self) -> ServeSettings:
        if (self.checkpoint_dir is None) == (self.models_topic is None):
            raise ValueError("give one model source: --checkpoint-dir or --models-topic")
        return self


ExportFormatName = Literal["torchscript", "onnx"]


class ExportSettings(_Settings):
    """`streamtrainer export`: a trained model as a TorchScript or ONNX file, standardizers folded in."""

    config_section: ClassVar[str | None] = "export"
    env_scopes: ClassVar[tuple[str, ...]] = ("EXPORT",)

    checkpoint_dir: Path | None = Field(
        default=None,
        description="Export the newest valid checkpoint of this directory (a worker's --checkpoint-dir "
        "or a replay's --out).",
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Export this checkpoint (its <version>.json) or model version manifest (.json).",
    )
    format: ExportFormatName = Field(
        default="torchscript", description="torchscript (torch.jit.load) or onnx (onnxruntime)."
    )
    output: Path = Field(description="The file to write.")
    log_level: LogLevel = Field(default="warning", description="Log level.")

    @model_validator(mode="after")
    def _check_source(self) -> ExportSettings:
        if (self.checkpoint_dir is None) == (self.checkpoint is None):
            raise ValueError("give one model: --checkpoint-dir or --checkpoint")
        return self


def cli_fields(settings_class: type[_Settings]) -> dict[str, Any]:
    """The fields of a settings class (for building command-line flags)."""
    return dict(settings_class.model_fields)


def public_name(field: str) -> str:
    """The name of a field's flag and environment variable: a trailing ``_`` (``from_``) is dropped."""
    return field.removesuffix("_")


def env_name(field: str) -> str:
    """The shared environment variable of a setting: ``STREAMTRAINER_<NAME>``."""
    return f"{ENV_PREFIX}{public_name(field).upper()}"


def command_env_name(scope: str, field: str) -> str:
    """A command's own variable of a setting, ``STREAMTRAINER_<SCOPE>_<NAME>`` (over the shared one)."""
    return f"{ENV_PREFIX}{scope}_{public_name(field).upper()}"


def command_scope(command: str) -> str:
    """The scope of a command's variables: ``dlq inspect`` -> ``DLQ_INSPECT``."""
    return "_".join(command.split()).replace("-", "_").upper()


class _CommandEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source with a command's prefix (``STREAMTRAINER_WORKER_``).

    Each field is read from its command variable only (a renamed field's old name too, deprecated),
    never from the shared aliases of a renamed field, and is keyed as the shared source keys it, so
    that the command's value overrides the shared one."""

    def __init__(self, settings_cls: type[BaseSettings], scope: str) -> None:
        self._scope = scope
        self._renamed = settings_cls.renamed if issubclass(settings_cls, _Settings) else {}
        super().__init__(settings_cls, env_prefix=f"{ENV_PREFIX}{scope}_")

    def _extract_field_info(
        self, field: FieldInfo, field_name: str, model_config: Any = None
    ) -> list[tuple[str, str, bool]]:
        shared = super()._extract_field_info(field, field_name, model_config)
        key = shared[0][0]  # the preferred alias (a renamed field's new variable), else the name
        complex_value = any(entry[2] for entry in shared)
        names = [field_name, *(old for old, new in self._renamed.items() if new == field_name)]
        return [
            (key, self._apply_case_sensitive(command_env_name(self._scope, name)), complex_value)
            for name in names
        ]


# -- the --config file -----------------------------------------------------------

# Each command's settings, by its section of a --config file; [kafka] holds the shared connection.
COMMAND_SETTINGS: dict[str, type[_Settings]] = {
    "produce": ProducerSettings,
    "worker": WorkerSettings,
    "replay": ReplaySettings,
    "dlq": DeadLetterSettings,
    "demo": DemoSettings,
    "serve": ServeSettings,
    "export": ExportSettings,
}
KAFKA_SECTION = "kafka"
CONFIG_SECTIONS = (KAFKA_SECTION, *COMMAND_SETTINGS)

# The file a settings class is loading from (set by _Settings.load, read by settings_customise_sources).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("streamtrainer_config_file", default=None)


# The command whose STREAMTRAINER_<SCOPE>_* variables a settings class is loading (set by _Settings.load).
_ENV_SCOPE: ContextVar[str | None] = ContextVar("streamtrainer_env_scope", default=None)


# Whether a settings class reads the environment and the --config file (True only inside _Settings.load).
_READING_SOURCES: ContextVar[bool] = ContextVar("streamtrainer_reading_sources", default=False)


@contextmanager
def _reading_sources() -> Iterator[None]:
    token = _READING_SOURCES.set(True)
    try:
        yield
    finally:
        _READING_SOURCES.reset(token)


@contextmanager
def _loading_config_file(path: Path | None) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


@contextmanager
def _loading_scope(scope: str | None) -> Iterator[None]:
    token = _ENV_SCOPE.set(scope)
    try:
        yield
    finally:
        _ENV_SCOPE.reset(token)


def live_names() -> frozenset[str]:
    """Every field of every command (an old name among them is renamed only in its own command)."""
    return frozenset(field for command in COMMAND_SETTINGS.values() for field in command.model_fields)


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file's TOML document; ConfigurationError (one line) if it cannot be read or parsed."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigurationError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except tomllib.TOMLDecodeError as error:
        reason = " ".join(str(error).split())
        raise ConfigurationError(f"--config {path}: not valid TOML: {reason}") from None
    for section in CONFIG_SECTIONS:
        if section in document and not isinstance(document[section], dict):
            raise ConfigurationError(f"--config {path}: {section} must be a table ([{section}])")
    return document


def _field_key(key: str, settings_class: type[_Settings], *, shared: bool = False) -> str | None:
    """The field a file key names (``-`` or ``_``, ``from`` for ``from_``, an old name), or None.
    ``shared``: a top-level or [kafka] key, where an old name that is another command's setting
    (``seed``) is that setting, not this command's renamed one."""
    name = key.replace("-", "_")
    if not (shared and name in live_names()):
        name = settings_class.renamed.get(name, name)
    for candidate in (name, name + "_"):
        if candidate in settings_class.model_fields:
            return candidate
    return None


def config_values(document: dict[str, Any], settings_class: type[_Settings]) -> dict[str, Any]:
    """What a --config document gives one command: its top-level keys, then [kafka], then its own
    section (later wins); keys the command does not have are left out (config_warnings names them)."""
    tables: list[dict[str, Any]] = [{k: v for k, v in document.items() if k not in CONFIG_SECTIONS}]
    tables.append(document.get(KAFKA_SECTION, {}))
    if settings_class.config_section is not None:
        tables.append(document.get(settings_class.config_section, {}))
    values: dict[str, Any] = {}
    for index, table in enumerate(tables):
        for key, value in table.items():
            field = _field_key(key, settings_class, shared=index < 2)
            if field is not None:
                values[field] = value
    return values


def config_warnings(document: dict[str, Any]) -> list[str]:
    """A line for each key or section of a --config document that no command would read (with the
    likely intended name), and for each old name of a renamed setting."""
    lines: list[str] = []
    everyone: dict[str, type[_Settings]] = {}
    for settings_class in COMMAND_SETTINGS.values():
        everyone.update(dict.fromkeys(settings_class.model_fields, settings_class))

    def check(where: str, key: str, classes: list[type[_Settings]]) -> None:
        name = key.replace("-", "_")
        if any(_field_key(key, c) is not None and name not in c.renamed for c in classes):
            return  # a setting (of another command too: a top-level seed is the model's)
        for settings_class in classes:
            if name in settings_class.renamed:
                lines.append(f"{where}{key} is deprecated: use {settings_class.renamed[name]}")
                return
            if _field_key(key, settings_class) is not None:
                return
        known = sorted({public_name(f) for c in classes for f in c.model_fields})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"unknown key {where}{key} ignored{hint}")

    for key, value in document.items():
        if key in CONFIG_SECTIONS:
            continue
        if isinstance(value, dict) and _collection_kind(_annotation_of(key)) is not dict:
            close = difflib.get_close_matches(key, CONFIG_SECTIONS, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            lines.append(f"unknown section [{key}] ignored{hint}")
            continue
        check("", key, list(COMMAND_SETTINGS.values()))
    for key in document.get(KAFKA_SECTION, {}):
        check(f"[{KAFKA_SECTION}] ", key, [KafkaSettings])
    for section, settings_class in COMMAND_SETTINGS.items():
        for key in document.get(section, {}):
            check(f"[{section}] ", key, [settings_class])
    return lines


def _annotation_of(key: str) -> Any:
    """The annotation of the field a top-level key names in any command (None: no such field)."""
    for settings_class in COMMAND_SETTINGS.values():
        field = _field_key(key, settings_class)
        if field is not None:
            return settings_class.model_fields[field].annotation
    return None


class _ConfigFileSource(TomlConfigSettingsSource):
    """pydantic-settings' TOML source, reading one command's values out of a sectioned --config file."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self._command = settings_cls
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        command = self._command if issubclass(self._command, _Settings) else None
        if command is None:
            return {}
        return config_values(read_config_file(Path(file_path)), command)
