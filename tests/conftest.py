from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support import procs

# Property tests check what holds for every input, not how fast inputs are drawn: on a
# loaded machine (two pytest workers, servers, Chromium on two cores) generation and single
# examples can take seconds, and a time-based health check or deadline would fail a correct
# test by luck (CI saw "Input generation is slow" on tests/unit/test_rules.py).
settings.register_profile("veil", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("veil")

UNIT_TESTS = Path(__file__).parent / "unit"
# Run from a systemd service, `veil serve` would keep its first key out of stdout (the
# journal); the servers the tests start read it from there. The test that checks that sets it.
os.environ.pop("INVOCATION_ID", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need root say so when skipped; in CI (root) nothing is skipped. Every unit
    test is a smoke test too (they take seconds): scripts/smoke runs them against the newest
    and the oldest dependencies."""
    for item in items:
        if item.path.is_relative_to(UNIT_TESTS):
            item.add_marker(pytest.mark.smoke)
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces (CI runs as root)")
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collect_leaks_where_they_happen() -> Iterator[None]:
    """A socket or transport a test forgets is reported by pytest ("unclosed ...", an error
    here) when the garbage collector finds it, which may be tests later: collect after each
    test, so the report names the test that leaked it, every run."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def nginx() -> Iterator[procs.Nginx]:
    if not Path(procs.NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    with procs.nginx() as server:
        yield server


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("veil")


@pytest.fixture(scope="module")
def veil_server(module_dir: Path) -> Iterator[procs.VeilServer]:
    server = procs.start_veil_server(module_dir)
    try:
        yield server
    finally:
        procs.stop(server.proc)


@pytest.fixture(scope="module")
def veil_client(module_dir: Path, veil_server: procs.VeilServer, udp_echo: procs.UdpEcho,
                tcp_echo: procs.TcpEcho) -> Iterator[procs.VeilClient]:
    udp = f"127.0.0.1:0:127.0.0.1:{udp_echo.port}/udp"
    tcp = f"0:127.0.0.1:{tcp_echo.port}"
    client = procs.start_veil_client(module_dir, veil_server.key, http=True, forwards=[udp, tcp])
    client.forwards.update(udp=client.forwards[udp], tcp=client.forwards[tcp])
    try:
        yield client
    finally:
        procs.stop(client.proc)


@pytest.fixture(scope="module")
def udp_echo() -> Iterator[procs.UdpEcho]:
    echo = procs.UdpEcho()
    yield echo
    echo.close()


@pytest.fixture(scope="module")
def tcp_echo() -> Iterator[procs.TcpEcho]:
    echo = procs.TcpEcho()
    yield echo
    echo.close()


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (.ci/run installs it)")
    return path
