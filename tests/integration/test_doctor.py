"""`veil doctor`: versions against bounds, a TLS self-test that fails when the record layer
breaks, and kernel checks that leave the host's interfaces and firewall as they were."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.support.procs import VEIL
from veil.cli import doctor


def run_doctor() -> tuple[int, dict[str, dict[str, str]]]:
    proc = subprocess.run([*VEIL, "doctor", "--json"], capture_output=True, text=True,
                          timeout=60, check=False)
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    return proc.returncode, checks


@pytest.mark.smoke
def test_doctor_passes_here_and_checks_what_matters() -> None:
    status, checks = run_doctor()
    assert status == 0, checks
    for name in ("python", "veil", "cryptography", "aiohttp", "h2", "openssl",
                 "tls self-test"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["tls self-test"]["detail"].count("TLS_") == 3  # every suite
    if os.geteuid() == 0:  # CI: the kernel checks ran in their own namespace
        for name in ("network namespaces", "tun", "nftables"):
            assert checks[name]["status"] in ("ok", "warn"), checks[name]
        assert checks["nftables"]["status"] == "ok", checks["nftables"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel checks need root (CI runs as root)")
def test_the_kernel_checks_leave_the_host_untouched() -> None:
    def host() -> tuple[str, str]:
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        nft = shutil.which("nft") or "/usr/sbin/nft"
        tables = subprocess.run([nft, "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        return links, tables

    before = host()
    status, checks = run_doctor()
    assert status == 0 and checks["tun"]["status"] in ("ok", "warn")
    after = host()
    assert "veildoctor" not in after[0] and "veil_doctor" not in after[1]
    assert after == before


def test_a_broken_record_layer_fails_the_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    # What every handshake did with cryptography 51 before the sealer stopped sealing in place.
    def refuse(*args: object, **kwargs: object) -> bytearray:
        raise ValueError("data and buf must not overlap")

    monkeypatch.setattr("veil.transport.tls13.record.RecordSealer.seal", refuse)
    check = doctor.check_tls_self_test()
    assert check.status == "fail"
    assert "must not overlap" in check.detail and check.hint


def test_requirements_outside_their_bounds_fail() -> None:
    checks = {c.name: c for c in doctor.check_requirements([
        "cryptography>=999", "surely-not-installed-veil-dep>=1",
        "h11>=0.1", "uvloop>=0.1; sys_platform == 'win32'", "pytest>=1; extra == 'test'"])}
    assert checks["cryptography"].status == "fail" and ">=999" in checks["cryptography"].detail
    assert checks["surely-not-installed-veil-dep"].status == "fail"
    assert checks["h11"].status == "ok"
    assert "uvloop" not in checks and "pytest" not in checks  # another platform's, an extra's
