"""The documentation refers only to what exists: files, config choices, modules, pages and sections.

Links between the site's pages are checked by ``mkdocs build --strict`` (CI); this checks what it cannot
see: paths and config choices in the README's and the pages' commands, the README's links into docs/, and
the docs pages the code cites.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [ROOT / "README.md", *DOCS]
TOP_FOLDERS = ("scripts", "configs", "datasets", "tests", "notebooks", "segadapt", "docs")
PATH = re.compile(rf"(?<![\w./$-])((?:{'|'.join(TOP_FOLDERS)})/[\w./*-]*[\w*/])")
CHOICE = re.compile(r"(?<![\w./+@-])(model|adapter|data|trainer|experiment)=([\w,]+)")
MODULE = re.compile(r"python -m (segadapt(?:\.\w+)*)")
SUBCOMMAND = re.compile(r"^segadapt ([a-z]\w*)", re.MULTILINE)
CITATION = re.compile(r"docs/([\w-]+\.md)(?:, \"([^\"]+)\")?")


def paths_in(text: str) -> set[str]:
    """Repository paths named in a text (placeholders such as <k> or ${fold} left out)."""
    return {p for p in PATH.findall(text) if not re.search(r"[<{$]", p)}


def config_choices(text: str) -> set[tuple[str, str]]:
    """(group, option) of every `group=a,b` override of a config group (model, adapter, data, ...)."""
    return {(group, option) for group, options in CHOICE.findall(text) for option in options.split(",") if option}


def headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", TEXTS, ids=lambda p: p.name)
def test_named_files_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in sorted(paths_in(text)) if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{doc.name} names files that are not in the repo: {missing}"


@pytest.mark.parametrize("doc", TEXTS, ids=lambda p: p.name)
def test_config_choices_exist(doc):
    choices = config_choices(doc.read_text(encoding="utf-8"))
    missing = [f"{g}={o}" for g, o in sorted(choices) if not (ROOT / "configs" / g / f"{o}.yaml").is_file()]
    assert not missing, f"{doc.name} selects configs that are not in configs/: {missing}"


@pytest.mark.parametrize("doc", TEXTS, ids=lambda p: p.name)
def test_python_modules_exist(doc):
    modules = set(MODULE.findall(doc.read_text(encoding="utf-8")))
    path = lambda m: ROOT / m.replace(".", "/")  # noqa: E731
    missing = [m for m in sorted(modules) if not (path(m).with_suffix(".py").is_file() or (path(m) / "__main__.py").is_file())]
    assert not missing, f"{doc.name} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", TEXTS, ids=lambda p: p.name)
def test_segadapt_subcommands_exist(doc):
    from segadapt.cli import COMMANDS

    missing = sorted(set(SUBCOMMAND.findall(doc.read_text(encoding="utf-8"))) - set(COMMANDS))
    assert not missing, f"{doc.name} runs segadapt subcommands that do not exist: {missing}"


def test_every_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", (ROOT / "README.md").read_text(encoding="utf-8")))
    pages = {p.name for p in DOCS} - {"index.md"}
    assert linked == pages, f"README links {sorted(linked - pages)} that do not exist; misses {sorted(pages - linked)}"


def test_code_cites_pages_and_sections_that_exist():
    """Comments and docstrings cite docs/<page>.md (and a section by its heading), never files outside the repo."""
    cited = []
    for folder in ("segadapt", "scripts", "tests", "configs", "datasets"):
        for source in (ROOT / folder).rglob("*"):
            if source.suffix not in (".py", ".yaml") or source.resolve() == Path(__file__).resolve():
                continue
            text = source.read_text(encoding="utf-8")
            assert "DESIGN.md" not in text, f"{source.relative_to(ROOT)} cites DESIGN.md, which is not in the repo"
            cited += [(source, page, section) for page, section in CITATION.findall(text)]
    assert cited, "no code cites docs/ (the adapters cite docs/methods.md)"
    for source, page, section in cited:
        target = ROOT / "docs" / page
        assert target.is_file(), f"{source.relative_to(ROOT)} cites docs/{page}, which does not exist"
        assert not section or section in headings(target), f"{source.relative_to(ROOT)} cites section {section!r} of docs/{page}"
