"""The product documentation stands alone: README.md and docs/ link only to files in the
repository, a LICENSE ships, and the README's config table names every config section."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pytest
from forkpop.experiments.config import ExperimentConfig
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
IGNORED = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def _prose(markdown: str) -> str:
    """``markdown`` without its fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~)[^\n]*\n.*?^\1[^\n]*$", "", markdown, flags=re.M | re.S)
    return re.sub(r"(`+).*?\1", "", text, flags=re.S)


def _links(markdown: str) -> list[str]:
    """The targets of the inline links and images, ``[text](target "title")``, and of the
    reference definitions, ``[label]: target``."""
    prose = _prose(markdown)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)", prose)
    refs = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", prose, flags=re.M)
    return inline + refs


def _bad_links(page: Path, markdown: str, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` that do not name an existing file or folder inside
    ``root``; http(s) and mailto links and in-page anchors are not checked."""
    bad = []
    for link in _links(markdown):
        if IGNORED.match(link) or link.startswith("#"):
            continue
        target = link.split("#")[0].split("?")[0]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("/"):
            bad.append(f"{link} (not a relative link)")
            continue
        path = Path(os.path.normpath(page.parent / target))
        if not path.is_relative_to(root):
            bad.append(f"{link} (outside the repository)")
        elif not path.exists():
            bad.append(f"{link} (no such file)")
    return bad


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(page):
    assert _bad_links(page, page.read_text()) == []


def test_the_link_check_catches_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n")
    page = tmp_path / "README.md"
    page.write_text("# readme\n")
    good = (
        "[d](docs/design.md) [a](docs/design.md#loop) ![i](docs/) [w](https://example.org/x) "
        "[m](mailto:a@example.org) [h](#top) `[c](../code.md)`\n"
        "```\n[fenced](../../fenced.md)\n```\n"
    )
    assert _bad_links(page, good, tmp_path) == []
    bad = {
        "[s](../shared/DESIGN.md)": "outside the repository",
        "[x](docs/missing.md)": "no such file",
        "[d](docs/../../x.md)": "outside the repository",
        '[t](nope.md "a title")': "no such file",
        "[abs](/etc/passwd)": "not a relative link",
        "[f](file:///etc/passwd)": "not a relative link",
        "[ref]: ../outside.md": "outside the repository",
    }
    for text, why in bad.items():
        found = _bad_links(page, text + "\n", tmp_path)
        assert len(found) == 1 and why in found[0], (text, found)
    assert _bad_links(tmp_path / "docs" / "design.md", "[r](../README.md)", tmp_path) == []


def test_the_readme_links_the_design_inside_the_repository():
    text = README.read_text()
    assert "docs/design.md" in _links(text)
    for page in [README, *DOCS]:
        assert "../shared" not in page.read_text(), page


def test_a_license_ships():
    license_file = ROOT / "LICENSE"
    assert license_file.is_file()
    text = license_file.read_text()
    assert "MIT License" in text and "Copyright" in text


def _sections(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of ``model``'s fields that are config sections: nested models, directly
    or as the values of a mapping (``population.genes``), at any depth."""
    out = []
    for name, field in model.model_fields.items():
        nested = [a for a in _types(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            out.append(prefix + name)
            for sub in nested:
                out += _sections(sub, f"{prefix}{name}.")
    return out


def _types(annotation) -> list:
    """``annotation`` and every type argument inside it (``dict[str, X] | None`` gives X)."""
    return [annotation, *(t for arg in typing.get_args(annotation) for t in _types(arg))]


def _config_table(markdown: str) -> dict[str, str]:
    """The README's config table (the first table after the "The config" heading), as the
    backticked names of its first column mapped to the rest of their row."""
    heading = re.search(r"^#+ The config\s*$", markdown, re.M)
    assert heading, "README.md has no 'The config' section"
    rows = re.search(r"((?:^\|.*\|\s*$\n?)+)", markdown[heading.end() :], re.M)
    assert rows, "the config section has no table"
    table = {}
    for line in rows.group(1).splitlines()[2:]:  # past the header and the |---| line
        first, _, rest = line.strip().strip("|").partition("|")
        for name in re.findall(r"`([^`]+)`", first):
            table[name] = rest
    return table


def test_the_readme_config_table_lists_every_section():
    table = _config_table(README.read_text())
    wanted = list(ExperimentConfig.model_fields) + [s for s in _sections(ExperimentConfig) if "." in s]
    missing = [s for s in wanted if s not in table]
    assert missing == [], f"README.md's config table lacks rows for {missing}"
    assert {"data.poison", "data.audit", "distill.generated"} <= set(table)


def test_the_readme_config_table_names_only_real_sections():
    table = _config_table(README.read_text())
    real = set(ExperimentConfig.model_fields) | set(_sections(ExperimentConfig))
    assert set(table) <= real, f"README.md's config table has rows for {sorted(set(table) - real)}"
