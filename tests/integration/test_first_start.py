"""A first ``veil serve`` that cannot listen persists nothing (no state that would record a
wrong address in every key), and a start whose keys name another address says so."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import VEIL

# `veil serve` failing at start: Python's start and one bind.
START_TIMEOUT_S = 30.0
# An address no interface here has (TEST-NET-1, RFC 5737): bind() says EADDRNOTAVAIL.
NOT_OURS = "192.0.2.1"


def serve(state: Path, *args: str, choice: tuple[str, ...] = ("--self-signed",)
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEIL, "serve", *choice, "--state", str(state), "--allow-private",
                           *args], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cause", ["port in use", "address not ours"])
def test_a_failed_first_start_persists_nothing(tmp_path: Path, cause: str) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        listen = (f"127.0.0.1:{busy.getsockname()[1]}" if cause == "port in use"
                  else f"{NOT_OURS}:{busy.getsockname()[1]}")
        fresh, empty = tmp_path / "fresh", tmp_path / "empty"
        empty.mkdir()
        for state in (fresh, empty):
            failed = serve(state, "--listen", listen)
            assert failed.returncode == 1, failed
            assert failed.stderr.startswith(f"veil: error: cannot listen on {listen}")
            assert "Traceback" not in failed.stderr and failed.stdout == ""  # no key printed
        assert not fresh.exists()
        assert list(empty.iterdir()) == []
    finally:
        busy.close()


def test_keys_naming_another_port_are_said_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    named = procs.unused_port()
    add = subprocess.run([*VEIL, "user", "add", "alice", "--state", str(state), "--public",
                          f"127.0.0.1:{named}"], capture_output=True, text=True,
                         timeout=START_TIMEOUT_S)
    assert add.returncode == 0, add.stderr
    server = procs.start_veil_server_on_a_stated_port(tmp_path)
    try:
        log = server.log_text()
        assert f"keys name 127.0.0.1:{named}, but this server listens on 127.0.0.1:" \
               f"{server.port}" in log, log
    finally:
        procs.stop(server.proc)
    same = procs.start_veil_server_on_a_stated_port(tmp_path / "same")
    try:
        assert "but this server listens on" not in same.log_text()
    finally:
        procs.stop(same.proc)


@pytest.mark.parametrize("public, says", [
    (None, "keys would name this server by its IP address 127.0.0.1"),
    ("203.0.113.7:443", "keys would name this server by its IP address 203.0.113.7"),
    ("vpn.internal:443", "no public CA issues a certificate for vpn.internal")])
def test_a_first_start_does_not_pick_the_self_signed_certificate_by_itself(
        tmp_path: Path, public: str | None, says: str) -> None:
    """#18: self-signed only when asked for. A first start whose strangers would be shown a
    self-signed certificate names the choices in one line and writes nothing; with
    --self-signed it starts, and later starts keep that choice without being told again."""
    state = tmp_path / "state"
    port = procs.unused_port()
    listen = ("--listen", f"127.0.0.1:{port}", *(("--public", public) if public else ()))
    refused = serve(state, *listen, choice=())
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith("veil: error: ") and says in refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stdout == ""
    assert not state.exists()
    chosen = procs.start_veil_server(tmp_path / "chosen", "--self-signed", port=port)
    procs.stop(chosen.proc)
    again = subprocess.Popen([*VEIL, "serve", "--state", str(tmp_path / "chosen" / "state"),
                              "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        procs.wait_port(port)  # listening: the earlier choice stands
    finally:
        procs.stop(again)


def test_creating_the_first_user_and_stopping_are_info_not_warnings(tmp_path: Path) -> None:
    """A first start and a SIGTERM are what an operator asked for: INFO, so that WARNING
    lines in the journal stay the ones to read."""
    server = procs.start_veil_server(tmp_path)
    procs.stop(server.proc)
    lines = server.log_text().splitlines()
    created = [line for line in lines if "created user" in line]
    stopping = [line for line in lines if line.endswith(": stopping")]
    assert len(created) == 1 and " INFO veil: " in created[0], lines
    assert len(stopping) == 1 and " INFO veil: " in stopping[0], lines
