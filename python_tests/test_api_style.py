"""Style rules of the package that a reader relies on, checked from the source: type hints on every public function,
method and class constructor; docstrings in one style (summary line; Args / Returns / Raises) on the public API
(`crossdiff_ext.__all__`); the PEP 561 marker."""

import ast
import inspect
import pathlib
import textwrap
import types

import crossdiff_ext as cx

PACKAGE = pathlib.Path(cx.__file__).parent


def _public_functions(tree):
    """(qualified name, node, is_method) of the module-level functions and the methods of module-level classes
    whose names are public (constructors included)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not item.name.startswith("_") or item.name == "__init__"
                ):
                    yield f"{node.name}.{item.name}", item, True


def _missing_hints(node, is_method):
    args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    decorators = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
    if is_method and args and "staticmethod" not in decorators:
        args = args[1:]  # self / cls
    missing = [a.arg for a in args if a.annotation is None]
    missing += [a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None and a.annotation is None]
    if node.returns is None and node.name != "__init__":
        missing.append("return")
    return missing


def test_every_public_function_and_method_has_type_hints():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, node, is_method in _public_functions(tree):
            gaps = _missing_hints(node, is_method)
            if gaps:
                missing.append(f"{path.relative_to(PACKAGE.parent)}: {name} ({', '.join(gaps)})")
    assert not missing, f"{len(missing)} public functions lack type hints:\n" + "\n".join(missing)


def _raises_directly(fn):
    """Whether the function's own body (not a nested function) has a `raise` statement."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    tree = ast.parse(textwrap.dedent(source))
    root = tree.body[0]
    stack = list(ast.iter_child_nodes(root))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Raise):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _docstring_problems(name, fn):
    doc = inspect.getdoc(fn)
    if not doc:
        return [f"{name}: no docstring"]
    problems = []
    summary = doc.split("\n\n")[0]
    if not summary.strip() or len(summary) > 400:
        problems.append(f"{name}: the docstring must open with a summary line (a short first paragraph)")
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters if p not in ("self", "cls")]
    if params and "Args:" not in doc:
        problems.append(f"{name}: no Args: section for {params}")
    returns = signature.return_annotation
    if returns not in (None, inspect.Signature.empty, "None") and name.split(".")[-1] != "__init__":
        if "Returns:" not in doc and "Yields:" not in doc:
            problems.append(f"{name}: no Returns: section")
    if _raises_directly(fn) and "Raises:" not in doc:
        problems.append(f"{name}: raises, but has no Raises: section")
    return problems


def _public_api():
    """(name, callable) of crossdiff_ext.__all__: functions, and classes with the public methods they define."""
    for name in cx.__all__:
        obj = getattr(cx, name)
        if isinstance(obj, types.ModuleType):
            continue
        if inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(fn):
                    yield f"{name}.{attr}", fn
        elif callable(obj):
            yield name, obj


def test_public_api_docstrings_follow_one_style():
    problems = []
    for name, obj in _public_api():
        if inspect.isclass(obj):
            if not inspect.getdoc(obj) or obj.__doc__ is None:
                problems.append(f"{name}: no class docstring")
            continue
        if name.endswith(".__init__"):
            continue  # the class docstring documents the constructor's arguments
        problems += _docstring_problems(name, obj)
    assert not problems, f"{len(problems)} docstring problems on the public API:\n" + "\n".join(problems)


def test_class_docstrings_document_the_constructor():
    problems = []
    for name, obj in _public_api():
        if inspect.isclass(obj) and "__init__" in vars(obj) and inspect.isfunction(vars(obj)["__init__"]):
            params = [p for p in inspect.signature(obj.__init__).parameters if p != "self"]
            doc = inspect.getdoc(obj) or ""
            # A dataclass documents its fields as Attributes:, any other class its constructor's Args:.
            if params and "Args:" not in doc and "Attributes:" not in doc:
                problems.append(f"{name}: the class docstring has no Args: (or Attributes:) section for {params}")
    assert not problems, "\n".join(problems)


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
