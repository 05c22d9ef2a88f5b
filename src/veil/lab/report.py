"""The lab's report: a table per detector (flows seen, judged, flagged, evidence)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.errors import ConfigError
from veil.lab import probe
from veil.lab.passive import FlowReport, analyse_pcap, detectors
from veil.lab.sni import BlockList
from veil.lab.verdict import Verdict

EVIDENCE_LINES = 3  # evidence lines shown per flagged flow in the text table


@dataclass
class DetectorRow:
    name: str
    source: str
    seen: int = 0
    judged: int = 0
    flagged: list[tuple[str, Verdict]] = field(default_factory=list)
    passed: list[tuple[str, Verdict]] = field(default_factory=list)


def load_inputs(paths: list[str], blocklist: BlockList | None = None
                ) -> tuple[list[FlowReport], list[dict[str, Any]]]:
    """Flow reports and probe reports from captures and from the JSON the lab writes."""
    flows: list[FlowReport] = []
    probes: list[dict[str, Any]] = []
    for path in paths:
        if path.endswith(".json"):
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {path}: {exc}") from exc
            items = data if isinstance(data, list) else [data]
            for item in items:
                if "verdicts" in item:
                    flows.append(FlowReport.from_json(item))
                elif "probes" in item:
                    probes.append(item)
                else:
                    raise ConfigError(f"{path}: neither `lab passive --json` nor "
                                      "`lab probe --json` output")
        else:
            flows += analyse_pcap(path, blocklist)
    return flows, probes


def build_rows(flows: list[FlowReport], probes: list[dict[str, Any]]) -> list[DetectorRow]:
    rows = {d.name: DetectorRow(d.name, d.source) for d in detectors()}
    for report in flows:
        where = report.flow["flow"]
        if report.flow.get("capture"):
            where += f"  [{Path(str(report.flow['capture'])).name}]"
        for v in report.verdicts:
            row = rows.setdefault(v.detector, DetectorRow(v.detector, ""))
            row.seen += 1
            if v.applicable:
                row.judged += 1
                (row.flagged if v.flagged else row.passed).append((where, v))
    probe_row = DetectorRow(probe.NAME, probe.SOURCE)
    for item in probes:
        v = Verdict.from_json(item["verdict"])
        target = item["target"] + (f" vs {item['reference']}" if item.get("reference") else "")
        probe_row.seen += 1
        probe_row.judged += 1
        (probe_row.flagged if v.flagged else probe_row.passed).append((target, v))
        if item.get("certificate"):
            cert = Verdict.from_json(item["certificate"])
            row = rows["certificate"]
            row.seen += 1
            row.judged += 1
            (row.flagged if cert.flagged else row.passed).append((f"{target} (probed)", cert))
    return [*rows.values(), probe_row]


def format_text(rows: list[DetectorRow]) -> str:
    lines = [f"{'detector':<26} {'seen':>6} {'judged':>7} {'flagged':>8}"]
    lines += [f"{r.name:<26} {r.seen:>6} {r.judged:>7} {len(r.flagged):>8}" for r in rows]
    for r in rows:
        lines.append("")
        lines.append(f"== {r.name}: {r.seen} seen, {r.judged} judged, {len(r.flagged)} flagged"
                     + (f"   [{r.source}]" if r.source else ""))
        for what, v in r.flagged:
            lines.append(f"  FLAG {what}")
            lines.extend(f"         {e}" for e in v.evidence[:EVIDENCE_LINES])
        for what, v in r.passed:
            lines.append(f"  pass {what}: {v.evidence[0] if v.evidence else ''}")
    return "\n".join(lines)


def format_html(rows: list[DetectorRow]) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>veil lab report</title>",
             "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:"
             "left;vertical-align:top}.flag{color:#b00;font-weight:bold}.pass{color:#080}"
             "small{color:#666}</style>",
             "<h1>veil lab report</h1><table><tr><th>detector</th><th>seen</th>"
             "<th>judged</th><th>flagged</th></tr>"]
    for r in rows:
        cls = "flag" if r.flagged else "pass"
        parts.append(f"<tr><td><a href='#{e(r.name)}'>{e(r.name)}</a></td><td>{r.seen}</td>"
                     f"<td>{r.judged}</td><td class='{cls}'>{len(r.flagged)}</td></tr>")
    parts.append("</table>")
    for r in rows:
        parts.append(f"<h2 id='{e(r.name)}'>{e(r.name)}</h2><p><small>{e(r.source)}</small></p>"
                     "<table><tr><th>verdict</th><th>flow</th><th>evidence</th></tr>")
        for label, items in (("flagged", r.flagged), ("passes", r.passed)):
            cls = "flag" if label == "flagged" else "pass"
            for what, v in items:
                evidence = "<br>".join(e(x) for x in v.evidence)
                parts.append(f"<tr><td class='{cls}'>{label}</td><td>{e(what)}</td>"
                             f"<td>{evidence}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"
