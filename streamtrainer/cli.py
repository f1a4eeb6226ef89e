"""The `streamtrainer` command. Its flags are built from the fields of the settings classes.

Each flag defaults to "not given", so that pydantic-settings applies the one
precedence rule (flag, then the command's ``STREAMTRAINER_<COMMAND>_*`` variable, then the
shared ``STREAMTRAINER_*`` one, then the ``--config`` file, then the default) in one place:
:mod:`streamtrainer.settings`.
``--help`` lists a command's flags in sections (Kafka, model, checkpoints...).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import click
from confluent_kafka import KafkaException
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from streamtrainer import __version__
from streamtrainer.exceptions import ConfigurationError, StreamtrainerError
from streamtrainer.producer.exceptions import ProducerError
from streamtrainer.security import install_log_scrubbing, scrub
from streamtrainer.settings import (
    COMMAND_SETTINGS,
    ENV_PREFIX,
    DeadLetterSettings,
    DemoSettings,
    ErrorBudgetSettings,
    ExportSettings,
    KafkaSettings,
    MetricsSettings,
    ModelSettings,
    ProducerSettings,
    ReplaySettings,
    ServeSettings,
    WorkerSettings,
    _Settings,
    command_env_name,
    command_scope,
    config_warnings,
    env_name,
    live_names,
    public_name,
    read_config_file,
)
from streamtrainer.training.exceptions import TrainingError

logger = logging.getLogger("streamtrainer")

S = TypeVar("S", bound=_Settings)
F = TypeVar("F", bound=Callable[..., Any])


# -- flags from settings ---------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _flag(name: str) -> str:
    return "--" + public_name(name).replace("_", "-")


# Values the tests use that are no choice for a user (the crash test's "audit" loss): accepted, not listed.
_TEST_ONLY_CHOICES = frozenset({"audit"})


class _Choice(click.Choice):  # type: ignore[type-arg]
    """A choice that also accepts values it does not list (in --help or in its error message)."""

    def __init__(self, choices: list[str], hidden: frozenset[str]) -> None:
        super().__init__(choices)
        self.hidden = hidden

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.hidden:
            return value
        return super().convert(value, param, ctx)


class _SettingOption(click.Option):
    """A flag built from a setting, with the section of --help it is listed in."""

    section: str = "Options"
    # Listed under "Required" in --help (a setting with no default, or a cluster to reach).
    required_mark: bool = False


def _option_for(name: str, field: FieldInfo, *, required_hint: str = "") -> _SettingOption:
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    required = field.is_required()
    default = None if required else field.get_default(call_default_factory=True)
    shown = "" if default is None or default == {} else f"; default: {default}"
    marked = "; required" if required else required_hint
    help_text = f"{field.description or ''} [env: {env_name(name)}{shown}{marked}]"
    flag = _flag(name)
    kwargs: dict[str, Any] = {"default": None, "help": help_text}
    declarations = [flag, name]
    if annotation is bool:
        declarations = [f"{flag}/--no-{name.replace('_', '-')}", name]
    elif origin is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        visible = [c for c in choices if c not in _TEST_ONLY_CHOICES]
        hidden = frozenset(choices) - frozenset(visible)
        kwargs["type"] = _Choice(visible, hidden)
    elif origin is dict:
        # A dict of paths (--kafka-secret-file) takes the path of a file as each value; K=V,K=V
        # in one flag as in its variable (settings.parse_collection), or the flag repeated.
        value_type = typing.get_args(annotation)[1] if typing.get_args(annotation) else str
        kwargs.update(multiple=True, metavar="KEY=PATH" if value_type is Path else "KEY=VALUE")
    elif origin is list:
        # Repeatable as well as comma-separated: every occurrence applies, not only the last.
        kwargs.update(multiple=True, metavar="A,B,...")
    else:
        kwargs["type"] = {int: int, float: float, Path: click.Path(path_type=Path)}.get(annotation, str)
    option = _SettingOption(declarations, **kwargs)
    option.required_mark = required or bool(required_hint)
    return option


# --help sections, in this order; "Options" holds a command's own flags not placed elsewhere.
_SECTION_ORDER = (
    "Options",
    "Kafka",
    "Model",
    "Synthetic source",
    "Run",
    "Checkpoints",
    "Distributed",
    "Compaction and drift",
    "Guards",
    "Dead letters and errors",
    "Metrics and logging",
)
# The section of a field by the settings group that declares it.
_GROUP_SECTIONS: dict[type[_Settings], str] = {
    KafkaSettings: "Kafka",
    ModelSettings: "Model",
    ErrorBudgetSettings: "Dead letters and errors",
    MetricsSettings: "Metrics and logging",
}
# A command's own fields placed in a section by name (else by prefix, then "Options").
_FIELD_SECTIONS: dict[str, str] = {
    "topic": "Kafka",
    "group": "Kafka",
    "auto_offset_reset": "Kafka",
    "session_timeout_ms": "Kafka",
    "assignment_strategy": "Kafka",
    "group_instance_id": "Kafka",
    "poll_batch": "Kafka",
    "distributed": "Distributed",
    "collective_timeout_s": "Distributed",
    "fused": "Model",
    "update_batch": "Model",
    "overlap": "Model",
    "max_records": "Run",
    "max_seconds": "Run",
    "stop_at_end": "Run",
    "fresh": "Checkpoints",
    "init_from": "Checkpoints",
    "clip_grad_norm": "Guards",
    "spike_factor": "Guards",
    "max_consecutive_skips": "Guards",
    "lr_backoff": "Guards",
    "max_lr_backoffs": "Guards",
    "max_value_bytes": "Dead letters and errors",
    "worker_id": "Dead letters and errors",
    "prequential_window": "Metrics and logging",
    "admin_endpoints": "Metrics and logging",
    "metrics_linger_s": "Metrics and logging",
    "run_log": "Metrics and logging",
    "log_level": "Metrics and logging",
}
_PREFIX_SECTIONS = (
    ("checkpoint_", "Checkpoints"),
    ("compaction", "Compaction and drift"),
    ("drift_", "Compaction and drift"),
    ("dlq_", "Dead letters and errors"),
    ("average_", "Distributed"),
)
# The synthetic generator's flags of `produce`.
_SYNTHETIC = frozenset(
    {
        "synthetic_task",
        "n_features",
        "n_classes",
        "nonlinear",
        "noise",
        "synthetic_seed",
        "drift",
        "drift_at",
        "drift_width",
        "n_keys",
    }
)


def _section_of(settings_class: type[_Settings], name: str) -> str:
    """The --help section of a setting of this command."""
    if settings_class is WorkerSettings:
        for prefix, title in _PREFIX_SECTIONS:
            if name.startswith(prefix):
                return _FIELD_SECTIONS.get(name, title)
    if settings_class is ProducerSettings and name in _SYNTHETIC:
        return "Synthetic source"
    for group, title in _GROUP_SECTIONS.items():
        if issubclass(settings_class, group) and name in group.model_fields:
            return title
    if settings_class is WorkerSettings:
        return _FIELD_SECTIONS.get(name, "Options")
    return {"topic": "Kafka", "log_level": "Metrics and logging"}.get(name, "Options")


class _SectionedCommand(click.Command):
    """A command whose --help lists its options in titled sections, required ones named first."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        required: list[str] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue  # a hidden option (an old spelling)
            if getattr(param, "required_mark", False) and isinstance(param, click.Option):
                required.append(param.opts[0])
            sections.setdefault(getattr(param, "section", "Options"), []).append(record)
        if required:
            with formatter.section("Required"):
                formatter.write_text(", ".join(required))
        order = {title: index for index, title in enumerate(_SECTION_ORDER)}
        for title in sorted(sections, key=lambda t: order.get(t, len(order))):
            with formatter.section(title):
                formatter.write_dl(sections[title])


_BOOTSTRAP_REQUIRED = "; required (or bootstrap.servers in --kafka-config or --kafka-config-file)"


def settings_options(
    settings_class: type[_Settings], *, command: str | None = None, exclude: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """The flags of a settings class (its --config, and old spellings hidden), in --help sections;
    ``command`` (``dlq inspect``; default: the class's) names its variables in --help."""

    def decorate(function: F) -> F:
        command_params = getattr(function, "__click_params__", [])
        fields = settings_class.model_fields
        # The command's own options first, then the shared ones (connection, metrics, logging).
        own = [name for name in settings_class.__annotations__ if name in fields]
        ordered = own + [name for name in fields if name not in own]
        scope = command_scope(command) if command else settings_class.env_scopes[0]
        options: list[click.Option] = [_config_option(scope)]
        for name in ordered:
            if name in exclude:
                continue
            # The demo starts the embedded broker without one; every other command needs a cluster.
            hint = (
                _BOOTSTRAP_REQUIRED
                if name == "bootstrap_servers" and settings_class is not DemoSettings
                else ""
            )
            option = _option_for(name, fields[name], required_hint=hint)
            option.section = _section_of(settings_class, name)
            options.append(option)
        for old, new in settings_class.renamed.items():
            current = _option_for(new, fields[new])
            options.append(
                click.Option(
                    [_flag(old), old], type=current.type, multiple=current.multiple, default=None, hidden=True
                )
            )
        command_params.extend(reversed(options))
        function.__click_params__ = command_params  # type: ignore[attr-defined]
        return function

    return decorate


CONFIG_VARIABLE = f"{ENV_PREFIX}CONFIG"


def _config_option(scope: str) -> _SettingOption:
    option = _SettingOption(
        ["--config", "config_file"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar=CONFIG_VARIABLE,
        default=None,
        help="Settings from this TOML file: top-level keys, then [kafka], then this command's section "
        "([worker], [replay], [produce], [dlq], [demo], [serve], [export]); flags and variables "
        "override it. Each "
        f"setting's variable may be this command's own: {ENV_PREFIX}{scope}_<NAME> overrides "
        f"{ENV_PREFIX}<NAME> [env: {CONFIG_VARIABLE}]",
    )
    option.section = "Options"
    return option


# STREAMTRAINER_* names that are not settings: the tests' own, and the compose file's image name.
_OTHER_VARIABLES = frozenset(
    {
        "STREAMTRAINER_TEST_BOOTSTRAP_SERVERS",
        "STREAMTRAINER_TEST_CHECKPOINT_WRITE_DELAY_S",
        "STREAMTRAINER_IMAGE",
        CONFIG_VARIABLE,
    }
)


def _known_variables() -> tuple[set[str], dict[str, str]]:
    """The STREAMTRAINER_* variables some command reads (shared, and each command's own), and the
    deprecated ones with their new names."""
    commands = COMMAND_SETTINGS.values()
    known = {env_name(field) for command in commands for field in command.model_fields} | _OTHER_VARIABLES
    renamed: dict[str, str] = {}
    for command in commands:
        for scope in command.env_scopes:
            known.update(command_env_name(scope, field) for field in command.model_fields)
            for old, new in command.renamed.items():
                renamed[command_env_name(scope, old)] = command_env_name(scope, new)
        # An old name that is still another command's setting (STREAMTRAINER_SEED) is that setting.
        renamed.update(
            {env_name(old): env_name(new) for old, new in command.renamed.items() if old not in live_names()}
        )
    return known, renamed


def _warn_unknown_variables() -> None:
    """A misspelled STREAMTRAINER_* variable (or STREAMTRAINER_WORKER_*...) is named on stderr, not
    silently ignored."""
    known, renamed = _known_variables()
    for name in sorted(os.environ):
        if name in renamed:
            click.echo(f"streamtrainer: warning: {name} is deprecated: use {renamed[name]}", err=True)
        elif name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            click.echo(f"streamtrainer: warning: unknown environment variable {name} ignored{hint}", err=True)


def build_settings(settings_class: type[S], given: dict[str, Any], command: str | None = None) -> S:
    """Settings from the flags actually given (the rest come from the environment, ``command``'s
    variables first, the --config file or defaults). A list or dict flag goes as given:
    settings.parse_collection reads it as it reads a variable."""
    _warn_unknown_variables()
    given = dict(given)
    config_file: Path | None = given.pop("config_file", None)
    if config_file is not None:
        for line in config_warnings(read_config_file(config_file)):
            click.echo(f"streamtrainer: warning: --config {config_file}: {line}", err=True)
    for old, new in settings_class.renamed.items():
        value = given.pop(old, None)
        if value is not None and value != ():
            click.echo(f"streamtrainer: warning: {_flag(old)} is deprecated: use {_flag(new)}", err=True)
            if given.get(new) in (None, ()):
                given[new] = value
    values = {name: value for name, value in given.items() if value is not None and value != ()}
    try:
        settings = settings_class.load(values, config_file, command_scope(command) if command else None)
    except ValidationError as error:
        raise ConfigurationError(_describe_validation(error)) from None
    except SettingsError as error:
        # pydantic-settings could not parse an environment variable.
        raise ConfigurationError(_describe_settings_error(settings_class, error)) from None
    _note_unscoped_old_variables(settings)
    cache_dir = getattr(settings, "cache_dir", None)
    if cache_dir is not None:
        # numba reads it at import, in this process and in the compiler processes it starts.
        os.environ["NUMBA_CACHE_DIR"] = str(Path(cache_dir).expanduser() / "numba")
    return settings


def _note_unscoped_old_variables(settings: _Settings) -> None:
    """For a release: a variable this command read before its setting was renamed, and that another
    command still reads (produce's STREAMTRAINER_SEED, the worker's model seed), is no longer read
    here; said when it would have changed this run (nothing set the new name)."""
    for old, new in type(settings).renamed.items():
        if old in live_names() and env_name(old) in os.environ and new not in settings.model_fields_set:
            click.echo(
                f"streamtrainer: warning: {env_name(old)} is not read by this command (it is another "
                f"command's {_flag(old)}): set {env_name(new)} for its {_flag(new)}",
                err=True,
            )


def _describe_settings_error(settings_class: type[_Settings], error: SettingsError) -> str:
    """One line for a variable pydantic-settings could not parse; never its value (it may be a secret)."""
    found = re.search(r'field "(\w+)"', str(error))
    if found is None:
        return f"the environment: {error}"
    name = found.group(1)
    field = settings_class.model_fields.get(name)
    origin = typing.get_origin(_unwrap_optional(field.annotation)) if field else None
    variable = env_name(name)
    if origin is dict:
        return f"{variable} must be KEY=VALUE[,KEY=VALUE...] or a JSON object"
    if origin is list:
        return f"{variable} must be a,b,... or a JSON list"
    return f"{variable}: cannot parse its value"


# The list and dict settings (parsed by settings.parse_collection): a,b or K=V,K=V, or JSON.
_COLLECTION_FIELDS = frozenset(
    name
    for command in COMMAND_SETTINGS.values()
    for name, field in command.model_fields.items()
    if typing.get_origin(_unwrap_optional(field.annotation)) in (list, dict)
)


def _describe_validation(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        # A renamed field reports its variable (an alias): named by its field, as the others are.
        location = location.removeprefix(ENV_PREFIX).lower() if location.startswith(ENV_PREFIX) else location
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            problems.append(f"{_flag(location)} is required (or set {env_name(location)})")
        elif location in _COLLECTION_FIELDS:
            # Given as a flag, a variable or a file key alike (the same syntax): name the flag and variable.
            problems.append(f"{_flag(location)} (or {env_name(location)}): {message}")
        elif location:
            problems.append(f"{_flag(location)}: {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


def _configure_logging(level: str, process: str = "") -> None:
    """Log lines to stderr; ``process`` (e.g. a rank and its pid) goes on each, after the level."""
    tag = f"[{process}] " if process else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # librdkafka repeats every connection failure; error callbacks already report what matters.
    logging.getLogger("streamtrainer.librdkafka").setLevel(
        logging.DEBUG if level == "debug" else logging.CRITICAL
    )
    # No log line shows a librdkafka secret (a password, a key), whoever logs it.
    install_log_scrubbing()


# -- commands ------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="streamtrainer")
def cli() -> None:
    """Train PyTorch models on a Kafka stream, one record at a time."""


@cli.command(cls=_SectionedCommand)
@settings_options(ProducerSettings)
def produce(**given: Any) -> None:
    """Publish training samples to a topic (synthetic, CSV, JSON lines or stdin)."""
    settings = build_settings(ProducerSettings, given)
    _configure_logging(settings.log_level)
    from streamtrainer.producer.command import exit_code, run_producer

    summary = run_producer(settings)
    # Always a summary, with the --skip that resumes without duplicates; then what ended the run.
    click.echo(summary.describe(settings.topic))
    if summary.error is not None:
        click.echo(f"streamtrainer: error: {scrub(summary.error)}", err=True)
    elif summary.signal is not None:
        click.echo(f"streamtrainer: stopped by {summary.signal}", err=True)
    code = exit_code(summary)
    if code:
        raise SystemExit(code)


@cli.command(cls=_SectionedCommand)
@settings_options(WorkerSettings)
def worker(**given: Any) -> None:
    """Run the worker: learn online from every record of a topic, in a consumer group."""
    settings = build_settings(WorkerSettings, given)
    # --distributed: torchrun writes every rank's lines to one stream, over restarts: each line
    # names its rank and process (a restart's ranks are new processes).
    rank = os.environ.get("RANK", "?")
    _configure_logging(settings.log_level, f"rank {rank} pid {os.getpid()}" if settings.distributed else "")
    # SIGTERM/SIGINT while torch and the client load (seconds on a busy host) is a stop request,
    # not a kill: the worker then stops at once, cleanly (exit 0), as it would once running. Seen:
    # a SIGTERM 8 s after the start, under CI load, killed the process (exit -15) before the
    # worker's own handlers were in place.
    early: dict[str, Any] = {}

    def _early_stop(signum: int, frame: types.FrameType | None) -> None:
        early["signal"] = signum
        if "worker" in early:
            early["worker"].stop()

    previous = {sig: signal.signal(sig, _early_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    logger.debug("worker starting: SIGTERM or SIGINT from here is a clean stop")
    from streamtrainer.consumer import Worker
    from streamtrainer.training.progressive import describe

    the_worker = early["worker"] = Worker(settings)
    if "signal" in early:
        the_worker.stop()
    try:
        status = the_worker.run()  # (it installs its own handlers for the run, and restores ours)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The whole run's figures, then the window's in parentheses: both named.
    learned = describe(status.prequential) if status.prequential.records else "no records trained"
    click.echo(
        f"trained {status.records_trained} record(s) ({status.records_invalid} invalid) in "
        f"{status.elapsed_s:.1f}s, {status.records_per_second:,.0f} records/s; {learned}"
    )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9092, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--storage-engine",
    default="memory://tansu/",
    show_default=True,
    help="Tansu storage (memory:// or s3://).",
)
def broker(host: str, port: int, storage_engine: str) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) in the foreground; SIGTERM or Ctrl-C stops it."""
    _configure_logging("info")
    from streamtrainer.broker import EmbeddedBroker

    embedded = EmbeddedBroker(host=host, port=port, storage_engine=storage_engine)
    status = embedded.serve(
        on_ready=lambda: click.echo(f"broker listening on {embedded.bootstrap_servers} (Ctrl-C stops it)")
    )
    raise SystemExit(status)


@cli.command(cls=_SectionedCommand)
@settings_options(DemoSettings)
def demo(**given: Any) -> None:
    """Produce a drifting synthetic stream and watch a worker learn from it (embedded broker)."""
    settings = build_settings(DemoSettings, given)
    _configure_logging(settings.log_level if settings.log_level != "info" else "warning")
    from streamtrainer.demo import run_demo

    result = run_demo(settings)
    if not result.ok:
        raise SystemExit(1)


@cli.command()
@click.argument("run_log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write (default: the run log's path with .png).",
)
@click.option(
    "--run",
    "run_index",
    type=int,
    default=-1,
    show_default=True,
    help="Which run of an appended run log: 1 is the first, -1 the last.",
)
@click.option("--title", default=None, help="Title of the picture (default: records trained and time).")
def plot(run_log: Path, output: Path | None, run_index: int, title: str | None) -> None:
    """Plot loss, accuracy/MAE and throughput of a worker's --run-log to a PNG."""
    from streamtrainer.plot import plot_run

    written = plot_run(run_log, output or run_log.with_suffix(".png"), run=run_index, title=title)
    click.echo(f"wrote {written}")


@cli.command(cls=_SectionedCommand)
@settings_options(ReplaySettings)
def replay(**given: Any) -> None:
    """Train in epochs on a bounded range of a topic; write a checkpoint and a manifest."""
    settings = build_settings(ReplaySettings, given)
    _configure_logging(settings.log_level)
    from streamtrainer.consumer.replay import run_replay

    result = run_replay(settings)
    holdout = f"{result.holdout_loss:.4f}" if result.holdout_loss is not None else "-"
    losses = " ".join(f"{loss:.4f}" for loss in result.epoch_losses)
    click.echo(
        f"replayed {result.records} record(s) ({result.invalid} invalid) of {result.topic} "
        f"in {result.elapsed_s:.1f}s; epoch losses {losses}; holdout loss {holdout}; "
        f"checkpoint {result.checkpoint_version}; manifest {result.manifest_path}"
    )


@cli.command(cls=_SectionedCommand)
@settings_options(ServeSettings)
def serve(**given: Any) -> None:
    """Serve predictions over HTTP from a checkpoint directory or the models topic, hot-swapping to
    each newer version the promotion gate lets through (POST /predict, /healthz, /ready, /metrics)."""
    settings = build_settings(ServeSettings, given)
    _configure_logging(settings.log_level)
    from streamtrainer.serving.server import ModelServer

    try:
        server = ModelServer(settings)
    except OSError as error:
        raise ConfigurationError(
            f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}"
        ) from None
    click.echo(f"serving on {server.url} (Ctrl-C stops it)", err=True)
    server.run()


@cli.command(cls=_SectionedCommand)
@settings_options(ExportSettings)
def export(**given: Any) -> None:
    """Write a trained model as one TorchScript or ONNX file: raw features in, the label's units
    (or class probabilities) out, the standardizers folded in."""
    settings = build_settings(ExportSettings, given)
    _configure_logging(settings.log_level)
    from streamtrainer.training.export import export_model
    from streamtrainer.training.predictor import load_model

    source = settings.checkpoint_dir if settings.checkpoint_dir is not None else settings.checkpoint
    assert source is not None  # the settings hold one
    predictor = load_model(source)
    written = export_model(predictor, settings.output, settings.format)
    click.echo(
        f"exported {predictor.name or 'the model'} version {predictor.version} ({predictor.task}, "
        f"{predictor.n_features} features) as {settings.format} to {written}"
    )


@cli.group()
def dlq() -> None:
    """Dead-lettered records: list them with their reasons, or send them back to their topic."""


def _dead_letter_log(settings: DeadLetterSettings) -> tuple[Any, set[tuple[int, int]] | None]:
    """The dead-letter topic read (after the flags are checked: a usage error never connects)."""
    from streamtrainer.consumer.dead_letter import (
        DEAD_LETTER_REASONS,
        dead_letter_topic,
        parse_source_offsets,
        read_dead_letter_log,
    )

    ctx = click.get_current_context()
    unknown = [reason for reason in settings.reason or () if reason not in DEAD_LETTER_REASONS]
    if unknown:
        raise click.UsageError(
            f"--reason: unknown {', '.join(unknown)} (valid: {', '.join(DEAD_LETTER_REASONS)})", ctx
        )
    wanted = None
    if settings.source_offsets:
        try:
            wanted = parse_source_offsets(settings.source_offsets)
        except ValueError:
            raise click.UsageError("--source-offsets takes PARTITION:OFFSET values", ctx) from None
    topic = dead_letter_topic(settings.topic, settings.dlq_topic)
    return read_dead_letter_log(settings, topic, idle_s=settings.idle_s), wanted


def _fail_missing(missing: list[tuple[int, int]], settings: DeadLetterSettings) -> None:
    """--source-offsets not found are a mistake to report, after doing what could be done."""
    if missing:
        offsets = ",".join(f"{partition}:{offset}" for partition, offset in missing)
        _fail(f"no dead letter of {settings.topic} matches source offset(s) {offsets}", 1)


@dlq.command(cls=_SectionedCommand)
@settings_options(DeadLetterSettings, command="dlq inspect")
def inspect(**given: Any) -> None:
    """List dead-lettered records: where they came from, why, which group; redriven or not."""
    settings = build_settings(DeadLetterSettings, given, command="dlq inspect")
    _configure_logging(settings.log_level)
    from streamtrainer.consumer.dead_letter import ERROR_MESSAGE, WORKER_ID, select

    log, wanted = _dead_letter_log(settings)
    selection = select(
        log,
        topic=settings.topic,
        reasons=settings.reason,
        groups=settings.group,
        source_offsets=wanted,
        limit=None,
    )
    letters = (
        selection.letters[: settings.max_records] if settings.max_records is not None else selection.letters
    )
    for letter in letters:
        topic, partition, offset = letter.source
        key = letter.key.decode(errors="replace") if letter.key is not None else "-"
        redriven = log.redriven.get(letter.identity)
        click.echo(
            f"{topic}[{partition}]@{offset}\t{letter.reason}\t{letter.header(ERROR_MESSAGE)}"
            f"\tkey={key}\tgroup={letter.group or '?'}\tworker={letter.header(WORKER_ID)}"
            + (f"\tredriven={redriven.at} to {redriven.to}" if redriven is not None else "")
        )
    marked = sum(letter.identity in log.redriven for letter in letters)
    click.echo(f"{len(letters)} dead-lettered record(s), {marked} of them redriven", err=True)
    _fail_missing(selection.missing, settings)


@dlq.command(cls=_SectionedCommand)
@settings_options(DeadLetterSettings, command="dlq redrive")
def redrive(**given: Any) -> None:
    """Publish selected dead-lettered records back to their source topic (after fixing the cause).

    Each source record is published once, however many groups dead-lettered it, and marked as
    redriven: a second redrive skips it unless --force.
    """
    settings = build_settings(DeadLetterSettings, given, command="dlq redrive")
    _configure_logging(settings.log_level)
    from streamtrainer.consumer.dead_letter import dead_letter_topic, select
    from streamtrainer.consumer.dead_letter import redrive as publish_again

    log, wanted = _dead_letter_log(settings)
    selection = select(
        log,
        topic=settings.topic,
        reasons=settings.reason,
        groups=settings.group,
        source_offsets=wanted,
        skip_redriven=not settings.force,
        limit=settings.max_records,
    )
    if selection.already_redriven:
        click.echo(
            f"skipped {selection.already_redriven} dead letter(s) redriven already (--force publishes them)",
            err=True,
        )
    if selection.letters:
        result = publish_again(
            settings,
            selection.letters,
            dead_letter_topic=dead_letter_topic(settings.topic, settings.dlq_topic),
        )
        click.echo(
            f"redrove {result.published} record(s) to {settings.topic} "
            f"({result.marked} dead letter(s) marked as redriven)"
        )
    _fail_missing(selection.missing, settings)
    if not selection.letters and not selection.already_redriven:
        _fail("no dead-lettered record matches the selection", 1)


# -- entry point ------------------------------------------------------------------


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"streamtrainer: error: {scrub(message)}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="streamtrainer", standalone_mode=False)
    except click.exceptions.Exit as done:
        raise SystemExit(done.exit_code) from None
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        _fail(f"{error.format_message()}{hint}", 2)
    except click.Abort:
        _fail("aborted", 130)
    except StreamtrainerError as error:
        _fail(str(error), error.exit_code)
    except (ProducerError, TrainingError) as error:
        # A source spec that cannot work (producer.exceptions.SourceSpecError) is a usage error: 2.
        _fail(str(error), getattr(error, "exit_code", 1))
    except KafkaException as error:
        _fail(f"kafka: {error}", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


if __name__ == "__main__":  # pragma: no cover
    main()
