"""The layering in docs/architecture.md, enforced: imports only point down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "veil"

ALLOWED = {
    "protocol": {"errors", "protocol"},
    "transport": {"errors", "transport"},
    "net": {"errors", "protocol", "transport", "net"},
    "store": {"errors", "store"},
    "config": {"errors", "protocol", "config"},
    "cover": {"errors", "protocol", "net", "cover"},
    "manage": {"errors", "protocol", "store", "manage"},
    "server": {"errors", "protocol", "transport", "net", "store", "cover", "manage", "config",
               "server"},
    "client": {"errors", "protocol", "transport", "net", "config", "client"},
    "lab": {"errors", "lab"},
    "admin": {"errors", "store", "manage", "config", "admin"},
}
# Single modules a layer may import from a layer it may not: the panel sees the server only
# through the status the server publishes, never its runtime.
# manage/ reads the packaged China lists (pure data, no runtime) to serve and export the
# rules `veil connect --rules cn` uses, so that apps route the same way.
ALLOWED_MODULES = {
    "admin": {"veil.server.status"},
    "manage": {"veil.client.ruledata"},
}
FORBIDDEN_IN_PROTOCOL = {"asyncio", "socket", "ssl", "time", "selectors", "threading"}


def veil_imports(path: Path, *, targets: bool = False) -> list[str]:
    """The modules ``path`` imports (absolute imports only). With ``targets``, ``from veil.a
    import b`` gives ``veil.a.b``: a module imported by name is told apart from the rest of
    its package."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if targets and "." in node.module:
                names += [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return names


def veil_import_targets(path: Path) -> list[str]:
    return veil_imports(path, targets=True)


def allowed_module(layer: str, name: str) -> bool:
    return any(name == module or name.startswith(module + ".")
               for module in ALLOWED_MODULES.get(layer, ()))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_point_down(layer: str) -> None:
    module = SRC / f"{layer}.py"  # a layer may be one module (config.py) or a package
    paths = [module] if module.is_file() else list((SRC / layer).rglob("*.py"))
    assert paths, f"no layer {layer} in {SRC}"
    for path in paths:
        for name in veil_import_targets(path):
            parts = name.split(".")
            if parts[0] == "veil" and len(parts) > 1 and not allowed_module(layer, name):
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(SRC)} imports {name}"
            if layer == "protocol":
                assert parts[0] not in FORBIDDEN_IN_PROTOCOL, (
                    f"{path.relative_to(SRC)} imports {name}: protocol/ is sans-IO")


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom veil.server import gate\n")
    assert veil_imports(bad) == ["asyncio", "veil.server"]


def test_admin_may_import_only_the_servers_status(tmp_path: Path) -> None:
    ok = tmp_path / "ok.py"
    ok.write_text("from veil.server import status\nfrom veil.server.status import ServerStatus\n")
    bad = tmp_path / "bad.py"
    bad.write_text("from veil.server import service, status\nimport veil.server.gate\n")
    assert all(allowed_module("admin", n) for n in veil_import_targets(ok))
    assert [n for n in veil_import_targets(bad) if not allowed_module("admin", n)] == [
        "veil.server.service", "veil.server.gate"]
    assert "server" not in ALLOWED["admin"]


# The cover site is sans-IO too, all but its asyncio adapters (cover/adapters.py, backends.py).
COVER_SANS_IO = ("http1", "http2", "nginx", "site", "uri")


@pytest.mark.parametrize("module", COVER_SANS_IO)
def test_cover_connections_are_sans_io(module: str) -> None:
    path = SRC / "cover" / f"{module}.py"
    for name in veil_imports(path):
        assert name.split(".")[0] not in FORBIDDEN_IN_PROTOCOL, (
            f"cover/{module}.py imports {name}: the cover's connections are sans-IO")
