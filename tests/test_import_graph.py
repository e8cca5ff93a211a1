"""The package's import graph, built with `ast` from every `import` in every module (in-function imports
included): no cycle, every folder imports only what README's "Where things live" table allows, no stage
imports another stage or the pipeline, and no module grows past 500 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zenith_merge"
MAX_LINES = 500


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (file, package)
    return out


def _lazy_names(tree: ast.Module) -> dict[str, str]:
    """A package's `_LAZY = {name: submodule}` table (attributes its __init__ imports on first use)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports; `from pkg import name` counts as importing `pkg.name` where
    that is a module, or a lazily imported attribute of `pkg`."""
    modules = _modules()
    trees = {name: ast.parse(file.read_text(encoding="utf-8")) for name, (file, _) in modules.items()}
    lazy = {name: _lazy_names(tree) for name, tree in trees.items() if modules[name][1]}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        package = modules[name][1]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:
                        targets.append(full)
                    elif alias.name in lazy.get(source, {}):
                        targets.append(f"{source}.{lazy[source][alias.name]}")
                    else:
                        targets.append(source)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "zenith_merge"):
                    graph[name].add(target)
    return graph


def _unit(module: str) -> str:
    """The folder or top-level module a module belongs to (`zenith_merge.plan.models` -> `plan`)."""
    return module.split(".")[1]


def allowed_imports() -> dict[str, set[str]]:
    """README's "Where things live" table: folder or module -> what it may import."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\|(.+)\|\s*$", section, flags=re.M):
        cells = [c.strip() for c in row.split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        may = set() if cells[2] == "nothing" else {m.strip() for m in cells[2].split(",")}
        for unit in re.findall(r"`([\w.]+)/?`", cells[0]):
            table[unit.removesuffix(".py")] = may
    return table


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_in_function_and_lazy_imports(graph):
    # plan/sources imports the demo cache inside resolve_model; checks/smoke_model imports the demo's
    # heldout_text (a lazy attribute of zenith_merge.demo) inside a function
    assert "zenith_merge.demo.cache" in graph["zenith_merge.plan.sources"]
    assert "zenith_merge.demo.corpora" in graph["zenith_merge.checks.smoke_model"]
    assert "zenith_merge.io.writer" in graph["zenith_merge.pipeline.merge"]


def test_no_import_cycle(graph):
    assert _cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one(graph):
    assert _cycles({**graph, "zenith_merge.errors": {"zenith_merge.cli"}})


def forbidden(graph: dict[str, set[str]], table: dict[str, set[str]]) -> list[str]:
    """Each import from one folder into another that the table does not allow (the CLI may import anything)."""
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m != "zenith_merge" and _unit(m) != "cli"
                  for t in targets if _unit(t) != _unit(m) and _unit(t) not in table[_unit(m)])


def test_every_folder_imports_only_what_the_readme_table_allows(graph):
    table = allowed_imports()
    units = {_unit(m) for m in graph if m != "zenith_merge"}
    assert units - {"cli"} <= set(table), f"folders missing from README's table: {units - set(table) - {'cli'}}"
    assert table["io"] == {"architectures", "kernels", "errors"}  # the table is read as written
    assert forbidden(graph, table) == []
    reader_reads_plan = {**graph, "zenith_merge.io.reader": {"zenith_merge.plan.models"}}
    assert forbidden(reader_reads_plan, table) == ["zenith_merge.io.reader imports zenith_merge.plan.models"]


def stage_crossings(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a stage into another stage or into the pipeline."""
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("zenith_merge.stages.")
                  for t in targets if t.startswith("zenith_merge.pipeline")
                  or (t.startswith("zenith_merge.stages.") and t != m))


def test_no_stage_imports_another_stage_or_the_pipeline(graph):
    assert stage_crossings(graph) == []
    before = {**graph, "zenith_merge.stages.router_training": {"zenith_merge.pipeline.tensor_source",
                                                               "zenith_merge.stages.tokenizer"}}
    assert len(stage_crossings(before)) == 2  # what router_training imported before issue 20


def test_no_module_is_longer_than_500_lines():
    long = sorted(f"{f.relative_to(ROOT)}: {n}" for f in PACKAGE.rglob("*.py")
                  if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert long == []
