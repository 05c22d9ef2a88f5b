"""``--system-proxy`` on Windows: the per-user WinINet values under ``Internet Settings``
(what the Settings app's proxy page writes, and what Edge, Chrome and most applications read),
then WinINet is told they changed. No administrator's rights needed."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Protocol

from veil.client.sysproxy import BYPASS, Backend, ProxySettings

INTERNET_SETTINGS = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
#: The values veil sets: (name, is a DWORD).
VALUES = (("ProxyEnable", True), ("ProxyServer", False), ("ProxyOverride", False))
# InternetSetOptionW options that make running applications re-read the settings.
_INTERNET_OPTION_SETTINGS_CHANGED = 39
_INTERNET_OPTION_REFRESH = 37


class Registry(Protocol):
    """The three calls veil makes of HKEY_CURRENT_USER\\...\\Internet Settings."""

    def get(self, name: str) -> int | str | None: ...
    def set(self, name: str, value: int | str) -> None: ...
    def delete(self, name: str) -> None: ...


def override_list() -> str:
    """WinINet's bypass syntax: ``;``-separated wildcards, ``<local>`` for dotless names."""
    wildcards = []
    for entry in BYPASS:
        if entry.endswith(".0.0/8"):
            wildcards.append(entry.split(".")[0] + ".*")
        elif entry == "172.16.0.0/12":
            wildcards.extend(f"172.{n}.*" for n in range(16, 32))
        elif entry.endswith(".0.0/16"):
            wildcards.append(".".join(entry.split(".")[:2]) + ".*")
        elif entry != "::1":
            wildcards.append(entry)
    return ";".join([*wildcards, "[::1]", "<local>"])


def values_for(settings: ProxySettings) -> dict[str, int | str]:
    """HTTP and HTTPS to veil's HTTP proxy (WinINet's ``socks=`` speaks SOCKS4 only)."""
    http = f"{settings.http.host}:{settings.http.port}"
    return {"ProxyServer": f"http={http};https={http}", "ProxyOverride": override_list(),
            "ProxyEnable": 1}


class WinregRegistry:
    """HKCU's Internet Settings through ``winreg`` (Windows only; imported when used)."""

    def __init__(self) -> None:
        import winreg  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

        self._winreg: Any = winreg

    def _key(self, write: bool) -> Any:
        w = self._winreg
        access = w.KEY_READ | (w.KEY_SET_VALUE if write else 0)
        return w.OpenKey(w.HKEY_CURRENT_USER, INTERNET_SETTINGS, 0, access)

    def get(self, name: str) -> int | str | None:
        with self._key(False) as key:
            try:
                value, _kind = self._winreg.QueryValueEx(key, name)
            except FileNotFoundError:
                return None
        return value  # type: ignore[no-any-return]

    def set(self, name: str, value: int | str) -> None:
        w = self._winreg
        with self._key(True) as key:
            w.SetValueEx(key, name, 0, w.REG_DWORD if isinstance(value, int) else w.REG_SZ,
                         value)

    def delete(self, name: str) -> None:
        # Not there: nothing to delete.
        with self._key(True) as key, contextlib.suppress(FileNotFoundError):
            self._winreg.DeleteValue(key, name)


def _tell_wininet() -> None:
    if sys.platform != "win32":
        return
    import ctypes  # noqa: PLC0415

    set_option = ctypes.windll.wininet.InternetSetOptionW  # type: ignore[attr-defined,unused-ignore]
    set_option(None, _INTERNET_OPTION_SETTINGS_CHANGED, None, 0)
    set_option(None, _INTERNET_OPTION_REFRESH, None, 0)


class WindowsProxy(Backend):
    name = "windows"

    def __init__(self, registry: Registry | None = None) -> None:
        self._registry: Registry = registry if registry is not None else WinregRegistry()

    def snapshot(self) -> dict[str, Any]:
        return {name: self._registry.get(name) for name, _dword in VALUES}

    def apply(self, settings: ProxySettings) -> None:
        for name, value in values_for(settings).items():  # ProxyEnable last
            self._registry.set(name, value)
        _tell_wininet()

    def restore(self, saved: dict[str, Any]) -> None:
        for name in ("ProxyEnable", "ProxyServer", "ProxyOverride"):  # off first
            value = saved.get(name)
            if value is None:
                self._registry.delete(name)
            else:
                self._registry.set(name, value)
        _tell_wininet()
