"""Which session of a pool carries a striped stream's next piece (veil.net.stripe), and what
a group does when one of its sessions goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from veil.net.driver import SessionDriver
from veil.net.stripe import MEMBER_NOTSENT_LOWAT, SWITCH_MARGIN, PoolRegistry, StripeGroup
from veil.protocol.events import ChunkReceived


@dataclass
class FakeSession:
    member: int
    closed: bool = False


@dataclass(eq=False)
class FakeDriver:
    """What StripeGroup asks of a driver."""

    member: int
    unsent: int = 0
    writing_paused: bool = False
    transport: object = None
    group: StripeGroup | None = None
    resets: int = 0
    striping: set[int] = field(default_factory=set)
    chunks: list[ChunkReceived] = field(default_factory=list)
    session: FakeSession = field(init=False)

    def __post_init__(self) -> None:
        self.session = FakeSession(self.member)

    def queued(self) -> int:
        return self.unsent

    def reset_striped(self) -> None:
        self.resets += 1

    def receive_chunk(self, event: ChunkReceived, now: float) -> None:
        self.chunks.append(event)


def _group(*drivers: FakeDriver) -> StripeGroup:
    group = StripeGroup()
    for driver in drivers:
        assert group.add(cast(SessionDriver, driver))
    return group


def test_a_piece_stays_home_while_home_keeps_up() -> None:
    home, other = FakeDriver(0, unsent=100_000), FakeDriver(1, unsent=100_000 - SWITCH_MARGIN + 1)
    group = _group(home, other)
    assert group.carrier(cast(SessionDriver, home)) is home


def test_a_piece_moves_to_the_least_queued_session_once_home_is_behind() -> None:
    home = FakeDriver(0, unsent=300_000)
    a, b = FakeDriver(1, unsent=100_000), FakeDriver(2, unsent=50_000)
    group = _group(home, a, b)
    assert group.carrier(cast(SessionDriver, home)) is b
    # A congested session (over its high-water mark: in loss recovery) is never picked.
    b.writing_paused = True
    assert group.carrier(cast(SessionDriver, home)) is a


def test_a_congested_home_sends_on_any_other_not_congested() -> None:
    home, other = FakeDriver(0, writing_paused=True), FakeDriver(1, unsent=10**6)
    group = _group(home, other)
    assert group.carrier(cast(SessionDriver, home)) is other
    other.writing_paused = True
    assert group.carrier(cast(SessionDriver, home)) is home


def test_a_session_busy_with_its_own_bulk_stream_takes_no_other_pieces() -> None:
    # Two bulk streams, each on its own connection: neither's pieces go to the other's
    # connection, so a loss on either stalls only its own stream (as with separate
    # connections); a third connection without bulk of its own is shared.
    home = FakeDriver(0, writing_paused=True, striping={1})
    busy = FakeDriver(1, unsent=0, striping={3})
    group = _group(home, busy)
    assert group.carrier(cast(SessionDriver, home)) is home
    assert group.carriers(cast(SessionDriver, home), [1, 1]) == [home, home]
    idle = FakeDriver(2, unsent=MEMBER_NOTSENT_LOWAT)
    group.add(cast(SessionDriver, idle))
    assert group.carrier(cast(SessionDriver, home)) is idle


def test_a_member_leaving_resets_the_others_striped_streams() -> None:
    registry = PoolRegistry()
    drivers = [FakeDriver(m) for m in range(3)]
    tokens = {registry.join("alice", b"p" * 16, cast(SessionDriver, d)) for d in drivers}
    assert len(tokens) == 1 and None not in tokens
    # Another user's pool with the same id is another group.
    assert registry.join("bob", b"p" * 16, cast(SessionDriver, FakeDriver(0))) not in tokens
    group = drivers[0].group
    assert group is not None
    group.remove(cast(SessionDriver, drivers[1]))
    assert [d.resets for d in drivers] == [1, 0, 1]
    assert drivers[1].group is None
    # The last one out forgets the group.
    group.remove(cast(SessionDriver, drivers[0]))
    group.remove(cast(SessionDriver, drivers[2]))
    assert len(registry) == 1


def test_a_chunk_for_a_member_whose_join_answer_is_late_still_reaches_it() -> None:
    # The server grouped session 1 and striped its stream over session 0 while the answer to
    # session 1's JOIN was still on its way (session 1 in loss recovery): the client finds
    # session 1 among the sessions that sent JOIN.
    carrier, late = FakeDriver(0), FakeDriver(1)
    group = StripeGroup(find={1: cast(SessionDriver, late)}.get)
    group.add(cast(SessionDriver, carrier))
    chunk = ChunkReceived(1, 3, 600_000, False, b"x")
    group.route(chunk, 0.0)
    assert late.chunks == [chunk]
    group.route(ChunkReceived(7, 3, 0, False, b"x"), 0.0)  # a member gone: dropped


def test_the_pieces_of_one_read_spread_as_they_fill_the_queues() -> None:
    # One read of 4 pieces, home backed up: each piece goes where the least is queued,
    # counting the pieces placed before it; the queues are asked once.
    piece = 64 * 1024
    home = FakeDriver(0, unsent=3 * piece)
    a, b = FakeDriver(1, unsent=0), FakeDriver(2, unsent=piece // 2)
    group = _group(home, a, b)
    chosen = group.carriers(cast(SessionDriver, home), [piece] * 4)
    assert chosen == [a, b, a, b]
