"""``veil serve`` says in one start-up line which certificate strangers see and why (issue #18):
a CA's over ACME with a DNS name, the most unremarkable default; without a name, plainly what a
censor sees (a self-signed certificate, ClientHellos with no SNI: nDPI flags "Missing SNI") and
what to do; self-signed with a name only when asked.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.protocol.address import Address
from veil.server.service import VeilServer


def start_up_log(tmp_path: Path, public: str, caplog: pytest.LogCaptureFixture,
                 **options: Any) -> list[str]:
    """The veil.server warnings of starting and stopping a real server on loopback."""
    return [m for level, m in start_up_records(tmp_path, public, caplog, **options)
            if level == logging.WARNING]


def start_up_records(tmp_path: Path, public: str, caplog: pytest.LogCaptureFixture,
                     **options: Any) -> list[tuple[int, str]]:
    """(level, message) of the veil.server records of starting and stopping a real server."""
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 0), public=public)

    async def run() -> None:
        server = VeilServer(state, ServerOptions(listen=Address("127.0.0.1", 0), **options))
        try:
            await server.start()
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO, logger="veil.server"):
        asyncio.run(run())
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "veil.server"]
    assert any(m.startswith("listening on") for _, m in records), records
    return records


def certificate_line(records: list[tuple[int, str]]) -> tuple[int, str]:
    """The one start-up line on the certificate; nothing else speaks of it."""
    (line,) = [(level, m) for level, m in records if m.startswith("certificate: ")]
    assert not [m for _, m in records if "SNI" in m and not m.startswith("certificate: ")]
    return line


@pytest.mark.parametrize("public", ["203.0.113.7:443", "[2001:db8::7]:443"])
def test_an_ip_public_address_warns_that_keys_send_no_sni(
        tmp_path: Path, public: str, caplog: pytest.LogCaptureFixture) -> None:
    level, line = certificate_line(start_up_records(tmp_path, public, caplog))
    print(line)
    host = public.rsplit(":", 1)[0].strip("[]")
    assert level == logging.WARNING and host in line
    assert "a censor sees a self-signed certificate" in line and "Missing SNI" in line
    assert "--public NAME" in line and "ACME" in line
    assert "borrowed identity (coming)" in line or "--borrow" in line


def test_a_public_dns_name_gets_acme_said_in_one_line(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A CA that is not there (nothing listens on port 9 of loopback): the line is said at
    # start, before any order.
    directory = "https://127.0.0.1:9/dir"
    level, line = certificate_line(start_up_records(
        tmp_path, "vpn.veil-unremarkable.net:443", caplog, acme_directory=directory))
    print(line)
    assert level == logging.INFO
    assert line.startswith("certificate: a CA's for vpn.veil-unremarkable.net, over ACME from "
                           f"{directory}")


def test_self_signed_with_a_name_only_when_asked(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    level, line = certificate_line(start_up_records(
        tmp_path, "vpn.veil-unremarkable.net:443", caplog, self_signed=True))
    print(line)
    assert level == logging.INFO and "as asked (--self-signed)" in line
    assert "no public website shows" in line


def test_a_named_public_address_does_not_warn(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert [w for w in start_up_log(tmp_path, "vpn.example.org:443", caplog)
            if "SNI" in w] == []
