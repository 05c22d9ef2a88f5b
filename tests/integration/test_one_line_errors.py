"""Mistakes an operator makes get one line on stderr, never a traceback: a state directory
that is a file, a password prompt with no terminal, a probe of a port nothing listens on."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import VEIL

# Python's start and the command's own work (the probe: one refused connect).
COMMAND_TIMEOUT_S = 30.0


def veil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEIL, *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)


def assert_one_line(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("veil: error: ") and says in last, result.stderr


@pytest.mark.parametrize("command", [
    ("serve", "--listen", "127.0.0.1:0"),
    ("user", "add", "alice", "--public", "127.0.0.1:4433"),
    ("user", "list"),
])
def test_a_state_directory_that_is_a_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    assert_one_line(veil(*command, "--state", str(state)), "is a file, not a directory")
    assert state.read_text() == "not a directory"


def test_admin_passwd_without_a_terminal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert veil("user", "add", "alice", "--state", str(state), "--public",
                "127.0.0.1:4433").returncode == 0
    assert_one_line(veil("admin", "passwd", "--state", str(state)), "--password-stdin")


def test_lab_probe_of_a_closed_port_says_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    # Closed now: nothing listens on the port the system just gave out.
    result = veil("lab", "probe", f"127.0.0.1:{port}")
    assert_one_line(result, "connection refused")
    assert "FLAGGED" not in result.stdout


def test_lab_probe_of_a_self_signed_server_is_flagged_by_its_certificate(
        tmp_path: Path) -> None:
    """The certificate's verdict counts: a server whose reactions pass but whose certificate
    gives it away is FLAGGED, exit 1, not "passes" below a FLAGGED certificate."""
    server = procs.start_veil_server(tmp_path, "--self-signed")
    try:
        result = veil("lab", "probe", f"127.0.0.1:{server.port}", "--wait", "0.5")
    finally:
        procs.stop(server.proc)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert "certificate: FLAGGED" in lines and "reactions: pass" in lines, result.stdout
    assert lines[-1] == "verdict: FLAGGED by the certificate", result.stdout
