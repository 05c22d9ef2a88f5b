"""Run every passive detector on every flow of a capture."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.lab import certs, fet, fingerprint, signatures, sni, tlsintls
from veil.lab.flow import Flow
from veil.lab.pcap import read_flows
from veil.lab.verdict import Verdict


@dataclass(frozen=True)
class Detector:
    name: str
    source: str
    detect: Callable[[Flow], Verdict]


def detectors(blocklist: sni.BlockList | None = None) -> list[Detector]:
    """The passive detectors, in report order."""
    return [
        Detector(fet.NAME, fet.SOURCE, fet.detect),
        Detector(signatures.NAME, signatures.SOURCE, signatures.detect),
        Detector(fingerprint.NAME, fingerprint.SOURCE, fingerprint.detect),
        Detector(sni.NAME, sni.SOURCE, lambda flow: sni.detect(flow, blocklist)),
        Detector(certs.NAME, certs.SOURCE, certs.detect),
        Detector(tlsintls.NAME, tlsintls.SOURCE, tlsintls.detect),
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
            capture: str | None = None) -> list[FlowReport]:
    """Every flow that carried data, judged by every detector."""
    active = detectors(blocklist)
    extra = {"capture": capture} if capture else {}
    return [FlowReport({**flow.summary(), **extra}, tuple(d.detect(flow) for d in active))
            for flow in flows if has_data(flow)]


def analyse_pcap(path: str | Path, blocklist: sni.BlockList | None = None) -> list[FlowReport]:
    """Every flow of the capture at ``path``, judged by every detector."""
    return analyse(read_flows(path), blocklist, capture=str(path))


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
