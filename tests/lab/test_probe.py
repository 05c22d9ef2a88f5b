"""The active prober against small servers with known reactions (loopback, no root)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.toyserver import Handler, ToyServer
from veil.lab import probe

WAIT = 0.6


@contextlib.contextmanager
def serving(handler: Handler) -> Iterator[ToyServer]:
    server = ToyServer(handler)
    try:
        yield server
    finally:
        server.close()


def website(conn: socket.socket) -> None:
    """Answers anything with a 400 and closes, like a web server's plain-HTTP port."""
    conn.settimeout(3)
    if conn.recv(4096):
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def fixed_header(conn: socket.socket, size: int = 50) -> None:
    """Frolov et al.'s tell: reads exactly ``size`` bytes, then closes (RST if more came)."""
    conn.settimeout(3)
    got = b""
    while len(got) < size:
        data = conn.recv(size - len(got))
        if not data:
            return
        got += data
    time.sleep(0.05)  # let any extra bytes arrive: closing with them unread sends RST


def silent(conn: socket.socket) -> None:
    conn.settimeout(3)
    while conn.recv(4096):
        pass


def accepts(recorded: bytes) -> Handler:
    def handler(conn: socket.socket) -> None:
        conn.settimeout(3)
        data = conn.recv(4096)
        if data == recorded:
            conn.sendall(b"welcome")
            silent(conn)
    return handler


def test_repertoire_has_the_published_probes() -> None:
    probes = probe.repertoire(seed=1, replay=bytes(range(100)), tls=True)
    by_name = {p.name: p for p in probes}
    lengths = sorted(len(p.payload) for p in probes if p.name.startswith("random-"))
    assert lengths == sorted(probe.GFW_LENGTHS)
    assert by_name["replay"].payload == bytes(range(100))
    changed = [i for i, (a, b) in enumerate(zip(by_name["replay-bytes0-7,62-63"].payload,
                                                 range(100), strict=True)) if a != b]
    assert changed == [0, 1, 2, 3, 4, 5, 6, 7, 62, 63]
    assert [i for i in range(100) if by_name["replay-bytes6,16"].payload[i] != i] == [6, 16]
    assert by_name["silence"].payload == b"" and by_name["tls-http-get"].tls
    assert probe.repertoire(seed=1) == probe.repertoire(seed=1)


def test_a_server_is_indistinguishable_from_its_twin() -> None:
    with serving(website) as a, serving(website) as b:
        report = probe.probe_server(a.address, b.address, wait=WAIT, tls=False, workers=48)
    assert report.differences == []
    assert not report.verdict.flagged
    assert report.results[1].target.close == "fin"
    assert report.results[1].target.data.startswith(b"HTTP/1.1 400")


def test_every_difference_is_listed() -> None:
    with serving(website) as a, serving(silent) as b:
        report = probe.probe_server(a.address, b.address, wait=WAIT, tls=False, workers=48)
    assert report.verdict.flagged
    # Silence: both time out, so the same; every probe with bytes differs.
    assert len(report.differences) == len(report.results) - 1
    assert report.differences[0].startswith("random-7 (7 B): close differs: target fin")


def test_a_fixed_size_header_shows_in_the_close() -> None:
    with serving(fixed_header) as server:
        report = probe.probe_server(server.address, wait=WAIT, tls=False, workers=48)
    closes = {len(r.probe.payload): r.target.close for r in report.results
              if r.probe.name.startswith("random-")}
    assert closes[49] == "timeout" and closes[50] == "fin" and closes[221] == "rst"
    assert report.verdict.flagged
    tell = report.tells[-1]
    assert "timeout at 49 B -> fin at 50 B" in tell and "fin at 50 B -> rst at 221 B" in tell


def test_silence_everywhere_is_a_tell() -> None:
    with serving(silent) as server:
        report = probe.probe_server(server.address, wait=WAIT, tls=False, workers=48)
    assert any("no probe got a single byte back" in t for t in report.tells)


def test_an_accepted_replay_is_a_tell() -> None:
    recorded = bytes(range(200))
    with serving(accepts(recorded)) as server:
        report = probe.probe_server(server.address, wait=WAIT, tls=False, replay=recorded,
                                    workers=48)
    assert any("the replay was accepted" in t for t in report.tells)


def test_tls_server_answers_are_compared_by_shape() -> None:
    hello = b"\x16\x03\x03\x00\x04" + b"\x02\x00\x00\x00"
    alert = b"\x15\x03\x03\x00\x02\x02\x28"
    assert probe.tls_shape(hello + alert) == b"handshake:2;alert:0228;"
    assert probe.Reaction(hello + b"\x17\x03\x03\x00\x01x", "fin").normalised().data == \
        b"handshake:2;record:23;"
    a = probe.Reaction(b"HTTP/1.1 200 OK\r\nDate: Mon\r\n\r\n", "fin", 0.1)
    b = probe.Reaction(b"HTTP/1.1 200 OK\r\nDate: Tue\r\n\r\n", "fin", 0.2)
    assert a.normalised() == b.normalised()


def test_timing_differences_need_a_real_gap() -> None:
    p = probe.Probe("x", b"1")
    near = [probe.ProbeResult(p, probe.Reaction(b"", "fin", 0.1),
                              probe.Reaction(b"", "fin", 0.9))]
    far = [probe.ProbeResult(p, probe.Reaction(b"", "fin", 0.1),
                             probe.Reaction(b"", "fin", 5.0))]
    assert probe.differences(near) == []
    assert "timing differs" in probe.differences(far)[0]


def test_unreachable_and_bad_addresses() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe.run_probe("127.0.0.1", port, probe.Probe("x", b"")).close == "refused"
    with pytest.raises(ValueError, match="HOST:PORT"):
        probe.split_host_port("no-port")
    assert probe.split_host_port("[::1]:443") == ("::1", 443)
