"""The house rules of docs/design.md, checked on the source: data flows one way between stages and no
two modules import each other in a cycle (every ``import`` counts, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "spkr"

# Stages in data-flow order; a module may import its own stage or an earlier one, never a later one.
STAGES = [
    ("spkr.errors",),
    ("spkr.config", "spkr.atomic", "spkr.runtime"),
    ("spkr.shards.schema", "spkr.shards.trials"),  # the shard contract: below every stage that uses it
    ("spkr.storage",),
    ("spkr.corpus",),
    ("spkr.features",),
    ("spkr.augment",),
    ("spkr.shards",),
    ("spkr.stream",),
    ("spkr.models",),
    ("spkr.scoring",),
    ("spkr.gallery", "spkr.checkpoint"),
    ("spkr.run",),
    ("spkr.train", "spkr.evaluate", "spkr.predict"),
    ("spkr.enroll", "spkr.tools"),
]


def stage_of(module: str) -> int:
    for i, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no stage: add it to STAGES in {__file__}")


def module_imports() -> dict[str, set[str]]:
    """{module: spkr modules it imports} for every module of the package."""
    mods = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spkr"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("spkr")}
        graph[name] = {t for t in targets if t != name and t != "spkr"}
    return graph


def against_the_flow(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} (stage {stage_of(m)}) imports {t} (stage {stage_of(t)})"
        for m, targets in sorted(graph.items())
        if m != "spkr"
        for t in sorted(targets)
        if stage_of(t) > stage_of(m)
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (cycle := visit(t, path + [t])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_module_imports_a_later_stage():
    bad = against_the_flow(module_imports())
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_violations():
    graph = module_imports()
    assert graph["spkr.run.trainer"], "no imports found: the parser is broken"
    assert against_the_flow({"spkr.stream.loader": {"spkr.run.trainer"}})
    assert find_cycle({"spkr.a": {"spkr.b"}, "spkr.b": {"spkr.c"}, "spkr.c": {"spkr.a"}}) == [
        "spkr.a",
        "spkr.b",
        "spkr.c",
        "spkr.a",
    ]


MAX_FUNCTION_LINES = 59  # a function you can read on one screen
MAX_FILE_LINES = 700  # one room per responsibility


def sizes() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """([(lines, "file:function")], [(lines, "file")]) for every function and module of the package."""
    functions, files = [], []
    for path in sorted(PKG.rglob("*.py")):
        src = path.read_text()
        name = str(path.relative_to(PKG.parent))
        files.append((len(src.splitlines()), name))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return functions, files


def test_functions_and_files_stay_readable():
    functions, files = sizes()
    assert len(functions) > 500 and len(files) > 50  # the walk saw the package
    assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []
    assert [f for f in files if f[0] > MAX_FILE_LINES] == []
