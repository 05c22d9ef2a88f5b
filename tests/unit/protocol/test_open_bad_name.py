"""An OPEN whose name the server cannot read costs that stream, not the session (found by
fuzzing: fuzz/crashes/http_proxy/bogus-punycode)."""

from __future__ import annotations

from veil.protocol.address import Address
from veil.protocol.events import SessionClosed, StreamOpened, StreamReset
from veil.protocol.frames import FrameType, ResetCode, StreamKind, frame
from veil.protocol.session import Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING

CONFIG = SessionConfig(shaping=NO_SHAPING)


def open_payload(name: bytes, port: int = 443) -> bytes:
    return bytes((StreamKind.TCP, 3, len(name))) + name + port.to_bytes(2, "big")


def test_an_unreadable_name_resets_only_its_stream() -> None:
    server = Session(client=False, now=0.0, config=CONFIG)
    client = Session(client=True, now=0.0, config=CONFIG)
    assert client.open_stream(StreamKind.TCP, Address("ok.example", 1)) == 1
    events = server.receive_data(frame(FrameType.OPEN, 1, open_payload(b"xn--zz.com")), 0.0)
    assert not any(isinstance(e, (StreamOpened, SessionClosed)) for e in events)
    assert not server.closed
    back = client.receive_data(server.data_to_send(), 0.0)
    resets = [e for e in back if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.code) for e in resets] == [(1, ResetCode.REFUSED_DESTINATION)]
    # The next stream of the same session opens normally.
    events = server.receive_data(frame(FrameType.OPEN, 3, open_payload(b"example.com")), 0.0)
    assert [e.destination.host for e in events if isinstance(e, StreamOpened)] == ["example.com"]


def test_a_badly_framed_open_still_closes_the_session() -> None:
    server = Session(client=False, now=0.0, config=CONFIG)
    bad = open_payload(b"xn--zz.com") + b"trailing"
    events = server.receive_data(frame(FrameType.OPEN, 1, bad), 0.0)
    assert any(isinstance(e, SessionClosed) for e in events) and server.closed
