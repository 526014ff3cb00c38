"""Properties of the package as a whole: only public API of the libraries it builds on."""

import ast
from pathlib import Path

import spar_pl

PACKAGE = Path(spar_pl.__file__).parent


def own_private_names(tree: ast.AST) -> set[str]:
    """Private names the source defines itself: functions, methods, class attributes, ``self._x = ...``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for item in ast.walk(target):
                    if isinstance(item, ast.Name):
                        names.add(item.id)
                    elif isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name):
                        if item.value.id in ("self", "cls"):
                            names.add(item.attr)
    return {name for name in names if name.startswith("_")}


def private_accesses(source: str, name: str = "<source>") -> list[str]:
    """``file:line: expression`` of every private attribute used on an object that is not ours: ``x._y`` (dunder
    names such as ``__dict__`` are public), ``self._y`` where the source defines no ``_y`` (a library base class's
    private member), and ``getattr``/``setattr``/``hasattr`` with such a name."""
    tree = ast.parse(source)
    own = own_private_names(tree)
    hits = []
    for node in ast.walk(tree):
        attr = None
        if isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            attr = None if owner in ("self", "cls") and node.attr in own else node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
            key = node.args[1]
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and isinstance(key, ast.Constant):
                attr = key.value if isinstance(key.value, str) else None
        if attr and attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")):
            hits.append((node.lineno, f"{name}:{node.lineno}: {ast.unparse(node)}"))
    return [hit for _, hit in sorted(hits)]


def test_no_private_attribute_of_other_libraries_is_used():
    hits = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in private_accesses(path.read_text(), path.name)]
    assert not hits, "private attributes of objects we do not own:\n" + "\n".join(hits)


def test_the_check_finds_what_it_looks_for():
    source = (
        "logger._version = 1\n"
        "x = model._parameters.values()\n"
        "getattr(logger, '_version', 0)\n"
        "self._should_skip_saving_checkpoint(trainer)\n"
        "self._mine = 1\n"
        "self._mine\n"
        "cfg.__dict__\n"
        "def _helper(): pass\n"
        "self._helper()\n"
    )
    hits = private_accesses(source)
    assert [hit.split(":")[1] for hit in hits] == ["1", "2", "3", "4"], hits
