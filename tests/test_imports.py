"""minitune's import graph has no cycles, and imports sit at the top of their module.

Every module under minitune/ is parsed with `ast` (nothing is imported), relative imports are resolved,
and the graph of module -> imported module is built from top-level AND function-level imports (a lazy
import inside a function still makes the two modules depend on each other). A cycle fails the test,
naming its modules. A function-level import fails too unless ALLOWED_LAZY below gives its reason:
lazy imports hide dependencies, so each one must say why it cannot sit at the top.

`if TYPE_CHECKING:` blocks are skipped (they never run). Importing a submodule also runs its parent
packages' __init__.py; those implicit edges are not counted, only what the source names.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minitune"

# (module, imported module) -> why the import must sit inside a function
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    # none today: optional third-party packages (triton in quant/nf4_triton.py, transformers in tests) are
    # imported lazily, but this graph holds minitune's own modules only
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, bool, int]]:
    """(imported minitune module, inside a function?, line) for every import statement of one module."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue
            lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "minitune":
                        found.append((alias.name, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "minitune":
                    continue
                names = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in modules]
                if child.module or not names:  # `from . import x` imports only the submodule x
                    found.append((target, in_function, child.lineno))
                found.extend((n, in_function, child.lineno) for n in names)
            visit(child, lazy)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return [(t, lazy, line) for t, lazy, line in found if t in modules and t != name]


def import_graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    edges = {m: {t for t, _, _ in imps} for m, imps in graph.items()}
    found = cycles(edges)
    assert not found, "import cycles (each group imports itself through the others):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_function_level_imports_are_allowed_with_a_reason():
    graph = import_graph()
    lazy = {(m, t): line for m, imps in graph.items() for t, is_lazy, line in imps if is_lazy}
    unexpected = sorted(f"{m}:{line} imports {t}" for (m, t), line in lazy.items()
                        if (m, t) not in ALLOWED_LAZY)
    assert not unexpected, ("function-level imports: move them to the top of the module, or add them to "
                            "ALLOWED_LAZY with the reason they must stay lazy:\n" + "\n".join(unexpected))
    stale = sorted(k for k in ALLOWED_LAZY if k not in lazy)
    assert not stale, f"ALLOWED_LAZY lists imports that are gone: {stale}"


def test_the_graph_sees_relative_and_lazy_imports(tmp_path):  # the checker itself: a cycle it cannot see is no proof
    graph = import_graph()
    assert ("minitune.model.transformer", False) in {(t, lazy) for t, lazy, _ in graph["minitune.model"]}
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from .model import transformer\n")
    found = imports_of("minitune.lazy", lazy, all_modules())
    assert ("minitune.model.transformer", True) in [(t, is_lazy) for t, is_lazy, _ in found]
    assert ("minitune.tiny.corpus", False) in {(t, lazy) for t, lazy, _ in graph["minitune.tiny.build"]}  # from . import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
