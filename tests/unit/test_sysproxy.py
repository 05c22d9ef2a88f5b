"""``--system-proxy``'s platform twins by what they would run or write.

macOS's networksetup and Windows' registry cannot run here: their commands and values are
checked as built (networksetup's outputs below are as it prints them), and the Windows
registry is a dictionary standing in for HKCU (a mock: there is no registry on Linux). The
Linux desktops run for real in tests/integration/test_system_proxy.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.client import sysproxy
from veil.client.sysproxy import ProxySettings, detect, saved_path
from veil.client.sysproxy_linux import (
    GNOME_KEYS,
    GnomeProxy,
    KdeProxy,
    gnome_apply_commands,
    gnome_restore_commands,
    kde_values,
)
from veil.client.sysproxy_macos import (
    NETWORKSETUP,
    MacOSProxy,
    apply_commands,
    parse_bypass,
    parse_proxy,
    parse_services,
    restore_commands,
)
from veil.client.sysproxy_windows import WindowsProxy, override_list, values_for
from veil.config import ClientOptions
from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address

SETTINGS = ProxySettings(http=Address("127.0.0.1", 1081), socks=Address("127.0.0.1", 1080))


def test_gnome_sets_mode_last_and_restores_it_first() -> None:
    commands = gnome_apply_commands(SETTINGS)
    assert commands[-1] == ["gsettings", "set", "org.gnome.system.proxy", "mode", "'manual'"]
    assert ["gsettings", "set", "org.gnome.system.proxy.socks", "port", "1080"] in commands
    saved = {f"{schema} {key}": "''" for schema, key in GNOME_KEYS}
    restore = gnome_restore_commands(saved)
    assert restore[0][2:4] == ["org.gnome.system.proxy", "mode"]
    assert len(restore) == len(GNOME_KEYS)


def test_gnome_without_socks_clears_its_slot() -> None:
    commands = gnome_apply_commands(ProxySettings(http=Address("127.0.0.1", 1081)))
    assert ["gsettings", "set", "org.gnome.system.proxy.socks", "port", "0"] in commands


def test_kde_values_and_an_empty_value_deletes_the_key() -> None:
    values = kde_values(SETTINGS)
    assert values["httpProxy"] == values["httpsProxy"] == "http://127.0.0.1 1081"
    assert values["socksProxy"] == "socks://127.0.0.1 1080"
    commands = KdeProxy().write_commands({"socksProxy": ""})
    assert commands == [["kwriteconfig5", "--file", "kioslaverc", "--group", "Proxy Settings",
                         "--key", "socksProxy", "--delete"]]
    assert KdeProxy(six=True).write_commands({"ProxyType": "1"})[0][0] == "kwriteconfig6"


LISTING = ("An asterisk (*) denotes that a network service is disabled.\n"
           "Wi-Fi\nThunderbolt Bridge\n*Bluetooth PAN\n")
WEB_PROXY_ON = ("Enabled: Yes\nServer: corp-proxy.example\nPort: 3128\n"
                "Authenticated Proxy Enabled: 0\n")
WEB_PROXY_OFF = "Enabled: No\nServer: \nPort: 0\nAuthenticated Proxy Enabled: 0\n"


def test_macos_parses_what_networksetup_prints() -> None:
    assert parse_services(LISTING) == ["Wi-Fi", "Thunderbolt Bridge"]
    assert parse_proxy(WEB_PROXY_ON) == {"enabled": "yes", "server": "corp-proxy.example",
                                         "port": "3128"}
    assert parse_proxy(WEB_PROXY_OFF)["enabled"] == "no"
    assert parse_bypass("There aren't any bypass domains set on Wi-Fi.\n") == []
    assert parse_bypass("*.local\n169.254/16\n") == ["*.local", "169.254/16"]


def test_macos_sets_every_enabled_service_and_restores_each_as_it_was() -> None:
    commands = apply_commands(["Wi-Fi", "Ethernet"], SETTINGS)
    assert [NETWORKSETUP, "-setwebproxy", "Wi-Fi", "127.0.0.1", "1081"] in commands
    assert [NETWORKSETUP, "-setsocksfirewallproxy", "Ethernet", "127.0.0.1", "1080"] in commands
    saved = {"Wi-Fi": {"webproxy": parse_proxy(WEB_PROXY_ON),
                       "securewebproxy": parse_proxy(WEB_PROXY_OFF),
                       "socksfirewallproxy": parse_proxy(WEB_PROXY_OFF), "bypass": []}}
    restore = restore_commands(saved)
    assert [NETWORKSETUP, "-setwebproxy", "Wi-Fi", "corp-proxy.example", "3128"] in restore
    assert [NETWORKSETUP, "-setsecurewebproxystate", "Wi-Fi", "off"] in restore
    assert [NETWORKSETUP, "-setproxybypassdomains", "Wi-Fi", "Empty"] in restore


def test_macos_snapshot_reads_each_service(monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {"-listallnetworkservices": LISTING, "-getproxybypassdomains": "*.local\n"}
    ran: list[list[str]] = []

    def fake_run(argv: list[str], env: object = None) -> str:
        ran.append(argv)
        return outputs.get(argv[1], WEB_PROXY_OFF)

    monkeypatch.setattr("veil.client.sysproxy_macos.run", fake_run)
    saved = MacOSProxy().snapshot()
    assert sorted(saved) == ["Thunderbolt Bridge", "Wi-Fi"]
    assert saved["Wi-Fi"]["bypass"] == ["*.local"]


class FakeRegistry:
    """HKCU\\...\\Internet Settings as a dictionary (no registry exists on Linux)."""

    def __init__(self, values: dict[str, int | str]) -> None:
        self.values = dict(values)

    def get(self, name: str) -> int | str | None:
        return self.values.get(name)

    def set(self, name: str, value: int | str) -> None:
        self.values[name] = value

    def delete(self, name: str) -> None:
        self.values.pop(name, None)


def test_windows_values_and_a_round_trip() -> None:
    values = values_for(SETTINGS)
    assert values["ProxyServer"] == "http=127.0.0.1:1081;https=127.0.0.1:1081"
    assert values["ProxyEnable"] == 1
    assert "192.168.*" in override_list().split(";") and override_list().endswith("<local>")
    assert "172.31.*" in override_list() and "10.*" in override_list()
    registry = FakeRegistry({"ProxyEnable": 0, "ProxyServer": "corp:3128"})
    proxy = WindowsProxy(registry)
    saved = proxy.snapshot()
    proxy.apply(SETTINGS)
    assert registry.values["ProxyEnable"] == 1
    proxy.restore(saved)
    assert registry.values == {"ProxyEnable": 0, "ProxyServer": "corp:3128"}  # none added


def test_detect_picks_the_desktops_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(detect("darwin", {}), MacOSProxy)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert isinstance(detect("linux", {"XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}), GnomeProxy)
    assert isinstance(detect("linux", {"XDG_CURRENT_DESKTOP": "KDE"}), KdeProxy)
    with pytest.raises(ConfigError, match="no desktop whose proxy settings"):
        detect("linux", {})


def test_saved_settings_live_in_each_platforms_state_directory() -> None:
    assert saved_path("linux", {"HOME": "/home/u"}) == Path(
        "/home/u/.local/state/veil/system-proxy.json")
    assert saved_path("linux", {"HOME": "/h", "XDG_STATE_HOME": "/s"}) == Path(
        "/s/veil/system-proxy.json")
    assert saved_path("darwin", {"HOME": "/Users/u"}) == Path(
        "/Users/u/Library/Application Support/veil/system-proxy.json")
    assert saved_path("win32", {"LOCALAPPDATA": "C:/Users/u/AppData/Local"}).parts[-2:] == (
        "veil", "system-proxy.json")


def test_a_file_from_another_desktop_is_not_applied_here(tmp_path: Path) -> None:
    path = tmp_path / "system-proxy.json"
    path.write_text('{"backend": "kde", "settings": {}}')
    with pytest.raises(ConfigError, match="restore your proxy settings by hand"):
        sysproxy.SystemProxy(WindowsProxy(FakeRegistry({})), path).recover()
    assert path.exists()  # kept for the user


KEY = AccessKey(Address("127.0.0.1", 443), bytes(32), bytes(32), None).to_uri()


def test_options_add_the_http_proxy_and_refuse_what_cannot_work() -> None:
    key = AccessKey.parse(KEY)
    options = ClientOptions.from_args(key, socks=None, http=None, forwards=[], socks_auth=None,
                                      connections=1, default_socks=Address("127.0.0.1", 1080),
                                      system_proxy=True)
    assert options.http == Address("127.0.0.1", 1081)
    assert options.socks == Address("127.0.0.1", 1080)
    with pytest.raises(ConfigError, match="--tun"):
        ClientOptions(key, tun=True, system_proxy=True)
    with pytest.raises(ConfigError, match="proxy password"):
        ClientOptions.from_args(key, socks=None, http=None, forwards=[], socks_auth="a:b",
                                connections=1, default_socks=Address("127.0.0.1", 1080),
                                system_proxy=True)


def test_a_clean_exit_restores_without_calling_itself_unclean(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = FakeRegistry({})
    proxy = sysproxy.SystemProxy(WindowsProxy(registry), tmp_path / "system-proxy.json")
    with caplog.at_level("INFO", logger="veil.client"):
        proxy.apply(SETTINGS)
        proxy.close()
    assert not (tmp_path / "system-proxy.json").exists()
    assert "system proxy (windows) restored" in caplog.text
    assert "did not exit cleanly" not in caplog.text
