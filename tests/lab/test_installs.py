"""Every install its own: two fresh `veil serve` installs, seen by a scanner, share nothing
two unrelated nginx sites would not; one shipped site (the old build) is caught.

Also: the seed is kept across restarts (same site, same certificate key), and veil's client
pins and completes a handshake with each key type an install may draw.
"""

from __future__ import annotations

import datetime
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import procs
from tests.support.loopserver import ThreadedServer
from veil.cover.adapters import CoverProtocol
from veil.cover.generate import SiteSeed
from veil.cover.site import CoverSite
from veil.lab import sameinstall
from veil.manage.state import KEY_TYPES, CertificateProfile


@pytest.fixture(scope="module")
def two_installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[procs.VeilServer]]:
    servers = [procs.start_veil_server(tmp_path_factory.mktemp(f"install{i}")) for i in (1, 2)]
    try:
        yield servers
    finally:
        for s in servers:
            procs.stop(s.proc)


def _print_side_by_side(verdict: object) -> None:
    details = getattr(verdict, "details", {})
    print(json.dumps({"a": details.get("a"), "b": details.get("b")}, indent=1))


def test_two_fresh_installs_share_nothing_a_scanner_could_use(
        two_installs: list[procs.VeilServer]) -> None:
    a, b = (sameinstall.scan("127.0.0.1", s.port) for s in two_installs)
    verdict = sameinstall.compare(a, b)
    _print_side_by_side(verdict)
    assert not verdict.flagged, verdict.evidence
    # The scan saw real pages and a certificate (a blank scan would pass for nothing).
    assert a.title and b.title and a.certificate and b.certificate
    assert a.pages["/"].status == b.pages["/"].status == 200
    assert a.pages[sameinstall.MISSING].status == 404


def test_the_seed_is_private_and_keeps_the_site_across_a_restart(
        two_installs: list[procs.VeilServer], tmp_path: Path) -> None:
    server = two_installs[0]
    seed = server.state / "site.seed"
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    before = sameinstall.scan("127.0.0.1", server.port)
    procs.stop(server.proc)
    key_before = (server.state / "key.pem").read_bytes()
    again = procs.start_veil_server(server.state.parent, port=server.port)
    two_installs[0] = again
    after = sameinstall.scan("127.0.0.1", again.port)
    assert after.pages == before.pages and after.title == before.title
    assert (server.state / "key.pem").read_bytes() == key_before


def test_a_state_from_before_seeds_gets_one_and_keeps_its_key(tmp_path: Path) -> None:
    server = procs.start_veil_server(tmp_path / "old")
    procs.stop(server.proc)
    (server.state / "site.seed").unlink()  # what a state made before seeds looks like
    key, config = ((server.state / n).read_bytes() for n in ("key.pem", "config.json"))
    again = procs.start_veil_server(tmp_path / "old", port=server.port)
    try:
        assert (server.state / "site.seed").exists()
        assert (server.state / "key.pem").read_bytes() == key
        assert (server.state / "config.json").read_bytes() == config
        client = procs.start_veil_client(tmp_path, server.key)
        procs.stop(client.proc)
    finally:
        procs.stop(again.proc)


def _seed_for_key_type(key_type: str) -> SiteSeed:
    for i in range(1000):
        seed = SiteSeed(i.to_bytes(32, "big"), 1_760_000_000)
        if CertificateProfile.for_seed(seed).key_type == key_type:
            return seed
    raise AssertionError(f"no seed draws {key_type}")


@pytest.mark.parametrize("key_type", sorted(set(KEY_TYPES)))
def test_the_client_pins_and_connects_with_every_key_type(key_type: str, tmp_path: Path) -> None:
    seed = _seed_for_key_type(key_type)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "site.seed").write_text(json.dumps({"seed": seed.seed.hex(),
                                                 "created": seed.created}))
    server = procs.start_veil_server(tmp_path)
    try:
        cert = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
        assert sameinstall.certificate_features(
            cert.public_bytes(serialization.Encoding.DER), "127.0.0.1")["key"] == {
                "P-256": "secp256r1", "P-384": "secp384r1", "RSA-2048": "RSA-2048"}[key_type]
        client = procs.start_veil_client(tmp_path, server.key)  # waits connected
        procs.stop(client.proc)
    finally:
        procs.stop(server.proc)


# ------------------------------------------------------------------ positive controls
class _PlainSite(ThreadedServer):
    """A CoverSite served over plain HTTP from a loop in a thread (the lab's stand-in for a
    server of another build)."""

    def __init__(self, site: CoverSite) -> None:
        super().__init__(lambda: CoverProtocol(site))


def test_control_one_shipped_site_is_caught() -> None:
    """Two servers of a build that ships one site (the old build: one constant site)."""
    shipped = SiteSeed(b"\x07" * 32, 1_678_886_400)
    servers = [_PlainSite(CoverSite.builtin(shipped)) for _ in range(2)]
    try:
        a, b = (sameinstall.scan("127.0.0.1", s.port, tls=False) for s in servers)
    finally:
        for s in servers:
            s.close()
    verdict = sameinstall.compare(a, b)
    _print_side_by_side(verdict)
    assert verdict.flagged
    assert any("ETag" in e for e in verdict.evidence)
    assert any(e.startswith("title") for e in verdict.evidence)


def _old_pattern_certificate() -> bytes:
    """The old build's certificate: CN = the IP, P-256, now - 1 h to now + 90 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=90))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_control_one_certificate_pattern_is_caught() -> None:
    a, b = (sameinstall.InstallView(certificate=sameinstall.certificate_features(
        _old_pattern_certificate(), "127.0.0.1")) for _ in range(2))
    verdict = sameinstall.compare(a, b)
    assert verdict.flagged
    assert any("lifetime" in e for e in verdict.evidence)
