"""The censor's rules, sans-IO: block an IP, a port, an SNI; reset instead of dropping;
throttle after N bytes; rules replaced while it runs.

The RST tests run two model TCP ends through the censor. Each end keeps what Linux keeps
(next byte to send, next byte expected) and takes an RST as Linux does (RFC 5961): in
ESTABLISHED only when its sequence number is exactly the next byte expected, in SYN-SENT only
with an ACK of its SYN. tests/netns/test_censor_rules.py shows the same with real sockets.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

import dpkt
import pytest

from tests.lab import synth
from veil.lab.censor import Censor, Decision, RuleEvent, Rules
from veil.lab.flow import SEQ_MOD, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Endpoint

CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 443)
OTHER_SERVER = Endpoint("10.0.0.3", 443)
PSH_ACK = 0x18


def tcp(src: Endpoint, dst: Endpoint, seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    segment = dpkt.tcp.TCP(sport=src.port, dport=dst.port, seq=seq % SEQ_MOD,
                           ack=ack % SEQ_MOD, flags=flags, data=data)
    ip = dpkt.ip.IP(src=socket.inet_aton(src.ip), dst=socket.inet_aton(dst.ip),
                    p=dpkt.ip.IP_PROTO_TCP, data=segment)
    return bytes(ip)


def udp(src: Endpoint, dst: Endpoint, data: bytes) -> bytes:
    datagram = dpkt.udp.UDP(sport=src.port, dport=dst.port, data=data)
    datagram.ulen = 8 + len(data)
    ip = dpkt.ip.IP(src=socket.inet_aton(src.ip), dst=socket.inet_aton(dst.ip),
                    p=dpkt.ip.IP_PROTO_UDP, data=datagram)
    return bytes(ip)


@dataclass
class End:
    """One TCP end, as far as an RST is concerned."""

    address: Endpoint
    snd_nxt: int
    rcv_nxt: int | None = None
    state: str = "closed"
    received: bytearray = field(default_factory=bytearray)

    def syn(self, peer: Endpoint) -> bytes:
        self.state = "syn-sent"
        self.snd_nxt = (self.snd_nxt + 1) % SEQ_MOD
        return tcp(self.address, peer, self.snd_nxt - 1, 0, TCP_SYN)

    def send(self, peer: Endpoint, data: bytes = b"", flags: int = PSH_ACK) -> bytes:
        assert self.rcv_nxt is not None
        seq = self.snd_nxt
        self.snd_nxt = (self.snd_nxt + len(data) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
                        ) % SEQ_MOD
        return tcp(self.address, peer, seq, self.rcv_nxt, flags, data)

    def receive(self, raw: bytes) -> None:
        """A packet reaches this end: data advances rcv_nxt; an RST resets or is ignored."""
        segment = dpkt.ip.IP(raw).data
        assert _checksums_valid(raw), "a packet with a wrong checksum would be dropped"
        if segment.flags & TCP_RST:
            if self.state == "syn-sent":
                accepted = bool(segment.flags & TCP_ACK) and segment.ack == self.snd_nxt
            else:
                accepted = segment.seq == self.rcv_nxt
            if accepted:
                self.state = "reset"
            return
        if segment.flags & TCP_SYN:
            self.rcv_nxt = (segment.seq + 1) % SEQ_MOD
            self.state = "established"
            return
        if segment.seq == self.rcv_nxt:
            self.received += segment.data
            self.rcv_nxt = (self.rcv_nxt + len(segment.data)
                            + (1 if segment.flags & TCP_FIN else 0)) % SEQ_MOD


def _checksums_valid(raw: bytes) -> bool:
    ip = dpkt.ip.IP(raw)
    ip_sum, tcp_sum = ip.sum, ip.data.sum
    ip.sum = ip.data.sum = 0
    again = dpkt.ip.IP(bytes(ip))
    return bool(again.sum == ip_sum and again.data.sum == tcp_sum)


class Path:
    """client -- censor -- server; packets the censor injects reach the end they are for."""

    def __init__(self, censor: Censor, client_isn: int = 1000, server_isn: int = 5000,
                 client: Endpoint = CLIENT, server: Endpoint = SERVER) -> None:
        self.censor = censor
        self.client = End(client, client_isn)
        self.server = End(server, server_isn)
        self.now = 0.0

    def cross(self, raw: bytes, sender: End) -> Decision:
        self.now += 0.001
        receiver = self.server if sender is self.client else self.client
        decision = self.censor.decide(raw, self.now)
        if decision.forward:
            receiver.receive(raw)
        for injection in decision.inject:
            (sender if injection.back else receiver).receive(injection.packet)
        return decision

    def connect(self) -> None:
        self.cross(self.client.syn(self.server.address), self.client)
        self.server.state = "syn-received"
        self.server.snd_nxt = (self.server.snd_nxt + 1) % SEQ_MOD
        assert self.client.rcv_nxt is None
        self.cross(tcp(self.server.address, self.client.address, self.server.snd_nxt - 1,
                       self.server.rcv_nxt or 0, TCP_SYN | TCP_ACK), self.server)
        self.cross(self.client.send(self.server.address, flags=TCP_ACK), self.client)
        self.server.state = "established"

    def client_says(self, data: bytes) -> Decision:
        return self.cross(self.client.send(self.server.address, data), self.client)

    def server_says(self, data: bytes) -> Decision:
        return self.cross(self.server.send(self.client.address, data), self.server)


def established(censor: Censor, **kwargs: int) -> Path:
    path = Path(censor, **kwargs)
    path.connect()
    assert path.client.state == path.server.state == "established"
    path.client_says(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    path.server_says(b"HTTP/1.1 200 OK\r\n\r\n" + bytes(3000))
    assert bytes(path.server.received).startswith(b"GET")
    return path


# ------------------------------------------------------------------ the rules' grammar
def test_rules_file_format() -> None:
    rules = Rules.parse("""
        # the GFW, 20 Aug 2025
        block-port 443 8443
        block-ip 203.0.113.7 198.51.100.0/24   # and a range
        block-sni Blocked.Example.
        inject-rst
        throttle-after 16384
        throttle-drop 0.5
    """)
    assert rules == Rules(("203.0.113.7/32", "198.51.100.0/24"), frozenset({443, 8443}),
                          frozenset({"blocked.example"}), True, 16384, 0.5)
    assert Rules.parse("") == Rules()
    for bad, why in (("block-port 70000", "not a port"), ("block-ip nowhere", "not an address"),
                     ("throttle-drop 2", "0 to 1"), ("inject-rst now", "cannot read"),
                     ("block-everything", "cannot read"), ("throttle-after many", "line 1")):
        with pytest.raises(ValueError, match=why):
            Rules.parse(bad)


def test_rules_merge_the_command_line_and_the_file() -> None:
    base = Rules(block_ports=frozenset({443}), throttle_after=100, throttle_drop=0.2)
    file = Rules.parse("block-port 8443\nblock-ip 10.0.0.9")
    merged = base.merged(file)
    assert merged.block_ports == {443, 8443} and merged.block_ips == ("10.0.0.9/32",)
    assert (merged.throttle_after, merged.throttle_drop) == (100, 0.2)
    assert base.merged(Rules(throttle_after=5, throttle_drop=1.0)).throttle_after == 5
    assert base.merged(Rules()) == base


# ------------------------------------------------------------------ block-ip
def test_block_ip_is_a_blackhole_both_ways_without_rsts() -> None:
    censor = Censor(rules=Rules(block_ips=("10.0.0.2",), inject_rst=True))
    path = Path(censor)
    assert not path.cross(path.client.syn(SERVER), path.client).forward
    reply = tcp(SERVER, CLIENT, 5000, 1001, TCP_SYN | TCP_ACK)
    decision = censor.decide(reply, 1.0)
    assert not decision.forward and decision.inject == ()  # silence: connects time out
    ping = dpkt.ip.IP(src=socket.inet_aton(CLIENT.ip), dst=socket.inet_aton(SERVER.ip), p=1,
                      data=b"\x08\x00\x00\x00\x00\x00\x00\x00")
    assert censor.packet(bytes(ping), 1.0) is False  # not only TCP and UDP
    assert censor.packet(udp(CLIENT, Endpoint(SERVER.ip, 53), b"q"), 1.0) is False
    # Negative control: another server on the same network and port crosses.
    other = Path(censor, server=OTHER_SERVER)
    other.connect()
    assert other.client.state == "established"
    (event,) = [e for e in censor.events if isinstance(e, RuleEvent)
                and e.flow == "tcp 10.0.0.1:40000 -> 10.0.0.2:443"]
    assert (event.rule, event.action) == ("block-ip", "drop")


def test_block_ip_takes_networks() -> None:
    censor = Censor(rules=Rules(block_ips=("10.0.0.2/31", "2001:db8::/32")))
    assert censor.packet(tcp(CLIENT, OTHER_SERVER, 1, 0, TCP_SYN), 0.0) is False
    assert censor.packet(tcp(CLIENT, Endpoint("10.0.0.9", 443), 1, 0, TCP_SYN), 0.0) is True


# ------------------------------------------------------------------ block-port
def test_block_port_drops_both_directions_silently() -> None:
    censor = Censor()
    path = established(censor)
    censor.set_rules(Rules(block_ports=frozenset({443})))
    assert not path.client_says(b"more").forward
    decision = path.server_says(b"late")
    assert not decision.forward and decision.inject == ()
    assert path.client.state == path.server.state == "established"  # frozen, not reset
    # Another port of the same server crosses.
    other = Path(censor, server=Endpoint(SERVER.ip, 8443))
    other.connect()
    other.client_says(b"GET / HTTP/1.1\r\n\r\n")
    assert bytes(other.server.received) == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("isn", [1000, SEQ_MOD - 100])  # the second wraps mid-connection
def test_inject_rst_resets_both_ends_of_an_established_connection(isn: int) -> None:
    censor = Censor()
    path = established(censor, client_isn=isn, server_isn=isn - 7)
    censor.set_rules(Rules(block_ports=frozenset({443}), inject_rst=True))
    decision = path.client_says(b"next request")
    assert not decision.forward
    assert path.client.state == "reset" and path.server.state == "reset"
    (rst_back, rst_on) = (dpkt.ip.IP(i.packet).data for i in decision.inject)
    assert rst_back.flags == rst_on.flags == TCP_RST | TCP_ACK
    (event,) = [e for e in censor.events if isinstance(e, RuleEvent)]
    assert (event.rule, event.action) == ("block-port", "rst")
    assert censor.stats.injected == 2


def test_inject_rst_counts_bytes_still_on_their_way() -> None:
    """The server's last segment crossed the censor but not yet the client's ACK of it: the
    RST to the client must expect those bytes too (they reach the client first)."""
    censor = Censor()
    path = established(censor)
    in_flight = path.server.send(CLIENT, b"x" * 1000)
    assert censor.decide(in_flight, 1.0).forward  # crossed; the client has not got it yet
    censor.set_rules(Rules(block_ports=frozenset({443}), inject_rst=True))
    request = path.client.send(SERVER, b"next")  # acknowledges only what it received
    decision = censor.decide(request, 1.1)
    path.client.receive(in_flight)
    for injection in decision.inject:
        (path.client if injection.back else path.server).receive(injection.packet)
    assert path.client.state == "reset" and path.server.state == "reset"


def test_the_model_ends_refuse_what_a_naive_censor_forges() -> None:
    """The positive control of the RST tests: an RST back to the sender that echoes its
    packet's own sequence number (a naive forger's choice), or one a byte off, leaves the
    ends established."""
    path = established(Censor())
    request = path.client.send(SERVER, b"next")
    segment = dpkt.ip.IP(request).data
    path.client.receive(tcp(SERVER, CLIENT, segment.seq, segment.ack, TCP_RST | TCP_ACK))
    path.server.receive(tcp(CLIENT, SERVER, segment.seq + 1, segment.ack, TCP_RST | TCP_ACK))
    assert path.client.state == path.server.state == "established"


def test_a_challenge_ack_is_answered_with_an_exact_rst() -> None:
    """An end whose data the censor never saw (it lost track) answers an inexact RST with a
    challenge ACK; that ACK names the next byte it expects, and the next RST hits it."""
    censor = Censor(rules=Rules(block_ports=frozenset({443}), inject_rst=True))
    client = End(CLIENT, 9000, rcv_nxt=777_000, state="established")  # seen by nobody
    first = censor.decide(client.send(SERVER, b"hello"), 1.0)
    for injection in first.inject:
        if injection.back:
            client.receive(injection.packet)
    assert client.state == "reset"  # its own ACK number was one of the candidates
    assert not censor.decide(tcp(SERVER, CLIENT, 1, 2, TCP_RST), 1.0).inject  # never answer RSTs


def test_inject_rst_refuses_new_connections() -> None:
    censor = Censor(rules=Rules(block_ports=frozenset({443}), inject_rst=True))
    path = Path(censor)
    decision = path.cross(path.client.syn(SERVER), path.client)
    assert not decision.forward and len(decision.inject) == 1 and decision.inject[0].back
    assert path.client.state == "reset"  # connect() fails with ECONNREFUSED
    assert path.server.state == "closed"  # never heard of it


def test_lifting_a_port_block_lets_new_connections_through() -> None:
    censor = Censor(rules=Rules(block_ports=frozenset({443}), inject_rst=True))
    assert not censor.packet(tcp(CLIENT, SERVER, 1, 0, TCP_SYN), 1.0)
    censor.set_rules(Rules())
    path = established(censor)
    assert path.server.state == "established"


# ------------------------------------------------------------------ block-sni
def hello_path(censor: Censor, name: str, client: Endpoint = CLIENT) -> tuple[Path, Decision]:
    path = Path(censor, client=client)
    path.connect()
    return path, path.client_says(synth.openssl_client_hello(sni=name))


def test_block_sni_blocks_the_name_and_its_triple_until_lifted() -> None:
    censor = Censor(rules=Rules(block_sni=frozenset({"blocked.example"})))
    _, decision = hello_path(censor, "www.blocked.example")
    assert not decision.forward
    event = censor.events[-1]
    assert getattr(event, "detector", None) == "block-sni"
    # The triple: the next connection dies at its SYN (residual blocking, 90 s).
    retry = Path(censor, client=Endpoint(CLIENT.ip, 40001))
    assert not retry.cross(retry.client.syn(SERVER), retry.client).forward
    # Negative control: another name to the same server crosses from another client.
    _, decision = hello_path(censor, "fine.example", client=Endpoint("10.0.0.5", 40000))
    assert decision.forward
    # Another rule changes: the name is still listed, the triple stays blocked.
    censor.set_rules(Rules(block_sni=frozenset({"blocked.example"}), inject_rst=True))
    still = Path(censor, client=Endpoint(CLIENT.ip, 40003))
    assert not still.cross(still.client.syn(SERVER), still.client).forward
    # Lifted: the triple is free at once.
    censor.set_rules(Rules())
    again = Path(censor, client=Endpoint(CLIENT.ip, 40002))
    again.connect()
    assert again.server.state == "established"


def test_block_sni_with_inject_rst_resets() -> None:
    censor = Censor(rules=Rules(block_sni=frozenset({"blocked.example"}), inject_rst=True))
    path, decision = hello_path(censor, "blocked.example")
    assert not decision.forward and decision.inject
    assert path.client.state == path.server.state == "reset"


def test_detector_blocks_reset_too_with_inject_rst() -> None:
    censor = Censor(rules=Rules(inject_rst=True))
    path = Path(censor, server=Endpoint(SERVER.ip, 8388))
    path.connect()
    decision = path.client_says(random.Random(1).randbytes(200))  # fully encrypted
    assert not decision.forward
    assert path.client.state == path.server.state == "reset"
    assert getattr(censor.events[0], "detector", None) == "fully-encrypted"


# ------------------------------------------------------------------ throttle
def test_throttle_drops_after_n_bytes_per_connection() -> None:
    censor = Censor(rules=Rules(throttle_after=10_000, throttle_drop=1.0))
    path = established(censor)
    carried = 27 + 3019  # the request and the answer
    sent = [path.server_says(bytes(1400)).forward for _ in range(10)]
    assert sent == [True] * 5 + [False] * 5  # frozen once 10_000 bytes went by
    assert carried + 4 * 1400 < 10_000 <= carried + 5 * 1400
    # Negative control: a second connection from the same client is not throttled yet.
    fresh = Path(censor, client=Endpoint(CLIENT.ip, 40001))
    fresh.connect()
    assert all(fresh.server_says(bytes(1400)).forward for _ in range(5))
    events = [e for e in censor.events if isinstance(e, RuleEvent)]
    assert [(e.rule, e.flow) for e in events] == [("throttle", "tcp 10.0.0.1:40000 -> "
                                                                "10.0.0.2:443")]


def test_throttle_ip_throttles_only_connections_to_those_addresses() -> None:
    """TSPU freezes connections to foreign hosting, not to a CDN's edge."""
    censor = Censor(rules=Rules.parse("throttle-after 10000\nthrottle-ip 10.0.0.2"))
    assert censor.rules.throttle_ips == ("10.0.0.2/32",)
    path = established(censor)
    assert [path.server_says(bytes(1400)).forward for _ in range(10)] == [True] * 5 + [False] * 5
    # Negative control: a connection to another address carries on past the bytes.
    other = Path(censor, server=OTHER_SERVER)
    other.connect()
    assert all(other.server_says(bytes(1400)).forward for _ in range(20))
    # The file's throttle comes with its addresses; a throttle without them takes every one.
    merged = Rules(throttle_after=5, throttle_ips=("10.0.0.9",)).merged(censor.rules)
    assert merged.throttle_ips == ("10.0.0.2/32",)
    assert Rules(throttle_ips=("10.0.0.9",)).merged(Rules(throttle_after=5)).throttle_ips == ()
    with pytest.raises(ValueError, match="throttle-ip: 'nowhere'"):
        Rules.parse("throttle-ip nowhere")


def test_throttle_drops_the_given_share() -> None:
    censor = Censor(seed=7, rules=Rules(throttle_after=0, throttle_drop=0.3))
    datagrams = [censor.packet(udp(CLIENT, Endpoint(SERVER.ip, 9000), bytes(100)), 0.0)
                 for _ in range(2000)]
    assert 0.25 < datagrams.count(False) / 2000 < 0.35
