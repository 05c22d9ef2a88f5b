"""The way-in chooser (protocol/failover.py), sans-IO: outcomes and times in, choices out."""

from __future__ import annotations

import random

import pytest

from veil.protocol.failover import FailoverConfig, Failure, Switched, WayChooser

CONFIG = FailoverConfig(block_after=2, probe_initial=5.0, probe_max=60.0, jitter=(0.5, 1.5))


def chooser(count: int = 3) -> WayChooser:
    return WayChooser(count, CONFIG, random.Random(7))


@pytest.mark.parametrize("failure", [Failure.REFUSED, Failure.RESET, Failure.CUT,
                                     Failure.TIMEOUT, Failure.UNREACHABLE])
def test_one_failure_is_a_blip_and_two_in_a_row_a_block(failure: Failure) -> None:
    ways = chooser()
    assert ways.failed(0, failure, 10.0) is None
    assert ways.current == 0
    assert ways.failed(0, failure, 10.5) == Switched(0, 1, failure)
    assert ways.current == 1 and ways.blocked(0)


def test_a_success_between_failures_clears_the_count() -> None:
    """A slow, lossy path that works fails now and then: it is never left."""
    ways = chooser()
    for second in range(100):
        assert ways.failed(0, Failure.TIMEOUT, second + 0.0) is None
        assert ways.succeeded(0, second + 0.5) is None
    assert ways.current == 0 and not ways.blocked(0)
    assert ways.next_probe() is None


@pytest.mark.parametrize("failure", [Failure.FOREIGN, Failure.SILENT])
def test_someone_elses_certificate_or_a_session_gone_silent_blocks_at_once(
        failure: Failure) -> None:
    ways = chooser()
    assert ways.failed(0, failure, 1.0) == Switched(0, 1, failure)


def test_the_blocked_preferred_way_is_probed_with_growing_jittered_waits() -> None:
    ways = chooser()
    ways.failed(0, Failure.RESET, 0.0)
    ways.failed(0, Failure.RESET, 0.0)
    waits = []
    now = 0.0
    for _ in range(8):
        planned = ways.next_probe()
        assert planned is not None and planned[0] == 0
        waits.append(planned[1] - now)
        now = planned[1]
        assert ways.failed(0, Failure.RESET, now) is None  # probes fail: no switch
        assert ways.current == 1
    # 5 s doubling to 60 s, each times 0.5-1.5.
    for wait, base in zip(waits, (5, 10, 20, 40, 60, 60, 60, 60), strict=True):
        assert 0.5 * base <= wait <= 1.5 * base
    assert len({round(w / b, 6) for w, b in zip(waits, (5, 10, 20, 40, 60), strict=False)}) > 1


def test_a_probe_that_works_moves_back_to_the_preferred_way() -> None:
    ways = chooser()
    ways.failed(0, Failure.TIMEOUT, 0.0)
    ways.failed(0, Failure.TIMEOUT, 5.0)
    assert ways.current == 1
    assert ways.succeeded(1, 5.5) is None  # the fallback works: stay on it
    assert ways.succeeded(0, 12.0) == Switched(1, 0, None)
    assert ways.current == 0 and not ways.blocked(0) and ways.next_probe() is None


def test_a_way_that_freezes_again_after_each_return_is_given_back_ever_more_rarely() -> None:
    """A throttle that freezes each connection after N bytes: every probe handshakes fine,
    and the user's next download on the way goes silent again. Each return waits 4x
    longer (5, 20, 80, 320, then 600 s, each times the jitter), not 5 s every time."""
    ways = chooser(2)
    now = 0.0
    assert ways.failed(0, Failure.SILENT, now) == Switched(0, 1, Failure.SILENT)
    waits = []
    for _ in range(6):
        planned = ways.next_probe()
        assert planned is not None
        waits.append(planned[1] - now)
        now = planned[1]
        assert ways.succeeded(0, now) == Switched(1, 0, None)  # the probe handshakes fine
        now += 8.0  # the next download freezes; found ~8 s later
        assert ways.failed(0, Failure.SILENT, now) == Switched(0, 1, Failure.SILENT)
    for wait, base in zip(waits, (5, 20, 80, 320, 600, 600), strict=True):
        assert 0.5 * base <= wait <= 1.5 * base, waits
    # A failed probe of a relapsed way does not shorten its wait back to probe_max.
    now = ways.next_probe()[1]  # type: ignore[index]
    ways.failed(0, Failure.RESET, now)
    assert ways.next_probe()[1] - now >= 0.5 * 600  # type: ignore[index]


def test_a_way_blocked_long_after_it_came_back_starts_over() -> None:
    """A block that lifted and a new block later: probed from probe_initial again."""
    ways = chooser(2)
    ways.failed(0, Failure.SILENT, 0.0)
    now = ways.next_probe()[1]  # type: ignore[index]
    ways.succeeded(0, now)
    now += 301.0  # relapse_window is 300 s
    ways.failed(0, Failure.SILENT, now)
    assert ways.next_probe()[1] - now <= 1.5 * CONFIG.probe_initial  # type: ignore[index]


def test_the_next_unblocked_way_in_key_order_is_used() -> None:
    ways = chooser(3)
    ways.failed(0, Failure.RESET, 0.0)
    ways.failed(0, Failure.RESET, 0.1)
    ways.failed(1, Failure.REFUSED, 0.2)
    assert ways.failed(1, Failure.REFUSED, 0.3) == Switched(1, 2, Failure.REFUSED)
    planned = ways.next_probe()
    assert planned is not None and planned[0] in (0, 1)  # the one due first
    # Way 1 comes back before way 0: used (better than 2), and 0 is still probed.
    assert ways.succeeded(1, 9.0) == Switched(2, 1, None)
    planned = ways.next_probe()
    assert planned is not None and planned[0] == 0


def test_when_every_way_is_blocked_each_is_tried_in_turn() -> None:
    ways = chooser(2)
    ways.failed(0, Failure.TIMEOUT, 0.0)
    ways.failed(0, Failure.TIMEOUT, 1.0)
    ways.failed(1, Failure.TIMEOUT, 2.0)
    assert ways.failed(1, Failure.TIMEOUT, 3.0) == Switched(1, 0, Failure.TIMEOUT)
    assert ways.failed(0, Failure.TIMEOUT, 4.0) == Switched(0, 1, Failure.TIMEOUT)
    # The network comes back: the first way that works is used, the better one probed.
    assert ways.succeeded(1, 5.0) is None
    assert ways.current == 1 and not ways.blocked(1)
    assert ways.succeeded(0, 6.0) == Switched(1, 0, None)


def test_one_way_in_never_switches() -> None:
    ways = chooser(1)
    for second in range(5):
        assert ways.failed(0, Failure.RESET, float(second)) is None
    assert ways.current == 0 and ways.next_probe() is None


def test_failures_of_a_way_not_in_use_change_nothing() -> None:
    """A session on the way left that fails later must not move the client off its new way."""
    ways = chooser()
    ways.failed(0, Failure.RESET, 0.0)
    ways.failed(0, Failure.RESET, 0.1)
    assert ways.failed(2, Failure.CUT, 0.2) is None
    assert ways.current == 1
