"""A connection's whole life as a censor sees it, and how two lives differ.

The first bytes of a connection are only its beginning: a censor that keeps watching sees
when it goes quiet, what crosses it while quiet, who ends it, when, and with which records.
A browser's connection to nginx has a plain life, measured in the lab (Chromium 156 and nginx
1.22.1 with ``http2``, tests/lab/test_lifecycle.py):

* every moment of activity is opened by the client (a request and its answer); the server
  speaks first only to close;
* nothing crosses while the connection is idle: no PING either way (by Chromium's source it
  pings only before reusing a session idle for more than 10 s, with the request itself; the
  lab's scaled script never idles that long before a reuse);
* nginx closes it ``keepalive_timeout`` after its last write: a GOAWAY record (34 bytes of
  ciphertext with TLS 1.3 and AES-GCM), a close_notify (19), its FIN; Chromium answers with
  its FIN alone, no close_notify;
* a connection opens only when a page is loaded.

:func:`summarize` turns one flow into a :class:`Lifecycle`; :func:`differences` lists where a
candidate's life departs from a reference's (a browser's with nginx, recorded on the same
script). Only TLS record sizes, directions and times are used, and the FINs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from veil.lab.flow import Direction, Flow
from veil.lab.idle import SMALL_RECORD
from veil.lab.tls import flow_records

NAME = "connection-lifecycle"
SOURCE = ("nginx keepalive_timeout and ngx_http_v2 GOAWAY on idle close; Chromium "
          "SpdySession (no idle PING; PING before reuse after 10 s)")

#: Records closer together than this belong to one moment (a request and its answer, a PING
#: and its ACK); the lab scales it with its round trip.
MOMENT_GAP = 1.0
#: How far two close times (after the last activity) may differ and still be one behaviour:
#: nginx's timer fires on its own schedule, and the lab's loop on two shared cores is late.
CLOSE_TIME_TOLERANCE = 1.0
#: A moment the server opens within this long of the client's last record is that record's
#: answer, come late (a slow backend; a server on a loaded machine): websites answer late
#: too. Past it the server spoke first: a held close that crossed, a heartbeat, a push. Far
#: below any keepalive timeout (nginx: 75 s), which is when a site's own close comes.
ANSWER_WINDOW = 5.0


@dataclass(frozen=True)
class Moment:
    start: float
    end: float
    opener: Direction
    records: tuple[tuple[Direction, int], ...]
    """Every record of the moment: its direction and ciphertext length, in order."""

    @property
    def quiet(self) -> bool:
        """The side that spoke first sent only small records: a ping, whatever the answer's
        size (a padded answer to a ping is still an answer to a ping)."""
        return all(length <= SMALL_RECORD for direction, length in self.records
                   if direction is self.opener)


@dataclass(frozen=True)
class Lifecycle:
    """One connection's life: enough to compare it with another's."""

    opened: float
    moments: tuple[Moment, ...]
    closer: Direction | None
    """Whose FIN came first; None: the connection was still open when the capture ended."""
    closed_at: float | None
    closing: tuple[tuple[Direction, int], ...]
    """The records of the moment that ended the connection, the one its first FIN came in
    (nginx's GOAWAY and close_notify)."""
    last_busy: float
    """When the last moment that carried something (not quiet) ended."""
    idle_moments: int
    """Quiet moments other than the closing one: pings, and anything else sent while idle."""
    server_first: int
    """Moments the server opened, other than its close: a website answers, it never starts."""

    @property
    def close_after_idle(self) -> float | None:
        return None if self.closed_at is None else self.closed_at - self.last_busy

    def describe(self) -> str:
        closing = " ".join(f"{d.value}:{n}" for d, n in self.closing) or "-"
        if self.closer is None:
            end = "still open"
        else:
            end = (f"closed by the {'server' if self.closer is Direction.SERVER else 'client'}"
                   f" {self.close_after_idle:.2f} s after the last activity")
        return (f"{len(self.moments)} moments, {self.idle_moments} while idle, "
                f"{self.server_first} opened by the server; {end}; closing records {closing}")


def _moments(flow: Flow, gap: float) -> list[Moment]:
    found: list[Moment] = []
    current: list[tuple[Direction, int]] = []
    start = end = 0.0
    for record in flow_records(flow):
        if current and record.time - end >= gap:
            found.append(Moment(start, end, current[0][0], tuple(current)))
            current = []
        if not current:
            start = record.time
        current.append((record.direction, record.length))
        end = record.time
    if current:
        found.append(Moment(start, end, current[0][0], tuple(current)))
    return found


def summarize(flow: Flow, *, moment_gap: float = MOMENT_GAP,
              answer_window: float = ANSWER_WINDOW) -> Lifecycle:
    """The life of one TCP connection as a capture (or the lab's relay) recorded it."""
    found = _moments(flow, moment_gap)
    client_times = [r.time for r in flow_records(flow) if r.direction is Direction.CLIENT]
    closer = min(flow.ends, key=flow.ends.__getitem__) if flow.ends else None
    closed_at = flow.ends[closer] if closer is not None else None
    closing_moment = None
    if closed_at is not None and found and found[-1].end >= closed_at - moment_gap:
        closing_moment = found[-1]
    living = found[:-1] if closing_moment is not None else found
    busy = [m for m in living if not m.quiet]
    return Lifecycle(
        opened=flow.start, moments=tuple(found), closer=closer, closed_at=closed_at,
        closing=closing_moment.records if closing_moment is not None else (),
        last_busy=busy[-1].end if busy else flow.start,
        idle_moments=sum(1 for m in living if m.quiet),
        server_first=sum(1 for m in living[1:] if m.opener is Direction.SERVER
                         and not _answers(m, client_times, answer_window)))


def _answers(moment: Moment, client_times: list[float], window: float) -> bool:
    """Whether ``moment`` (opened by the server) comes within ``window`` of the client's
    last record before it: a late answer, not the server speaking first."""
    before = bisect.bisect_right(client_times, moment.start)
    return before > 0 and moment.start - client_times[before - 1] < window


@dataclass(frozen=True)
class Difference:
    label: str
    detail: str

    def __str__(self) -> str:
        return f"{self.label}: {self.detail}"


def differences(reference: Lifecycle, candidate: Lifecycle, *,
                close_tolerance: float = CLOSE_TIME_TOLERANCE) -> list[Difference]:
    """Where ``candidate``'s life departs from ``reference``'s (both on the same script)."""
    found: list[Difference] = []

    def who(direction: Direction | None) -> str:
        return {None: "nobody (still open)", Direction.SERVER: "the server",
                Direction.CLIENT: "the client"}[direction]

    if candidate.closer is not reference.closer:
        found.append(Difference("closer", f"closed by {who(candidate.closer)}, "
                                          f"not {who(reference.closer)}"))
    ours, theirs = candidate.close_after_idle, reference.close_after_idle
    if ours is not None and theirs is not None and abs(ours - theirs) > close_tolerance:
        found.append(Difference("close-time", f"closed {ours:.2f} s after the last activity, "
                                              f"not {theirs:.2f} s"))
    if candidate.closer is not None and candidate.closing != reference.closing:
        def show(records: tuple[tuple[Direction, int], ...]) -> str:
            return " ".join(f"{d.value}:{n}" for d, n in records) or "none"
        found.append(Difference("closing-records", f"{show(candidate.closing)}, "
                                                   f"not {show(reference.closing)}"))
    if candidate.idle_moments > reference.idle_moments:
        found.append(Difference("idle-records", f"{candidate.idle_moments} quiet moments "
                                                f"while idle, not {reference.idle_moments}"))
    if candidate.server_first > reference.server_first:
        found.append(Difference("server-first", f"the server opened {candidate.server_first} "
                                                f"moments, not {reference.server_first}"))
    return found


def connection_differences(reference: list[Flow], candidate: list[Flow],
                           demands: list[float], *, demand_window: float) -> list[Difference]:
    """Across all of a script's connections: how many, and whether each opened on demand
    (within ``demand_window`` after one of the script's page loads, ``demands``)."""
    found: list[Difference] = []
    if len(candidate) != len(reference):
        found.append(Difference("connections", f"{len(candidate)} connections for the "
                                               f"script, not {len(reference)}"))
    for flow in candidate:
        if not any(0 <= flow.start - demand <= demand_window for demand in demands):
            found.append(Difference("no-demand", f"a connection opened at {flow.start:.2f} "
                                                 "with no page load before it"))
    return found
