"""``--system-proxy`` on macOS: ``networksetup`` on every enabled network service (Wi-Fi,
Ethernet, ...), as the Network settings pane does; Safari, Chrome and most applications read
them. Changing them needs an administrator's rights (networksetup asks)."""

from __future__ import annotations

from typing import Any

from veil.client.sysproxy import BYPASS, Backend, ProxySettings, run

NETWORKSETUP = "/usr/sbin/networksetup"
#: The proxies veil sets: networksetup's name for each (get<kind>, set<kind>, set<kind>state).
KINDS = ("webproxy", "securewebproxy", "socksfirewallproxy")


def parse_services(listing: str) -> list[str]:
    """Enabled services from ``-listallnetworkservices`` (first line is a note; a leading
    ``*`` marks a disabled service)."""
    return [line for line in listing.splitlines()[1:] if line and not line.startswith("*")]


def parse_proxy(output: str) -> dict[str, str]:
    """``-getwebproxy`` and friends: ``Enabled: Yes`` / ``Server: h`` / ``Port: n`` lines."""
    fields = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return {"enabled": "yes" if fields.get("Enabled", "").lower() == "yes" else "no",
            "server": fields.get("Server", ""), "port": fields.get("Port", "0")}


def parse_bypass(output: str) -> list[str]:
    """``-getproxybypassdomains``: one domain per line, or a sentence when there are none."""
    if output.startswith("There aren't any"):
        return []
    return [line.strip() for line in output.splitlines() if line.strip()]


def apply_commands(services: list[str], settings: ProxySettings) -> list[list[str]]:
    out: list[list[str]] = []
    for service in services:
        out.append([NETWORKSETUP, "-setwebproxy", service, settings.http.host,
                    str(settings.http.port)])
        out.append([NETWORKSETUP, "-setsecurewebproxy", service, settings.http.host,
                    str(settings.http.port)])
        if settings.socks is not None:
            out.append([NETWORKSETUP, "-setsocksfirewallproxy", service, settings.socks.host,
                        str(settings.socks.port)])
        out.append([NETWORKSETUP, "-setproxybypassdomains", service, *BYPASS])
    return out


def restore_commands(saved: dict[str, Any]) -> list[list[str]]:
    """State first (off, or the server it had), then the bypass list as it was."""
    out: list[list[str]] = []
    for service, proxies in saved.items():
        for kind in KINDS:
            was = proxies[kind]
            if was["enabled"] == "yes" and was["server"]:
                out.append([NETWORKSETUP, f"-set{kind}", service, was["server"], was["port"]])
            else:
                out.append([NETWORKSETUP, f"-set{kind}state", service, "off"])
        out.append([NETWORKSETUP, "-setproxybypassdomains", service,
                    *(proxies["bypass"] or ["Empty"])])
    return out


class MacOSProxy(Backend):
    name = "macos"

    def _services(self) -> list[str]:
        return parse_services(run([NETWORKSETUP, "-listallnetworkservices"]))

    def snapshot(self) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        for service in self._services():
            proxies: dict[str, Any] = {kind: parse_proxy(run([NETWORKSETUP, f"-get{kind}",
                                                              service])) for kind in KINDS}
            proxies["bypass"] = parse_bypass(run([NETWORKSETUP, "-getproxybypassdomains",
                                                  service]))
            saved[service] = proxies
        return saved

    def apply(self, settings: ProxySettings) -> None:
        for argv in apply_commands(self._services(), settings):
            run(argv)

    def restore(self, saved: dict[str, Any]) -> None:
        for argv in restore_commands(saved):
            run(argv)
