"""The README stays a short front door, and every relative link of the README and of docs/ reaches its target.

Links are Markdown's inline ``[text](target)`` and ``![alt](target)``; a target with a scheme (``https:``) is
left alone, any other is a path relative to the page, optionally with a ``#fragment`` that must name a heading
of the target page (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens).
"""

import re
from pathlib import Path

import pytest
from test_layout import LAYERS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    """The inline link targets of a Markdown page, code blocks and code spans left out."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchor of each heading of a Markdown page."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_readme_is_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_link_checker_sees_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title: here\n[a](b.md#c) ![i](../x.png) `[no](code.md)`\n```\n[no](block.md)\n```\n")
    assert links(page) == ["b.md#c", "../x.png"]
    assert anchors(page) == {"a-title-here"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_in_the_repository(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in resolved.parents:
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "layout.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_layers_named_in_the_docs_are_those_tests_test_layout_enforces(page):
    sentence = re.search(r"The layers, lowest first: (.*?\))\.", page.read_text(), re.S)
    assert sentence, f"{page.relative_to(ROOT)} should name the layers: 'The layers, lowest first: ... (top, ...).'"
    named = [set(re.findall(r"`(\w+)`", step)) for step in sentence.group(1).split("->")]
    enforced = [{name for name, rank in LAYERS.items() if rank == r} for r in sorted(set(LAYERS.values()))]
    assert named == enforced
