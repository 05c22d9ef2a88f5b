"""The server's count of reported blocks (server/blocks.py): distinct users per way in, the
window, the alert threshold and its cooldown. Time is an argument: no waiting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from veil.admin.pages import health_page
from veil.protocol.report import BlockedWay
from veil.server.blocks import (
    ALERT_COOLDOWN_S,
    OTHER_WAY,
    RECOUNT_S,
    REPORT_WINDOW_S,
    BlockAlert,
    BlockTracker,
    run_alert_command,
)

DIRECT = "tls://203.0.113.7:443"
CDN = "https://cdn.example.org:443"
T0 = 1_800_000_000.0


def report(way: str = DIRECT, kind: str = "reset", first_min: int = 0) -> list[BlockedWay]:
    return [BlockedWay(0, way, kind, first_min, 0, 2)]


def tracker(**options: float) -> BlockTracker:
    return BlockTracker([DIRECT, CDN], **options)  # type: ignore[arg-type]


def test_distinct_users_not_reports_make_the_share() -> None:
    blocks = tracker()
    for user in ("a", "b", "c", "d"):
        assert blocks.active(user, T0) == []
    for _ in range(10):  # one user, ten reports: one user of four
        assert blocks.reported("a", report(), T0 + 1) == []
    alerts = blocks.reported("b", report(first_min=3), T0 + 2)  # two of four: half
    assert alerts == [BlockAlert(DIRECT, "reset", 2, 4, T0 + 2 - 180)]
    (status,) = blocks.snapshot(T0 + 3)
    assert (status.way_in, status.users, status.active_users) == (DIRECT, 2, 4)
    assert status.since == T0 + 2 - 180
    assert status.reports == {"reset": 2}  # a's repeats within RECOUNT_S count once
    assert status.alerts == 1


def test_repeats_count_again_after_the_recount_interval() -> None:
    blocks = tracker()
    blocks.reported("a", report(), T0)
    blocks.reported("a", report(), T0 + RECOUNT_S)
    blocks.reported("a", report(kind="timeout"), T0 + RECOUNT_S)
    assert blocks.snapshot(T0 + RECOUNT_S)[0].reports == {"reset": 2, "timeout": 1}


def test_reports_and_users_leave_the_window() -> None:
    blocks = tracker()
    blocks.active("b", T0)
    blocks.reported("a", report(), T0)
    later = T0 + REPORT_WINDOW_S + 1
    blocks.active("c", later)
    (status,) = blocks.snapshot(later)
    assert (status.users, status.active_users) == (0, 1)
    assert status.reports == {"reset": 1}  # the total stays: it is a counter


def test_the_alert_fires_once_per_crossing_and_not_again_within_the_cooldown() -> None:
    blocks = tracker()
    assert blocks.reported("a", report(), T0) != []  # one user of one: all of them
    assert blocks.reported("a", report(), T0 + 10) == []  # still over: no second alert
    blocks.active("b", T0 + 20)
    blocks.active("c", T0 + 20)  # one of three: under the share, re-armed
    assert blocks.reported("b", report(), T0 + 30) == []  # crosses again within the cooldown
    blocks.active("d", T0 + 40)
    blocks.active("e", T0 + 40)  # two of five: under again
    alerts = blocks.reported("c", report(), T0 + ALERT_COOLDOWN_S + 1)
    assert [a.users for a in alerts] == [3]
    assert blocks.snapshot(T0 + ALERT_COOLDOWN_S + 1)[0].alerts == 2


def test_an_active_user_leaving_can_make_the_share_cross() -> None:
    blocks = tracker()
    blocks.active("b", T0)
    blocks.active("c", T0)
    assert blocks.reported("a", report(), T0 + 600) == []  # one of three
    alerts = blocks.active("a", T0 + REPORT_WINDOW_S + 300)  # b and c are gone: one of one
    assert [a.way_in for a in alerts] == [DIRECT]


def test_the_threshold_and_the_minimum_of_users_are_named_options() -> None:
    blocks = tracker(share=0.9, min_users=2)
    assert blocks.reported("a", report(), T0) == []  # one user: under the minimum
    assert blocks.reported("b", report(), T0) != []


def test_ways_the_server_does_not_announce_count_as_other_and_are_kept_apart() -> None:
    blocks = tracker()
    blocks.reported("a", report(way="tls://198.51.100.1:443"), T0)
    blocks.reported("a", report(way="tls://198.51.100.2:443"), T0)
    blocks.reported("b", report(way=CDN, kind="timeout"), T0)
    statuses = blocks.snapshot(T0)
    assert [s.way_in for s in statuses] == [CDN, OTHER_WAY]  # in the server's order
    assert statuses[1].users == 1 and statuses[0].reports == {"timeout": 1}


def test_the_alert_command_runs_without_a_shell_with_the_alert_in_its_env(
        tmp_path: Path) -> None:
    out = tmp_path / "alert.txt"
    script = ("import os, sys; open(sys.argv[1], 'w').write(' '.join(os.environ[k] for k in "
              "('VEIL_WAY_IN', 'VEIL_KIND', 'VEIL_USERS', 'VEIL_ACTIVE_USERS', 'VEIL_SINCE')))")
    alert = BlockAlert(DIRECT, "reset", 3, 4, T0 + 0.7)
    asyncio.run(run_alert_command([sys.executable, "-c", script, str(out)], alert))
    assert out.read_text() == f"{DIRECT} reset 3 4 {int(T0)}"


def test_the_panel_shows_a_table_of_the_reported_ways() -> None:
    blocks = tracker()
    blocks.active("b", T0)
    blocks.reported("a", report(first_min=2), T0)
    page = health_page([("Version", "veil")], "csrf", blocks.snapshot(T0))
    row = page.split('<table id="blocked">')[1]
    assert DIRECT in row and "1 of 2" in row and "reset 1" in row
    assert "No client reported" in health_page([], "csrf")
