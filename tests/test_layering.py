"""The layers: the protocol core does no I/O, the client stands on its own, and the
framework uses only the client's public names.

The checks read every module's imports with ``ast`` (inside functions and
``TYPE_CHECKING`` blocks too), and one imports the client in a fresh interpreter to
see what it loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import strictconsume

PACKAGE = Path(strictconsume.__file__).parent
CLIENT = PACKAGE / "amqp"

#: The sans-IO core: bytes in, events out. ``_protocol`` and everything it builds on.
CORE = (
    "_protocol",
    "_receive",
    "_handshake",
    "_events",
    "_framing",
    "_state",
    "_content",
    "_confirms",
    "_codec",
    "_errors",
)
IO_LIBRARIES = {"anyio", "trio", "asyncio", "socket", "ssl", "selectors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute; ``from X import y`` gives X and X.y
    (y may be a submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_of(path.read_text(), package)


def imports_of(source: str, package: str) -> set[str]:
    """What a module of ``package`` with this source imports (see :func:`imports`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                assert node.module is not None
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def sources(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.py"))


def framework_imports(found: set[str]) -> set[str]:
    """The framework modules (anything of strictconsume outside the client) in ``found``."""
    return {
        m
        for m in found
        if m.split(".")[0] == "strictconsume" and not m.startswith("strictconsume.amqp")
    }


def test_the_import_reader_sees_what_the_checks_look_for() -> None:
    """Relative imports resolve to absolute names, also inside functions and
    TYPE_CHECKING blocks, so that each check below can fail."""
    found = imports(CLIENT / "_protocol.py")
    assert "strictconsume.amqp._framing" in found
    assert "pamqp.frame" in found
    assert module_name(CLIENT / "__init__.py") == "strictconsume.amqp"
    assert "strictconsume.amqp" in imports(PACKAGE / "_dispatch.py")
    # What _protocol.py once did to name its version, inside a method:
    old = "def f():\n    from .. import __version__\n"
    assert framework_imports(imports_of(old, "strictconsume.amqp")) == {
        "strictconsume",
        "strictconsume.__version__",
    }
    typed = "if TYPE_CHECKING:\n    from .amqp._codec import Headers\n"
    assert "strictconsume.amqp._codec" in imports_of(typed, "strictconsume")
    assert {"anyio", "trio.lowlevel"} <= imports_of("import anyio, trio.lowlevel", "x")


@pytest.mark.parametrize("name", CORE)
def test_the_protocol_core_imports_no_io_library(name: str) -> None:
    path = CLIENT / f"{name}.py"
    found = {module.partition(".")[0] for module in imports(path)}
    assert not found & IO_LIBRARIES, f"{path.name} imports {sorted(found & IO_LIBRARIES)}"
    inside = {m for m in imports(path) if m.startswith("strictconsume.amqp.")}
    outside_core = {m for m in inside if m.split(".")[2] not in (*CORE, "_version")}
    assert not outside_core, f"{path.name} imports {sorted(outside_core)}, outside the core"


def test_the_client_imports_nothing_of_the_framework() -> None:
    for path in sources(CLIENT):
        above = framework_imports(imports(path))
        assert not above, f"{path.name} imports {sorted(above)}"


def test_importing_the_client_loads_nothing_of_the_framework() -> None:
    code = (
        "import sys, strictconsume.amqp\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('strictconsume'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert "strictconsume.amqp._protocol" in loaded
    framework = {
        m for m in loaded if m != "strictconsume" and not m.startswith("strictconsume.amqp")
    }
    assert not framework, f"import strictconsume.amqp loaded {sorted(framework)}"


def test_the_framework_uses_only_the_clients_public_names() -> None:
    framework = [p for p in sources(PACKAGE) if not p.is_relative_to(CLIENT)]
    assert framework
    for path in framework:
        private = {
            m
            for m in imports(path)
            if m.startswith("strictconsume.amqp._") and not m.endswith("__")  # __version__
        }
        assert not private, f"{path.name} imports {sorted(private)}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = [stack.pop()]
            while group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others() -> None:
    """Not even under TYPE_CHECKING or inside a function: each module can be read
    knowing only what it imports (the __init__ files of strictconsume and
    strictconsume.amqp, which only gather names, are left out; a subpackage's, such
    as strictconsume.idempotency, is a module like the others)."""
    modules = {module_name(path): path for path in sources(PACKAGE)}
    roots = {"strictconsume", "strictconsume.amqp"}
    graph = {
        name: {m for m in imports(path) if m in modules and m != name} - roots
        for name, path in modules.items()
        if name not in roots
    }
    assert import_cycles(graph) == []


def test_the_testing_helpers_do_not_import_the_dispatcher() -> None:
    """``strictconsume.testing`` shares the handler call and the copies' headers with
    the dispatcher through their own modules, not through the channel loop."""
    assert "strictconsume._dispatch" not in imports(PACKAGE / "testing.py")
    assert {"strictconsume._handler", "strictconsume._copies"} <= imports(PACKAGE / "testing.py")
