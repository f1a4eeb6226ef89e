"""Every ``--flag`` that README.md and docs/*.md name exists (issue 19, point 6).

A flag is looked for in fenced code blocks and in inline code. Where a command line (or an
inline snippet) says ``streamtrainer <command> ...``, the flags after it must be options of that
command (``dlq inspect`` and ``dlq redrive`` included), and those of a ``torchrun`` line before its
``-m streamtrainer ...`` options of torchrun (its own argument parser); any other flag must be an
option of some streamtrainer command or of torchrun, or be named in OTHER_TOOLS with the tool it
belongs to. A doc that names a flag no command has (a typo, a renamed or removed option) fails
here, without a broker.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from torch.distributed.run import get_args_parser

from streamtrainer.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")

# Flags of other tools that the docs name, each with its tool: checked by nothing here, so the
# list is kept to what the docs use (a flag added to it must name its tool).
OTHER_TOOLS: dict[str, str] = {
    "--build": "docker compose up",
    "--scale": "docker compose up (worker replicas)",
    "--index": "docker compose port (which replica)",
    "--adaptive": "Vowpal Wabbit (what the default optimizer corresponds to)",
    "--normalized": "Vowpal Wabbit",
    "--quick": "python -m bench.run",
    "--grid": "python -m bench.quality",
    "--repeats": "python -m bench.predictions (docs/predictions-and-versions.md, issue 19 B)",
    "--prometheus": "deploy/grafana/preview.py",
    "--minutes": "deploy/grafana/preview.py",
}


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def command_flags() -> dict[str, frozenset[str]]:
    """Each streamtrainer command (``dlq inspect`` as two words) and its long options, hidden ones too."""
    flags: dict[str, frozenset[str]] = {}
    for name, command in _commands(cli):
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        flags[name] = frozenset(options | {"--help"})
    return flags


def torchrun_flags() -> frozenset[str]:
    """torchrun's long options, from the parser torchrun itself uses."""
    parser = get_args_parser()
    return frozenset(o for action in parser._actions for o in action.option_strings if o.startswith("--"))


def _snippets(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every fenced code line (continuations joined) and every inline code span."""
    fenced, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
            continue
        if fenced:
            if not pending:
                start = number
            pending += line.rstrip("\\") + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                yield start, pending
                pending = ""
            continue
        for span in re.findall(r"`([^`]+)`", line):
            yield number, span


def _segments(text: str) -> Iterator[list[str]]:
    """The words of each command of a line: split at pipes, ``&&``, ``;`` and ``&``; comments dropped."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # prose or an unbalanced quote: plain words
        words = text.split()
    segment: list[str] = []
    for word in words:
        if word in {"|", "||", "&&", ";", "&"}:
            yield segment
            segment = []
        else:
            segment.append(word)
    yield segment


def unknown_flags(path: Path, flags: dict[str, frozenset[str]]) -> list[str]:
    """``file:line: --flag (why)`` for each flag of the page that is neither a command's nor listed."""
    torchrun = torchrun_flags()
    every = frozenset().union(*flags.values()) | torchrun | set(OTHER_TOOLS)
    found: list[str] = []
    for number, text in _snippets(path):
        if "--" not in text:
            continue
        for words in _segments(text):
            command, start = None, len(words)
            if "streamtrainer" in words:
                start = words.index("streamtrainer")
                after = words[start + 1 :]
                for size in (2, 1):
                    if " ".join(after[:size]) in flags:
                        command = " ".join(after[:size])
                        break
            for index, word in enumerate(words):
                for flag in FLAG.findall(word.split("=", 1)[0]):
                    if command is not None and index > start:
                        allowed, why = flags[command], f"not an option of `streamtrainer {command}`"
                    elif words[0] == "torchrun":
                        allowed, why = torchrun, "not an option of torchrun"
                    else:
                        allowed, why = every, "no command has it"
                    if flag not in allowed:
                        found.append(f"{path.name}:{number}: {flag} ({why})")
    return found


def test_the_docs_are_found() -> None:
    """The pages exist and name flags, so the check below has something to check."""
    assert len(DOCS) >= 10, DOCS
    flags = command_flags()
    commands = {"worker", "produce", "replay", "demo", "plot", "broker", "dlq inspect", "dlq redrive"}
    assert commands <= set(flags)
    assert "--compaction-window" in flags["worker"] and "--compaction-window" not in flags["produce"]
    named = {flag for path in DOCS for _, text in _snippets(path) for flag in FLAG.findall(text)}
    assert len(named) >= 80, sorted(named)


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_flag_a_page_names_exists(path: Path) -> None:
    """Each ``--flag`` of the page is an option of its command, of some command, or of a listed tool."""
    unknown = unknown_flags(path, command_flags())
    assert not unknown, "flags the docs name that do not exist:\n" + "\n".join(unknown)


def test_a_flag_no_command_has_is_caught(tmp_path: Path) -> None:
    """A misspelled flag fails, in a command line, in prose, and on the wrong command."""
    page = tmp_path / "page.md"
    page.write_text(
        "Set `--compaction-windw 5`.\n\n"
        "```bash\n"
        "streamtrainer worker --bootstrap-servers localhost:9092 \\\n"
        "    --topic samples --no-such-flag 3\n"
        "streamtrainer produce --topic samples --compaction-window 5   # a worker's flag\n"
        "torchrun --nproc-per-node=2 --max-restart=3 -m streamtrainer worker --distributed\n"
        "```\n"
        "Or `python deploy/grafana/preview.py --minutes 15 --hours 2`.\n"
    )
    assert unknown_flags(page, command_flags()) == [
        "page.md:1: --compaction-windw (no command has it)",
        "page.md:4: --no-such-flag (not an option of `streamtrainer worker`)",
        "page.md:6: --compaction-window (not an option of `streamtrainer produce`)",
        "page.md:7: --max-restart (not an option of torchrun)",
        "page.md:9: --hours (no command has it)",
    ]
