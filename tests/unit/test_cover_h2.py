"""The HTTP/2 cover, sans-IO: the h2 library's client on one end, H2CoverConnection on the
other, bytes passed by hand (the real-nginx comparison is tests/integration/
test_cover_h2_vs_nginx.py)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

h2_connection = pytest.importorskip("h2.connection")
import h2.config  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
import hpack  # noqa: E402

from veil.cover.generate import SiteSeed, generate_site  # noqa: E402
from veil.cover.http2 import (  # noqa: E402
    SERVER_PREFACE,
    H2CloseAction,
    H2CoverConnection,
    encode_response_headers,
)
from veil.cover.site import CoverSite  # noqa: E402

# An install's site that has a robots.txt (the tests below fetch it; not every install has one).
SEED = next(seed for seed in (SiteSeed(bytes([i]) * 32, 1_760_000_000) for i in range(256))
            if "robots.txt" in generate_site(seed))
SITE = CoverSite.builtin(SEED)
INDEX = generate_site(SEED)["index.html"].body


class Pair:
    """An h2 client and the cover, joined in memory."""

    def __init__(self, settings: dict[Any, int] | None = None) -> None:
        self.client = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        if settings:
            self.client.update_settings(settings)
        self.now = 100.0
        self.cover = H2CoverConnection(SITE, now=self.now, header_timeout=60,
                                       keepalive_timeout=75)
        self.writes: list[bytes] = []

    def pump(self) -> list[Any]:
        data = self.client.data_to_send()
        if data:
            self.cover.receive_data(data, self.now)
        events: list[Any] = []
        for chunk in self.cover.writes():
            self.writes.append(chunk)
            events += self.client.receive_data(chunk)
        return events


def request(pair: Pair, path: str = "/", method: str = "GET") -> int:
    sid: int = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, [(":method", method), (":path", path),
                                   (":scheme", "https"), (":authority", "example.com")],
                             end_stream=True)
    return sid


def test_get_root_over_h2() -> None:
    pair = Pair()
    request(pair)
    events = pair.pump()
    response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    headers = [(bytes(n), bytes(v)) for n, v in response.headers]
    assert [n for n, _ in headers] == [b":status", b"server", b"date", b"content-type",
                                       b"content-length", b"last-modified", b"etag",
                                       b"accept-ranges"]
    assert headers[1] == (b"server", b"nginx/1.22.1")
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == INDEX
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    # nginx's record boundaries: preface, ACK and HEADERS together; the body on its own
    assert pair.writes[0].startswith(SERVER_PREFACE)
    assert pair.writes[1][3] == 0 and len(pair.writes) == 2


def test_missing_page_and_method_not_allowed() -> None:
    pair = Pair()
    request(pair, "/missing")
    request(pair, "/", "PUT")
    statuses = [dict(e.headers)[b":status"] for e in pair.pump()
                if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == [b"404", b"405"]


def test_bad_preface_gets_goaway_and_lingering_close() -> None:
    cover = H2CoverConnection(SITE, now=0.0)
    cover.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1.0)
    out = b"".join(cover.writes())
    assert out == SERVER_PREFACE + bytes.fromhex("000008070000000000") + struct.pack(">II", 0, 1)
    assert cover.close_action is H2CloseAction.LINGER
    assert cover.get_timer() == 6.0  # lingering_timeout after the last read


def test_idle_timeouts() -> None:
    cover = H2CoverConnection(SITE, now=0.0, started_at=-1.0, header_timeout=2,
                              keepalive_timeout=3)
    assert cover.get_timer() == 1.0  # client_header_timeout counts from the accept
    cover.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"),
                       0.5)
    assert cover.get_timer() == 1.0  # a SETTINGS frame does not reset it
    cover.writes()
    cover.handle_timer(1.0)
    assert cover.writes() == [bytes.fromhex("000008070000000000") + bytes(8)]
    assert cover.close_action is H2CloseAction.QUIET


def test_keepalive_timer_after_a_request() -> None:
    pair = Pair()
    request(pair)
    pair.pump()
    assert pair.cover.get_timer() == pair.now + 75


def test_flow_control_holds_the_body() -> None:
    pair = Pair({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 256})
    sid = request(pair)
    events = pair.pump()
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == INDEX[:256]
    pair.client.increment_flow_control_window(100000, stream_id=sid)
    events = pair.pump()
    got += b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == INDEX


def test_response_headers_encoding_as_nginx() -> None:
    block = encode_response_headers(200, [(b"server", b"nginx/1.22.1"),
                                          (b"content-length", b"24")], table_update=True)
    assert block == bytes.fromhex("20887689aa6355e580ae212e1f5c023234")
    assert hpack.Decoder().decode(block, raw=True) == [
        (b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"content-length", b"24")]
    assert encode_response_headers(405, [], table_update=False) == b"\x48\x03405"


def test_preface_already_sent() -> None:
    """A gate that wrote SERVER_PREFACE right after the handshake (as nginx does) says so."""
    cover = H2CoverConnection(SITE, now=0.0, preface_sent=True)
    cover.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"),
                       0.1)
    assert cover.writes() == [bytes.fromhex("000000040100000000")]  # the SETTINGS ACK only


def _goaways(events: list[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]


def test_a_burst_past_the_new_stream_limit_is_refused_then_cut_off() -> None:
    """nginx opens 256 streams per read; it refuses the rest, and past 129 refusals it ends
    the connection with GOAWAY(NO_ERROR) naming the stream that broke the limit."""
    pair = Pair()
    pair.client.local_settings.max_concurrent_streams = 1 << 20
    pair.client.remote_settings.max_concurrent_streams = 1 << 20
    pair.pump()
    sids = [request(pair, "/robots.txt") for _ in range(1100)]
    events = pair.pump()
    answered = [e.stream_id for e in events if isinstance(e, h2.events.ResponseReceived)]
    refused = [e.stream_id for e in events if isinstance(e, h2.events.StreamReset)]
    assert answered == sids[:256]
    assert refused == sids[256:256 + 129]
    (goaway,) = _goaways(events)
    assert (goaway.error_code, goaway.last_stream_id) == (0, sids[256 + 129])
    assert pair.cover.close_action is H2CloseAction.LINGER


def _raw_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in ``data``."""
    out = []
    while data:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], int.from_bytes(data[5:9], "big"), data[9:9 + length]))
        data = data[9 + length:]
    return out


def test_the_thousandth_request_ends_the_connection() -> None:
    """keepalive_requests 1000: the 1000th request is answered behind GOAWAY(NO_ERROR, its
    id); the HEADERS after it are skipped; the connection then closes (lingering)."""
    pair = Pair()
    pair.pump()
    sids: list[int] = []
    for _ in range(8):
        sids += [request(pair, "/robots.txt") for _ in range(120)]
        pair.pump()
    sids += [request(pair, "/robots.txt") for _ in range(120)]
    pair.cover.receive_data(pair.client.data_to_send(), pair.now)
    frames = _raw_frames(b"".join(pair.cover.writes()))
    answered = [sid for kind, sid, _ in frames if kind == 1]  # HEADERS
    assert answered == sids[960:1000]
    goaway = [payload for kind, _, payload in frames if kind == 7]
    assert goaway == [struct.pack(">II", sids[999], 0)]
    assert [kind for kind, _, _ in frames[-3:]] == [7, 1, 0]  # GOAWAY, HEADERS, DATA
    assert pair.cover.close_action is H2CloseAction.LINGER


def test_a_ping_flood_with_answers_unsent_is_cut_off() -> None:
    """nginx answers 9,998 PINGs in one read (with its preface and SETTINGS ACK: 10,001
    frames waiting) and closes on the next, nothing written, no GOAWAY."""
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes(8)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    for count, cut_off in ((9998, False), (9999, True)):
        cover = H2CoverConnection(SITE, now=0.0)
        cover.receive_data(preface + ping * count, 0.0)
        writes = b"".join(cover.writes())
        assert (cover.close_action is H2CloseAction.DROP) is cut_off
        assert len(writes) == (0 if cut_off else len(SERVER_PREFACE) + 9 + 17 * count)
    # frames the adapter reports still unsent count as well
    cover = H2CoverConnection(SITE, now=0.0, preface_sent=True)
    cover.unsent_frames = 10000
    cover.receive_data(preface + ping, 0.0)
    assert cover.close_action is H2CloseAction.DROP
