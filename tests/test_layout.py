"""The layout shows the layers: subpackages by layer, no facades, Pyro's privates in one module."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "pyro_lag"
PUBLIC_PACKAGES = {"pyro_lag", "pyro_lag.data", "pyro_lag.report", "pyro_lag.lightning"}
TOP_MODULES = {"__init__.py", "compat.py", "distributions.py"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [elt.value for elt in node.value.elts]  # type: ignore[attr-defined]
    return []


def test_the_top_of_the_library_holds_only_subpackages_and_two_modules():
    assert {p.name for p in LIBRARY.glob("*.py")} == TOP_MODULES


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in LIBRARY.rglob("__init__.py")}
    assert on_disk | {"pyro_lag.models", "pyro_lag.cli"} == listed


def test_no_module_re_exports_another_modules_names():
    """Only the public packages' ``__init__`` gather names; every other ``__all__`` lists its own."""
    for name, tree in _modules().items():
        if name in PUBLIC_PACKAGES:
            continue
        borrowed = set(_all(tree)) - _defined(tree)
        assert not borrowed, f"{name} re-exports {sorted(borrowed)}"


def test_layer_packages_hold_only_a_docstring():
    """``import pyro_lag.engine`` costs nothing and hides nothing: the modules are the API."""
    for name, tree in _modules().items():
        path = LIBRARY.joinpath(*name.split(".")[1:], "__init__.py")
        if name in PUBLIC_PACKAGES or not path.exists():
            continue
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), f"{name}/__init__.py has code"


def _private_attributes(tree: ast.Module) -> list[tuple[int, str]]:
    """Every ``x._name`` read and ``getattr(x, "_name")``, ``self`` included (a base class's privates)."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            hits.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                attr = node.args[1].value
                if attr.startswith("_") and not attr.startswith("__"):
                    hits.append((node.lineno, attr))
    return hits


def test_private_attributes_of_other_libraries_are_read_in_compat_only():
    """A private name the library reads but never defines belongs to Pyro, torch or Lightning."""
    modules = _modules()
    own: set[str] = set()
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
    foreign = {
        name: [(line, attr) for line, attr in _private_attributes(tree) if attr not in own]
        for name, tree in modules.items()
        if name != "pyro_lag.compat"
    }
    assert {name: hits for name, hits in foreign.items() if hits} == {}
    assert _private_attributes(modules["pyro_lag.compat"]), "compat reads the privates"


def test_the_checker_sees_a_private_read():
    tree = ast.parse("def f(fn):\n    return fn._mask\n\ndef g(self):\n    return self._trainer\n")
    assert _private_attributes(tree) == [(2, "_mask"), (5, "_trainer")]


def test_the_public_api_is_where_it_was():
    import pyro_lag.data
    import pyro_lag.distributions
    import pyro_lag.report

    for name in pyro_lag.__all__:
        assert getattr(pyro_lag, name) is not None
    assert callable(pyro_lag.mutual_information), "the function, not a module of that name"
    assert pyro_lag.distributions.NextTokenCategorical
    assert pyro_lag.report.write_report and pyro_lag.data.TextBatches
