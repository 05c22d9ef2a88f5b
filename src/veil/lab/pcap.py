"""Read a capture file (pcap or pcapng, as tcpdump and tshark write them) into flows.

Packet decoding is dpkt's (a small, long-maintained pure-Python library); link layers are
those a Linux capture produces: Ethernet (a veth or ``lo``), Linux cooked v1/v2 (``-i any``),
raw IP, and BSD loopback. IP fragments are skipped (the handshakes the detectors read are
never fragmented on the paths tests build).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import dpkt  # type: ignore[import-untyped]

from veil.errors import ConfigError
from veil.lab.flow import Endpoint, Flow, FlowTable, Packet

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
RAW_ALIASES = {12, 14, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6}

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TAGS = {0x8100, 0x88A8}
IPPROTO_TCP = 6
IPPROTO_UDP = 17


def read_flows(path: str | Path) -> list[Flow]:
    """Every flow in the capture at ``path``, in order of first packet."""
    table = FlowTable()
    for packet in read_packets(path):
        table.add(packet)
    return table.flows


def read_packets(path: str | Path) -> Iterator[Packet]:
    try:
        handle: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed in the finally below)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        try:
            reader: Any = dpkt.pcap.UniversalReader(handle)
        except (ValueError, dpkt.Error) as exc:
            raise ConfigError(f"{path} is not a pcap or pcapng capture: {exc}") from exc
        linktype = int(reader.datalink())
        for timestamp, frame in reader:
            ip = _network_layer(linktype, bytes(frame))
            if ip is None:
                continue
            packet = decode_ip(float(timestamp), ip)
            if packet is not None:
                yield packet
    finally:
        handle.close()


def _network_layer(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside one captured frame, or None for anything else (ARP, ...)."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        offset, (ethertype,) = 12, struct.unpack_from("!H", frame, 12)
        while ethertype in VLAN_TAGS and len(frame) >= offset + 6:
            offset += 4
            (ethertype,) = struct.unpack_from("!H", frame, offset)
        return frame[offset + 2:] if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, 14)
        return frame[16:] if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, 0)
        return frame[20:] if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return frame[4:]
    if linktype in RAW_ALIASES:
        return frame
    raise ConfigError(f"unsupported link type {linktype} (capture on an interface, not 'any' "
                      "with an old tcpdump, or convert the file)")


def decode_ip(timestamp: float, data: bytes) -> Packet | None:
    """One IP packet as a :class:`Packet`; None if it is not one we can use."""
    if not data:
        return None
    try:
        if data[0] >> 4 == 4:
            ip: Any = dpkt.ip.IP(data)
            if ip.offset != 0 or ip.mf:
                return None  # a fragment
            src, dst = socket.inet_ntop(socket.AF_INET, ip.src), socket.inet_ntop(
                socket.AF_INET, ip.dst)
            proto = int(ip.p)
        elif data[0] >> 4 == 6:
            ip = dpkt.ip6.IP6(data)
            src, dst = socket.inet_ntop(socket.AF_INET6, ip.src), socket.inet_ntop(
                socket.AF_INET6, ip.dst)
            proto = int(ip.nxt)
        else:
            return None
    except (dpkt.UnpackError, dpkt.NeedData, struct.error, ValueError):
        return None
    upper = ip.data
    if proto == IPPROTO_TCP and isinstance(upper, dpkt.tcp.TCP):
        return Packet(timestamp, "tcp", Endpoint(src, int(upper.sport)),
                      Endpoint(dst, int(upper.dport)), bytes(upper.data),
                      tcp_flags=int(upper.flags), seq=int(upper.seq),
                      ack=int(upper.ack))
    if proto == IPPROTO_UDP and isinstance(upper, dpkt.udp.UDP):
        return Packet(timestamp, "udp", Endpoint(src, int(upper.sport)),
                      Endpoint(dst, int(upper.dport)), bytes(upper.data))
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        return None  # truncated beyond decoding
    return Packet(timestamp, f"ip:{proto}", Endpoint(src, 0), Endpoint(dst, 0), bytes(upper))
