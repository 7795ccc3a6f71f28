"""The documentation: docs/settings.md's table is the one Settings renders (so no setting is documented twice or not
at all), the README stays a first five minutes that links every file of docs/, and every link between them lands."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

from sdworker.config import GROUPS, TABLE_END, TABLE_START, Settings, env_names, settings_table

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
REGENERATE = "python -m sdworker.config --write docs/settings.md"


def table_in_docs() -> str:
    text = (ROOT / "docs" / "settings.md").read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, "docs/settings.md lost its table's markers"
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]


def test_the_settings_table_is_the_one_settings_renders() -> None:
    assert table_in_docs().strip() == settings_table().strip(), f"docs/settings.md is out of date: run {REGENERATE}"


def test_every_setting_has_a_description_and_one_row() -> None:
    rows = [line for line in settings_table().splitlines() if line.startswith("| `")]
    assert len(rows) == len(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description: the table would say nothing of it"
        first = f"| `{env_names(name, field)[0]}`"
        assert [row for row in rows if row.startswith((f"{first} ", f"{first} ("))], name
    assert next(iter(Settings.model_fields)) in GROUPS and set(GROUPS) <= set(Settings.model_fields)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a `# comment` in one is no heading, a `](` no link)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.MULTILINE):
        base = slug(heading)
        seen[base] = seen.get(base, -1) + 1
        seen.setdefault(f"{base}-{seen[base]}" if seen[base] else base, 0)
    return set(seen)


def test_every_link_between_the_readme_and_docs_lands() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):  # https://, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and anchor not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_is_the_first_five_minutes_and_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for heading in ("## Quick start", "## A request and its answer", "## One server, several ways in", "## Tests"):
        assert heading in readme
    assert not [doc.name for doc in DOCS if f"(docs/{doc.name})" not in readme]
    for doc in DOCS:  # each starts with its title, then a paragraph saying what it covers
        title, blank, covers = doc.read_text().split("\n")[:3]
        assert title.startswith("# ") and not blank and covers and not covers.startswith(("#", "|", "`")), doc.name
