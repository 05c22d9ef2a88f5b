"""What every load test needs: an echo server that answers as fast as the machine allows."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """A TCP echo server (tests/support/aio_echo.py) in its own process; its port."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "support" /
                                                  "aio_echo.py")], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield int(proc.stdout.readline())
    finally:
        procs.stop(proc)
