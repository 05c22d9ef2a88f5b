"""The lab's report: a table per detector (flows seen, judged, flagged, evidence), and each
pair of installs compared (``veil lab installs``) side by side."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.errors import ConfigError
from veil.lab import probe, sameinstall
from veil.lab.passive import FlowReport, IdleOptions, analyse_pcap, detectors
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


@dataclass(frozen=True)
class InstallsResult:
    """``veil lab installs A B``: the two targets and the same-install verdict."""

    a: str
    b: str
    verdict: Verdict

    @property
    def label(self) -> str:
        return f"{self.a} vs {self.b}"

    def to_json(self) -> dict[str, Any]:
        return {"installs": [self.a, self.b], "verdict": self.verdict.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstallsResult:
        a, b = data["installs"]
        return cls(str(a), str(b), Verdict.from_json(data["verdict"]))


@dataclass
class Inputs:
    flows: list[FlowReport] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    installs: list[InstallsResult] = field(default_factory=list)


def load_inputs(paths: list[str], blocklist: BlockList | None = None,
                idle_options: IdleOptions | None = None) -> Inputs:
    """Flow reports, probe reports and install comparisons from captures and from the JSON
    the lab writes."""
    inputs = Inputs()
    for path in paths:
        if path.endswith(".json"):
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {path}: {exc}") from exc
            items = data if isinstance(data, list) else [data]
            for item in items:
                if "verdicts" in item:
                    inputs.flows.append(FlowReport.from_json(item))
                elif "probes" in item:
                    inputs.probes.append(item)
                elif "installs" in item:
                    inputs.installs.append(InstallsResult.from_json(item))
                else:
                    raise ConfigError(f"{path}: not `lab passive --json`, `lab probe --json` "
                                      "or `lab installs --json` output")
        else:
            inputs.flows += analyse_pcap(path, blocklist, idle_options)
    return inputs


def build_rows(flows: list[FlowReport], probes: list[dict[str, Any]],
               installs: list[InstallsResult] | None = None) -> list[DetectorRow]:
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
    installs_row = DetectorRow(sameinstall.NAME, sameinstall.SOURCE)
    for pair in installs or []:
        installs_row.seen += 1
        installs_row.judged += 1
        (installs_row.flagged if pair.verdict.flagged else installs_row.passed).append(
            (pair.label, pair.verdict))
    return [*rows.values(), probe_row, installs_row]


STATUS_MARK = {"shared": "SHARED", "same": "same", "differs": ""}
ITEM_COLUMN = 40  # at most this many characters of an item's name in the text table
SIDE_COLUMN = 34  # at most this many characters of each install's value


def format_installs_text(result: InstallsResult) -> str:
    """Two installs side by side: a row per item a scanner compares, the shared ones
    marked SHARED (a tell), the ones equal but common to unrelated nginx sites 'same'."""
    v = result.verdict
    rows = sameinstall.side_by_side(v.details)
    item_width = min(ITEM_COLUMN, max([len(r.item) for r in rows], default=0))
    value_width = min(SIDE_COLUMN, max([len(x) for r in rows for x in (r.a, r.b)]
                                       + [len(result.a), len(result.b)]))

    def line(item: str, a: str, b: str, mark: str) -> str:
        # An item keeps its end (the field), a value its start.
        shown = item if len(item) <= item_width else "~" + item[len(item) - item_width + 1:]
        return (f"{shown:<{item_width}}  {_cut(a, value_width):<{value_width}}"
                f"  {_cut(b, value_width):<{value_width}}  {mark}").rstrip()

    lines = [line("", result.a, result.b, "")]
    lines += [line(r.item, r.a, r.b, STATUS_MARK[r.status]) for r in rows]
    status = "FLAGGED: they share what unrelated sites would not" if v.flagged else "passes"
    lines += ["", f"verdict: {status}"]
    lines += [f"  - {e}" for e in v.evidence]
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def format_text(rows: list[DetectorRow], installs: list[InstallsResult] | None = None) -> str:
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
    for pair in installs or []:
        lines += ["", f"== installs side by side: {pair.label}", format_installs_text(pair)]
    return "\n".join(lines)


def format_html(rows: list[DetectorRow], installs: list[InstallsResult] | None = None) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>veil lab report</title>",
             "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:"
             "left;vertical-align:top}.flag{color:#b00;font-weight:bold}.pass{color:#080}"
             "small{color:#666}tr.same{color:#666}</style>",
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
    for n, pair in enumerate(installs or [], 1):
        parts.append(_installs_html(pair, f"installs-{n}"))
    return "\n".join(parts) + "\n"


def _installs_html(pair: InstallsResult, anchor: str) -> str:
    e = html.escape
    v = pair.verdict
    verdict = ("<span class='flag'>flagged</span>: they share what unrelated sites would not"
               if v.flagged else "<span class='pass'>passes</span>")
    parts = [f"<h2 id='{anchor}'>installs side by side: {e(pair.label)}</h2>",
             f"<p>{verdict}</p><table><tr><th>item</th><th>{e(pair.a)}</th>"
             f"<th>{e(pair.b)}</th><th></th></tr>"]
    for row in sameinstall.side_by_side(v.details):
        cls = {"shared": " class='flag'", "same": " class='same'"}.get(row.status, "")
        parts.append(f"<tr{cls}><td>{e(row.item)}</td><td>{e(row.a)}</td><td>{e(row.b)}</td>"
                     f"<td>{e(STATUS_MARK[row.status])}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)
