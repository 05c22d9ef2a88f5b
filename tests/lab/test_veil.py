"""The lab's detectors on veil's own traffic: what veil passes today, and its known gaps.

``veil serve`` and ``veil connect`` run on loopback; tcpdump captures the tunnel while curl
fetches, through veil's SOCKS5 port, a page and an 8 MiB file over plain HTTP, and then the
same over HTTPS (inner TLS handshakes inside veil's TLS). veil must pass the fully-encrypted
rule, every protocol signature and the SNI check, its ClientHello must be Chrome's, and an
active prober must not tell it from the web server it covers for. The probed certificate
passes in ACME mode (a DNS name) and with a borrowed identity (tests/integration/
test_borrowed.py); a self-signed one, shown only when the operator asks for it
(``--self-signed``), is the positive control the probe must flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import realtraffic as rt
from tests.support import procs
from tests.support.pebble import PEBBLE, NameServer, pebble
from tests.support.wait import wait_until
from veil.lab.certs import judge_certificate
from veil.lab.passive import FlowReport, analyse_pcap
from veil.lab.pcap import read_flows
from veil.lab.probe import ProbeReport, fetch_certificate, probe_server
from veil.lab.verdict import Verdict

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROBE_WAIT = 2.0
SHOULD_PASS = ("fully-encrypted", "protocol-signatures", "sni", "certificate")
# The DNS name of the lab's server in ACME mode, resolved by the lab's name server alone.
ACME_NAME = "www.veil-lab-acme.org"
# Pebble validates and issues in about a second; this leaves room for a loaded machine.
ACME_ORDER_TIMEOUT_S = 30.0


@dataclass
class VeilTraffic:
    server: procs.VeilServer
    plain_http: FlowReport
    inner_https: FlowReport
    first_packet: bytes
    captures: tuple[Path, ...]


def capture_fetch(workdir: Path, server: procs.VeilServer, base: str, name: str,
                  extra_curl: tuple[str, ...] = (),
                  client_args: tuple[str, ...] = ()) -> list[FlowReport]:
    """Capture one veil client's whole tunnel (from its first SYN) while curl fetches a page
    and then an 8 MiB file from ``base``."""
    pcap = workdir / f"{name}.pcap"
    with rt.capture(pcap, f"tcp port {server.port}"):
        client = procs.start_veil_client(workdir, server.key, extra=client_args)
        try:
            socks = ("--socks5-hostname", f"127.0.0.1:{client.socks}")
            assert b"hello from nginx" in rt.curl(*extra_curl, *socks, f"{base}/")
            assert len(rt.curl(*extra_curl, *socks, f"{base}/big.bin")) == 8 * 1024 * 1024
        finally:
            procs.stop(client.proc)
    return [r for r in analyse_pcap(pcap) if r.flow["server"].endswith(f":{server.port}")]


@pytest.fixture(scope="module")
def veil_traffic(module_dir: Path, nginx: procs.Nginx) -> Iterator[VeilTraffic]:
    workdir = module_dir / "lab-veil"
    server = procs.start_veil_server(workdir, "--cover", f"http://127.0.0.1:{nginx.http_port}")
    try:
        plain = capture_fetch(workdir, server, f"http://127.0.0.1:{nginx.http_port}", "plain")
        inner = capture_fetch(workdir, server, f"https://127.0.0.1:{nginx.https_port}",
                              "inner-https", ("-k",))
        assert len(plain) == 1 and len(inner) == 1, (plain, inner)
        (flow,) = [f for f in read_flows(workdir / "plain.pcap")
                   if f.server.port == server.port]
        assert flow.first_client_packet is not None
        yield VeilTraffic(server, plain[0], inner[0], flow.first_client_packet,
                          (workdir / "plain.pcap", workdir / "inner-https.pcap"))
    finally:
        procs.stop(server.proc)


@pytest.fixture(scope="module")
def probed(veil_traffic: VeilTraffic, nginx: procs.Nginx) -> ProbeReport:
    """The prober against veil (covering for nginx) and against nginx itself, with replays of
    veil's recorded first packet (its ClientHello)."""
    return probe_server(f"127.0.0.1:{veil_traffic.server.port}",
                        f"127.0.0.1:{nginx.https_port}", wait=PROBE_WAIT,
                        replay=veil_traffic.first_packet, workers=48)


@pytest.mark.parametrize("detector", SHOULD_PASS)
@pytest.mark.parametrize("fetch", ["plain_http", "inner_https"])
def test_veil_passes(veil_traffic: VeilTraffic, fetch: str, detector: str) -> None:
    report: FlowReport = getattr(veil_traffic, fetch)
    verdict = report.verdict(detector)
    assert not verdict.flagged, verdict.evidence


def test_veil_looks_like_tls(veil_traffic: VeilTraffic) -> None:
    verdict = veil_traffic.plain_http.verdict("fully-encrypted")
    assert verdict.applicable and "Ex5: starts like a TLS record" in verdict.evidence


def test_prober_cannot_tell_veil_from_its_cover(probed: ProbeReport) -> None:
    assert probed.differences == [], "\n".join(probed.differences)
    assert not probed.verdict.flagged
    names = {r.probe.name for r in probed.results}
    assert {"silence", "random-221", "replay", "replay-byte0", "tls-http-get"} <= names
    get = next(r for r in probed.results if r.probe.name == "tls-http-get")
    assert get.target.data.startswith(b"HTTP/1.1 200 OK")


def test_ndpi_sees_ordinary_tls(veil_traffic: VeilTraffic) -> None:
    """A second opinion from a real DPI engine: nDPI must see veil as ordinary web TLS."""
    for pcap in veil_traffic.captures:
        flows = [f for f in rt.ndpi_classify(pcap) if f[0] == veil_traffic.server.port]
        assert flows == [(veil_traffic.server.port, "TLS", "Web")], flows


def test_plain_http_tunnel_shows_no_inner_handshake(veil_traffic: VeilTraffic) -> None:
    verdict = veil_traffic.plain_http.verdict("tls-in-tls")
    assert not verdict.flagged, (verdict.evidence, verdict.details)


def test_clienthello_looks_like_chrome(veil_traffic: VeilTraffic) -> None:
    """veil's client sends Chrome's ClientHello (transport/browser_tls.py)."""
    for report in (veil_traffic.plain_http, veil_traffic.inner_https):
        verdict = report.verdict("clienthello-fingerprint")
        assert not verdict.flagged, verdict.evidence
        assert verdict.details["browser"] == "Chrome"


def test_inner_https_handshake_is_hidden(veil_traffic: VeilTraffic) -> None:
    verdict = veil_traffic.inner_https.verdict("tls-in-tls")
    assert not verdict.flagged, verdict.evidence


@pytest.fixture(scope="module")
def acme_mode(module_dir: Path, nginx: procs.Nginx) -> Iterator[procs.VeilServer]:
    """``veil serve --public NAME`` as an operator starts it with a DNS name (the default:
    ACME), its CA a real Pebble that validates the name over TLS-ALPN-01 on veil's port,
    through a name server that points NAME at loopback."""
    if not Path(PEBBLE).exists():
        pytest.skip("needs Debian's pebble (scripts/install-deps installs it)")
    workdir = module_dir / "lab-veil-acme"
    port = procs.unused_port()
    dns = NameServer({ACME_NAME: "127.0.0.1"})
    try:
        with pebble(workdir / "pebble", port, dns.port) as ca:
            server = procs.start_veil_server(
                workdir, "--public", f"{ACME_NAME}:{port}", "--acme-directory", ca.directory,
                "--acme-ca-bundle", str(ca.ca_bundle),
                "--cover", f"http://127.0.0.1:{nginx.http_port}", port=port)
            try:
                obtained = f"ACME: obtained a certificate for {ACME_NAME}"
                wait_until(lambda: obtained in server.log_text()
                           or server.proc.poll() is not None, ACME_ORDER_TIMEOUT_S,
                           lambda: server.log_text()[-2000:])
                assert obtained in server.log_text(), server.log_text()[-2000:]
                yield server
            finally:
                procs.stop(server.proc)
    finally:
        dns.close()


def probed_certificate(port: int, sni: str | None) -> Verdict:
    """The certificate a prober fetches with this SNI, scored as ``veil lab probe`` does."""
    der = fetch_certificate("127.0.0.1", port, sni)
    assert der is not None
    verdict = judge_certificate(der, sni)
    print(f"certificate for SNI {sni}: {'FLAGGED' if verdict.flagged else 'ok'}: "
          f"{'; '.join(verdict.evidence)}")
    return verdict


def test_probed_certificate_in_acme_mode_is_unremarkable(acme_mode: procs.VeilServer) -> None:
    """A server with a DNS name presents its CA's chain: nothing a prober flags."""
    verdict = probed_certificate(acme_mode.port, ACME_NAME)
    assert not verdict.flagged, verdict.evidence


def test_the_certificate_probe_flags_the_self_signed_default(
        veil_traffic: VeilTraffic) -> None:
    """The positive control, and the known-bad mode: a server without a DNS name (the lab's
    server names 127.0.0.1) presents its self-signed certificate, and the probe says so."""
    verdict = probed_certificate(veil_traffic.server.port, None)
    assert verdict.flagged and "self-signed" in verdict.labels, verdict.evidence


def test_without_shaping_the_inner_handshake_shows(module_dir: Path, nginx: procs.Nginx) -> None:
    """The positive control on veil itself: with shaping off on both ends, the detector that
    passes veil above catches its tunnel carrying HTTPS. Shaping is what hides it."""
    workdir = module_dir / "lab-veil-unshaped"
    server = procs.start_veil_server(workdir, "--no-shaping", "--cover",
                                     f"http://127.0.0.1:{nginx.http_port}")
    try:
        (inner,) = capture_fetch(workdir, server, f"https://127.0.0.1:{nginx.https_port}",
                                 "inner-https-unshaped", ("-k",), ("--no-shaping",))
    finally:
        procs.stop(server.proc)
    verdict = inner.verdict("tls-in-tls")
    assert verdict.flagged, verdict.evidence
