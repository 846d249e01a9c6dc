"""The package's modules import one another without a cycle: each can be read after the ones it imports, and none
imports, even inside a function, a module that imports it (directly or through others)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqhit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (a package's __init__ only when named itself)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` and `from .pkg import module` import modules
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_without_a_cycle():
    graph = import_graph()
    assert "vqhit.training" in graph and "vqhit.resume" in graph["vqhit.training"]  # the walk sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_data_package_imports_only_downward():
    # the order vqhit/data/__init__.py lists its modules in: each imports only modules before it
    layers = ["config", "images", "sources", "streams", "datasets", "batches"]
    graph = import_graph()
    assert {name for name in graph if name.startswith("vqhit.data.")} == {f"vqhit.data.{m}" for m in layers}
    assert "vqhit.data.images" in graph["vqhit.data.datasets"]  # the walk sees the package's relative imports
    for i, module in enumerate(layers):
        inside = {name.removeprefix("vqhit.data.") for name in graph[f"vqhit.data.{module}"]
                  if name.startswith("vqhit.data")}
        assert inside <= set(layers[:i]), f"vqhit.data.{module} imports {sorted(inside - set(layers[:i]))}"
