"""The package's folders tell the flow, and imports run one way: down.

The import graph is drawn from the source (every import, also those inside
functions) and each edge is checked against the layers below; a module may
import from its own layer or any lower one, never from a higher one.
"""

import ast
from pathlib import Path

import batchd

PACKAGE = Path(batchd.__file__).parent

# Lowest first. A module's layer is its longest matching prefix.
LAYERS = [
    ("vocabulary", ["batchd.config", "batchd.layout", "batchd.lines", "batchd.profiles",
                    "batchd.logs", "batchd.bench", "batchd"]),
    ("spool", ["batchd.spool"]),
    ("engine", ["batchd.engine"]),
    ("jobs", ["batchd.jobs"]),
    ("api", ["batchd.api"]),
    ("daemon", ["batchd.daemon", "batchd.admission", "batchd.hooks", "batchd.scheduler",
                "batchd.views", "batchd.overview", "batchd.metrics", "batchd.notify",
                "batchd.signals", "batchd.owner", "batchd.report", "batchd.candidates"]),
    ("command line", ["batchd.cli", "batchd.commands", "batchd.__main__"]),
    ("testing", ["batchd.testing"]),  # for tests only: nothing in the package imports it
]


def layer(module: str) -> int:
    best = (-1, -1)
    for rank, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = (rank, len(prefix))
    assert best[0] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the batchd modules it imports}."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("batchd"):
                    continue
                if node.module is None or node.level and not node.module:
                    edges.update(f"{target}.{alias.name}" for alias in node.names)
                else:
                    edges.add(target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("batchd"))
    return graph


def test_every_import_runs_down_the_layers():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    upward = [f"{source} ({LAYERS[layer(source)][0]}) imports {target} "
              f"({LAYERS[layer(target)][0]})"
              for source, targets in sorted(graph.items()) for target in sorted(targets)
              if layer(target) > layer(source)]
    assert upward == []


def test_no_production_module_imports_the_testing_module():
    """batchd.testing (the fake engine) is for tests and benchmarks only: no
    module of the package imports it, the engine least of all, so no setting of
    a deployed daemon can reach it."""
    graph = import_graph()
    assert "batchd.testing" in graph  # it was read
    engine = [source for source, targets in graph.items()
              if source == "batchd.engine" or source.startswith("batchd.engine.")]
    assert engine and not any("batchd.testing" in graph[source] for source in engine)
    importers = sorted(source for source, targets in graph.items()
                       if source != "batchd.testing"
                       and any(t == "batchd.testing" or t.startswith("batchd.testing.")
                               for t in targets))
    assert importers == []


def test_only_the_engine_wing_imports_vllm():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        if any(n == "vllm" or n.startswith("vllm.") for n in names):
            assert module_name(path).startswith("batchd.engine."), path


def test_the_spool_is_spelled_in_one_module():
    spelled = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                     if "status.jsonl" in p.read_text())
    assert spelled == ["batchd.layout"]
