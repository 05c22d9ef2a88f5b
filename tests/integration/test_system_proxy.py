"""``veil connect --system-proxy`` on Linux desktops, for real: GNOME's gsettings (its keyfile
backend, so the test's settings live in its own directory rather than a desktop session's
dconf) and KDE's kwriteconfig5/kreadconfig5 on the test's own kioslaverc. The client sets the
desktop's proxy to its proxies, an application that obeys them reaches the web through veil,
a clean exit puts back exactly what was there, and a SIGKILLed client's settings are put back
by the next start (never mistaken for the user's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import Nginx, VeilServer

pytestmark = pytest.mark.slow

BEFORE_GNOME = {  # a user's own settings: an automatic proxy, and a manual one kept aside
    ("org.gnome.system.proxy", "mode"): "'auto'",
    ("org.gnome.system.proxy", "autoconfig-url"): "'http://wpad.example/proxy.pac'",
    ("org.gnome.system.proxy.http", "host"): "'corp-proxy.example'",
    ("org.gnome.system.proxy.http", "port"): "3128",
}


def desktop_env(tmp_path: Path, desktop: str) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_STATE_HOME": str(tmp_path / "state"), "GSETTINGS_BACKEND": "keyfile",
            "XDG_CURRENT_DESKTOP": desktop, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}


def gsettings(env: dict[str, str], *args: str) -> str:
    return subprocess.run(["gsettings", *args], env=env, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def gnome_state(env: dict[str, str]) -> dict[tuple[str, str], str]:
    keys = [*BEFORE_GNOME, ("org.gnome.system.proxy", "ignore-hosts"),
            ("org.gnome.system.proxy.https", "host"), ("org.gnome.system.proxy.https", "port"),
            ("org.gnome.system.proxy.socks", "host"), ("org.gnome.system.proxy.socks", "port")]
    return {key: gsettings(env, "get", *key) for key in keys}


def kde_state(env: dict[str, str]) -> str:
    path = Path(env["XDG_CONFIG_HOME"]) / "kioslaverc"
    return path.read_text() if path.exists() else ""


def start(tmp_path: Path, server: VeilServer, env: dict[str, str]) -> procs.VeilClient:
    return procs.start_veil_client(tmp_path, server.key, http=True, env=env,
                                   extra=("--system-proxy",))


def fetch_with_gnome_proxy(env: dict[str, str], nginx: Nginx) -> str:
    """What an application that obeys GNOME's proxy settings does: ask them, then use them."""
    assert gsettings(env, "get", "org.gnome.system.proxy", "mode") == "'manual'"
    host = gsettings(env, "get", "org.gnome.system.proxy.http", "host").strip("'")
    port = gsettings(env, "get", "org.gnome.system.proxy.http", "port")
    done = subprocess.run(["curl", "-sS", "-m", "10", "--noproxy", "", "-x",
                           f"http://{host}:{port}", f"http://127.0.0.1:{nginx.http_port}/"],
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def gnome(tmp_path: Path) -> Iterator[dict[str, str]]:
    if shutil.which("gsettings") is None:
        pytest.skip("gsettings is not installed (scripts/install-deps installs it)")
    env = desktop_env(tmp_path, "ubuntu:GNOME")
    for (schema, key), value in BEFORE_GNOME.items():
        gsettings(env, "set", schema, key, value)
    yield env


def test_gnome_gets_veils_proxies_and_its_own_back_on_exit(
        tmp_path: Path, veil_server: VeilServer, nginx: Nginx, gnome: dict[str, str]) -> None:
    before = gnome_state(gnome)
    client = start(tmp_path, veil_server, gnome)
    try:
        assert "hello from nginx" in fetch_with_gnome_proxy(gnome, nginx)
        now = gnome_state(gnome)
        assert now[("org.gnome.system.proxy.http", "port")] == str(client.http)
        assert now[("org.gnome.system.proxy.https", "port")] == str(client.http)
        assert now[("org.gnome.system.proxy.socks", "port")] == str(client.socks)
        assert "'192.168.0.0/16'" in now[("org.gnome.system.proxy", "ignore-hosts")]
        assert (tmp_path / "state" / "veil" / "system-proxy.json").exists()
    finally:
        assert procs.stop(client.proc) == 0
    assert gnome_state(gnome) == before
    assert not (tmp_path / "state" / "veil" / "system-proxy.json").exists()
    assert "system proxy (gnome) restored" in client.log_text()


def test_a_killed_clients_settings_are_restored_by_the_next_start(
        tmp_path: Path, veil_server: VeilServer, nginx: Nginx, gnome: dict[str, str]) -> None:
    before = gnome_state(gnome)
    killed = start(tmp_path, veil_server, gnome)
    killed.proc.kill()  # SIGKILL: no chance to restore
    killed.proc.wait()
    assert gnome_state(gnome) != before  # veil's settings are still in place
    client = start(tmp_path, veil_server, gnome)
    try:
        assert "did not exit cleanly" in client.log_text()
        assert "hello from nginx" in fetch_with_gnome_proxy(gnome, nginx)
    finally:
        assert procs.stop(client.proc) == 0
    assert gnome_state(gnome) == before  # the user's, not the killed client's


def test_kde_gets_veils_proxies_and_its_own_back_on_exit(
        tmp_path: Path, veil_server: VeilServer) -> None:
    if shutil.which("kwriteconfig5") is None:
        pytest.skip("kwriteconfig5 is not installed (scripts/install-deps installs it)")
    env = desktop_env(tmp_path, "KDE")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "kioslaverc").write_text(
        "[Proxy Settings]\nProxyType=0\nhttpProxy=http://corp-proxy.example 3128\n")
    before = kde_state(env)
    client = start(tmp_path, veil_server, env)
    try:
        text = kde_state(env)
        assert "ProxyType=1" in text
        assert re.search(rf"^httpProxy=http://127\.0\.0\.1 {client.http}$", text, re.M)
        assert re.search(rf"^socksProxy=socks://127\.0\.0\.1 {client.socks}$", text, re.M)
        assert "NoProxyFor=localhost,127.0.0.0/8" in text
    finally:
        assert procs.stop(client.proc) == 0
    assert kde_state(env).split() == before.split()


def test_no_desktop_is_one_clear_line_and_nothing_changes(
        tmp_path: Path, veil_server: VeilServer) -> None:
    env = {**desktop_env(tmp_path, ""), "XDG_CURRENT_DESKTOP": ""}
    client = procs.start_veil_client(tmp_path, veil_server.key, http=True, env=env,
                                     extra=("--system-proxy",), wait=False)
    assert client.proc.wait(15) != 0
    assert "no desktop whose proxy settings veil can set" in client.log_text()
    assert "Traceback" not in client.log_text()
    assert not (tmp_path / "state").exists()
