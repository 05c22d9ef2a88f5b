"""Positive and negative controls on real traffic, captured with tcpdump.

Positive controls (the detector must flag them): Debian's OpenVPN over UDP and TCP and
wireguard-go, in a network namespace the test creates (they need tun devices); shadowsocks-
libev and trojan carrying HTTPS, and OpenSSH's client, on loopback. Negative controls (they
must pass): curl fetching HTTP and HTTPS (TLS 1.3 and 1.2) from a local nginx.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import realtraffic as rt
from tests.support import procs
from veil.lab.passive import FlowReport, analyse_pcap
from veil.lab.sni import BlockList

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def flows_to(reports: list[FlowReport], port: int) -> list[FlowReport]:
    return [r for r in reports if r.flow["server"].endswith(f":{port}")]


def flagged_labels(report: FlowReport, detector: str) -> tuple[str, ...]:
    verdict = report.verdict(detector)
    return verdict.labels if verdict.flagged else ()


# ------------------------------------------------------------------ OpenVPN
def run_openvpn(tmp_path: Path, proto: str) -> list[FlowReport]:
    openvpn = rt.require("openvpn")
    pki = rt.write_pki(tmp_path)
    port = 11940
    common = ["--dev", "null", "--verb", "3", "--ca", str(pki["ca"]), "--connect-retry", "1"]
    server = [openvpn, *common, "--tls-server", "--dh", "none", "--cert", str(pki["server"]),
              "--key", str(pki["server_key"]), "--local", "127.0.0.1", "--lport", str(port),
              "--proto", "udp4" if proto == "udp" else "tcp4-server"]
    client = [openvpn, *common, "--tls-client", "--cert", str(pki["client"]), "--key",
              str(pki["client_key"]), "--remote", "127.0.0.1", str(port), "--nobind",
              "--proto", "udp4" if proto == "udp" else "tcp4-client"]
    pcap = tmp_path / f"openvpn-{proto}.pcap"
    with rt.Netns(f"ovpn{proto}") as ns, rt.capture(pcap, f"{proto} port {port}", ns=ns):
        server_proc = ns.start(server, tmp_path / "server.log")
        rt.wait_for(tmp_path / "server.log", "link local (bound)" if proto == "udp"
                    else "Listening for incoming TCP connection", server_proc)
        client_proc = ns.start(client, tmp_path / "client.log")
        rt.wait_for(tmp_path / "client.log", "Initialization Sequence Completed", client_proc)
    return flows_to(analyse_pcap(pcap), port)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_openvpn_is_caught(tmp_path: Path, proto: str) -> None:
    reports = run_openvpn(tmp_path, proto)
    assert reports, "no OpenVPN flow in the capture"
    assert flagged_labels(reports[0], "protocol-signatures") == (f"openvpn-{proto}",)


# ------------------------------------------------------------------ WireGuard
def test_wireguard_go_is_caught(tmp_path: Path) -> None:
    wireguard_go, wg = rt.require("wireguard-go"), rt.require("wg")
    pcap = tmp_path / "wireguard.pcap"
    # Interface names are global in /var/run/wireguard (the UAPI sockets): make them unique.
    tag = f"{os.getpid() % 100000}"
    a, b = f"vla{tag}", f"vlb{tag}"
    with rt.Netns("wg") as ns:
        keys = {}
        for name in (a, b):
            private = ns.run([wg, "genkey"]).stdout.strip()
            public = ns.run([wg, "pubkey"], input=private + b"\n").stdout.strip()
            (tmp_path / f"{name}.key").write_bytes(private + b"\n")
            keys[name] = public.decode()
        for name in (a, b):
            proc = ns.start(["env", "LOG_LEVEL=verbose", wireguard_go, "-f", name],
                            tmp_path / f"{name}.log")
            rt.wait_for(tmp_path / f"{name}.log", "Device started", proc)
        ns.run([wg, "set", a, "listen-port", "51820", "private-key", str(tmp_path / f"{a}.key"),
                "peer", keys[b], "allowed-ips", "10.77.9.0/24", "endpoint", "127.0.0.1:51821"])
        ns.run([wg, "set", b, "listen-port", "51821", "private-key", str(tmp_path / f"{b}.key"),
                "peer", keys[a], "allowed-ips", "10.77.8.0/24"])
        for name, address in ((a, "10.77.0.1/32"), (b, "10.77.0.2/32")):
            ns.run(["ip", "addr", "add", address, "dev", name])
            ns.run(["ip", "link", "set", name, "up"])
        ns.run(["ip", "route", "add", "10.77.9.0/24", "dev", a])
        with rt.capture(pcap, "udp port 51820 or udp port 51821", ns=ns):
            # Any packet routed into the tunnel makes wireguard-go start a handshake.
            ns.run(["python3", "-c", "import socket; s = socket.socket(2, 2); "
                    "[s.sendto(b'x', ('10.77.9.9', 9)) for _ in range(3)]"])
            rt.wait_for(tmp_path / f"{a}.log", "Received handshake response", timeout=10)
    (report,) = flows_to(analyse_pcap(pcap), 51821)
    verdict = report.verdict("protocol-signatures")
    assert verdict.labels == ("wireguard",), verdict.evidence
    assert any("handshake initiation" in e and "148" in e for e in verdict.evidence)
    assert any("handshake response" in e and "92" in e for e in verdict.evidence)


# ------------------------------------------------------------------ shadowsocks
def test_shadowsocks_libev_is_caught(tmp_path: Path, nginx: procs.Nginx) -> None:
    ss_server, ss_local = rt.require("ss-server"), rt.require("ss-local")
    port, socks = procs.unused_port(), procs.unused_port()
    key = ["-k", "lab-test-password", "-m", "chacha20-ietf-poly1305"]
    pcap = tmp_path / "shadowsocks.pcap"
    server = rt.start([ss_server, "-s", "127.0.0.1", "-p", str(port), *key],
                      tmp_path / "ss-server.log")
    local = rt.start([ss_local, "-s", "127.0.0.1", "-p", str(port), "-b", "127.0.0.1",
                      "-l", str(socks), *key], tmp_path / "ss-local.log")
    try:
        procs.wait_port(port, proc=server)
        procs.wait_port(socks, proc=local)
        with rt.capture(pcap, f"tcp port {port}"):
            for _ in range(3):
                body = rt.curl("--socks5-hostname", f"127.0.0.1:{socks}",
                               f"http://127.0.0.1:{nginx.http_port}/")
                assert b"hello from nginx" in body
    finally:
        procs.stop(local)
        procs.stop(server)
    reports = flows_to(analyse_pcap(pcap), port)
    assert len(reports) == 3
    # Random first bytes pass the GFW's exemptions now and then by chance, as they do on the
    # real firewall (Ex2, six printable bytes: 1 flow in ~400; Ex1, popcount: rarer still).
    # One chance exemption in three flows is allowed; two would be a broken detector.
    verdicts = [report.verdict("fully-encrypted") for report in reports]
    assert sum(v.flagged for v in verdicts) >= 2, verdicts
    for verdict in verdicts:
        assert verdict.flagged or verdict.evidence[0].startswith(("Ex1", "Ex2")), verdict
    for report in reports:
        assert flagged_labels(report, "protocol-signatures") == ("random-stream",)


# ------------------------------------------------------------------ trojan carrying HTTPS
def test_trojan_carrying_https_is_caught(tmp_path: Path, nginx: procs.Nginx) -> None:
    trojan = rt.require("trojan")
    pki = rt.write_pki(tmp_path)
    port, socks = procs.unused_port(), procs.unused_port()
    server_conf = {"run_type": "server", "local_addr": "127.0.0.1", "local_port": port,
                   "remote_addr": "127.0.0.1", "remote_port": nginx.http_port,
                   "password": ["lab-test-password"], "log_level": 1,
                   "ssl": {"cert": str(pki["server"]), "key": str(pki["server_key"]),
                           "alpn": ["http/1.1"]}}
    client_conf = {"run_type": "client", "local_addr": "127.0.0.1", "local_port": socks,
                   "remote_addr": "127.0.0.1", "remote_port": port,
                   "password": ["lab-test-password"], "log_level": 1,
                   "ssl": {"verify": False, "verify_hostname": False, "sni": "localhost"}}
    (tmp_path / "server.json").write_text(json.dumps(server_conf))
    (tmp_path / "client.json").write_text(json.dumps(client_conf))
    pcap = tmp_path / "trojan.pcap"
    server = rt.start([trojan, "-c", str(tmp_path / "server.json")], tmp_path / "server.log")
    client = rt.start([trojan, "-c", str(tmp_path / "client.json")], tmp_path / "client.log")
    try:
        procs.wait_port(port, proc=server)
        procs.wait_port(socks, proc=client)
        with rt.capture(pcap, f"tcp port {port}"):
            for _ in range(2):
                body = rt.curl("-k", "--socks5-hostname", f"127.0.0.1:{socks}",
                               f"https://127.0.0.1:{nginx.https_port}/")
                assert b"hello from nginx" in body
    finally:
        procs.stop(client)
        procs.stop(server)
    reports = flows_to(analyse_pcap(pcap), port)
    assert len(reports) == 2
    for report in reports:
        assert not report.verdict("fully-encrypted").flagged  # TLS is exempt (Ex5)
        assert not report.verdict("protocol-signatures").flagged
        assert report.verdict("tls-in-tls").flagged, report.verdict("tls-in-tls").details
        assert report.verdict("clienthello-fingerprint").flagged


# ------------------------------------------------------------------ SSH
@pytest.fixture
def ssh_banner_server() -> Iterator[int]:
    """Speaks only the first line of an SSH server; the client's banner is what we catch."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_openssh_client_is_caught(tmp_path: Path, ssh_banner_server: int) -> None:
    ssh = rt.require("ssh")
    pcap = tmp_path / "ssh.pcap"
    with rt.capture(pcap, f"tcp port {ssh_banner_server}"):
        subprocess.run([ssh, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=3",
                        "-p", str(ssh_banner_server), "lab@127.0.0.1", "true"],
                       capture_output=True, timeout=15, check=False)
    (report,) = flows_to(analyse_pcap(pcap), ssh_banner_server)
    verdict = report.verdict("protocol-signatures")
    assert verdict.labels == ("ssh",)
    assert any(e.startswith("ssh: client identification string 'SSH-2.0-OpenSSH")
               for e in verdict.evidence)


# ------------------------------------------------------------------ negatives: curl and nginx
def test_curl_and_nginx_pass(tmp_path: Path, nginx: procs.Nginx) -> None:
    pcap = tmp_path / "curl.pcap"
    with rt.capture(pcap, f"tcp port {nginx.http_port} or tcp port {nginx.https_port}"):
        base = f"127.0.0.1:{nginx.https_port}"
        rt.curl(f"http://127.0.0.1:{nginx.http_port}/")
        rt.curl("-k", f"https://{base}/")
        rt.curl("-k", f"https://{base}/1k.bin", f"https://{base}/")  # keep-alive, two requests
        rt.curl("-k", "--tls-max", "1.2", "--resolve", f"localhost:{nginx.https_port}:127.0.0.1",
                f"https://localhost:{nginx.https_port}/")
    reports = analyse_pcap(pcap)
    assert len(reports) == 4
    for report in reports:
        for detector in ("fully-encrypted", "protocol-signatures", "sni", "tls-in-tls"):
            verdict = report.verdict(detector)
            assert not verdict.flagged, (report.flow["flow"], verdict.evidence)
    http, tls13, keepalive, tls12 = reports
    assert "Ex5: starts like an HTTP request" in http.verdict("fully-encrypted").evidence
    # curl is OpenSSL, not a browser: the fingerprint detector says so, by design.
    assert tls13.verdict("clienthello-fingerprint").flagged
    assert not tls13.verdict("certificate").applicable  # TLS 1.3 hides the certificate
    cert = tls12.verdict("certificate")  # test nginx's certificate is self-signed
    assert cert.flagged and cert.labels[0] == "self-signed"
    assert keepalive.flow["server_bytes"] > 1024
    # With 'localhost' on a block list, the request that named it is caught by its SNI.
    listed = analyse_pcap(pcap, BlockList(["localhost"]))
    assert [r.verdict("sni").flagged for r in listed] == [False, False, False, True]


# ------------------------------------------------------------------ negative: a real browser
def test_chromium_passes_the_fingerprint_check(tmp_path: Path, nginx: procs.Nginx) -> None:
    chromium = rt.require("chromium")
    pcap = tmp_path / "chromium.pcap"
    profile = tmp_path / "profile"
    with rt.capture(pcap, f"tcp port {nginx.https_port}"):
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", "--ignore-certificate-errors",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP lab.test 127.0.0.1",
             "--dump-dom", f"https://lab.test:{nginx.https_port}/"],
            capture_output=True, timeout=60, check=False)
    reports = analyse_pcap(pcap)
    assert reports, "chromium made no connection"
    for report in reports:
        verdict = report.verdict("clienthello-fingerprint")
        assert verdict.applicable and not verdict.flagged, verdict.evidence
        assert verdict.details["browser"] == "Chrome"
        assert "known Chromium 156" in verdict.evidence[0] or "Chrome's cipher list" in \
            verdict.evidence[0]
        assert not report.verdict("fully-encrypted").flagged
        assert not report.verdict("tls-in-tls").flagged
