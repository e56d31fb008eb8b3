"""The package layout holds: layers only import downwards, modules stay small, no import cycle at import time.

Every module under ``src/tlsgate`` is read with `ast` (nothing is imported), so a violation is reported with
the file and line of the import, whatever the import would do at run time.

The layers (a module may import from its own package or from a LOWER layer, never sideways or up)::

    0  tlsgate (the root: __version__) and its leaf modules tlsgate.errors, tlsgate.logs (one unit)
    1  settings     2  tls     3  pki, policy     4  engine     5  status     6  process     7  dev     8  cli
    9  tlsgate.__main__ (the entry point)

Imports under ``if TYPE_CHECKING:`` are exempt (they never run). An import inside a function is NOT exempt:
it runs on first call and ties the layers together just the same; it only escapes the import-cycle check,
which is about what runs while a module is being imported.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = SRC / "tlsgate"
MAX_LINES = 500

# The root and its two leaf modules are one unit: logs may raise errors' exceptions.
LAYERS: dict[str, int] = {
    "tlsgate": 0,
    "tlsgate.settings": 1,
    "tlsgate.tls": 2,
    "tlsgate.pki": 3,
    "tlsgate.policy": 3,
    "tlsgate.engine": 4,
    "tlsgate.status": 5,
    "tlsgate.process": 6,
    "tlsgate.dev": 7,
    "tlsgate.cli": 8,
    "tlsgate.__main__": 9,
}

# Today's violators, as paths relative to src/tlsgate. Shrinks as the layout lands: the lead removes an entry
# when the branch that fixes it is merged (test_known_exceptions_are_still_needed says which ones to remove).
KNOWN_LAYER_EXCEPTIONS: frozenset[str] = frozenset()
KNOWN_SIZE_EXCEPTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is, and whether it runs while the module is imported."""

    target: str
    line: int
    at_import_time: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The tlsgate modules an import statement loads (a ``from A import b`` names module ``A.b`` when it exists)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        yield submodule if submodule in MODULES else base


def imports(path: Path, module: str | None = None, *, everything: bool = False) -> list[Import]:
    """Every import of a tlsgate module in ``path`` (module ``module``), except those under ``if TYPE_CHECKING:``.

    ``everything`` keeps imports of other modules too (the standard library, third parties) as they are named.
    """
    module = module_name(path) if module is None else module
    found: list[Import] = []

    def walk(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.orelse:
                walk(statement, at_import_time)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(node, module, path.name == "__init__.py"):
                if everything or target == "tlsgate" or target.startswith("tlsgate."):
                    found.append(Import(target, node.lineno, at_import_time))
            return
        # A function body runs when called, not when the module is imported (a lambda has no statements).
        inner = at_import_time and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            walk(child, inner)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return found


def layer_of(module: str) -> tuple[str, int]:
    """The layer unit a module belongs to (its top-level package, or the leaf module) and that unit's layer."""
    parts = module.split(".")
    for size in (2, 1):
        unit = ".".join(parts[:size])
        if unit in LAYERS and (size == 2 or len(parts) == 1 or f"{unit}.{parts[1]}" in MODULES):
            return unit, LAYERS[unit]
    raise KeyError(f"{module} is in no layer: add its package to LAYERS in tests/test_layout.py")


def layer_violations(path: Path, module: str | None = None) -> list[str]:
    """One line per import in ``path`` that goes sideways or up (``module`` defaults to the path's own)."""
    unit, layer = layer_of(module_name(path) if module is None else module)
    problems = []
    for found in imports(path, module):
        target_unit, target_layer = layer_of(found.target)
        if target_unit != unit and target_layer >= layer:
            where = path.name if module else _relative(path)
            problems.append(
                f"{where}:{found.line}: {unit} (layer {layer}) imports {found.target} (layer {target_layer})"
            )
    return problems


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_modules_import_only_their_own_package_or_a_lower_layer() -> None:
    problems = [
        problem
        for path in MODULES.values()
        if _relative(path) not in KNOWN_LAYER_EXCEPTIONS
        for problem in layer_violations(path)
    ]
    assert problems == [], "\n".join(problems)


def test_no_module_is_over_500_lines() -> None:
    problems = [
        f"{_relative(path)}: {line_count(path)} lines"
        for path in MODULES.values()
        if _relative(path) not in KNOWN_SIZE_EXCEPTIONS and line_count(path) > MAX_LINES
    ]
    assert problems == [], "\n".join(problems)


def test_no_import_cycle_at_import_time() -> None:
    graph = {
        module: sorted({found.target for found in imports(path) if found.at_import_time and found.target != module})
        for module, path in MODULES.items()
    }
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> None:
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target in on_stack:
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in done:
                visit(target)
        stack.pop()
        on_stack.discard(module)
        done.add(module)

    for module in graph:
        if module not in done:
            visit(module)


def test_only_tls_ossl_uses_ctypes() -> None:
    """Every ctypes binding (library, prototypes, pointer reads) is in one module, checked once at start-up."""
    users = sorted(
        _relative(path)
        for path in MODULES.values()
        if any(found.target.split(".")[0] == "ctypes" for found in imports(path, everything=True))
    )
    assert users == ["tls/ossl.py"]


def test_known_exceptions_are_still_needed() -> None:
    """An entry whose file is gone or now fits is stale: remove it, so the exception lists only ever shrink."""
    stale = [
        f"layer: {name}" for name in KNOWN_LAYER_EXCEPTIONS if not _still(name, lambda p: bool(layer_violations(p)))
    ]
    stale += [
        f"size: {name}" for name in KNOWN_SIZE_EXCEPTIONS if not _still(name, lambda p: line_count(p) > MAX_LINES)
    ]
    assert stale == [], "remove from tests/test_layout.py: " + ", ".join(sorted(stale))


def _still(name: str, violates: Callable[[Path], bool]) -> bool:
    path = ROOT / name
    return path.is_file() and violates(path)


# The checker itself, on a small made-up source: what counts, what is exempt.


def test_the_checker_exempts_type_checking_only_and_sees_lazy_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from tlsgate.errors import ConfigError\n"
        "if TYPE_CHECKING:\n"
        "    from tlsgate.engine.tunnel import Tunnel\n"
        "else:\n"
        "    import tlsgate.logs\n"
        "def later():\n"
        "    from tlsgate.process import supervisor\n"
        "class Late:\n"
        "    from . import ossl\n"
    )
    sample = tmp_path / "sample.py"
    sample.write_text(source, encoding="utf-8")
    found = {(item.target, item.at_import_time) for item in imports(sample, "tlsgate.tls.sample")}
    assert found == {
        ("tlsgate.errors", True),
        ("tlsgate.logs", True),
        ("tlsgate.process.supervisor", False),
        ("tlsgate.tls.ossl", True),
    }
    assert layer_of("tlsgate.process.supervisor") == ("tlsgate.process", 6)
    assert layer_of("tlsgate.logs") == ("tlsgate", 0)
    with pytest.raises(KeyError, match="in no layer"):
        layer_of("tlsgate.newpackage.module")
    assert layer_of("tlsgate") == ("tlsgate", 0)


def test_the_checker_refuses_a_lazy_upward_import_and_a_sideways_one(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tlsgate.tls import internals\n"
        "def later():\n"
        "    from tlsgate.process import systemd\n"
        "from tlsgate.policy import rego\n",
        encoding="utf-8",
    )
    problems = layer_violations(sample, "tlsgate.pki.sample")
    assert [problem.split(": ", 1)[0] for problem in problems] == ["sample.py:3", "sample.py:4"]
