"""What ``veil`` logs at each -v, wherever -v is typed, and what ``veil connect`` says at
start: its proxies and forwards at INFO, an open proxy as a WARNING (docs/operations.md,
"What is logged")."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import VEIL

# Python's start and one setup call.
COMMAND_TIMEOUT_S = 30.0


@pytest.mark.parametrize(("verbosity", "veil_level", "root_level"), [
    (0, logging.INFO, logging.INFO),
    (1, logging.DEBUG, logging.INFO),
    (2, logging.DEBUG, logging.DEBUG),
])
def test_each_v_adds_a_level(verbosity: int, veil_level: int, root_level: int) -> None:
    # In a process of its own: logging's configuration is global.
    code = ("import logging; from veil.cli import _setup_logging; "
            f"_setup_logging({verbosity}); "
            "print(logging.getLogger('veil.client').getEffectiveLevel(), "
            "logging.getLogger('asyncio').getEffectiveLevel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=COMMAND_TIMEOUT_S).stdout.split()
    assert [int(x) for x in out] == [veil_level, root_level]


def test_v_may_come_after_the_command() -> None:
    from veil.cli import _take_verbosity

    assert _take_verbosity(["serve", "--listen", "x", "-v"]) == (["serve", "--listen", "x"], 1)
    assert _take_verbosity(["-v", "connect", "k", "-vv"]) == (["connect", "k"], 3)
    assert _take_verbosity(["user", "add", "--verbose", "a"]) == (["user", "add", "a"], 1)
    assert _take_verbosity(["connect", "--", "-v"]) == (["connect", "--", "-v"], 0)
    assert _take_verbosity(["-vx"]) == (["-vx"], 0)


def test_connect_says_where_it_listens_and_warns_of_an_open_proxy(tmp_path: Path) -> None:
    key = subprocess.run([*VEIL, "user", "add", "alice", "--state", str(tmp_path / "state"),
                          "--public", f"127.0.0.1:{procs.unused_port()}"],
                         capture_output=True, text=True, check=True,
                         timeout=COMMAND_TIMEOUT_S).stdout.strip()
    log = tmp_path / "client.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*VEIL, "connect", key, "--socks", "0.0.0.0:0", "--allow-lan",
                                 "--forward", "0:127.0.0.1:9", "-v"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        socks = procs.bound_port(log, "SOCKS5 proxy on", proc)
        text = log.read_text()
        assert f" INFO veil.client: SOCKS5 proxy on 0.0.0.0:{socks}" in text, text
        assert " INFO veil.client.forward: TCP forward to 127.0.0.1:9 on 127.0.0.1:" in text
        assert (f" WARNING veil.client: the SOCKS5 proxy on 0.0.0.0:{socks} takes anyone who "
                "can reach it, with no password") in text, text
    finally:
        procs.stop(proc)
