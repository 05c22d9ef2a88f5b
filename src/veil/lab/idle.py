"""Idle heartbeat / immortal idle connection: a connection's whole life, not its first bytes.

A browser's connection to nginx goes quiet when its requests are done, and nginx closes it
after ``keepalive_timeout`` (75 s by default, for HTTP/1.1 and, since nginx 1.19.7, HTTP/2
too). A tunnel's connection does not: its client and server keep it alive with small records
at a fixed period (a 15 s PING, a 30 s heartbeat), for hours. Two tells, from timestamps and
TLS record sizes alone:

* **heartbeat**: at least ``MIN_BEATS`` quiet moments in a row — moments opened by small
  records only (a ping; its answer may be padded) — at a near-fixed period (the gaps
  between them vary by less than ``MAX_PERIOD_VARIATION`` of their mean);
* **immortal**: a stretch longer than nginx's keepalive_timeout (plus ``TIMEOUT_SLACK``) with
  only quiet moments, while the connection stayed open (it went on afterwards,
  or was still open when the capture ended, ``until``).
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

from veil.lab.flow import Flow
from veil.lab.tls import APPLICATION_DATA, flow_records
from veil.lab.verdict import Verdict

NAME = "idle-heartbeat"
SOURCE = ("nginx keepalive_timeout (ngx_http_core_module; HTTP/2 since 1.19.7); heartbeat "
          "periodicity as in Wails et al., 'Website fingerprinting' timing features")

#: nginx's keepalive_timeout, its default: what a browser's idle connection to nginx lives.
NGINX_KEEPALIVE_TIMEOUT = 75.0
#: A TLS record body this small carries no request: an HTTP/2 PING or its ACK (34 bytes of
#: ciphertext with TLS 1.3 and AES-GCM), a SETTINGS ACK (26), a WINDOW_UPDATE (30), a GOAWAY
#: (34), a close_notify (19), veil's PING (33). A request's HEADERS can be smaller than one
#: would think: Chromium's repeat load of a page, on a connection whose HPACK table already
#: holds its headers, is a 48-byte record (measured in tests/lab/test_lifecycle.py).
SMALL_RECORD = 40
#: Records closer together than this belong to one moment (a PING and its PONG).
MOMENT_GAP = 1.0
#: Quiet moments in a row, at a fixed period, before they count as a heartbeat: three gaps.
MIN_BEATS = 4
#: Gaps that vary by less than this share of their mean are a period (timer jitter and the
#: network's make a few per cent; a human's clicks make tens).
MAX_PERIOD_VARIATION = 0.1
#: How far past keepalive_timeout nginx's own close comes (its timer, the last ACK).
TIMEOUT_SLACK = 2.0


@dataclass(frozen=True)
class Moment:
    start: float
    quiet: bool
    """The side that spoke first sent only small records: a ping, whatever the answer's
    size (a padded PONG is still an answer to a ping)."""


def moments(flow: Flow, gap: float = MOMENT_GAP) -> list[Moment]:
    """The flow's application-data records grouped into moments (see MOMENT_GAP)."""
    found: list[Moment] = []
    opener = None
    last = float("-inf")
    for record in flow_records(flow):
        if record.content_type != APPLICATION_DATA:
            continue
        small = record.length <= SMALL_RECORD
        if found and record.time - last < gap:
            if record.direction is opener:
                found[-1] = Moment(found[-1].start, found[-1].quiet and small)
        else:
            opener = record.direction
            found.append(Moment(record.time, small))
        last = record.time
    return found


def _heartbeat(found: list[Moment]) -> tuple[float, int] | None:
    """(period, beats) of the longest run of quiet moments at a near-fixed period."""
    best: tuple[float, int] | None = None
    run: list[float] = []
    for moment in [*found, Moment(float("inf"), False)]:
        if moment.quiet:
            candidate = [*run, moment.start]
            gaps = [b - a for a, b in itertools.pairwise(candidate)]
            if len(gaps) >= 2 and (statistics.pstdev(gaps)
                                   > MAX_PERIOD_VARIATION * statistics.fmean(gaps)):
                run = candidate[-2:]  # the period changed: a new run starts at the last gap
            else:
                run = candidate
            continue
        if len(run) >= MIN_BEATS:
            gaps = [b - a for a, b in itertools.pairwise(run)]
            if best is None or len(run) > best[1]:
                best = (statistics.fmean(gaps), len(run))
        run = []
    return best


def detect(flow: Flow, *, until: float | None = None,
           keepalive_timeout: float = NGINX_KEEPALIVE_TIMEOUT,
           moment_gap: float = MOMENT_GAP) -> Verdict:
    """Judge ``flow``; ``until`` is when the capture ended (an open flow was idle until
    then), ``keepalive_timeout`` the server's (nginx's default unless the lab knows better);
    a lab that scales time down scales ``moment_gap`` with it."""
    found = moments(flow, moment_gap)
    if not found:
        return Verdict.not_applicable(NAME, "no TLS application data")
    evidence: list[str] = []
    labels: list[str] = []
    beat = _heartbeat(found)
    if beat is not None:
        period, beats = beat
        evidence.append(f"{beats} small-record moments every {period:.1f} s while idle")
        labels.append("heartbeat")
    # The longest quiet stretch: from a moment that carried something to the next one that
    # did, or to the end (the capture's end while open, else the last record, the close).
    end = until if flow.close == "open" and until is not None else found[-1].start
    busy = [m.start for m in found if not m.quiet] or [found[0].start]
    edges = [*busy, end]
    idle = max(b - a for a, b in itertools.pairwise(edges)) if len(edges) > 1 else 0.0
    if idle > keepalive_timeout + TIMEOUT_SLACK:
        evidence.append(f"open and idle for {idle:.1f} s, past nginx's keepalive_timeout of "
                        f"{keepalive_timeout:g} s")
        labels.append("immortal")
    flagged = bool(labels)
    if not flagged:
        evidence.append(f"no heartbeat; longest idle stretch {idle:.1f} s "
                        f"(keepalive_timeout {keepalive_timeout:g} s)")
    return Verdict(NAME, flagged, tuple(evidence), tuple(labels),
                   details={"longest_idle_s": round(idle, 3),
                            "heartbeat_period_s": round(beat[0], 3) if beat else None,
                            "heartbeats": beat[1] if beat else 0,
                            "moments": len(found), "close": flow.close})
