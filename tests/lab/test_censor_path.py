"""The in-path censor between a client and a server namespace: it blocks OpenVPN, WireGuard
and shadowsocks-libev, and veil still gets through.

Topology (all namespaces made and deleted here; see ``realtraffic.CensoredPath``)::

    [client 10.198.0.1] vc0 ==== vmc [censor: veil lab censor] vms ==== vs0 [server 10.198.0.2]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.lab import realtraffic as rt
from tests.support.wait import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HTTP_PORT = 8000
PAGE = b"hello from the far side of the censor"
# How long a blocked handshake is given to (not) complete: unblocked, each completes in
# well under a second on this path.
BLOCKED_WAIT = 4.0


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[rt.CensoredPath]:
    workdir = tmp_path_factory.mktemp("censor")
    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_bytes(PAGE)
    (www / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    with rt.CensoredPath(workdir) as censored:
        server = censored.server.start(
            [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", rt.SERVER_IP,
             "--directory", str(www)], workdir / "http.log")

        def serving() -> bool:
            assert server.poll() is None, "the HTTP server exited"
            return fetch(censored, f"http://{rt.SERVER_IP}:{HTTP_PORT}/", timeout=2) == PAGE

        wait_until(serving, 10, "the HTTP server in the server namespace", poll=0.1)
        yield censored


def fetch(path: rt.CensoredPath, url: str, *curl_args: str, timeout: float = BLOCKED_WAIT
          ) -> bytes | None:
    """The body curl got from ``url`` in the client namespace, or None if it failed."""
    out = subprocess.run(path.client.argv([rt.require("curl"), "-sS", "--max-time",
                                           str(timeout), *curl_args, url]),
                         capture_output=True, timeout=timeout + 10)
    return out.stdout if out.returncode == 0 else None


def events_for(path: rt.CensoredPath, port: int) -> list[dict[str, object]]:
    return [e for e in path.events() if str(e["flow"]).endswith(f":{port}")]


def wait_events(path: rt.CensoredPath, port: int, timeout: float = 5.0) -> list[dict[str, object]]:
    """The censor's events for ``port`` once there is one, or none after ``timeout``."""
    with contextlib.suppress(AssertionError):
        return wait_until(lambda: events_for(path, port), timeout,
                          f"a censor event on port {port}", poll=0.1)
    return []


def test_plain_http_crosses(path: rt.CensoredPath) -> None:
    assert fetch(path, f"http://{rt.SERVER_IP}:{HTTP_PORT}/") == PAGE
    assert events_for(path, HTTP_PORT) == []


def test_shadowsocks_is_blocked(path: rt.CensoredPath) -> None:
    ss_server, ss_local = rt.require("ss-server"), rt.require("ss-local")
    key = ["-k", "lab-test-password", "-m", "chacha20-ietf-poly1305"]
    log = path.workdir
    server = path.server.start([ss_server, "-s", rt.SERVER_IP, "-p", "8388", *key],
                               log / "ss-server.log")
    local = path.client.start([ss_local, "-s", rt.SERVER_IP, "-p", "8388", "-b", "127.0.0.1",
                               "-l", "1081", *key], log / "ss-local.log")
    rt.wait_for(log / "ss-server.log", "listening at", server)
    rt.wait_for(log / "ss-local.log", "listening at", local)
    url = f"http://{rt.SERVER_IP}:{HTTP_PORT}/"
    # A connection whose random first bytes pass an exemption by chance (Ex2, six printable
    # bytes: 1 in ~400) crosses, as on the real firewall; the next one is caught.
    for _attempt in range(3):
        if fetch(path, url, "--socks5-hostname", "127.0.0.1:1081") is None:
            break
    (event,) = wait_events(path, 8388)
    assert event["detector"] == "fully-encrypted" and event["blocked"]
    # The triple stays blocked: a second try fails at once, with no new detection.
    assert fetch(path, url, "--socks5-hostname", "127.0.0.1:1081", timeout=2) is None
    assert len(events_for(path, 8388)) == 1


def test_openvpn_is_blocked(path: rt.CensoredPath) -> None:
    openvpn = rt.require("openvpn")
    pki = rt.write_pki(path.workdir)
    common = ["--dev", "null", "--verb", "3", "--ca", str(pki["ca"]), "--proto", "udp4"]
    path.server.start([openvpn, *common, "--tls-server", "--dh", "none", "--cert",
                       str(pki["server"]), "--key", str(pki["server_key"]), "--local",
                       rt.SERVER_IP, "--lport", "1194"], path.workdir / "ovpn-server.log")
    rt.wait_for(path.workdir / "ovpn-server.log", "link local (bound)")
    path.client.start([openvpn, *common, "--tls-client", "--cert", str(pki["client"]), "--key",
                       str(pki["client_key"]), "--remote", rt.SERVER_IP, "1194", "--nobind"],
                      path.workdir / "ovpn-client.log")
    with pytest.raises(AssertionError):  # never within BLOCKED_WAIT
        rt.wait_for(path.workdir / "ovpn-client.log", "Initialization Sequence Completed",
                    timeout=BLOCKED_WAIT)
    events = wait_events(path, 1194)
    assert events and events[0]["detector"] == "protocol-signatures"
    assert any("openvpn-udp" in str(e) for e in events[0]["evidence"])  # type: ignore[union-attr]


def test_wireguard_is_blocked(path: rt.CensoredPath) -> None:
    wireguard_go, wg = rt.require("wireguard-go"), rt.require("wg")
    work = path.workdir
    ends = {"client": (path.client, rt.CLIENT_IP, "10.77.0.1/32", "10.77.0.2/32"),
            "server": (path.server, rt.SERVER_IP, "10.77.0.2/32", "10.77.0.1/32")}
    keys = {}
    for role, (ns, *_rest) in ends.items():
        private = ns.run([wg, "genkey"]).stdout.strip()
        (work / f"wg-{role}.key").write_bytes(private + b"\n")
        keys[role] = ns.run([wg, "pubkey"], input=private + b"\n").stdout.strip().decode()
    # Interface names are global in /var/run/wireguard (the UAPI sockets): one per end.
    names = {role: f"vl{role[0]}{os.getpid() % 100000}" for role in ends}
    for role, (ns, _ip, address, _peer) in ends.items():
        proc = ns.start(["env", "LOG_LEVEL=verbose", wireguard_go, "-f", names[role]],
                        work / f"wg-{role}.log")
        rt.wait_for(work / f"wg-{role}.log", "Device started", proc)
        ns.run(["ip", "addr", "add", address, "dev", names[role]])
        ns.run(["ip", "link", "set", names[role], "up"])
    path.server.run([wg, "set", names["server"], "listen-port", "51820", "private-key",
                     str(work / "wg-server.key"), "peer", keys["client"],
                     "allowed-ips", "10.77.0.1/32"])
    path.client.run([wg, "set", names["client"], "private-key", str(work / "wg-client.key"), "peer",
                     keys["server"], "allowed-ips", "10.77.0.2/32", "endpoint",
                     f"{rt.SERVER_IP}:51820"])
    path.client.run(["ip", "route", "replace", "10.77.0.2/32", "dev", names["client"]])
    path.client.run([sys.executable, "-c", "import socket; s = socket.socket(2, 2); "
                     "[s.sendto(b'x', ('10.77.0.2', 9)) for _ in range(3)]"])
    events = wait_events(path, 51820)
    assert events and events[0]["detector"] == "protocol-signatures"
    time.sleep(1.0)  # an absence is checked: time for a handshake that must not complete
    handshakes = path.server.run([wg, "show", names["server"], "latest-handshakes"]).stdout.split()
    assert handshakes[-1] == b"0", "the WireGuard handshake completed through the censor"


def test_veil_gets_through(path: rt.CensoredPath) -> None:
    work = path.workdir
    server = path.server.start(
        [sys.executable, "-m", "veil", "-v", "serve", "--self-signed",
         "--state", str(work / "veil-state"),
         "--listen", f"{rt.SERVER_IP}:8443", "--allow-private"], work / "veil-server.log")
    rt.wait_for(work / "veil-server.log", "veil://", server)
    key = next(line for line in (work / "veil-server.log").read_text().splitlines()
               if line.startswith("veil://"))
    client = path.client.start([sys.executable, "-m", "veil", "-v", "connect", key, "--socks",
                                "127.0.0.1:1080"], work / "veil-client.log")
    rt.wait_for(work / "veil-client.log", "connected to", client)
    socks = ("--socks5-hostname", "127.0.0.1:1080")
    assert fetch(path, f"http://{rt.SERVER_IP}:{HTTP_PORT}/", *socks, timeout=10) == PAGE
    big = fetch(path, f"http://{rt.SERVER_IP}:{HTTP_PORT}/big.bin", *socks, timeout=20)
    assert big is not None and len(big) == 2 * 1024 * 1024
    assert events_for(path, 8443) == [], events_for(path, 8443)
