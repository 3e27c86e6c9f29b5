"""The package's shape: data -> method -> engine -> eval -> demo, one way, and no import cycle."""

import ast
from pathlib import Path

import videomoco

PACKAGE = Path(videomoco.__file__).parent
LAYERS = ["data", "method", "engine", "eval", "demo"]  # a layer may import those before it, never after


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """{module: the videomoco modules it imports anywhere in its file (lazy imports too)}."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("videomoco"):
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("videomoco"))
        graph[module_name(path)] = names
    return {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}


def layer(module):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_only_downwards():
    upward = [(m, n) for m, names in imports().items() for n in names
              if layer(m) is not None and layer(n) is not None and layer(n) > layer(m)]
    assert not upward, f"imports against the data -> method -> engine -> eval -> demo flow: {upward}"


def test_no_import_cycle():
    graph = imports()
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):
                continue  # a package importing its own modules (its __init__) is not a cycle
            if state.get(n) == "open" and not m.startswith(n + "."):
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
