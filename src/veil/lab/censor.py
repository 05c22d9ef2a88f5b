"""An in-path censor, sans-IO: IP packets in, decisions (forward or drop, and packets to
inject) and events out.

It does what THREATS.md section 6 says the GFW does, with the lab's own detectors: it
inspects the first packets of every flow, and when a blocking detector flags one it drops
the flow's client-to-server packets (no RST: the GFW's fully-encrypted blocking is silent,
Wu et al. 2023 section 4) and keeps dropping everything from that client to that server
port (the "triple") for a residual period (180 s for fully encrypted traffic, 90 s for SNI,
Wu et al. 2023 and Rambert et al. 2021). Server-to-client packets pass, as on the GFW.

Besides the detectors it applies :class:`Rules`, blocks that need no detection and can be
replaced while it runs (THREATS.md section 8): ``block-ip`` (a blackhole, both directions,
as a null-routed server), ``block-port`` (every connection to a server port, both
directions, as the GFW's port-443 blocking of 20 Aug 2025), ``block-sni`` (a name list, as
the GFW's SNI filter), ``inject-rst`` (blocked TCP connections are reset instead of
silenced: forged RST+ACKs to both ends, with the sequence numbers each end expects) and
``throttle-after``/``throttle-drop`` (after a connection carried N bytes, drop that share of
its packets: Iran's throttling; with a share of 1, Russia's TSPU "freeze after 16 KB"), for
every connection or, with ``throttle-ip``, only those to or from the addresses listed (TSPU
freezes connections to foreign hosting, not to a CDN's edge).

The byte-level I/O (an AF_PACKET bridge between two veths) is :mod:`veil.lab.bridge`;
everything here takes bytes and a clock value, so it is tested without a network.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import dpkt  # type: ignore[import-untyped]

from veil.lab import fet, fingerprint, signatures, sni, tlsintls
from veil.lab.flow import (
    SEQ_MOD,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Direction,
    Endpoint,
    Flow,
    FlowTable,
    Packet,
)
from veil.lab.pcap import decode_ip
from veil.lab.verdict import Verdict

# Detectors a censor can block on, and the residual blocking each one triggers (seconds).
BLOCKING: dict[str, tuple[Callable[[Flow, sni.BlockList | None], Verdict], float]] = {
    fet.NAME: (lambda flow, _: fet.detect(flow), 180.0),
    signatures.NAME: (lambda flow, _: signatures.detect(flow), 180.0),
    sni.NAME: (sni.detect, 90.0),
    fingerprint.NAME: (lambda flow, _: fingerprint.detect(flow), 90.0),
    tlsintls.NAME: (lambda flow, _: tlsintls.detect(flow), 180.0),
}
DEFAULT_BLOCK = (fet.NAME, signatures.NAME, sni.NAME)
# A DPI box looks at the start of a flow only: after this many client bytes, or chunks in
# either direction, an unflagged flow is let through for good.
INSPECT_CLIENT_BYTES = 16 * 1024
INSPECT_CHUNKS = 24
# Flows remembered at once, under inspection and decided alike (each kind separately);
# the oldest are forgotten first. A flow under inspection holds at most a few dozen chunks.
# Connections tracked for the rules (sequence numbers and bytes carried) have the same bound.
MAX_FLOWS = 8192

# The rules' names, as the command line, the rules file and the events spell them.
RULE_BLOCK_IP = "block-ip"
RULE_BLOCK_PORT = "block-port"
RULE_BLOCK_SNI = "block-sni"
RULE_INJECT_RST = "inject-rst"
RULE_THROTTLE_AFTER = "throttle-after"
RULE_THROTTLE_DROP = "throttle-drop"
RULE_THROTTLE_IP = "throttle-ip"
RULE_THROTTLE = "throttle"  # the events' name for the pair above
# A connection that matched block-sni keeps its triple blocked this long, as the GFW's SNI
# filter does (90 s, Rambert et al. 2021), unless --residual says otherwise or the rule is
# lifted first.
SNI_RULE_RESIDUAL = 90.0
# Entries in one rule set (addresses, ports and names together): a rules file is written by
# hand or by a test, and a censor that matches each packet against it must stay fast.
MAX_RULE_ENTRIES = 4096
# The TTL of forged packets: what a Linux host sends, so they look like the peer's.
INJECTED_TTL = 64
TCP_HEADER = 20


@dataclass(frozen=True)
class Triple:
    """What the GFW blocks after a detection: (client address, server address, server port)."""

    client: str
    server: str
    port: int

    def __str__(self) -> str:
        return f"{self.client} -> {self.server}:{self.port}"


@dataclass(frozen=True)
class CensorEvent:
    """A flow was flagged (``blocked`` unless the probability roll let it go)."""

    time: float
    flow: str
    detector: str
    evidence: tuple[str, ...]
    blocked: bool
    until: float

    def to_json(self) -> dict[str, object]:
        return {"event": "flagged", "time": round(self.time, 3), "flow": self.flow,
                "detector": self.detector, "evidence": list(self.evidence),
                "blocked": self.blocked, "until": round(self.until, 3)}


@dataclass(frozen=True)
class RuleEvent:
    """A rule acted on a connection for the first time: ``blocked`` (``action`` says whether it
    was dropped or reset) or ``throttled``. One per connection and rule, not per packet."""

    time: float
    flow: str
    rule: str
    action: str

    def to_json(self) -> dict[str, object]:
        event = "throttled" if self.rule == RULE_THROTTLE else "blocked"
        return {"event": event, "time": round(self.time, 3), "flow": self.flow,
                "rule": self.rule, "action": self.action}


@dataclass
class CensorStats:
    forwarded: int = 0
    dropped: int = 0
    flagged: int = 0
    flows: int = 0
    injected: int = 0


@dataclass(frozen=True)
class Rules:
    """Blocks that need no detector; the command line's options and the rules file's lines.

    ``block_ips`` holds addresses and networks (``203.0.113.7``, ``198.51.100.0/24``);
    ``block_ports`` server ports (TCP and UDP); ``block_sni`` names, each with its
    subdomains; ``inject_rst`` resets blocked TCP connections instead of silencing them
    (except ``block_ips``, always a blackhole); ``throttle_after`` bytes a connection may
    carry (both directions) before ``throttle_drop`` of its packets are dropped; with
    ``throttle_ips``, only connections to or from those addresses and networks are throttled.
    """

    block_ips: tuple[str, ...] = ()
    block_ports: frozenset[int] = frozenset()
    block_sni: frozenset[str] = frozenset()
    inject_rst: bool = False
    throttle_after: int | None = None
    throttle_drop: float = 1.0
    throttle_ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, rule in (("block_ips", RULE_BLOCK_IP), ("throttle_ips", RULE_THROTTLE_IP)):
            networks = []
            for text in getattr(self, name):
                try:
                    networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
                except ValueError as exc:
                    raise ValueError(f"{rule}: {text!r} is not an address or network"
                                     ) from exc
            object.__setattr__(self, name, tuple(dict.fromkeys(networks)))
        bad_ports = sorted(p for p in self.block_ports if not 0 < p < 65536)
        if bad_ports:
            raise ValueError(f"{RULE_BLOCK_PORT}: {bad_ports[0]} is not a port (1-65535)")
        names = frozenset(n.strip().lower().rstrip(".") for n in self.block_sni if n.strip())
        object.__setattr__(self, "block_sni", names)
        if self.throttle_after is not None and self.throttle_after < 0:
            raise ValueError(f"{RULE_THROTTLE_AFTER} takes a number of bytes >= 0")
        if not 0.0 <= self.throttle_drop <= 1.0:
            raise ValueError(f"{RULE_THROTTLE_DROP} takes a share from 0 to 1")
        if (len(self.block_ips) + len(self.block_ports) + len(self.block_sni)
                + len(self.throttle_ips) > MAX_RULE_ENTRIES):
            raise ValueError(f"more than {MAX_RULE_ENTRIES} addresses, ports and names")

    @classmethod
    def parse(cls, text: str) -> Rules:
        """The rules file's format: one rule a line, its values after it, ``#`` comments.

        ``block-ip ADDR|NET...``, ``block-port PORT...``, ``block-sni NAME...``,
        ``inject-rst``, ``throttle-after BYTES``, ``throttle-drop SHARE``,
        ``throttle-ip ADDR|NET...``.
        """
        ips: list[str] = []
        ports: set[int] = set()
        names: set[str] = set()
        inject = False
        after: int | None = None
        drop = 1.0
        throttled: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            rule, values = words[0], words[1:]
            try:
                if rule == RULE_BLOCK_IP and values:
                    ips += values
                elif rule == RULE_BLOCK_PORT and values:
                    ports.update(int(v) for v in values)
                elif rule == RULE_BLOCK_SNI and values:
                    names.update(values)
                elif rule == RULE_INJECT_RST and not values:
                    inject = True
                elif rule == RULE_THROTTLE_AFTER and len(values) == 1:
                    after = int(values[0])
                elif rule == RULE_THROTTLE_DROP and len(values) == 1:
                    drop = float(values[0])
                elif rule == RULE_THROTTLE_IP and values:
                    throttled += values
                else:
                    raise ValueError(f"cannot read {line.strip()!r}")
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from exc
        try:
            return cls(tuple(ips), frozenset(ports), frozenset(names), inject, after, drop,
                       tuple(throttled))
        except ValueError as exc:
            raise ValueError(f"rules: {exc}") from exc

    def merged(self, other: Rules) -> Rules:
        """These rules and ``other``'s together; ``other``'s throttle (with its addresses)
        wins when it has one."""
        throttled = other if other.throttle_after is not None else self
        return Rules(self.block_ips + other.block_ips, self.block_ports | other.block_ports,
                     self.block_sni | other.block_sni, self.inject_rst or other.inject_rst,
                     throttled.throttle_after, throttled.throttle_drop, throttled.throttle_ips)

    def to_json(self) -> dict[str, object]:
        return {RULE_BLOCK_IP: list(self.block_ips), RULE_BLOCK_PORT: sorted(self.block_ports),
                RULE_BLOCK_SNI: sorted(self.block_sni), RULE_INJECT_RST: self.inject_rst,
                RULE_THROTTLE_AFTER: self.throttle_after,
                RULE_THROTTLE_DROP: self.throttle_drop,
                RULE_THROTTLE_IP: list(self.throttle_ips)}


class _AddressSet:
    """Addresses and networks (a rule's), matched against a packet's either end."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self._hosts = frozenset(n.split("/")[0] for n in networks
                                if n.endswith(("/32", "/128")))
        self._networks = tuple(ipaddress.ip_network(n) for n in networks
                               if not n.endswith(("/32", "/128")))

    def holds(self, packet: Packet) -> bool:
        if packet.src.ip in self._hosts or packet.dst.ip in self._hosts:
            return True
        if self._networks:
            addresses = (ipaddress.ip_address(packet.src.ip), ipaddress.ip_address(packet.dst.ip))
            return any(a in n for n in self._networks for a in addresses
                       if a.version == n.version)
        return False


@dataclass(frozen=True)
class Injection:
    """A packet the censor forges: a whole IP packet, and which way it goes."""

    packet: bytes
    back: bool
    """True: back to the sender of the packet that caused it (out of the interface that
    packet came in on); False: onward, to that packet's receiver."""


@dataclass(frozen=True)
class Decision:
    """What to do with one packet: forward it or not, and packets to send besides."""

    forward: bool
    inject: tuple[Injection, ...] = ()


FlowKey = tuple[str, Endpoint, Endpoint]  # (transport, client, server)
ConnectionKey = tuple[str, tuple[str, int], tuple[str, int]]  # (transport, lower, higher end)


@dataclass
class _Inspecting:
    """A flow still under inspection: how many of its chunks the detectors have seen."""

    flow: Flow
    chunks_seen: int = 0


@dataclass
class _Decided:
    """A flow the detectors (or the block-sni rule) are done with."""

    blocked: bool
    sni_rule: str | None = None
    """The server name the block-sni rule blocked the flow for (None: a detector did)."""


@dataclass
class _Residual:
    until: float
    sni_rule: str | None = None
    """As :attr:`_Decided.sni_rule`: a residual block the rule's lifting ends."""


@dataclass
class _Connection:
    """What the rules need of one connection (TCP) or 5-tuple (UDP), decided or not."""

    transport: str
    client: Endpoint
    server: Endpoint
    next_seq: dict[Endpoint, int] = field(default_factory=dict)
    """Per sender, the sequence number after the last segment forwarded (SYN and FIN count
    one): what the other end expects next, so what a forged RST to it must carry."""
    carried: int = 0
    """Payload bytes forwarded, both directions: what the throttle counts."""
    reported: set[str] = field(default_factory=set)
    """Rules already reported for this connection (one event each)."""

    @property
    def key(self) -> str:
        return f"{self.transport} {self.client} -> {self.server}"


def _seq_after(a: int, b: int) -> bool:
    """True when sequence number ``a`` comes after ``b`` (modulo 2**32, RFC 793)."""
    return 0 < (a - b) % SEQ_MOD < SEQ_MOD // 2


def forge_tcp(src: Endpoint, dst: Endpoint, seq: int, ack: int, flags: int) -> bytes:
    """An IP packet with an empty TCP segment from ``src`` to ``dst``, checksums filled in."""
    segment = dpkt.tcp.TCP(sport=src.port, dport=dst.port, seq=seq % SEQ_MOD,
                           ack=ack % SEQ_MOD, flags=flags, win=0)
    if ":" in src.ip:
        ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src.ip),
                           dst=socket.inet_pton(socket.AF_INET6, dst.ip),
                           nxt=dpkt.ip.IP_PROTO_TCP, hlim=INJECTED_TTL, plen=TCP_HEADER,
                           data=segment)
        return bytes(ip6)
    ip4 = dpkt.ip.IP(src=socket.inet_aton(src.ip), dst=socket.inet_aton(dst.ip),
                     p=dpkt.ip.IP_PROTO_TCP, ttl=INJECTED_TTL, data=segment)
    return bytes(ip4)


@dataclass
class Censor:
    """Decides, packet by packet, what crosses. ``decide()`` is the whole interface
    (``packet()`` is its forward-or-drop half); ``set_rules()`` changes the rules."""

    block: tuple[str, ...] = DEFAULT_BLOCK
    residual: float | None = None
    """Residual blocking in seconds; None for each detector's published value."""
    blocklist: sni.BlockList | None = None
    probability: float = 1.0
    """Chance that a flagged flow is blocked (the GFW blocked 26.3% of fully encrypted
    connections); 1.0 makes tests deterministic."""
    seed: int | None = None
    rules: Rules = field(default_factory=Rules)
    events: list[CensorEvent | RuleEvent] = field(default_factory=list)
    stats: CensorStats = field(default_factory=CensorStats)

    def __post_init__(self) -> None:
        unknown = set(self.block) - BLOCKING.keys()
        if unknown:
            raise ValueError(f"cannot block on {sorted(unknown)}; choose from {sorted(BLOCKING)}")
        self._rng = random.Random(self.seed)
        # The throttle draws from its own generator, so that adding a throttle does not
        # change which flagged flows the probability draws block.
        self._throttle_rng = random.Random(self.seed)
        self._table = FlowTable()
        # Flows under inspection keep their bytes in the table; decided ones are forgotten
        # there and remembered here only as blocked or let through.
        self._inspecting: OrderedDict[int, _Inspecting] = OrderedDict()
        self._decided: OrderedDict[FlowKey, _Decided] = OrderedDict()
        self._blocked: dict[Triple, _Residual] = {}
        self._connections: OrderedDict[ConnectionKey, _Connection] = OrderedDict()
        self.set_rules(self.rules)

    # ------------------------------------------------------------------ rules
    def set_rules(self, rules: Rules) -> None:
        """Replace the rules, at once: what the old ones blocked by an SNI no longer listed (the
        flows and their residual triples) is let go, and the new ones apply from the next
        packet."""
        self.rules = rules
        self._ip_block = _AddressSet(rules.block_ips)
        self._ip_throttle = _AddressSet(rules.throttle_ips)
        self._sni_rule = sni.BlockList(rules.block_sni)
        def lifted(name: str | None) -> bool:
            return name is not None and self._sni_rule.match(name) is None

        self._blocked = {t: r for t, r in self._blocked.items() if not lifted(r.sni_rule)}
        for decided in self._decided.values():
            if lifted(decided.sni_rule):
                decided.blocked, decided.sni_rule = False, None

    def _ip_blocked(self, packet: Packet) -> bool:
        return self._ip_block.holds(packet)

    # ------------------------------------------------------------------ packets
    def packet(self, data: bytes, now: float) -> bool:
        """One IP packet crossing the censor at ``now``: True to forward it, False to drop."""
        return self.decide(data, now).forward

    def decide(self, data: bytes, now: float) -> Decision:
        """One IP packet crossing the censor at ``now``: forward it or not, and what to inject."""
        packet = decode_ip(now, data)
        if packet is None:
            return self._forward()
        if packet.proto not in ("tcp", "udp"):
            return self._drop() if self._ip_blocked(packet) else self._forward()
        connection = self._track(packet)
        if self._ip_blocked(packet):
            self._report(connection, RULE_BLOCK_IP, "drop", now)  # a blackhole, never a RST
            return self._drop()
        if self.rules.block_ports & {packet.src.port, packet.dst.port}:
            return self._block(packet, connection, RULE_BLOCK_PORT, now)
        after = self.rules.throttle_after
        if (after is not None and connection.carried >= after
                and (not self.rules.throttle_ips or self._ip_throttle.holds(packet))):
            self._report(connection, RULE_THROTTLE, f"drop {self.rules.throttle_drop:g}", now)
            if self._throttle_rng.random() < self.rules.throttle_drop:
                return self._drop()
        blocked_flow, drop = self._detect(packet, now)
        if blocked_flow and self.rules.inject_rst and packet.proto == "tcp":
            return self._reset(packet, connection)
        if drop:
            return self._drop()
        self._account(packet, connection)
        return self._forward()

    def _forward(self) -> Decision:
        self.stats.forwarded += 1
        return Decision(True)

    def _drop(self) -> Decision:
        self.stats.dropped += 1
        return Decision(False)

    def _block(self, packet: Packet, connection: _Connection, rule: str, now: float
               ) -> Decision:
        reset = self.rules.inject_rst and packet.proto == "tcp"
        self._report(connection, rule, "rst" if reset else "drop", now)
        return self._reset(packet, connection) if reset else self._drop()

    def _report(self, connection: _Connection, rule: str, action: str, now: float) -> None:
        if rule not in connection.reported:
            connection.reported.add(rule)
            self.events.append(RuleEvent(now, connection.key, rule, action))

    # ------------------------------------------------------------------ connections
    def _track(self, packet: Packet) -> _Connection:
        ends = sorted(((packet.src.ip, packet.src.port), (packet.dst.ip, packet.dst.port)))
        key: ConnectionKey = (packet.proto, ends[0], ends[1])
        syn_only = packet.tcp_flags & TCP_SYN and not packet.tcp_flags & TCP_ACK
        connection = self._connections.get(key)
        if connection is None or (syn_only and packet.src in connection.next_seq
                                  and connection.next_seq[packet.src] != (packet.seq + 1)
                                  % SEQ_MOD):
            # New, or a new connection reusing the ports (a SYN with another ISN).
            if packet.tcp_flags & TCP_SYN and packet.tcp_flags & TCP_ACK:
                client, server = packet.dst, packet.src
            elif syn_only or packet.src.port >= packet.dst.port:
                client, server = packet.src, packet.dst
            else:
                client, server = packet.dst, packet.src
            connection = self._connections[key] = _Connection(packet.proto, client, server)
            while len(self._connections) > MAX_FLOWS:
                self._connections.popitem(last=False)
        else:
            self._connections.move_to_end(key)
        return connection

    @staticmethod
    def _account(packet: Packet, connection: _Connection) -> None:
        """A packet crosses: what the rules count of it."""
        connection.carried += len(packet.payload)
        if packet.proto != "tcp" or packet.tcp_flags & TCP_RST:
            return
        end = (packet.seq + len(packet.payload) + (1 if packet.tcp_flags & TCP_SYN else 0)
               + (1 if packet.tcp_flags & TCP_FIN else 0)) % SEQ_MOD
        known = connection.next_seq.get(packet.src)
        if known is None or _seq_after(end, known):
            connection.next_seq[packet.src] = end

    def _reset(self, packet: Packet, connection: _Connection) -> Decision:
        """Drop a TCP packet of a blocked connection and forge the RSTs that end it.

        Linux (RFC 5961) takes an RST only when its sequence number is exactly the next byte
        it expects; one that is merely in the window earns a challenge ACK, which is itself a
        packet of the blocked connection and is answered here with an exact RST. In SYN-SENT
        it takes an RST+ACK that acknowledges its SYN.
        """
        self.stats.dropped += 1
        flags = packet.tcp_flags
        if flags & TCP_RST:
            return Decision(False)  # an RST is never answered
        sender, receiver = packet.src, packet.dst
        length = (len(packet.payload) + (1 if flags & TCP_SYN else 0)
                  + (1 if flags & TCP_FIN else 0))
        sender_end = (packet.seq + length) % SEQ_MOD
        rst_ack = TCP_RST | TCP_ACK
        injected: tuple[Injection, ...]
        if flags & TCP_SYN and not flags & TCP_ACK:
            # A new connection: refused as the GFW's port-443 RSTs of 20 Aug 2025 did.
            injected = (Injection(forge_tcp(receiver, sender, 0, sender_end, rst_ack), True),)
        else:
            # The sender expects what it acknowledged, or more if bytes forwarded to it are
            # still on the way (they are ahead of this RST on the same link).
            back_seqs = _distinct(connection.next_seq.get(receiver),
                                  packet.ack if flags & TCP_ACK else None)
            # The receiver expects the end of what was forwarded to it (this packet is not).
            onward_seqs = _distinct(connection.next_seq.get(sender), packet.seq)
            injected = tuple(
                [Injection(forge_tcp(receiver, sender, seq, sender_end, rst_ack), True)
                 for seq in back_seqs]
                + [Injection(forge_tcp(sender, receiver, seq, packet.ack,
                                       rst_ack if flags & TCP_ACK else TCP_RST), False)
                   for seq in onward_seqs])
        self.stats.injected += len(injected)
        return Decision(False, injected)

    # ------------------------------------------------------------------ detectors
    def _detect(self, packet: Packet, now: float) -> tuple[bool, bool]:
        """(the packet belongs to a blocked flow or triple, the detectors drop it)."""
        triple = Triple(packet.src.ip, packet.dst.ip, packet.dst.port)
        residual = self._blocked.get(triple)
        if residual is not None:
            if now < residual.until:
                return True, True
            del self._blocked[triple]
        new_connection = packet.tcp_flags & TCP_SYN and not packet.tcp_flags & TCP_ACK
        for key, from_client in (((packet.proto, packet.src, packet.dst), True),
                                 ((packet.proto, packet.dst, packet.src), False)):
            decided = self._decided.get(key)
            if decided is None:
                continue
            if new_connection and not decided.blocked:
                del self._decided[key]  # the ports are reused by a new connection
                break
            return decided.blocked, decided.blocked and from_client
        flow = self._table.add(packet)
        state = self._inspecting.get(id(flow))
        if state is None:
            state = self._inspecting[id(flow)] = _Inspecting(flow)
            self.stats.flows += 1
        if len(flow.chunks) > state.chunks_seen:
            state.chunks_seen = len(flow.chunks)
            decision = self._inspect(flow, now)
            if decision is not None:
                self._decide(flow, decision)
                if decision.blocked:
                    return True, packet.src == flow.client
        self._bound_memory()
        return False, False

    def _inspect(self, flow: Flow, now: float) -> _Decided | None:
        """How the flow is decided (blocked or let through for good), None to look again."""
        if self._sni_rule.names:
            verdict = sni.detect(flow, self._sni_rule)
            if verdict.flagged and "blocked-sni" in verdict.labels:
                residual = self.residual if self.residual is not None else SNI_RULE_RESIDUAL
                self.events.append(CensorEvent(now, flow.key, RULE_BLOCK_SNI, verdict.evidence,
                                               True, now + residual))
                self.stats.flagged += 1
                self._blocked[Triple(flow.client.ip, flow.server.ip, flow.server.port)] = \
                    _Residual(now + residual, sni_rule=verdict.details["sni"])
                return _Decided(True, sni_rule=verdict.details["sni"])
        for name in self.block:
            judge, default_residual = BLOCKING[name]
            verdict = judge(flow, self.blocklist)
            if not verdict.flagged:
                continue
            blocked = self._rng.random() < self.probability
            residual = self.residual if self.residual is not None else default_residual
            until = now + residual if blocked else now
            self.events.append(CensorEvent(now, flow.key, name, verdict.evidence, blocked,
                                           until))
            self.stats.flagged += 1
            if blocked:
                self._blocked[Triple(flow.client.ip, flow.server.ip, flow.server.port)] = \
                    _Residual(until)
            return _Decided(blocked)
        if (flow.bytes_total[Direction.CLIENT] > INSPECT_CLIENT_BYTES
                or len(flow.chunks) >= INSPECT_CHUNKS):
            return _Decided(False)  # seen enough: let it through for good
        return None

    def _decide(self, flow: Flow, decided: _Decided) -> None:
        self._inspecting.pop(id(flow), None)
        self._table.forget(flow)
        self._decided[(flow.transport, flow.client, flow.server)] = decided
        while len(self._decided) > MAX_FLOWS:
            self._decided.popitem(last=False)

    def _bound_memory(self) -> None:
        # Flows that went quiet while under inspection are let go, oldest first.
        while len(self._inspecting) > MAX_FLOWS:
            _, stale = self._inspecting.popitem(last=False)
            self._table.forget(stale.flow)


def _distinct(*values: int | None) -> list[int]:
    """The known values, each once, in order."""
    return list(dict.fromkeys(v for v in values if v is not None))
