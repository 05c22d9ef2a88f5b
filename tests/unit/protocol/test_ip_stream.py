"""IP streams: the OPEN, the config message and packets as DATAGRAM frames, byte for byte."""

from __future__ import annotations

import ipaddress

import pytest

from veil.errors import LocalProtocolError
from veil.protocol.address import Address, NeedMoreData
from veil.protocol.events import (
    DataReceived,
    PacketReceived,
    SessionClosed,
    StreamOpened,
)
from veil.protocol.frames import (
    MAX_DATAGRAM_PAYLOAD,
    CloseCode,
    FrameType,
    StreamKind,
    frame,
)
from veil.protocol.ip import (
    GSO_F_NEEDS_CSUM,
    GSO_HEADER_SIZE,
    GSO_TCPV4,
    MAX_IP_DATAGRAM,
    PLAIN_HEADER,
    GsoHeader,
    IpConfig,
    packet_destination,
    packet_source,
)
from veil.protocol.session import Session, SessionConfig
from veil.protocol.shaping import NO_SHAPING

ANY = Address("0.0.0.0", 0)
QUIET = SessionConfig(shaping=NO_SHAPING)

# A minimal IPv4/UDP packet 10.77.0.2 -> 203.0.113.2 and an IPv6 header fd77::2 -> 2001:db8::1.
IPV4 = bytes.fromhex("4500001c000000004011000a0a4d0002cb007102") + bytes(8)
IPV6 = (bytes.fromhex("6000000000081140") + ipaddress.IPv6Address("fd77::2").packed
        + ipaddress.IPv6Address("2001:db8::1").packed + bytes(8))


def pair() -> tuple[Session, Session]:
    return (Session(client=True, now=0.0, config=QUIET),
            Session(client=False, now=0.0, config=QUIET))


def test_stream_kind_ip_is_3() -> None:
    assert StreamKind.IP == 3


def test_open_of_an_ip_stream_exact_bytes() -> None:
    client, _ = pair()
    sid = client.open_stream(StreamKind.IP, ANY)
    assert client.data_to_send() == (
        bytes([FrameType.OPEN, 0, 0, 8]) + sid.to_bytes(4, "big")
        + b"\x03" + b"\x01\x00\x00\x00\x00\x00\x00")


def test_config_exact_bytes_and_round_trip() -> None:
    config = IpConfig(ipaddress.IPv4Interface("10.77.0.2/16"),
                      ipaddress.IPv6Interface("fd77::2/64"), 1500,
                      (ipaddress.ip_address("203.0.113.2"), ipaddress.ip_address("2001:db8::53")))
    wire = config.encode()
    assert wire == (
        (len(wire) - 2).to_bytes(2, "big") + b"\x01" + (1500).to_bytes(2, "big")
        + b"\x10" + bytes([10, 77, 0, 2])
        + b"\x40" + ipaddress.IPv6Address("fd77::2").packed
        + b"\x02" + b"\x04" + bytes([203, 0, 113, 2])
        + b"\x06" + ipaddress.IPv6Address("2001:db8::53").packed)
    assert IpConfig.decode(wire) == (config, len(wire))
    # Split anywhere: the decoder asks for more.
    for cut in range(len(wire)):
        with pytest.raises(NeedMoreData):
            IpConfig.decode(wire[:cut])


def test_config_without_ipv6_and_with_later_fields() -> None:
    config = IpConfig(ipaddress.IPv4Interface("10.77.0.9/24"), None, 1400)
    wire = bytearray(config.encode())
    wire += b"\x00future"  # no routes, then a later version's fields: skipped
    wire[0:2] = (len(wire) - 2).to_bytes(2, "big")
    decoded, used = IpConfig.decode(bytes(wire) + b"next")
    assert decoded == config and used == len(wire)


def test_config_with_routes_round_trips_and_an_old_reader_skips_them() -> None:
    routes = (ipaddress.ip_network("192.168.20.0/24"), ipaddress.ip_network("fd20::/64"),
              ipaddress.ip_network("0.0.0.0/0"))
    config = IpConfig(ipaddress.IPv4Interface("10.77.0.9/16"), None, 1500,
                      (ipaddress.ip_address("1.1.1.1"),), routes)
    wire = config.encode()
    assert wire.endswith(b"\x03\x04\x18\xc0\xa8\x14\x00\x06\x40\xfd\x20" + bytes(14)
                         + b"\x04\x00" + bytes(4))
    assert IpConfig.decode(wire + b"next") == (config, len(wire))
    # What a reader from before routes makes of it: the same config without them (the
    # length covers them, and it skips what follows the resolvers).
    without = IpConfig(config.ipv4, None, 1500, config.dns)
    assert wire.startswith(without.encode()[2:], 2)
    for cut in range(len(without.encode()) + 1, len(wire)):
        truncated = bytearray(wire[:cut])
        truncated[0:2] = (cut - 2).to_bytes(2, "big")
        with pytest.raises(ValueError):
            IpConfig.decode(bytes(truncated))
    with pytest.raises(ValueError):
        IpConfig(config.ipv4, None, routes=routes * 14)


@pytest.mark.parametrize("mutate", [
    lambda w: w[:2] + b"\x02" + w[3:],  # unknown version
    lambda w: w[:5] + b"\x21" + w[6:],  # IPv4 prefix 33
    lambda w: b"\x10\x00" + w[2:],  # longer than the limit
    lambda w: w[:3] + b"\x00\x10" + w[5:],  # MTU 16
])
def test_malformed_configs_are_refused(mutate: object) -> None:
    wire = IpConfig(ipaddress.IPv4Interface("10.77.0.2/16"), None).encode()
    bad = mutate(wire)  # type: ignore[operator]
    with pytest.raises((ValueError, NeedMoreData)):
        IpConfig.decode(bad)


def test_config_needs_an_address() -> None:
    with pytest.raises(ValueError):
        IpConfig(None, None)


def test_packets_travel_as_datagram_frames_without_an_address() -> None:
    client, server = pair()
    sid = client.open_stream(StreamKind.IP, ANY)
    packet = PLAIN_HEADER + IPV4
    client.send_packet(sid, packet)
    wire = client.data_to_send()
    assert wire.endswith(frame(FrameType.DATAGRAM, sid, packet))
    events = server.receive_data(wire, 0.0)
    assert events == [StreamOpened(sid, StreamKind.IP, ANY), PacketReceived(sid, packet)]
    # ... and back, after the config as the stream's DATA.
    config = IpConfig(ipaddress.IPv4Interface("10.77.0.2/16"), None).encode()
    server.send_data(sid, config)
    server.send_packet(sid, packet)
    events = client.receive_data(server.data_to_send(), 0.0)
    assert events == [DataReceived(sid, config), PacketReceived(sid, packet)]


def test_a_super_packet_fits_one_frame() -> None:
    assert MAX_IP_DATAGRAM <= MAX_DATAGRAM_PAYLOAD
    client, server = pair()
    sid = client.open_stream(StreamKind.IP, ANY)
    header = GsoHeader(GSO_F_NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16).encode()
    packet = header + IPV4[:20] + bytes(MAX_IP_DATAGRAM - GSO_HEADER_SIZE - 20)
    client.send_packet(sid, packet)
    wire = client.data_to_send()
    # Delivered whole even when the TLS records cut it into pieces.
    events = []
    for start in range(0, len(wire), 16384):
        events += server.receive_data(wire[start : start + 16384], 0.0)
    assert events[-1] == PacketReceived(sid, packet)
    with pytest.raises(LocalProtocolError):
        client.send_packet(sid, packet + bytes(MAX_DATAGRAM_PAYLOAD))


def test_packets_only_on_ip_streams() -> None:
    client, server = pair()
    tcp = client.open_stream(StreamKind.TCP, Address("1.2.3.4", 80))
    with pytest.raises(LocalProtocolError):
        client.send_packet(tcp, PLAIN_HEADER + IPV4)
    # A DATAGRAM frame on a TCP stream is still a protocol error that closes.
    server.receive_data(client.data_to_send(), 0.0)
    events = server.receive_data(frame(FrameType.DATAGRAM, tcp, PLAIN_HEADER + IPV4), 0.0)
    assert isinstance(events[-1], SessionClosed)
    assert events[-1].code is CloseCode.PROTOCOL_ERROR


def test_gso_header_layout_is_virtio_little_endian() -> None:
    header = GsoHeader(GSO_F_NEEDS_CSUM, GSO_TCPV4, 0x0134, 0x05A8, 0x0014, 0x0010)
    assert header.encode() == bytes.fromhex("01013401a805140010 00".replace(" ", ""))
    assert GsoHeader.decode(header.encode()) == header


def test_packet_addresses() -> None:
    v4 = PLAIN_HEADER + IPV4
    assert packet_source(v4) == bytes([10, 77, 0, 2])
    assert packet_destination(v4) == bytes([203, 0, 113, 2])
    v6 = PLAIN_HEADER + IPV6
    assert packet_source(v6) == ipaddress.IPv6Address("fd77::2").packed
    assert packet_destination(v6) == ipaddress.IPv6Address("2001:db8::1").packed
    for junk in (b"", PLAIN_HEADER, PLAIN_HEADER + IPV4[:19], PLAIN_HEADER + b"\x50" + IPV4[1:]):
        assert packet_source(junk) == b"" and packet_destination(junk) == b""
