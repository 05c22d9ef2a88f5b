"""Run every passive detector on every flow of a capture."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.lab import certs, fet, fingerprint, idle, signatures, sni, tlsintls
from veil.lab.flow import Flow, FlowTable
from veil.lab.pcap import read_packets
from veil.lab.verdict import Verdict


@dataclass(frozen=True)
class Detector:
    name: str
    source: str
    detect: Callable[[Flow], Verdict]


@dataclass(frozen=True)
class IdleOptions:
    """What the idle detector is told about the server and the clock (see :mod:`idle`)."""

    keepalive_timeout: float = idle.NGINX_KEEPALIVE_TIMEOUT
    """The keepalive_timeout of the nginx the server passes for (nginx's default, 75 s)."""
    moment_gap: float = idle.MOMENT_GAP
    """Records closer than this are one moment (a ping and its answer): over a round trip."""


def detectors(blocklist: sni.BlockList | None = None, idle_options: IdleOptions | None = None,
              until: float | None = None) -> list[Detector]:
    """The passive detectors, in report order. ``until`` is when the capture ended: a flow
    still open then was open (and idle, if nothing came) until that moment."""
    options = idle_options or IdleOptions()

    def idle_detect(flow: Flow) -> Verdict:
        return idle.detect(flow, until=until, keepalive_timeout=options.keepalive_timeout,
                           moment_gap=options.moment_gap)

    return [
        Detector(fet.NAME, fet.SOURCE, fet.detect),
        Detector(signatures.NAME, signatures.SOURCE, signatures.detect),
        Detector(fingerprint.NAME, fingerprint.SOURCE, fingerprint.detect),
        Detector(sni.NAME, sni.SOURCE, lambda flow: sni.detect(flow, blocklist)),
        Detector(certs.NAME, certs.SOURCE, certs.detect),
        Detector(tlsintls.NAME, tlsintls.SOURCE, tlsintls.detect),
        Detector(idle.NAME, idle.SOURCE, idle_detect),
    ]


@dataclass(frozen=True)
class FlowReport:
    """One flow and what each detector said about it."""

    flow: dict[str, Any]
    verdicts: tuple[Verdict, ...]

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.flagged]

    def verdict(self, detector: str) -> Verdict:
        for v in self.verdicts:
            if v.detector == detector:
                return v
        raise KeyError(detector)

    def to_json(self) -> dict[str, Any]:
        return {**self.flow, "flagged": [v.detector for v in self.flagged],
                "verdicts": [v.to_json() for v in self.verdicts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FlowReport:
        flow = {k: v for k, v in data.items() if k not in ("verdicts", "flagged")}
        return cls(flow, tuple(Verdict.from_json(v) for v in data["verdicts"]))


def has_data(flow: Flow) -> bool:
    return any(chunk.data for chunk in flow.chunks)


def analyse(flows: Iterable[Flow], blocklist: sni.BlockList | None = None,
            capture: str | None = None, *, idle_options: IdleOptions | None = None,
            until: float | None = None) -> list[FlowReport]:
    """Every flow that carried data, judged by every detector (``until``: the capture's
    end, see :func:`detectors`)."""
    active = detectors(blocklist, idle_options, until)
    extra = {"capture": capture} if capture else {}
    return [FlowReport({**flow.summary(), **extra}, tuple(d.detect(flow) for d in active))
            for flow in flows if has_data(flow)]


def analyse_pcap(path: str | Path, blocklist: sni.BlockList | None = None,
                 idle_options: IdleOptions | None = None) -> list[FlowReport]:
    """Every flow of the capture at ``path``, judged by every detector; the capture ended at
    its last packet (an ACK counts: the connection was seen alive then)."""
    table = FlowTable()
    until: float | None = None
    for packet in read_packets(path):
        table.add(packet)
        until = packet.time if until is None else max(until, packet.time)
    return analyse(table.flows, blocklist, capture=str(path), idle_options=idle_options,
                   until=until)


def format_text(reports: list[FlowReport], verbose: bool = False) -> str:
    """Each flow, its flagged verdicts with their evidence, and (verbose) the passes too."""
    lines = []
    for report in reports:
        f = report.flow
        flagged = report.flagged
        status = "FLAGGED by " + ", ".join(v.detector for v in flagged) if flagged else "passes"
        lines.append(f"{f['flow']}  ({f['client_bytes']} B up, {f['server_bytes']} B down, "
                     f"{f['close']}): {status}")
        for v in report.verdicts:
            if not (v.flagged or verbose):
                continue
            mark = "FLAG" if v.flagged else ("pass" if v.applicable else " n/a")
            lines.append(f"    {mark} {v.detector}")
            lines.extend(f"           - {e}" for e in v.evidence)
    if not reports:
        lines.append("no flow with data in the capture")
    return "\n".join(lines)
