"""nDPI's verdict on veil, next to its verdict on Chromium (Debian's ndpiReader, nDPI 4.2).

nDPI scores every flow with "risks" (a self-signed certificate, a missing SNI, an unknown TLS
extension, obfuscated traffic, ...). A censor using it must find nothing in veil's flows that
it does not also find in a real browser's under the same conditions (same server, port, SNI):
any extra risk would be a way to tell them apart.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_chrome_fingerprint import capture_chromium, capture_veil, recorder
from tests.lab import realtraffic as rt
from tests.support import procs

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NDPI = shutil.which("ndpiReader")
RISK = re.compile(r"\*\* ([^*]+?) \*\*")


def ndpi_flows(pcap: Path, port: int) -> list[tuple[str, set[str]]]:
    """(protocol, risks) of each TCP flow to ``port`` in the capture."""
    if NDPI is None:
        pytest.skip("ndpiReader is not installed (libndpi-bin; scripts/install-deps has it)")
    out = subprocess.run([NDPI, "-i", str(pcap), "-v", "2"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    flows = []
    for line in out.splitlines():
        if not re.search(rf"TCP \S+ <-> 127\.0\.0\.1:{port}\b", line):
            continue
        proto = re.search(r"\[proto: [\d.]+/([^\]]+)\]", line)
        risks = set(RISK.findall(line.split("[Risk:", 1)[1].split("][", 1)[0])) if (
            "[Risk:" in line) else set()
        flows.append((proto.group(1) if proto else "?", risks))
    return flows


@pytest.mark.parametrize("host", ["127.0.0.1", "veil.test"])
def test_veil_tls_client_has_no_risk_chromium_lacks(tmp_path: Path, nginx: procs.Nginx,
                                                    host: str) -> None:
    """veil's TLS client and Chromium, each through the same relay to the same nginx."""
    risks = {}
    for who, capture in (("chromium", capture_chromium), ("veil", capture_veil)):
        pcap = tmp_path / f"{who}.pcap"
        with recorder(upstream=nginx.https_port) as rec, \
                rt.capture(pcap, f"tcp port {rec.port}"):
            capture(rec, host)
        flows = [f for f in ndpi_flows(pcap, rec.port) if f[0].startswith("TLS")]
        assert flows, f"nDPI saw no TLS flow from {who}"
        risks[who] = set().union(*(r for _, r in flows))
    assert risks["veil"] <= risks["chromium"], risks


def test_veil_tunnel_has_no_risk_a_browser_lacks(tmp_path: Path, nginx: procs.Nginx) -> None:
    """The whole tunnel, carrying a page, against Chromium fetching from the same kind of
    server (a TLS port that is not 443, no SNI: veil's key names an IP)."""
    server = procs.start_veil_server(tmp_path / "srv")
    try:
        tunnel_pcap = tmp_path / "tunnel.pcap"
        with rt.capture(tunnel_pcap, f"tcp port {server.port}"):
            client = procs.start_veil_client(tmp_path, server.key)
            try:
                rt.curl("--socks5-hostname", f"127.0.0.1:{client.socks}",
                        f"http://127.0.0.1:{nginx.http_port}/")
            finally:
                procs.stop(client.proc)
    finally:
        procs.stop(server.proc)
    browser_pcap = tmp_path / "browser.pcap"
    with recorder(upstream=nginx.https_port) as rec, \
            rt.capture(browser_pcap, f"tcp port {rec.port}"):
        capture_chromium(rec, "127.0.0.1")
    (tunnel,) = ndpi_flows(tunnel_pcap, server.port)
    browser = set().union(*(r for _, r in ndpi_flows(browser_pcap, rec.port)))
    assert tunnel[0].startswith("TLS"), tunnel
    assert tunnel[1] <= browser, (tunnel, browser)
    assert not {r for r in tunnel[1] if re.search(r"obfusc|vpn|proxy|tor", r, re.I)}
