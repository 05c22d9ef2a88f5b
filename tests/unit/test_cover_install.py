"""Every install its own: the generated cover site and the certificate pattern, per seed."""

from __future__ import annotations

import datetime
import json
import re
import stat
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.cover.generate import SEED_BYTES, Draw, SiteSeed, generate_site, write_site
from veil.cover.site import CoverSite, Request
from veil.manage.state import (
    SEED_NAME,
    CertificateProfile,
    init_state,
    load_state,
    self_signed_certificate,
)
from veil.protocol.address import Address

CREATED = 1_760_000_000
SEEDS = [SiteSeed(i.to_bytes(SEED_BYTES, "big"), CREATED) for i in range(40)]


def test_the_same_seed_gives_the_same_bytes_and_dates() -> None:
    again = SiteSeed(SEEDS[3].seed, CREATED)
    assert generate_site(SEEDS[3]) == generate_site(again)


def test_the_draw_is_pinned_so_an_upgrade_keeps_every_site() -> None:
    # HMAC-SHA256 over the seed, not `random`: these values must never change.
    d = Draw(b"\0" * 32, "x")
    assert [d.below(1000) for _ in range(4)] == [852, 911, 729, 454]


def test_installs_differ_in_title_pages_sizes_and_etags() -> None:
    sites = [generate_site(s) for s in SEEDS]
    titles = {re.search(rb"<title>(.*?)</title>", s["index.html"].body).group(1)  # type: ignore[union-attr]
              for s in sites}
    etags = {CoverSite.builtin(s)._files[b"/index.html"].etag for s in SEEDS}
    assert len(titles) >= len(SEEDS) - 1
    assert len(etags) == len(SEEDS)
    assert len({tuple(sorted(s)) for s in sites}) >= len(SEEDS) - 1
    assert len({len(s) for s in sites}) >= 3  # page counts vary
    assert any("robots.txt" not in s for s in sites) and any("robots.txt" in s for s in sites)
    assert any("favicon.ico" not in s for s in sites) and any("favicon.ico" in s for s in sites)


def test_dates_lie_in_the_past_of_the_install_and_spread() -> None:
    for seed in SEEDS:
        mtimes = [f.mtime for f in generate_site(seed).values()]
        assert max(mtimes) < seed.created - 2 * 86400
        assert max(mtimes) - min(mtimes) > 7 * 86400
        assert min(mtimes) > seed.created - 3 * 365 * 86400


def test_every_link_resolves_and_pages_are_small() -> None:
    for seed in SEEDS:
        files = generate_site(seed)
        site = CoverSite.builtin(seed)
        for f in files.values():
            assert len(f.body) < 8 * 1024
            for href in re.findall(rb'href="(/[^"]*)"', f.body):
                got = site.respond(Request(b"GET", href, 1001), date=0)
                assert got.status == 200, (f.name, href)


def test_favicon_is_a_well_formed_icon() -> None:
    icons = [f.body for s in SEEDS if (f := generate_site(s).get("favicon.ico"))]
    assert icons
    for ico in icons:
        reserved, kind, count = struct.unpack_from("<HHH", ico)
        width, height, _, _, planes, bpp, size, offset = struct.unpack_from("<BBBBHHII", ico, 6)
        assert (reserved, kind, count, planes, bpp) == (0, 1, 1, 1, 32)
        assert width == height in (16, 32) and offset + size == len(ico)


def test_write_site_gives_nginx_the_same_files(tmp_path: Path) -> None:
    files = generate_site(SEEDS[0])
    write_site(files, tmp_path)
    for f in files.values():
        assert (tmp_path / f.name).read_bytes() == f.body
        assert int((tmp_path / f.name).stat().st_mtime) == f.mtime


# ------------------------------------------------------------------ state and certificate
LISTEN = Address("127.0.0.1", 443)


def test_init_makes_a_private_seed_kept_across_loads(tmp_path: Path) -> None:
    state, _ = init_state(tmp_path, listen=LISTEN)
    assert stat.S_IMODE((tmp_path / SEED_NAME).stat().st_mode) == 0o600
    assert state.site_seed is not None
    assert load_state(tmp_path).site_seed == state.site_seed


def test_a_state_without_a_seed_gets_one_and_keeps_key_and_certificate(tmp_path: Path) -> None:
    init_state(tmp_path, listen=LISTEN)
    (tmp_path / SEED_NAME).unlink()
    key, cert = (tmp_path / "key.pem").read_bytes(), (tmp_path / "cert.pem").read_bytes()
    state = load_state(tmp_path)
    assert state.site_seed is not None and (tmp_path / SEED_NAME).exists()
    assert (tmp_path / "key.pem").read_bytes() == key
    assert (tmp_path / "cert.pem").read_bytes() == cert


def test_a_certificate_is_due_by_its_own_lifetime_not_the_installs_profile(
        tmp_path: Path) -> None:
    """A 30-day certificate with 29 days left is not due (a third of its life is 10 days),
    though this install's profile, drawn from a seed made after it, says 90 days or more
    (renewed 30 days ahead): an older install keeps its certificate when it gets a seed."""
    for attempt in range(20):  # an install whose profile draws 90 days or more (7 in 8 do)
        directory = tmp_path / str(attempt)
        state, _ = init_state(directory, listen=LISTEN)
        assert state.site_seed is not None
        if CertificateProfile.for_seed(state.site_seed).lifetime >= datetime.timedelta(days=90):
            break
    key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    month = CertificateProfile(lifetime=datetime.timedelta(days=30),
                               backdate=datetime.timedelta(days=1))
    pem = self_signed_certificate(key, "127.0.0.1", month).public_bytes(
        serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(pem)
    load_state(directory)
    assert (directory / "cert.pem").read_bytes() == pem


def _cert(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())


def test_the_certificate_follows_the_install_profile(tmp_path: Path) -> None:
    state, _ = init_state(tmp_path, listen=LISTEN)
    assert state.site_seed is not None
    profile = CertificateProfile.for_seed(state.site_seed)
    cert = _cert(tmp_path)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == profile.lifetime
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - cert.not_valid_before_utc) - profile.backdate).total_seconds() < 60


def test_profiles_vary_between_installs() -> None:
    profiles = [CertificateProfile.for_seed(s) for s in SEEDS]
    assert len({p.key_type for p in profiles}) == 3
    assert len({p.lifetime for p in profiles}) >= 4
    assert len({p.backdate for p in profiles}) >= len(SEEDS) - 1
    assert len({p.subject for p in profiles}) >= 4
    assert {p.openssl_style for p in profiles} == {True, False}


@pytest.mark.parametrize("index", range(6))
def test_renewal_keeps_the_key_so_pins_survive(tmp_path: Path, index: int) -> None:
    (tmp_path / SEED_NAME).write_text(
        json.dumps({"seed": SEEDS[index].seed.hex(), "created": CREATED}))
    (tmp_path / SEED_NAME).chmod(0o600)
    state, _ = init_state(tmp_path, listen=LISTEN)
    # Make the certificate due: one that expires tomorrow.
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    old = _cert(tmp_path)
    due = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
           .public_key(old.public_key()).serial_number(1)
           .not_valid_before(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=89))
           .not_valid_after(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
           .sign(key, old.signature_hash_algorithm))  # type: ignore[arg-type]
    (tmp_path / "cert.pem").write_bytes(due.public_bytes(serialization.Encoding.PEM))
    renewed = load_state(tmp_path)
    assert _cert(tmp_path).serial_number != 1
    assert renewed.pin == state.pin
