"""veil.protocol.bittorrent: what --block-bittorrent recognises, and what it must not."""

from __future__ import annotations

import os

import pytest

from veil.protocol.bittorrent import (
    HANDSHAKE,
    SNIFF_LIMIT,
    StreamSniffer,
    datagram_is_bittorrent,
    stream_is_bittorrent,
)

PEER_HANDSHAKE = HANDSHAKE + bytes(8) + os.urandom(20) + b"-qB4650-" + os.urandom(12)
ANNOUNCE = b"GET /announce?info_hash=%12%34&peer_id=-TR3000-&port=51413 HTTP/1.1\r\nHost: t\r\n\r\n"
CLIENT_HELLO_START = bytes.fromhex("160301020001") + os.urandom(40)


@pytest.mark.parametrize("first", [PEER_HANDSHAKE, HANDSHAKE, ANNOUNCE,
                                   b"GET /scrape?info_hash=%12 HTTP/1.0\r\n\r\n"])
def test_bittorrent_streams_are_recognised(first: bytes) -> None:
    assert stream_is_bittorrent(first)


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", CLIENT_HELLO_START, b"SSH-2.0-OpenSSH_9.2\r\n",
    b"GET /announcements HTTP/1.1\r\n\r\n", b"GET /announce?x=1 HTTP/1.1\r\ninfo_hash=1\r\n\r\n",
    HANDSHAKE[:19], b"\x13BitTorrent protocoX"])
def test_other_streams_are_not(first: bytes) -> None:
    assert not stream_is_bittorrent(first)


@pytest.mark.parametrize("cut", range(1, len(PEER_HANDSHAKE)))
def test_a_split_handshake_is_refused_by_its_20th_byte(cut: int) -> None:
    """Whatever the reads, the read that completes the 20-byte signature is refused: the
    infohash (bytes 28-48) never passes."""
    sniffer = StreamSniffer()
    first, second = PEER_HANDSHAKE[:cut], PEER_HANDSHAKE[cut:]
    if cut >= len(HANDSHAKE):
        assert sniffer.feed(first)
    else:
        assert not sniffer.feed(first)
        assert sniffer.feed(second)
    assert sniffer.done


def test_an_ordinary_stream_is_let_go_at_once_and_costs_nothing_after() -> None:
    sniffer = StreamSniffer()
    assert not sniffer.feed(CLIENT_HELLO_START)
    assert sniffer.done
    assert not sniffer.feed(PEER_HANDSHAKE)  # later bytes are the connection's business


def test_a_long_request_line_is_given_up_at_the_limit() -> None:
    sniffer = StreamSniffer()
    assert not sniffer.feed(b"GET /announce?" + b"a" * SNIFF_LIMIT)
    assert sniffer.done


def test_a_tracker_request_line_split_in_two_reads() -> None:
    sniffer = StreamSniffer()
    assert not sniffer.feed(ANNOUNCE[:20])
    assert not sniffer.done
    assert sniffer.feed(ANNOUNCE[20:])


@pytest.mark.parametrize("datagram", [
    b"d1:ad2:id20:" + bytes(20) + b"e1:q4:ping1:t2:aa1:y1:qe",
    b"d1:rd2:id20:" + bytes(20) + b"e1:t2:aa1:y1:re",
    bytes.fromhex("0000041727101980") + bytes(4) + os.urandom(4),  # UDP tracker connect
    bytes([0x41, 0x00]) + os.urandom(18),  # uTP SYN
])
def test_bittorrent_datagrams_are_recognised(datagram: bytes) -> None:
    assert datagram_is_bittorrent(datagram)


@pytest.mark.parametrize("datagram", [
    bytes.fromhex("12340100000100000000000006676f6f676c6503636f6d0000010001"),  # DNS query
    bytes([0xC3, 0, 0, 0, 1]) + os.urandom(1195),  # a QUIC Initial
    bytes([0x41, 0x00]) + os.urandom(30),  # a QUIC short-header packet that starts alike
    b"d1:xe",
])
def test_other_datagrams_are_not(datagram: bytes) -> None:
    assert not datagram_is_bittorrent(datagram)


def test_the_server_relay_looks_at_bytes_that_waited_for_the_connect_once() -> None:
    """A stream's first bytes arrive before its outbound connection is made and are passed
    on when it is: a handshake split across that moment is still refused, not let through
    because its first part was looked at twice."""
    import asyncio

    from tests.unit.test_driver_turns import RecordingTransport
    from veil.net.driver import SessionDriver
    from veil.protocol.address import Address
    from veil.protocol.frames import StreamKind
    from veil.protocol.session import Session, SessionConfig
    from veil.protocol.shaping import NO_SHAPING
    from veil.server.live import OutboundSlots
    from veil.server.outbound import _CountedTcpRelay

    class Outbound(RecordingTransport):
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        quiet = SessionConfig(keepalive_interval=None, idle_close=None, shaping=NO_SHAPING)
        client = Session(client=True, now=loop.time(), config=quiet)
        server = Session(client=False, now=loop.time(), config=quiet)
        driver = SessionDriver(server, on_stream_opened=lambda event: None)
        driver.connection_made(RecordingTransport())
        stream = client.open_stream(StreamKind.TCP, Address("127.0.0.1", 9))
        driver.data_received(client.data_to_send())
        slot = OutboundSlots(total=10, per_user=4).take("u")
        assert slot is not None
        relay = _CountedTcpRelay(driver, stream, slot, StreamSniffer())
        driver.attach(stream, relay)
        relay.on_data(PEER_HANDSHAKE[:7])  # before the connect: it waits
        outbound = Outbound()
        relay.connection_made(outbound)
        relay.on_data(PEER_HANDSHAKE[7:])
        assert bytes(outbound.written) == PEER_HANDSHAKE[:7]
        assert outbound.aborted

    asyncio.run(main())
