"""Layering: mailbridge.core is pure (no I/O, no event loop), so it never imports outer layers.

Checked by reading the source with ``ast`` rather than importing it, so a forbidden import inside
a function body or under ``if TYPE_CHECKING`` is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailbridge

PACKAGE_ROOT = Path(mailbridge.__file__).resolve().parent
CORE = PACKAGE_ROOT / "core"

FORBIDDEN = (
    "mailbridge.mail",
    "mailbridge.store",
    "mailbridge.daemon",
    "asyncio",
    "socket",
    "sqlite3",
    "ssl",
)


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(source: str, module: str, *, is_package: bool) -> set[str]:
    """Every module name ``source`` imports, relative imports resolved against ``module``.

    ``from a import b`` yields both ``a`` and ``a.b`` since ``b`` may be a submodule.
    """
    tree = ast.parse(source)
    # The package that a level-1 relative import is relative to.
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.add(node.args[0].value)  # importlib.import_module("x") / __import__("x")
    return found


def forbidden_in(names: set[str]) -> set[str]:
    return {
        name for name in names for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")
    }


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_exists() -> None:
    assert _core_files(), f"no Python files under {CORE}"


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_core_imports_nothing_forbidden(path: Path) -> None:
    names = imported_modules(
        path.read_text(encoding="utf-8"), _module_name(path), is_package=_is_package(path)
    )
    assert not forbidden_in(names), f"{path} imports {sorted(forbidden_in(names))}"


def test_config_knows_nothing_of_the_backends() -> None:
    """config.py validates names against core's table list, not the store's DDL module."""
    path = PACKAGE_ROOT / "config.py"
    names = imported_modules(
        path.read_text(encoding="utf-8"), "mailbridge.config", is_package=False
    )
    outer = {
        n
        for n in names
        if n.startswith(("mailbridge.store", "mailbridge.mail", "mailbridge.daemon"))
    }
    assert not outer, f"config.py imports {sorted(outer)}"


# The checker itself must catch each form, or the test above could pass vacuously.
@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("import asyncio", "mailbridge.core.x", False, {"asyncio"}),
        ("import ssl as s, json", "mailbridge.core.x", False, {"ssl"}),
        ("import socket.foo", "mailbridge.core.x", False, {"socket.foo"}),
        ("from sqlite3 import connect", "mailbridge.core.x", False, {"sqlite3", "sqlite3.connect"}),
        ("from mailbridge import store", "mailbridge.core.x", False, {"mailbridge.store"}),
        ("from mailbridge.mail.imap import Client", "mailbridge.core.x", False,
         {"mailbridge.mail.imap", "mailbridge.mail.imap.Client"}),
        ("from .. import daemon", "mailbridge.core.x", False, {"mailbridge.daemon"}),
        ("from ..store.base import Repo", "mailbridge.core.x", False,
         {"mailbridge.store.base", "mailbridge.store.base.Repo"}),
        ("from ... import mail", "mailbridge.core.sub.x", False, {"mailbridge.mail"}),
        ("from ... import store", "mailbridge.core.sub", True, {"mailbridge.store"}),
        ("from .. import store", "mailbridge.core.sub", True, set()),  # mailbridge.core.store
        ("def f():\n    import asyncio\n", "mailbridge.core.x", False, {"asyncio"}),
        ("import importlib\nimportlib.import_module('ssl')", "mailbridge.core.x", False, {"ssl"}),
        ("from . import model\nfrom .model import Address\nimport json", "mailbridge.core.x",
         False, set()),
        ("import asyncio_extras\nimport sslib", "mailbridge.core.x", False, set()),
    ],
)  # fmt: skip
def test_checker_catches_every_form(
    source: str, module: str, is_package: bool, expected: set[str]
) -> None:
    assert forbidden_in(imported_modules(source, module, is_package=is_package)) == expected
