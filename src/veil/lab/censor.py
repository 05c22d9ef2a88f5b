"""An in-path censor, sans-IO: IP packets in, forward-or-drop decisions and events out.

It does what THREATS.md section 6 says the GFW does, with the lab's own detectors: it
inspects the first packets of every flow, and when a blocking detector flags one it drops
the flow's client-to-server packets (no RST: the GFW's fully-encrypted blocking is silent,
Wu et al. 2023 section 4) and keeps dropping everything from that client to that server
port (the "triple") for a residual period (180 s for fully encrypted traffic, 90 s for SNI,
Wu et al. 2023 and Rambert et al. 2021). Server-to-client packets pass, as on the GFW.

The byte-level I/O (an AF_PACKET bridge between two veths) is :mod:`veil.lab.bridge`;
everything here takes bytes and a clock value, so it is tested without a network.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from veil.lab import fet, fingerprint, signatures, sni, tlsintls
from veil.lab.flow import TCP_ACK, TCP_SYN, Direction, Endpoint, Flow, FlowTable
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
MAX_FLOWS = 8192


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


@dataclass
class CensorStats:
    forwarded: int = 0
    dropped: int = 0
    flagged: int = 0
    flows: int = 0


FlowKey = tuple[str, Endpoint, Endpoint]  # (transport, client, server)


@dataclass
class _Inspecting:
    """A flow still under inspection: how many of its chunks the detectors have seen."""

    flow: Flow
    chunks_seen: int = 0


@dataclass
class Censor:
    """Decides, packet by packet, what crosses. ``packet()`` is the whole interface."""

    block: tuple[str, ...] = DEFAULT_BLOCK
    residual: float | None = None
    """Residual blocking in seconds; None for each detector's published value."""
    blocklist: sni.BlockList | None = None
    probability: float = 1.0
    """Chance that a flagged flow is blocked (the GFW blocked 26.3% of fully encrypted
    connections); 1.0 makes tests deterministic."""
    seed: int | None = None
    events: list[CensorEvent] = field(default_factory=list)
    stats: CensorStats = field(default_factory=CensorStats)

    def __post_init__(self) -> None:
        unknown = set(self.block) - BLOCKING.keys()
        if unknown:
            raise ValueError(f"cannot block on {sorted(unknown)}; choose from {sorted(BLOCKING)}")
        self._rng = random.Random(self.seed)
        self._table = FlowTable()
        # Flows under inspection keep their bytes in the table; decided ones are forgotten
        # there and remembered here only as blocked (True) or let through (False).
        self._inspecting: OrderedDict[int, _Inspecting] = OrderedDict()
        self._decided: OrderedDict[FlowKey, bool] = OrderedDict()
        self._blocked: dict[Triple, float] = {}

    def packet(self, data: bytes, now: float) -> bool:
        """One IP packet crossing the censor at ``now``: True to forward it, False to drop."""
        packet = decode_ip(now, data)
        if packet is None or packet.proto not in ("tcp", "udp"):
            return self._forward()
        triple = Triple(packet.src.ip, packet.dst.ip, packet.dst.port)
        until = self._blocked.get(triple)
        if until is not None:
            if now < until:
                return self._drop()
            del self._blocked[triple]
        new_connection = packet.tcp_flags & TCP_SYN and not packet.tcp_flags & TCP_ACK
        for key, from_client in (((packet.proto, packet.src, packet.dst), True),
                                 ((packet.proto, packet.dst, packet.src), False)):
            blocked = self._decided.get(key)
            if blocked is None:
                continue
            if new_connection and not blocked:
                del self._decided[key]  # the ports are reused by a new connection
                break
            return self._drop() if blocked and from_client else self._forward()
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
                if decision and packet.src == flow.client:
                    return self._drop()
        self._bound_memory()
        return self._forward()

    def _forward(self) -> bool:
        self.stats.forwarded += 1
        return True

    def _drop(self) -> bool:
        self.stats.dropped += 1
        return False

    def _inspect(self, flow: Flow, now: float) -> bool | None:
        """True to block the flow, False to let it through for good, None to look again."""
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
                self._blocked[Triple(flow.client.ip, flow.server.ip, flow.server.port)] = until
            return blocked
        if (flow.bytes_total[Direction.CLIENT] > INSPECT_CLIENT_BYTES
                or len(flow.chunks) >= INSPECT_CHUNKS):
            return False  # seen enough: let it through for good
        return None

    def _decide(self, flow: Flow, blocked: bool) -> None:
        self._inspecting.pop(id(flow), None)
        self._table.forget(flow)
        self._decided[(flow.transport, flow.client, flow.server)] = blocked
        while len(self._decided) > MAX_FLOWS:
            self._decided.popitem(last=False)

    def _bound_memory(self) -> None:
        # Flows that went quiet while under inspection are let go, oldest first.
        while len(self._inspecting) > MAX_FLOWS:
            _, stale = self._inspecting.popitem(last=False)
            self._table.forget(stale.flow)
