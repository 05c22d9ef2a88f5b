"""veil connect on macOS and Windows (proxy mode): what can be checked on Linux.

The dependencies' markers leave out what those platforms lack (uvloop on Windows, pyroute2
off Linux), and the client's command line loads with those modules and Linux-only ones
(fcntl, resource) absent, as they are there. The desktops' proxy settings are checked by
command construction in test_sysproxy.py."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PLATFORMS = {"win32": ("Windows", "nt"), "darwin": ("Darwin", "posix"),
             "linux": ("Linux", "posix")}


def required_on(platform: str) -> set[str]:
    system, os_name = PLATFORMS[platform]
    env = {"sys_platform": platform, "platform_system": system, "os_name": os_name,
           "python_version": "3.11", "python_full_version": "3.11.2"}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    return {r.name for r in requirements if r.marker is None or r.marker.evaluate(env)}


def test_each_platform_gets_only_what_it_can_install() -> None:
    assert "uvloop" not in required_on("win32") and "uvloop" in required_on("darwin")
    assert "pyroute2" not in required_on("win32") and "pyroute2" not in required_on("darwin")
    assert {"uvloop", "pyroute2"} <= required_on("linux")


@pytest.mark.parametrize("missing", [("fcntl", "resource", "pyroute2", "uvloop"),
                                     ("pyroute2",)])
def test_the_client_command_line_loads_without_linux_only_modules(
        missing: tuple[str, ...]) -> None:
    script = (
        "import sys\n"
        f"for name in {missing!r}: sys.modules[name] = None\n"
        "from veil.cli import build_parser\n"
        "from veil.client import service, sysproxy, sysproxy_macos, sysproxy_windows\n"
        "parser = build_parser()\n"
        "args = parser.parse_args(['connect', 'veil://x', '--system-proxy'])\n"
        "print(args.system_proxy)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, env={"PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
