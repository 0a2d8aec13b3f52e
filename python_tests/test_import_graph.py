"""The package's import graph, read with `ast` (nothing is imported): no cycles, layers point one way, no private
name crosses a module boundary.

Edges. Every `import` and `from ... import` of a crossdiff_ext module counts, at module level or inside a
function (a function-level import still runs, and still closes a cycle when it runs). Relative imports are
resolved. `from P import name` is an edge to the submodule P.name when that is a module, else to P itself.
Importing P.sub also runs every package __init__ on the way there, so those count too, except the importer's
own ancestor packages: they are already initialised when it runs (a module importing its own package
explicitly, e.g. `import crossdiff_ext as cx`, still counts: it uses what that __init__ gathers).

Layers, bottom to top: the foundation modules (backends.py, atomic.py, errors.py, _extension.py, _build_hash.py)
< ops/ and triton/ < layer/ < models/ < data/ < training/ < diffing/ < truth/ < distributed/ < demo/ < the
command line (cli.py, or the cli/ package with one module per subcommand) < the top-level __init__.py and
__main__.py. A module may import its own layer and the ones below it, never one above. The top-level __init__ is
the public face: nothing in the package imports it, and like the rest of the core it never imports demo/.

Private names. `from M import _name` and `M._name` (M bound by an import of a crossdiff_ext module) are refused
when _name is not a module: what another module needs gets a public name in its owner. A private MODULE (a file
whose name starts with "_") may be imported only from within its own package (its siblings), e.g.
`from . import _launch` in triton/; the compiled crossdiff_ext._C is not a Python file and is outside the graph.
"""

import ast
import os

import pytest

PACKAGE = "crossdiff_ext"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

FOUNDATION = {f"{PACKAGE}.{name}" for name in ("backends", "atomic", "errors", "_extension", "_build_hash")}
LAYERS = [
    ("foundation", None),
    ("ops", ("ops", "triton")),
    ("layer", ("layer",)),
    ("models", ("models",)),
    ("data", ("data",)),
    ("training", ("training",)),
    ("diffing", ("diffing",)),
    ("truth", ("truth",)),
    ("distributed", ("distributed",)),
    ("demo", ("demo",)),
    ("cli", ("cli",)),
    ("top", None),
]
TOP = {PACKAGE, f"{PACKAGE}.__main__"}
COMPILED = {f"{PACKAGE}._C"}  # the C++ extension: imported like a module, no Python source to read


def _modules():
    """{dotted name: path} of every Python module of the package; a package is named by its __init__."""
    found = {}
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(directory, os.path.dirname(ROOT)).split(os.sep)
        for name in sorted(files):
            if name.endswith(".py"):
                parts = rel if name == "__init__.py" else rel + [name[:-3]]
                found[".".join(parts)] = os.path.join(directory, name)
    return found


MODULES = _modules()


def _is_package(module):
    return MODULES.get(module, "").endswith("__init__.py")


def _ancestors(module):
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _resolve(importer, level, target):
    """The absolute module name of a (possibly relative) import in `importer`."""
    if level == 0:
        return target
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Import:
    def __init__(self, target, name, line, in_function):
        self.target, self.name, self.line, self.in_function = target, name, line, in_function


def _imports(module):
    """Every import of a crossdiff_ext module in `module`: _Import(target module, imported attribute or None)."""
    with open(MODULES[module], encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), MODULES[module])
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        out.append(_Import(alias.name, None, child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child.level, child.module)
                if source == PACKAGE or source.startswith(PACKAGE + "."):
                    for alias in child.names:
                        sub = f"{source}.{alias.name}"
                        if sub in MODULES or sub in COMPILED:
                            out.append(_Import(sub, None, child.lineno, inside))
                        else:
                            out.append(_Import(source, alias.name, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return tree, out


def _edges(module, imports):
    """The modules whose import `module`'s imports run (see the module docstring)."""
    edges = set()
    for imp in imports:
        if imp.target in MODULES and imp.target != module:
            edges.add(imp.target)
        for package in _ancestors(imp.target) - _ancestors(module) - {module}:
            edges.add(package)
    return edges


def graph():
    return {m: _edges(m, _imports(m)[1]) for m in MODULES}


def find_cycles(edges):
    """One cycle (as a list of modules, first repeated at the end) per strongly connected component."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan, recursive: the graph is a few dozen modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first inside the component from `start` back to `start`: the shortest cycle through it.
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in edges[path[-1]] if w in component)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def layer_of(module):
    """(rank, layer name) of a module; None for a module outside every layer."""
    if module in FOUNDATION:
        return 0, "foundation"
    if module in TOP:
        return len(LAYERS) - 1, "top"
    rest = module[len(PACKAGE) + 1 :].split(".")
    for rank, (name, folders) in enumerate(LAYERS):
        if folders and rest[0] in folders:
            return rank, name
    return None


def test_every_module_has_a_layer():
    outside = sorted(m for m in MODULES if layer_of(m) is None)
    assert not outside, f"modules outside every layer (move them into a subpackage, or name them here): {outside}"


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    wrong = []
    for module, targets in graph().items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there[0] > here[0]:
                wrong.append(f"{module} ({here[1]}) imports {target} ({there[1]})")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


def test_the_core_never_imports_demo():
    demo = [m for m in MODULES if layer_of(m) == layer_of(f"{PACKAGE}.demo")]
    users = sorted(
        f"{m} imports {t}"
        for m, targets in graph().items()
        for t in targets
        if t in demo and layer_of(m) is not None and layer_of(m)[1] not in ("demo", "cli")
    )
    assert not users, "the core imports demo/:\n" + "\n".join(users)


def _private_uses(module):
    tree, imports = _imports(module)
    found = []
    for imp in imports:
        private_module = imp.target.rsplit(".", 1)[-1].startswith("_") and imp.name is None
        if (
            private_module
            and imp.target.rsplit(".", 1)[0] != module.rsplit(".", 1)[0]
            and imp.target.rsplit(".", 1)[0] != module
        ):
            found.append(f"{module}:{imp.line} imports the private module {imp.target} from outside its package")
        if imp.name is not None and imp.name.startswith("_"):
            found.append(f"{module}:{imp.line} imports the private name {imp.target}.{imp.name}")
    # `alias._name` where alias is bound by an import of a crossdiff_ext module
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    # `import a.b` binds a; `import a.b as c` binds c to a.b
                    name = alias.name if alias.asname else alias.name.split(".")[0]
                    bound[alias.asname or name] = name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            owner = bound[node.value.id]
            if f"{owner}.{node.attr}" not in MODULES:
                found.append(f"{module}:{node.lineno} uses the private name {owner}.{node.attr}")
    return found


def test_no_private_names_across_modules():
    found = [line for m in sorted(MODULES) for line in _private_uses(m)]
    assert not found, "private names used across modules (give them a public name in their owner):\n" + "\n".join(found)


def test_package_imports_stay_at_module_top():
    """An import of the package's own modules inside a function only ever hid a cycle; imports of heavy optional
    dependencies (transformers, matplotlib, pyarrow, triton) may stay inside functions."""
    late = [
        f"{m}:{imp.line} imports {imp.target}"
        for m in sorted(MODULES)
        for imp in _imports(m)[1]
        if imp.in_function and imp.target not in COMPILED
    ]  # _extension wraps _C's ImportError with advice
    assert not late, "imports of crossdiff_ext modules inside functions:\n" + "\n".join(late)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_graph_reads_every_module(module):
    # the graph is only as good as its parse: every module must parse and resolve
    for imp in _imports(module)[1]:
        assert imp.target in MODULES or imp.target in COMPILED, f"{module}:{imp.line}: {imp.target}"


def test_the_command_line_is_one_layer_as_a_module_or_a_package():
    # cli.py and a cli/ package of one module per subcommand sit at the same place: above demo/, below the top.
    cli = layer_of(f"{PACKAGE}.cli")
    assert cli[1] == "cli" and layer_of(f"{PACKAGE}.cli.train") == cli
    assert layer_of(f"{PACKAGE}.demo")[0] < cli[0] < layer_of(PACKAGE)[0]
