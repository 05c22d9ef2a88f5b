"""``--system-proxy`` on Linux desktops: GNOME's gsettings (also read by Cinnamon, Budgie,
Unity and by Chromium and Firefox on them) and KDE's ``kioslaverc`` (KDE's applications, and
Chromium and Firefox on KDE)."""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

from veil.client.sysproxy import BYPASS, Backend, ProxySettings, run
from veil.errors import ConfigError

_PROXY = "org.gnome.system.proxy"
#: The keys veil sets, and so reads before and writes back after: (schema, key).
GNOME_KEYS = ((_PROXY, "mode"), (_PROXY, "ignore-hosts"),
              (f"{_PROXY}.http", "host"), (f"{_PROXY}.http", "port"),
              (f"{_PROXY}.https", "host"), (f"{_PROXY}.https", "port"),
              (f"{_PROXY}.socks", "host"), (f"{_PROXY}.socks", "port"))


def _gvariant_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def gnome_apply_commands(settings: ProxySettings) -> list[list[str]]:
    """``gsettings set`` commands for veil's proxies; mode last, once the rest is in place."""
    socks_host, socks_port = (settings.socks.host, settings.socks.port) if settings.socks \
        else ("", 0)
    values = {
        (_PROXY, "ignore-hosts"): _gvariant_list(BYPASS),
        (f"{_PROXY}.http", "host"): f"'{settings.http.host}'",
        (f"{_PROXY}.http", "port"): str(settings.http.port),
        (f"{_PROXY}.https", "host"): f"'{settings.http.host}'",
        (f"{_PROXY}.https", "port"): str(settings.http.port),
        (f"{_PROXY}.socks", "host"): f"'{socks_host}'",
        (f"{_PROXY}.socks", "port"): str(socks_port),
        (_PROXY, "mode"): "'manual'",
    }
    return [["gsettings", "set", schema, key, value] for (schema, key), value in values.items()]


def gnome_restore_commands(saved: dict[str, str]) -> list[list[str]]:
    """Write back what ``gsettings get`` printed (GVariant text, which ``set`` reads); mode
    first, so the proxy is off before its address changes."""
    ordered = sorted(GNOME_KEYS, key=lambda sk: sk != (_PROXY, "mode"))
    return [["gsettings", "set", schema, key, saved[f"{schema} {key}"]]
            for schema, key in ordered if f"{schema} {key}" in saved]


class GnomeProxy(Backend):
    name = "gnome"

    def snapshot(self) -> dict[str, Any]:
        return {f"{schema} {key}": run(["gsettings", "get", schema, key]).strip()
                for schema, key in GNOME_KEYS}

    def apply(self, settings: ProxySettings) -> None:
        for argv in gnome_apply_commands(settings):
            run(argv)

    def restore(self, saved: dict[str, Any]) -> None:
        for argv in gnome_restore_commands(saved):
            run(argv)


_KIO_GROUP = "Proxy Settings"
#: kioslaverc's keys veil sets (ProxyType 1 = manual).
KDE_KEYS = ("ProxyType", "httpProxy", "httpsProxy", "socksProxy", "NoProxyFor")


def kde_values(settings: ProxySettings) -> dict[str, str]:
    """kioslaverc's values for veil's proxies (KIO writes "scheme://host port")."""
    http = f"http://{settings.http.host} {settings.http.port}"
    socks = f"socks://{settings.socks.host} {settings.socks.port}" if settings.socks else ""
    return {"httpProxy": http, "httpsProxy": http, "socksProxy": socks,
            "NoProxyFor": ",".join(BYPASS), "ProxyType": "1"}


class KdeProxy(Backend):
    name = "kde"

    def __init__(self, six: bool = False) -> None:
        self._write = "kwriteconfig6" if six else "kwriteconfig5"
        self._read = "kreadconfig6" if six else "kreadconfig5"

    def _base(self, tool: str, key: str) -> list[str]:
        return [tool, "--file", "kioslaverc", "--group", _KIO_GROUP, "--key", key]

    def write_commands(self, values: dict[str, str]) -> list[list[str]]:
        """kwriteconfig commands; an empty value deletes the key (KDE reads absent as empty,
        and kreadconfig cannot tell them apart)."""
        return [[*self._base(self._write, key), *(["--delete"] if value == "" else [value])]
                for key, value in values.items()]

    def snapshot(self) -> dict[str, Any]:
        return {key: run(self._base(self._read, key)).rstrip("\n") for key in KDE_KEYS}

    def apply(self, settings: ProxySettings) -> None:
        self._write_all(kde_values(settings))

    def restore(self, saved: dict[str, Any]) -> None:
        # ProxyType first: the proxy is off (or as it was) before its addresses change.
        ordered = {key: str(saved[key]) for key in sorted(saved, key=lambda k: k != "ProxyType")}
        self._write_all(ordered)

    def _write_all(self, values: dict[str, str]) -> None:
        for argv in self.write_commands(values):
            run(argv)
        # Running KDE applications re-read kioslaverc when told; without a session bus
        # (a test, a console login) there is nobody to tell.
        if shutil.which("dbus-send") is not None:
            with contextlib.suppress(ConfigError):  # no session bus: the file is what counts
                run(["dbus-send", "--type=signal", "/KIO/Scheduler",
                     "org.kde.KIO.Scheduler.reparseSlaveConfiguration", "string:"])
