"""Synthetic traffic for the lab's tests: ClientHellos, flows and pcap files built from the
published formats, for what no real program here can produce (and for exact vectors)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from pathlib import Path

import dpkt

from veil.lab.flow import Direction, Endpoint, Flow, FlowTable, Packet

CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 443)
WIREGUARD_SERVER = Endpoint("10.0.0.2", 51820)


# ------------------------------------------------------------------ TLS
def record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", content_type, version, len(body)) + body


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def u16s(values: list[int], length_bytes: int = 2) -> bytes:
    data = b"".join(struct.pack("!H", v) for v in values)
    return len(data).to_bytes(length_bytes, "big") + data


def ext_sni(name: str) -> bytes:
    raw = name.encode()
    entry = b"\x00" + struct.pack("!H", len(raw)) + raw
    return struct.pack("!H", len(entry)) + entry


def ext_alpn(protocols: list[str]) -> bytes:
    body = b"".join(bytes([len(p)]) + p.encode() for p in protocols)
    return struct.pack("!H", len(body)) + body


def client_hello_body(ciphers: list[int], extensions: list[tuple[int, bytes]],
                      legacy_version: int = 0x0303) -> bytes:
    exts = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
    return (struct.pack("!H", legacy_version) + bytes(range(32)) + b"\x20" + bytes(32)
            + u16s(ciphers) + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)


def hello_from_lists(ciphers: list[int], extensions: list[int], alpn: str | None,
                     sigalgs: list[int], sni: str = "www.example.com",
                     groups: list[int] | None = None) -> bytes:
    """A ClientHello record whose lists are exactly the given ones (JA4 test vectors)."""
    built = []
    for t in extensions:
        if t == 0x0000:
            data = ext_sni(sni)
        elif t == 0x0010:
            data = ext_alpn([alpn] if alpn else [])
        elif t == 0x000D:
            data = u16s(sigalgs)
        elif t == 0x002B:
            data = u16s([0x0304, 0x0303], 1)
        elif t == 0x000A:
            data = u16s(groups or [0x001D, 0x0017, 0x0018])
        elif t == 0x000B:
            data = b"\x01\x00"
        else:
            data = b""
        built.append((t, data))
    return record(22, handshake(1, client_hello_body(ciphers, built)), version=0x0301)


def openssl_client_hello(sni: str | None = "example.com",
                         alpn: list[str] | None = None) -> bytes:
    """The ClientHello this machine's OpenSSL (Python's ssl) really sends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ------------------------------------------------------------------ flows
def tcp_flow(exchanges: list[tuple[Direction, bytes]], client: Endpoint = CLIENT,
             server: Endpoint = SERVER, segment: int = 0, close: str = "fin") -> Flow:
    """A TCP connection with a handshake, these payloads (each one packet, or segments of
    ``segment`` bytes), and a close."""
    return flow_from_packets(tcp_packets(exchanges, client, server, segment, close))


def tcp_packets(exchanges: list[tuple[Direction, bytes]], client: Endpoint = CLIENT,
                server: Endpoint = SERVER, segment: int = 0,
                close: str = "fin") -> list[Packet]:
    seq = {Direction.CLIENT: 1000, Direction.SERVER: 5000}
    t = 1.0
    packets = [Packet(t, "tcp", client, server, b"", 0x02, seq[Direction.CLIENT] - 1),
               Packet(t, "tcp", server, client, b"", 0x12, seq[Direction.SERVER] - 1),
               Packet(t, "tcp", client, server, b"", 0x10, seq[Direction.CLIENT])]
    for direction, data in exchanges:
        src, dst = (client, server) if direction is Direction.CLIENT else (server, client)
        step = segment or max(len(data), 1)
        for i in range(0, len(data), step):
            t += 0.001
            piece = data[i:i + step]
            packets.append(Packet(t, "tcp", src, dst, piece, 0x18, seq[direction]))
            seq[direction] += len(piece)
    if close == "fin":
        packets.append(Packet(t + 0.001, "tcp", client, server, b"", 0x11, seq[Direction.CLIENT]))
    elif close == "rst":
        packets.append(Packet(t + 0.001, "tcp", server, client, b"", 0x04, seq[Direction.SERVER]))
    return packets


def udp_flow(datagrams: list[tuple[Direction, bytes]], client: Endpoint = CLIENT,
             server: Endpoint = WIREGUARD_SERVER, proto: str = "udp") -> Flow:
    packets = []
    for i, (direction, data) in enumerate(datagrams):
        src, dst = (client, server) if direction is Direction.CLIENT else (server, client)
        packets.append(Packet(1.0 + i / 1000, proto, src, dst, data))
    return flow_from_packets(packets)


def flow_from_packets(packets: list[Packet]) -> Flow:
    table = FlowTable()
    for p in packets:
        table.add(p)
    (flow,) = table.flows
    return flow


# ------------------------------------------------------------------ pcap files
def write_pcap(path: Path, packets: list[Packet], linktype: str = "ethernet") -> None:
    """Write packets as tcpdump would capture them on an Ethernet link (or 'sll2')."""
    with open(path, "wb") as handle:
        dlt = {"ethernet": dpkt.pcap.DLT_EN10MB, "sll2": 276, "raw": 101}[linktype]
        writer = dpkt.pcap.Writer(handle, linktype=dlt)
        for p in packets:
            writer.writepkt(ip_frame(p, linktype), ts=p.time)


def ip_frame(p: Packet, linktype: str) -> bytes:
    if p.proto == "tcp":
        upper = dpkt.tcp.TCP(sport=p.src.port, dport=p.dst.port, seq=p.seq, flags=p.tcp_flags,
                             data=p.payload)
        number = dpkt.ip.IP_PROTO_TCP
    elif p.proto == "udp":
        upper = dpkt.udp.UDP(sport=p.src.port, dport=p.dst.port, data=p.payload)
        upper.ulen = 8 + len(p.payload)
        number = dpkt.ip.IP_PROTO_UDP
    else:
        upper = p.payload
        number = int(p.proto.split(":")[1])
    ip = dpkt.ip.IP(src=socket.inet_aton(p.src.ip), dst=socket.inet_aton(p.dst.ip), p=number,
                    data=upper)
    ip.len = 20 + len(bytes(upper))
    if linktype == "raw":
        return bytes(ip)
    if linktype == "sll2":
        # protocol, reserved, ifindex, hatype, pkttype, halen, address (8)
        return struct.pack("!HHIHBB8s", 0x0800, 0, 1, 1, 0, 6, bytes(8)) + bytes(ip)
    eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6,
                                 type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


def packets_of_flow(flow: Flow, segment: int = 1400) -> list[Packet]:
    """A TCP flow recorded some other way (a relay's chunks) as the packets a capture would
    hold: the handshake at its start, each chunk in segments of ``segment`` bytes at the
    chunk's time, and its close."""
    client, server = flow.client, flow.server
    seq = {Direction.CLIENT: 1000, Direction.SERVER: 5000}
    packets = [Packet(flow.start, "tcp", client, server, b"", 0x02, seq[Direction.CLIENT] - 1),
               Packet(flow.start, "tcp", server, client, b"", 0x12, seq[Direction.SERVER] - 1),
               Packet(flow.start, "tcp", client, server, b"", 0x10, seq[Direction.CLIENT])]
    last = flow.start
    for chunk in flow.chunks:
        src, dst = (client, server) if chunk.direction is Direction.CLIENT else (server, client)
        for i in range(0, len(chunk.data), segment):
            piece = chunk.data[i:i + segment]
            packets.append(Packet(chunk.time, "tcp", src, dst, piece, 0x18,
                                  seq[chunk.direction]))
            seq[chunk.direction] += len(piece)
        last = chunk.time
    if flow.close == "fin":
        packets.append(Packet(last, "tcp", client, server, b"", 0x11, seq[Direction.CLIENT]))
    elif flow.close == "rst":
        packets.append(Packet(last, "tcp", server, client, b"", 0x04, seq[Direction.SERVER]))
    return packets
