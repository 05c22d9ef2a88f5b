"""The CDN carrier's h2 connection (transport/cdn/h2client.py) opens as Chrome does: the
preface, SETTINGS 1:65536;2:0;4:6291456;6:262144 in that order and nothing else, a
WINDOW_UPDATE of 15663105, all in one write; then a request's HEADERS with the priority flag
(exclusive, on stream 0, weight 220) and the pseudo-headers in Chrome's order (m,a,s,p)."""

from __future__ import annotations

import asyncio
from typing import Any

import hpack
from hyperframe.frame import Frame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from veil.transport.cdn.h2client import H2Connection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_the_connection_opens_as_chromes() -> None:
    async def main() -> None:
        transport = Recorder()
        connection = H2Connection()
        connection.connection_made(transport)
        (first,) = transport.writes
        assert first.startswith(PREFACE)
        settings, window = frames(first[len(PREFACE):])
        assert isinstance(settings, SettingsFrame)
        assert list(settings.settings.items()) == [(1, 65536), (2, 0), (4, 6291456),
                                                   (6, 262144)]
        assert isinstance(window, WindowUpdateFrame)
        assert (window.stream_id, window.window_increment) == (0, 15663105)

        connection.request([(b":method", b"GET"), (b":authority", b"cdn.test"),
                            (b":scheme", b"https"), (b":path", b"/x/"),
                            (b"user-agent", b"Mozilla/5.0")])
        (headers,) = frames(transport.writes[-1])
        assert isinstance(headers, HeadersFrame)
        assert "PRIORITY" in headers.flags and "END_STREAM" in headers.flags
        assert (headers.exclusive, headers.depends_on, headers.stream_weight) == (True, 0, 219)
        names = [name for name, _ in hpack.Decoder().decode(headers.data, raw=True)]
        assert names == [b":method", b":authority", b":scheme", b":path", b"user-agent"]
    asyncio.run(main())
