"""Protocol signatures of what firewalls block today, read from the first packets of a flow.

Each matcher looks at one protocol's published wire format and returns evidence when the
flow carries it; the detector flags a flow that any matcher recognises. Sources:

- OpenVPN: the packet header of its reliability layer (opcode << 3 | key id, 8-byte session
  id), OpenVPN's ``ssl_pkt.h`` and its protocol notes; over TCP each packet has a 2-byte
  length prefix. ``--tls-crypt`` encrypts the control channel's payload but keeps this header.
- WireGuard: "WireGuard: Next Generation Kernel Network Tunnel" (Donenfeld, NDSS 2017) 5.4:
  message types 1-4 in the first byte, three reserved zero bytes, handshake initiation 148
  bytes, response 92 bytes, cookie reply 64 bytes; net4people/bbs #117 on its blocking.
- IKE (L2TP/IPsec, IKEv2 VPNs): RFC 2408 3.1 and RFC 7296 3.1 (the 28-byte header whose
  length field equals the datagram length); RFC 3948 2.2 (the 4-byte non-ESP marker on 4500).
- PPTP: RFC 2637 (control messages on TCP 1723 carry the magic cookie 0x1A2B3C4D; data goes
  in enhanced GRE, version 1, protocol 0x880B).
- SSH: RFC 4253 4.2 (both sides open with an ``SSH-protoversion-softwareversion`` line).
- Tor's TLS: tor's ``tortls`` sets a random SNI ``www.<4-25 base32 chars>.com`` on every
  client connection, and relays' link certificates name random ``www.<8-20 chars>.net|com``
  hosts (Winter and Lindskog, FOCI 2012, and nDPI's Tor dissector score these names).
- Shadowsocks-like random streams: a first packet that is uniformly random and has no header
  at all (Alice et al., IMC 2020, on how the GFW picks Shadowsocks servers to probe; Wu et
  al. 2023 for the related fully-encrypted rule), and for UDP a first datagram of the same kind.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from veil.lab import fet
from veil.lab.certs import names
from veil.lab.flow import Direction, Flow
from veil.lab.tls import read_handshake
from veil.lab.tornames import TOR_SNI, random_label, tor_certificate_names
from veil.lab.verdict import Verdict

NAME = "protocol-signatures"
SOURCE = ("OpenVPN ssl_pkt.h; WireGuard NDSS 2017 5.4; RFC 2408/7296/3948 (IKE); RFC 2637 "
          "(PPTP); RFC 4253 (SSH); tor tortls.c (random SNI); Alice et al. IMC 2020")

Matcher = Callable[[Flow], list[str]]

# ------------------------------------------------------------------ OpenVPN
OVPN_HARD_RESET_CLIENT = {1, 7, 10}  # V1, V2, V3 (tls-crypt-v2)
OVPN_HARD_RESET_SERVER = {2, 8}
OVPN_CONTROL = {3, 4, 5, 11}  # soft reset, control, ack, control with wrapped key
OVPN_DATA = {6, 9}
OVPN_MIN_RESET = 1 + 8 + 1 + 4  # opcode, session id, ack count (0), packet id


def _ovpn_opcode(packet: bytes) -> tuple[int, int]:
    return packet[0] >> 3, packet[0] & 0x07


def _ovpn_tcp_packets(stream: bytes, limit: int = 8) -> list[bytes]:
    """OpenVPN-over-TCP packets: each has a 2-byte big-endian length prefix."""
    out: list[bytes] = []
    pos = 0
    while pos + 2 <= len(stream) and len(out) < limit:
        (n,) = struct.unpack_from("!H", stream, pos)
        if n == 0 or pos + 2 + n > len(stream):
            break
        out.append(stream[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def _openvpn(client: list[bytes], server: list[bytes], transport: str) -> list[str]:
    if not client or len(client[0]) < OVPN_MIN_RESET:
        return []
    op, key_id = _ovpn_opcode(client[0])
    if op not in OVPN_HARD_RESET_CLIENT or key_id != 0:
        return []
    session = client[0][1:9]
    evidence = [f"openvpn-{transport}: first client packet is P_CONTROL_HARD_RESET_CLIENT "
                f"(opcode {op}, key id 0, {len(client[0])} bytes)"]
    confirmed = False
    if server and len(server[0]) >= OVPN_MIN_RESET:
        sop, skey = _ovpn_opcode(server[0])
        if sop in OVPN_HARD_RESET_SERVER and skey == 0:
            evidence.append(f"openvpn-{transport}: server answers P_CONTROL_HARD_RESET_SERVER "
                            f"(opcode {sop})")
            confirmed = True
    repeats = sum(1 for p in client[1:] if len(p) >= 9 and _ovpn_opcode(p)[0] in OVPN_CONTROL
                  and p[1:9] == session)
    if repeats:
        evidence.append(f"openvpn-{transport}: {repeats} later client control packets carry "
                        f"the same session id {session.hex()}")
        confirmed = True
    return evidence if confirmed else []


def match_openvpn(flow: Flow) -> list[str]:
    if flow.transport == "udp":
        return _openvpn(flow.datagrams(Direction.CLIENT), flow.datagrams(Direction.SERVER),
                        "udp")
    if flow.transport == "tcp":
        return _openvpn(_ovpn_tcp_packets(flow.stream(Direction.CLIENT)),
                        _ovpn_tcp_packets(flow.stream(Direction.SERVER)), "tcp")
    return []


# ------------------------------------------------------------------ WireGuard
WG_SIZES = {1: 148, 2: 92, 3: 64}
WG_NAMES = {1: "handshake initiation", 2: "handshake response", 3: "cookie reply",
            4: "transport data"}


def _wg_type(datagram: bytes) -> int | None:
    if len(datagram) < 4 or datagram[1:4] != b"\x00\x00\x00":
        return None
    kind = datagram[0]
    if kind in WG_SIZES and len(datagram) == WG_SIZES[kind]:
        return kind
    if kind == 4 and len(datagram) >= 32 and (len(datagram) - 16) % 16 == 0:
        return 4
    return None


def match_wireguard(flow: Flow) -> list[str]:
    if flow.transport != "udp":
        return []
    seen: dict[int, int] = {}
    for chunk in flow.chunks:
        kind = _wg_type(chunk.data)
        if kind is not None:
            seen[kind] = seen.get(kind, 0) + 1
    if not {1, 2} & seen.keys():
        return []  # data messages alone are too weak a signal
    return [f"wireguard: {n} {WG_NAMES[k]} message(s) (type {k}"
            + (f", exactly {WG_SIZES[k]} bytes)" if k in WG_SIZES else ")")
            for k, n in sorted(seen.items())]


# ------------------------------------------------------------------ IKE
IKE_HEADER = 28
IKE_VERSIONS = {0x10: "IKEv1", 0x20: "IKEv2"}
IKE_EXCHANGES = {2: "Identity Protection", 4: "Aggressive", 5: "Informational",
                 32: "Quick Mode", 34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA",
                 37: "INFORMATIONAL"}
NON_ESP_MARKER = b"\x00\x00\x00\x00"


def _ike_header(datagram: bytes) -> str | None:
    data = datagram
    if data[:4] == NON_ESP_MARKER:
        data = data[4:]
    if len(data) < IKE_HEADER:
        return None
    spi_i = data[0:8]
    version, exchange = data[17], data[18]
    (length,) = struct.unpack_from("!I", data, 24)
    if spi_i == bytes(8) or version not in IKE_VERSIONS or exchange not in IKE_EXCHANGES:
        return None
    if length != len(data):
        return None
    return f"{IKE_VERSIONS[version]} {IKE_EXCHANGES[exchange]}"


def match_ike(flow: Flow) -> list[str]:
    if flow.transport != "udp":
        return []
    first = flow.first_data(Direction.CLIENT)
    if first is None:
        return []
    kind = _ike_header(first)
    if kind is None:
        return []
    ports = {flow.client.port, flow.server.port}
    where = " on UDP 500/4500" if ports & {500, 4500} else ""
    return [f"ike: first datagram is an {kind} message with a consistent 28-byte header{where}"]


# ------------------------------------------------------------------ PPTP and GRE
PPTP_MAGIC = 0x1A2B3C4D
PPTP_CONTROL_MESSAGE = 1
GRE_PPP = 0x880B


def match_pptp(flow: Flow) -> list[str]:
    if flow.transport == "tcp":
        data = flow.first_data(Direction.CLIENT) or b""
        if len(data) < 12:
            return []
        length, msg_type, magic, ctrl_type = struct.unpack_from("!HHIH", data, 0)
        if magic == PPTP_MAGIC and msg_type == PPTP_CONTROL_MESSAGE and 1 <= ctrl_type <= 15 \
                and length <= len(data) + 512:
            return [f"pptp: control message type {ctrl_type} with the magic cookie "
                    f"0x1A2B3C4D (TCP port {flow.server.port})"]
        return []
    if flow.transport == "ip:47":
        data = flow.first_data(Direction.CLIENT) or b""
        if len(data) >= 8 and data[1] & 0x07 == 1 and struct.unpack_from("!H", data, 2)[0] \
                == GRE_PPP:
            return ["pptp: enhanced GRE (version 1) carrying PPP (0x880B)"]
    return []


# ------------------------------------------------------------------ SSH
SSH_BANNER = re.compile(rb"SSH-(2\.0|1\.99|1\.5)-[\x21-\x7e]+")


def match_ssh(flow: Flow) -> list[str]:
    if flow.transport != "tcp":
        return []
    out = []
    for direction, who in ((Direction.CLIENT, "client"), (Direction.SERVER, "server")):
        data = flow.first_data(direction) or b""
        m = SSH_BANNER.match(data)
        if m:
            out.append(f"ssh: {who} identification string {m.group(0)[:40].decode()!r}")
    return out


# ------------------------------------------------------------------ Tor
def match_tor(flow: Flow) -> list[str]:
    handshake = read_handshake(flow)
    if handshake is None or handshake.client_hello is None:
        return []
    out = []
    sni = handshake.client_hello.server_name
    m = TOR_SNI.fullmatch(sni or "")
    if sni and m and random_label(m.group(1)):
        out.append(f"tor: SNI {sni!r} is a random www.<base32>.com name, as tor's client sets")
    if handshake.certificates:
        subject_cn, issuer_cn = names(handshake.certificates[0])
        out += tor_certificate_names(subject_cn, issuer_cn)
    return out


# ------------------------------------------------------------------ random streams
RANDOM_MIN_LENGTH = 24
DISTINCT_FRACTION = 0.8


def expected_distinct(n: int) -> float:
    """Expected number of distinct byte values among n uniformly random bytes."""
    return 256.0 * (1.0 - (255.0 / 256.0) ** n)


def looks_random(data: bytes) -> bool:
    if len(data) < RANDOM_MIN_LENGTH:
        return False
    if len(set(data)) < DISTINCT_FRACTION * expected_distinct(len(data)):
        return False
    popcount = fet.average_popcount(data)
    return fet.POPCOUNT_LOW < popcount < fet.POPCOUNT_HIGH


def _is_quic_long_header(data: bytes) -> bool:
    return len(data) >= 5 and data[0] & 0xC0 == 0xC0 and data[1:5] in (
        b"\x00\x00\x00\x01", b"\x6b\x33\x43\xcf")


def match_random_stream(flow: Flow) -> list[str]:
    first = flow.first_data(Direction.CLIENT)
    if first is None or not looks_random(first):
        return []
    if flow.transport == "tcp":
        if fet.exemptions(first):
            return []
        reply = flow.first_data(Direction.SERVER)
        answer = ("the server's first data is random too" if reply and looks_random(reply)
                  else "the server sent no data" if not reply else "")
        what = f"random-stream: first client packet ({len(first)} bytes) is uniformly random " \
               f"with no protocol header ({len(set(first))} distinct byte values)"
        return [what + (f"; {answer}" if answer else "")]
    if flow.transport == "udp":
        if _wg_type(first) is not None or _ike_header(first) is not None \
                or _is_quic_long_header(first) or 53 in (flow.client.port, flow.server.port):
            return []
        return [f"random-datagrams: first datagram ({len(first)} bytes) is uniformly random "
                "with no protocol header"]
    return []


MATCHERS: dict[str, Matcher] = {
    "openvpn": match_openvpn,
    "wireguard": match_wireguard,
    "ike": match_ike,
    "pptp": match_pptp,
    "ssh": match_ssh,
    "tor": match_tor,
    "random-stream": match_random_stream,
}


def detect(flow: Flow) -> Verdict:
    evidence: list[str] = []
    labels: list[str] = []
    for matcher in MATCHERS.values():
        found = matcher(flow)
        if found:
            evidence += found
            labels.append(found[0].split(":", 1)[0])
    if not evidence:
        return Verdict(NAME, False, ("no known VPN or proxy protocol header",))
    return Verdict(NAME, True, tuple(evidence), tuple(dict.fromkeys(labels)))
