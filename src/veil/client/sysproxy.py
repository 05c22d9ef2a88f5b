"""``veil connect --system-proxy``: point the desktop's proxy settings at the client, and put
them back.

Each desktop keeps its proxy settings its own way, so each has a twin module that knows only
that: ``sysproxy_linux`` (GNOME's gsettings, KDE's kioslaverc), ``sysproxy_macos``
(networksetup, every enabled network service) and ``sysproxy_windows`` (the per-user WinINet
registry values every browser on Windows reads). A backend reads what is set now
(:meth:`Backend.snapshot`), sets veil's proxies (:meth:`Backend.apply`) and writes back what
it read (:meth:`Backend.restore`).

What was there before is written to a file before anything changes (:func:`saved_path`), and
the file is removed only once it is restored: a client killed with SIGKILL, or a machine that
lost power, leaves it behind, and the next ``--system-proxy`` start restores from it first, so
veil's own settings are never taken for the user's.

Every system proxy understands an HTTP proxy (plain requests and CONNECT), so veil sets its
HTTP proxy for http and https, and its SOCKS5 proxy where the desktop has a SOCKS slot that
means SOCKS5 (GNOME, KDE, macOS; WinINet's ``socks=`` is SOCKS4: left alone). Local and
private addresses bypass the proxy, as they do in every desktop's defaults.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import ConfigError
from veil.protocol.address import Address

log = logging.getLogger("veil.client")

#: Destinations that never go through the proxy: this machine and the private networks (the
#: desktops' own defaults, plus the RFC 1918 ranges a LAN printer or router lives in).
BYPASS = ("localhost", "127.0.0.0/8", "::1", "10.0.0.0/8", "172.16.0.0/12",
          "192.168.0.0/16", "169.254.0.0/16", "*.local")
#: A settings tool that has not answered in this long is stuck (a hung D-Bus): give up
#: rather than hold the client's start or exit.
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The client's proxies as bound: ``http`` always, ``socks`` when it listens."""

    http: Address
    socks: Address | None = None


class Backend(ABC):
    """One desktop's proxy settings. ``snapshot``'s result is JSON (it goes to a file)."""

    name: str

    @abstractmethod
    def snapshot(self) -> dict[str, Any]: ...

    @abstractmethod
    def apply(self, settings: ProxySettings) -> None: ...

    @abstractmethod
    def restore(self, saved: dict[str, Any]) -> None: ...


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a settings tool; its stdout, or ConfigError with its own words."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              timeout=COMMAND_TIMEOUT_S, env=env)
    except FileNotFoundError as exc:
        raise ConfigError(f"--system-proxy: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"--system-proxy: {argv[0]} did not answer in "
                          f"{COMMAND_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"--system-proxy: {' '.join(argv[:3])} failed: "
                          f"{said[-1] if said else f'exit {done.returncode}'}")
    return done.stdout


def detect(platform: str = sys.platform, environ: dict[str, str] | None = None) -> Backend:
    """The backend for this desktop, or ConfigError saying what to set by hand."""
    env = os.environ if environ is None else environ
    if platform == "darwin":
        from veil.client.sysproxy_macos import MacOSProxy  # noqa: PLC0415

        return MacOSProxy()
    if platform == "win32":
        from veil.client.sysproxy_windows import WindowsProxy  # noqa: PLC0415

        return WindowsProxy()
    from veil.client.sysproxy_linux import GnomeProxy, KdeProxy  # noqa: PLC0415

    desktops = env.get("XDG_CURRENT_DESKTOP", "").upper().split(":")
    if "KDE" in desktops:
        tool = shutil.which("kwriteconfig6") or shutil.which("kwriteconfig5")
        if tool is None:
            raise ConfigError("--system-proxy: KDE's kwriteconfig5/6 is not installed")
        return KdeProxy(six="kwriteconfig6" in tool)
    if shutil.which("gsettings") is not None and desktops != [""]:
        return GnomeProxy()  # GNOME, and the desktops that read its settings (Cinnamon, ...)
    raise ConfigError("--system-proxy: no desktop whose proxy settings veil can set (GNOME, "
                      "KDE, macOS, Windows); set the HTTP proxy by hand, or point the "
                      "application at the SOCKS5 or HTTP proxy")


def saved_path(platform: str = sys.platform, environ: dict[str, str] | None = None) -> Path:
    """Where the settings found before veil's go while veil's are in place."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
    return base / "veil" / "system-proxy.json"


class SystemProxy:
    """Applies veil's proxies on start and restores the user's on close, through a file that
    outlives a killed client."""

    def __init__(self, backend: Backend, path: Path) -> None:
        self.backend = backend
        self.path = path
        self._applied = False

    def apply(self, settings: ProxySettings) -> None:
        self.recover()
        saved = {"backend": self.backend.name, "settings": self.backend.snapshot()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(saved, indent=1))
        os.replace(partial, self.path)  # the file is whole before anything changes
        self._applied = True
        self.backend.apply(settings)
        log.warning("system proxy (%s) set to HTTP %s%s; restored when veil exits",
                    self.backend.name, settings.http,
                    f" and SOCKS5 {settings.socks}" if settings.socks else "")

    def recover(self, left_behind: bool = True) -> bool:
        """Restore what a client that did not exit cleanly left behind; False if nothing.
        ``left_behind=False``: this client's own settings, at its clean exit."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--system-proxy: cannot read {self.path} ({exc}); restore "
                              "your proxy settings by hand, then delete it") from exc
        if saved.get("backend") != self.backend.name:
            raise ConfigError(f"--system-proxy: {self.path} holds {saved.get('backend')!r} "
                              f"settings, this desktop is {self.backend.name}: restore your "
                              "proxy settings by hand, then delete it")
        if left_behind:
            log.warning("restoring the system proxy settings a veil client that did not exit "
                        "cleanly left in place")
        self.backend.restore(saved["settings"])
        self.path.unlink()
        return True

    def close(self) -> None:
        """Put the user's settings back (once); the file goes only when that worked."""
        if not self._applied:
            return
        self._applied = False
        try:
            self.recover(left_behind=False)
        except ConfigError as exc:
            log.error("%s; the settings found at start are in %s", exc, self.path)
        else:
            log.warning("system proxy (%s) restored", self.backend.name)
