"""docs/python-api.md: every ```python block runs, top to bottom in one namespace, against the test broker.

The page's examples assert what they claim (a loss that falls, probabilities that sum to 1, the
environment left unread), so running them checks the page and the API together. The worker's
example names ``localhost:9092`` and the topic ``clicks``: they become the test broker and a
topic of this run's own.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import streamtrainer

PAGE = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The page's ```python blocks, in order."""
    return [match.group(1) for match in BLOCK.finditer(text)]


def test_the_page_documents_every_exported_name() -> None:
    text = PAGE.read_text()
    table = text[: text.index("\n## ")]
    for name in streamtrainer.__all__:
        assert f"`{name}`" in table, f"{name} is exported but not in docs/python-api.md's table"


def test_every_python_example_runs(
    bootstrap: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("STREAMTRAINER_LR", raising=False)
    topic = f"clicks-{uuid.uuid4().hex[:12]}"
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) == 6, len(blocks)  # a block that is not found is not run: count them
    namespace: dict[str, Any] = {"__name__": "python_api_example"}
    took = []
    for index, block in enumerate(blocks, 1):
        source = block.replace('"localhost:9092"', repr(bootstrap)).replace('"clicks', f'"{topic}')
        start = time.perf_counter()
        exec(compile(source, f"docs/python-api.md, example {index}", "exec"), namespace)
        took.append(time.perf_counter() - start)
    printed = capsys.readouterr().out
    assert "mean squared error: first 200" in printed and "trained 2000 records" in printed
    with capsys.disabled():
        print(f"\ndocs/python-api.md: {len(blocks)} examples ran in " + ", ".join(f"{t:.1f}s" for t in took))
