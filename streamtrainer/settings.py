"""Every option of streamtrainer, its default, its help text and its environment name.

This is the only place configuration is defined. Each field of a settings class
is read, in order of precedence, from a command-line flag (the CLI builds its
flags from these fields), a ``STREAMTRAINER_<FIELD>`` environment variable, then
the default below. Settings objects are frozen: a running worker never sees its
configuration change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STREAMTRAINER_"

Codec = Literal["json", "binary"]
Task = Literal["regression", "binary", "multiclass"]
ModelName = str  # linear | logistic | softmax | mlp | package.module:factory
OptimizerName = Literal["sgd", "adam", "adagrad"]
LossName = Literal["auto", "mse", "l1", "bce", "ce"]
OffsetReset = Literal["earliest", "latest"]
LogLevel = Literal["debug", "info", "warning", "error"]

BUILTIN_TASKS: dict[str, Task] = {"linear": "regression", "logistic": "binary", "softmax": "multiclass"}


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    def digest(self) -> str:
        """A short, stable hash of the configuration (recorded with checkpoints)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to print or log."""
        return self.model_dump(mode="json")


class KafkaSettings(_Settings):
    """How to reach the Kafka cluster (shared by every command that talks to it)."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers, host:port[,host:port]. "
        "Unset: commands that can (demo) start the embedded broker.",
    )
    kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka settings, KEY=VALUE (repeatable).",
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

    topic: str = Field(description="Topic to publish to.")
    metrics_port: int = Field(
        default=9465, ge=-1, le=65535, description="Prometheus port; 0 picks a free one, -1 disables."
    )
    source: str = Field(
        default="synthetic", description="synthetic | csv:PATH | jsonl:PATH | - (stdin, JSON lines)."
    )
    count: int | None = Field(
        default=None, ge=0, description="Number of records to publish (default: all; synthetic: 10000)."
    )
    rate: float | None = Field(
        default=None, gt=0, description="Records per second (default: as fast as possible)."
    )
    codec: Codec = Field(default="json", description="Wire format of the records.")
    label: str | None = Field(default=None, description="CSV: the label column.")
    key_column: str | None = Field(default=None, description="CSV: the column used as record key.")
    partitions: int | None = Field(
        default=None, ge=1, description="Create the topic with this many partitions if it is missing."
    )
    # Synthetic generator.
    task: Task = Field(default="regression", description="Synthetic task.")
    n_features: int = Field(default=8, ge=1, description="Synthetic feature dimension.")
    n_classes: int = Field(default=3, ge=2, description="Synthetic multi-class: number of classes.")
    nonlinear: bool = Field(default=False, description="Synthetic: a concept no linear model separates.")
    noise: float = Field(default=0.1, ge=0, description="Synthetic label noise (std, or flip probability).")
    seed: int = Field(default=0, description="Synthetic random seed.")
    drift: Literal["none", "abrupt", "gradual"] = Field(
        default="none", description="Synthetic concept drift."
    )
    drift_at: int = Field(default=0, ge=0, description="Synthetic: record index where drift starts.")
    drift_width: int = Field(default=1000, ge=1, description="Synthetic gradual drift: records it takes.")
    n_keys: int = Field(default=0, ge=0, description="Synthetic: number of distinct record keys (0: no key).")
    progress: bool | None = Field(default=None, description="Progress bar (default: when on a terminal).")


class WorkerSettings(KafkaSettings, MetricsSettings):
    """`streamtrainer worker`."""

    topic: str = Field(description="Topic to train from.")
    group: str = Field(default="streamtrainer", description="Consumer group id.")
    model: ModelName = Field(
        default="linear", description="linear | logistic | softmax | mlp | package.module:factory."
    )
    task: Task | None = Field(
        default=None,
        description="regression | binary | multiclass (default: from the model; mlp/custom: regression).",
    )
    loss: LossName = Field(default="auto", description="Loss (auto: mse, bce or ce by task).")
    optimizer: OptimizerName = Field(default="sgd", description="Optimizer.")
    lr: float = Field(default=0.01, gt=0, description="Learning rate.")
    hidden: int = Field(default=64, ge=1, description="mlp: hidden units.")
    update_batch: int = Field(
        default=1,
        ge=1,
        description="Records per optimizer step: 1 is strict per-record learning; B>1 micro-batches.",
    )
    n_features: int | None = Field(
        default=None, ge=1, description="Feature dimension (default: from the first record)."
    )
    feature_names: list[str] | None = Field(
        default=None, description="Feature order for object-form features (default: first record's)."
    )
    n_classes: int | None = Field(default=None, ge=2, description="multiclass: number of classes.")
    standardize: bool = Field(default=True, description="Online feature standardization.")
    seed: int = Field(default=0, description="Seed for model initialisation.")
    device: str = Field(default="cpu", description="Torch device.")
    torch_threads: int = Field(
        default=1, ge=1, description="Torch intra-op threads (1 is fastest beside the broker)."
    )
    prequential_window: int = Field(
        default=1000, ge=1, description="Records in the prequential loss window (EW span and summary window)."
    )
    poll_batch: int = Field(default=2000, ge=1, description="Most records taken from the consumer per poll.")
    auto_offset_reset: OffsetReset = Field(
        default="earliest", description="Where a partition with no committed offset starts."
    )
    session_timeout_ms: int = Field(default=10000, ge=1000, description="Consumer group session timeout.")
    commit_interval_s: float = Field(default=5.0, gt=0, description="Commit trained offsets this often.")
    max_records: int | None = Field(default=None, ge=1, description="Stop after training this many records.")
    max_seconds: float | None = Field(default=None, gt=0, description="Stop after this many seconds.")
    run_log: Path | None = Field(
        default=None, description="Append a JSON line of run statistics here every second."
    )

    @model_validator(mode="after")
    def _check_model(self) -> WorkerSettings:
        builtin = {"linear", "logistic", "softmax", "mlp"}
        if self.model not in builtin and ":" not in self.model:
            raise ValueError(
                f"model {self.model!r} is neither built in ({', '.join(sorted(builtin))}) "
                "nor package.module:factory"
            )
        task = self.resolved_task
        if task == "multiclass" and self.n_classes is None:
            raise ValueError("a multiclass model needs n_classes (--n-classes)")
        return self

    @property
    def resolved_task(self) -> Task:
        if self.task is not None:
            return self.task
        return BUILTIN_TASKS.get(self.model, "regression")


class DemoSettings(MetricsSettings, KafkaSettings):
    """`streamtrainer demo`: producer and worker on one topic, on the embedded broker by default."""

    topic: str = Field(default="streamtrainer-demo", description="Demo topic.")
    records: int = Field(default=60000, ge=1000, description="Records to produce and train.")
    partitions: int = Field(default=3, ge=1, description="Partitions of the demo topic.")
    task: Task = Field(default="binary", description="Synthetic task of the demo.")
    n_features: int = Field(default=8, ge=1, description="Feature dimension.")
    codec: Codec = Field(default="json", description="Wire format.")
    rate: float | None = Field(default=None, gt=0, description="Producer rate limit (records/s).")
    live: bool | None = Field(default=None, description="Live terminal view (default: on a terminal).")
    out_dir: Path = Field(default=Path("runs/demo"), description="Where the demo writes its run log.")


def cli_fields(settings_class: type[_Settings]) -> dict[str, Any]:
    """The fields of a settings class (for building command-line flags)."""
    return dict(settings_class.model_fields)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"
