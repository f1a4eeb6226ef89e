"""Every relative link of README.md, docs/*.md and bench/README.md resolves (issue 19, point 6).

A link to a file must name one that exists; a link with ``#anchor`` must name a heading of its
page, as GitHub makes anchors of headings. Sections move between pages; this test finds a link
left pointing at where one was.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of the page outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as
    hyphens, ``-1``, ``-2`` ... after a repeated one."""
    seen: dict[str, int] = {}
    for _, line in _prose(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(path: Path) -> list[str]:
    """``file:line: target (why)`` for each relative link of the page that does not resolve."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    broken: list[str] = []
    for number, line in _prose(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            file = (path.parent / name).resolve() if name else path
            if not file.exists():
                broken.append(f"{where}:{number}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{where}:{number}: {target} (no such heading)")
    return broken


def test_anchors_are_made_as_github_makes_them() -> None:
    """Headings with code, punctuation and a repeat give GitHub's anchors (checked by hand on GitHub)."""
    page = ROOT / "docs" / "semantics.md"
    assert "one-model-across-ranks---distributed" in anchors(page)
    assert "one-model-on-many-workers---distributed" in anchors(ROOT / "docs" / "distributed.md")


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(path: Path) -> None:
    """Each relative link of the page names an existing file, and a heading of it when it has an anchor."""
    broken = broken_links(path)
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_a_link_to_a_moved_section_is_caught(tmp_path: Path) -> None:
    """A link to a heading that is not there, or to a file that is not there, fails."""
    (tmp_path / "other.md").write_text("# Other\n\n## The error budget\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\nSee [budget](other.md#the-error-budget), [notes](other.md#notes-1),\n"
        "[gone](#the-error-budget), [moved](other.md#training-guards), [file](nothing.md).\n"
        "```md\n[in code](#not-checked)\n```\n"
    )
    assert [line.split(": ", 1)[1] for line in broken_links(page)] == [
        "#the-error-budget (no such heading)",
        "other.md#training-guards (no such heading)",
        "nothing.md (no such file)",
    ]


def test_readme_lists_every_docs_page() -> None:
    """README is the front page: a page in docs/ that it does not link is a page nobody finds."""
    readme = (ROOT / "README.md").read_text()
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not missing, f"README.md links no: {', '.join(missing)}"
