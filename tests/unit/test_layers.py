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
    "cover": {"errors", "protocol", "net", "cover"},
    "manage": {"errors", "protocol", "store", "manage"},
    "server": {"errors", "protocol", "transport", "net", "store", "cover", "manage", "server"},
    "client": {"errors", "protocol", "transport", "net", "client"},
    "lab": {"errors", "lab"},
    "admin": {"errors", "store", "manage", "server", "admin"},
}
FORBIDDEN_IN_PROTOCOL = {"asyncio", "socket", "ssl", "time", "selectors", "threading"}


def veil_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_point_down(layer: str) -> None:
    for path in (SRC / layer).rglob("*.py"):
        for name in veil_imports(path):
            parts = name.split(".")
            if parts[0] == "veil" and len(parts) > 1:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(SRC)} imports {name}"
            if layer == "protocol":
                assert parts[0] not in FORBIDDEN_IN_PROTOCOL, (
                    f"{path.relative_to(SRC)} imports {name}: protocol/ is sans-IO")


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom veil.server import gate\n")
    assert veil_imports(bad) == ["asyncio", "veil.server"]


# The cover site is sans-IO too, all but its asyncio adapters (cover/adapters.py, backends.py).
COVER_SANS_IO = ("http1", "http2", "nginx", "site", "uri")


@pytest.mark.parametrize("module", COVER_SANS_IO)
def test_cover_connections_are_sans_io(module: str) -> None:
    path = SRC / "cover" / f"{module}.py"
    for name in veil_imports(path):
        assert name.split(".")[0] not in FORBIDDEN_IN_PROTOCOL, (
            f"cover/{module}.py imports {name}: the cover's connections are sans-IO")
