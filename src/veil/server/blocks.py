"""Blocks that clients report, counted per way in, and the operator's alert.

A client whose way in was blocked says so, through the way it moved to, in a block report
(veil.protocol.report): which way, what failed, since when. :class:`BlockTracker` counts the
reports per way in and per user: what matters to an operator is not how many reports came
but how many of the users who use the server find a way blocked ("the direct IP is blocked
for most users since 14:02"), so it keeps, per way, the distinct users who reported it
within :data:`REPORT_WINDOW_S` and compares them with the distinct users who had a session
in that window. When that share crosses :data:`ALERT_SHARE`, ``veil serve --on-block CMD``
runs CMD once (:func:`run_alert_command`), then not again for that way within
:data:`ALERT_COOLDOWN_S`.

The tracker takes the time as an argument (unix seconds: reports are shown as times of day)
and does no I/O; its memory is bounded by the users in the store times the server's ways in
(plus one "other"), and entries older than the window are dropped as time passes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from veil.protocol.report import BlockedWay
from veil.server.status import WayBlockStatus

log = logging.getLogger("veil.server")

#: "In the last hour": a user counts as reporting a way blocked, and as active, for this long
#: after their latest report or session. Blocks that operators act on last hours (an IP, a
#: port); a report older than this describes a path that may have been fixed since.
REPORT_WINDOW_S = 3600.0
#: The alert fires when at least this share of active users report a way blocked: "most
#: users". One user's broken Wi-Fi on a server with several users stays below it; a censor's
#: block of an IP or a port reaches every user behind that censor.
ALERT_SHARE = 0.5
#: ...and at least this many users: on a one-user server (a family's), that user's block is
#: the news the operator wants; the share already keeps one user from speaking for many.
ALERT_MIN_USERS = 1
#: After an alert for a way, none again for it within this long (seconds), even if its share
#: falls below the threshold and crosses it again: a block that flaps (a censor's rules
#: reloaded, users coming and going) is one event to the operator, who moves a way in within
#: hours, not one message per flap.
ALERT_COOLDOWN_S = 3600.0
#: One user's reports of one way and kind add to ``reports`` at most once per this long
#: (seconds): a client reports once per block episode, so more is a client reconnecting in a
#: loop, or one inflating the count; distinct users are counted regardless.
RECOUNT_S = 300.0
#: A way the server does not announce (an old key's address, a typo in a client's report):
#: counted under one label, so a client cannot mint metric labels.
OTHER_WAY = "other"
#: How long the alert command may run before it is killed (seconds): a hook sends a message
#: or calls an API; one that hangs must not pile up across alerts.
ALERT_COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class BlockAlert:
    """A way in crossed the alert threshold."""

    way_in: str
    #: The failure most of its reporters saw ("reset", "timeout", ...).
    kind: str
    users: int
    active_users: int
    #: The earliest failure its reporters saw, in unix seconds.
    since: float

    def describe(self) -> str:
        since = time.strftime("%H:%M UTC", time.gmtime(self.since))
        return (f"way in {self.way_in} reported blocked ({self.kind}) by {self.users} of "
                f"{self.active_users} active user(s) since {since}")


@dataclass(slots=True)
class _Reporter:
    at: float  # the latest report's arrival
    since: float  # the episode's first failure, as the server dates it
    kind: str
    counted: dict[str, float] = field(default_factory=dict)  # kind -> last time counted


@dataclass(slots=True)
class _Way:
    reporters: dict[str, _Reporter] = field(default_factory=dict)
    reports: Counter[str] = field(default_factory=Counter)
    over: bool = False  # the share is at or above the threshold now
    last_alert: float | None = None
    alerts: int = 0


class BlockTracker:
    def __init__(self, ways: Sequence[str], *, window: float = REPORT_WINDOW_S,
                 share: float = ALERT_SHARE, min_users: int = ALERT_MIN_USERS,
                 cooldown: float = ALERT_COOLDOWN_S) -> None:
        """``ways``: the server's own ways in, as veil.protocol.report.way_label names them."""
        if not 0 < share <= 1 or min_users < 1:
            raise ValueError("need 0 < share <= 1 and min_users >= 1")
        self.window, self.share, self.min_users, self.cooldown = window, share, min_users, cooldown
        self._ways: dict[str, _Way] = {}
        self._active: dict[str, float] = {}  # user -> latest session start, end or report
        self.set_ways(ways)

    def set_ways(self, ways: Iterable[str]) -> None:
        """The server's ways in (again: after a reload renamed one); counts are kept."""
        self._known = frozenset(ways)
        self._order = [*dict.fromkeys(ways), OTHER_WAY]

    def active(self, user: str, now: float) -> list[BlockAlert]:
        """``user`` had a veil session at ``now`` (one started or ended); the alerts this
        makes fire (a share changes as users come and go)."""
        self._active[user] = now
        self._forget_old(now)
        return [alert for name, way in self._ways.items()
                if (alert := self._evaluate(name, way, now)) is not None]

    def reported(self, user: str, entries: Sequence[BlockedWay], now: float) -> list[BlockAlert]:
        """``user`` reported these ways blocked at ``now``; the alerts this makes fire."""
        self._active[user] = now
        self._forget_old(now)
        touched: dict[str, _Way] = {}
        for entry in entries:
            name = entry.endpoint if entry.endpoint in self._known else OTHER_WAY
            way = touched[name] = self._ways.setdefault(name, _Way())
            since = now - entry.first_seen_min * 60.0
            reporter = way.reporters.get(user)
            if reporter is None or now - reporter.at > self.window:
                reporter = way.reporters[user] = _Reporter(now, since, entry.kind)
            reporter.at, reporter.kind = now, entry.kind
            reporter.since = min(reporter.since, since)
            counted = reporter.counted.get(entry.kind)
            if counted is None or now - counted >= RECOUNT_S:
                reporter.counted[entry.kind] = now
                way.reports[entry.kind] += 1
        alerts = []
        for name, way in touched.items():
            alert = self._evaluate(name, way, now)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def snapshot(self, now: float) -> tuple[WayBlockStatus, ...]:
        active = sum(1 for at in self._active.values() if now - at <= self.window)
        result = []
        for name in self._order:
            way = self._ways.get(name)
            if way is None:
                continue
            current = [r for r in way.reporters.values() if now - r.at <= self.window]
            result.append(WayBlockStatus(
                way_in=name, users=len(current), active_users=active,
                since=min((r.since for r in current), default=None),
                reports=dict(way.reports), alerts=way.alerts))
        return tuple(result)

    def _forget_old(self, now: float) -> None:
        horizon = now - self.window
        for user in [u for u, at in self._active.items() if at < horizon]:
            del self._active[user]
        for way in self._ways.values():
            for user in [u for u, r in way.reporters.items() if r.at < horizon]:
                del way.reporters[user]

    def _evaluate(self, name: str, way: _Way, now: float) -> BlockAlert | None:
        users = len(way.reporters)
        active = max(len(self._active), users)
        over = users >= self.min_users and users >= self.share * active
        crossed, way.over = over and not way.over, over
        if not crossed:
            return None
        if way.last_alert is not None and now - way.last_alert < self.cooldown:
            return None
        way.last_alert = now
        way.alerts += 1
        kinds = Counter(r.kind for r in way.reporters.values())
        return BlockAlert(name, kinds.most_common(1)[0][0], users, active,
                          min(r.since for r in way.reporters.values()))


async def run_alert_command(command: Sequence[str], alert: BlockAlert) -> None:
    """Run ``--on-block``'s command for ``alert``: no shell, the alert in its environment
    (VEIL_WAY_IN, VEIL_KIND, VEIL_USERS, VEIL_ACTIVE_USERS, VEIL_SINCE as unix seconds), its
    output to the server's stderr, killed after ALERT_COMMAND_TIMEOUT_S."""
    env = {**os.environ, "VEIL_WAY_IN": alert.way_in, "VEIL_KIND": alert.kind,
           "VEIL_USERS": str(alert.users), "VEIL_ACTIVE_USERS": str(alert.active_users),
           "VEIL_SINCE": str(int(alert.since))}
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=None, env=env)
    except OSError as exc:
        log.error("--on-block: cannot run %s: %s", command[0], exc.strerror or exc)
        return
    try:
        status = await asyncio.wait_for(proc.wait(), ALERT_COMMAND_TIMEOUT_S)
    except TimeoutError:
        log.error("--on-block: %s ran longer than %.0f s; killed", command[0],
                  ALERT_COMMAND_TIMEOUT_S)
        proc.kill()
        await proc.wait()
        return
    except asyncio.CancelledError:  # the server stops
        proc.kill()
        await proc.wait()
        raise
    if status:
        log.error("--on-block: %s exited with status %d", command[0], status)
