"""No import cycles inside `megatron_omni/`, lazy (function-level) imports included.

The graph is built from the source alone (`ast`), so a cycle hidden in a function body -- one
that works today only because the import runs late -- is found as well as a module-level one.

Nodes are the package's modules (`pkg/__init__.py` is the node `pkg`).  Edge rules:

* `import a.b.c` and `from a.b.c import x` (absolute or relative): an edge to `a.b.c`, and to each
  parent package (`a.b`) whose `__init__` Python runs for it -- except the importer's own parent
  packages, which have already started running when the importer runs (so a package `__init__`
  re-exporting its submodules is not a cycle with each of them, while `training.loop` importing
  `profiling.profiler` does run `profiling/__init__` and so everything that `__init__` imports).  The top
  package `megatron_omni` is everyone's parent.
* `from a.b import x` where `a.b.x` is a module: an edge to `a.b.x`.
* `from a.b import x` where `x` is a name defined or re-exported by `a/b/__init__.py`: an edge
  to the module the name comes from (the `__init__`'s own `from m import x` is followed), or to
  `a.b` itself when the `__init__` defines it.
* Imports under `if TYPE_CHECKING:` never run, so they are not edges.  `importlib.import_module`
  with a string is not seen (gpu_check's group registry; no cycle passes through it).

A cycle is a strongly connected component with more than one module (Tarjan's algorithm).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

PACKAGE = "megatron_omni"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_files(root: Path = ROOT) -> Dict[str, Path]:
    """Dotted module name -> source file, for every .py under the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every Import / ImportFrom in the tree, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by `from <...> import`, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class ImportGraph:
    def __init__(self, root: Path = ROOT):
        self.files = module_files(root)
        self.trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in self.files.items()}
        self.edges: Dict[str, Set[str]] = {m: set() for m in self.files}
        for module, tree in self.trees.items():
            is_package = self.files[module].name == "__init__.py"
            for node in _runtime_imports(tree):
                for target in self._targets(module, is_package, node):
                    for runs in (target, *self._foreign_packages(module, target)):
                        if runs != module:
                            self.edges[module].add(runs)

    def _foreign_packages(self, importer: str, target: str) -> Iterator[str]:
        """The packages whose `__init__` Python runs to import `target`, other than the importer's own
        ancestors (those have already started running when the importer runs)."""
        parts = target.split(".")
        for n in range(2, len(parts)):
            package = ".".join(parts[:n])
            if package in self.files and not (importer + ".").startswith(package + "."):
                yield package

    def _targets(self, module: str, is_package: bool, node: ast.stmt) -> Iterator[str]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in self.files:
                    yield alias.name
            return
        source = _absolute(module, is_package, node)
        if source not in self.files:
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.files:
                yield submodule
            else:
                yield self.origin(source, alias.name)

    def origin(self, module: str, name: str, _seen: Optional[Set[Tuple[str, str]]] = None) -> str:
        """The module that defines `name` as seen from `module`: follows a package `__init__`'s
        `from m import name` re-exports; `module` itself when the name is defined there."""
        seen = _seen or set()
        if (module, name) in seen or self.files[module].name != "__init__.py":
            return module
        seen.add((module, name))
        for node in self.trees[module].body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, True, node)
                        if f"{source}.{alias.name}" in self.files:
                            return f"{source}.{alias.name}"
                        if source in self.files:
                            return self.origin(source, alias.name, seen)
        return module

    def cycles(self) -> List[frozenset]:
        """Strongly connected components of more than one module (iterative Tarjan)."""
        index: Dict[str, int] = {}
        low: Dict[str, int] = {}
        on_stack: Set[str] = set()
        stack: List[str] = []
        found: List[frozenset] = []
        for start in sorted(self.edges):
            if start in index:
                continue
            work = [(start, iter(sorted(self.edges[start])))]
            index[start] = low[start] = len(index)
            stack.append(start)
            on_stack.add(start)
            while work:
                node, successors = work[-1]
                for nxt in successors:
                    if nxt not in index:
                        index[nxt] = low[nxt] = len(index)
                        stack.append(nxt)
                        on_stack.add(nxt)
                        work.append((nxt, iter(sorted(self.edges[nxt]))))
                        break
                    if nxt in on_stack:
                        low[node] = min(low[node], index[nxt])
                else:
                    work.pop()
                    if work:
                        low[work[-1][0]] = min(low[work[-1][0]], low[node])
                    if low[node] == index[node]:
                        component = set()
                        while True:
                            member = stack.pop()
                            on_stack.discard(member)
                            component.add(member)
                            if member == node:
                                break
                        if len(component) > 1:
                            found.append(frozenset(component))
        return found

    def describe(self, component: frozenset) -> str:
        """The edges inside one cycle, one per line (which import to cut)."""
        return "\n".join(f"    {a} -> {b}" for a in sorted(component) for b in sorted(self.edges[a] & component))


def test_graph_sees_relative_lazy_and_reexported_imports(tmp_path):
    """The edge rules on a small package: a relative import, a function-level one, a name re-exported
    by a foreign package's `__init__` (edges to the defining module and that `__init__`), a sibling
    in the importer's own package (no edge to the `__init__`), a TYPE_CHECKING import (no edge)."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from megatron_omni.sub.impl import Thing\n")
    (pkg / "sub" / "impl.py").write_text("def f():\n    from ..user import g\n")
    (pkg / "sub" / "sibling.py").write_text("from megatron_omni.sub.impl import Thing\n")
    (pkg / "user.py").write_text("from megatron_omni.sub import Thing\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import user\n")
    graph = ImportGraph(pkg)
    # the name's module, and the foreign package whose __init__ runs to import it
    assert graph.edges["megatron_omni.user"] == {"megatron_omni.sub.impl", "megatron_omni.sub"}
    assert graph.edges["megatron_omni.sub.impl"] == {"megatron_omni.user"}
    assert graph.edges["megatron_omni.sub.sibling"] == {"megatron_omni.sub.impl"}  # its own package: no edge
    assert graph.edges["megatron_omni.typed"] == set()
    assert graph.edges["megatron_omni.sub"] == {"megatron_omni.sub.impl"}
    assert graph.cycles() == [frozenset({"megatron_omni.user", "megatron_omni.sub.impl", "megatron_omni.sub"})]


@functools.lru_cache(maxsize=None)
def package_graph() -> ImportGraph:
    return ImportGraph()


def _edges_into(graph: ImportGraph, source: str, target: str) -> List[str]:
    """Edges from modules under package `source` into modules under package `target`."""
    inside = lambda m, pkg: m == pkg or m.startswith(pkg + ".")  # noqa: E731
    return [f"{a} -> {b}" for a in sorted(graph.edges) if inside(a, source)
            for b in sorted(graph.edges[a]) if inside(b, target)]


def test_models_do_not_import_training():
    """Layers point one way: training builds models, models never reach back into training code
    (sparse upcycling, which loads and saves training checkpoints, is training/upcycle.py)."""
    assert _edges_into(package_graph(), "megatron_omni.models", "megatron_omni.training") == []


# config/validate.py probes the installed kernels (models/kernels.py: torch + importlib only) when a
# check needs to know whether the layers will be Transformer Engine's; imported inside the function
# (with its package `models`, whose `__init__` is empty).
CONFIG_RUNTIME_PROBES = ["megatron_omni.config.validate -> megatron_omni.models",
                         "megatron_omni.config.validate -> megatron_omni.models.kernels"]


def test_config_imports_no_model_or_training_module():
    """Statically, lazy imports included (test_config_imports.py checks what `import` loads)."""
    graph = package_graph()
    for layer in ("models", "training", "data", "parallel", "convert", "profiling", "inference"):
        edges = [e for e in _edges_into(graph, "megatron_omni.config", f"megatron_omni.{layer}")
                 if e not in CONFIG_RUNTIME_PROBES]
        assert edges == [], f"megatron_omni.config imports {layer} code: {edges}"


def test_no_import_cycles():
    graph = package_graph()
    assert len(graph.files) > 100, "the walk found too few modules: wrong package root?"
    found = graph.cycles()
    assert not found, "import cycles (cut one edge of each):\n" + "\n\n".join(graph.describe(c) for c in found)
