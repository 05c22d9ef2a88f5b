"""The replay filter worker processes share (veil.server.shared): an authenticator one worker
accepted is refused by another, in another process; stale stretches are forgotten; and what
it costs a handshake."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from veil.protocol.auth import ACCEPT_WINDOW, Credential, ReplayFilter, build_auth, verify_auth
from veil.server.shared import SharedReplayFilter, SharedUsers, create_replay_table

NOW = 1_800_000_000.0
KEY = b"k" * 8
# Handshakes timed for the cost figure (docs/operations.md, "Workers").
TIMED = 2000


@pytest.fixture
def table() -> Iterator[int]:
    fd = create_replay_table()
    yield fd
    os.close(fd)


def test_a_replay_reaching_another_process_is_refused(table: int) -> None:
    mine = SharedReplayFilter(table)
    try:
        assert mine.check_and_add(KEY, b"a" * 16, NOW, NOW) is None
        # Another worker: another process, mapping the table from the descriptor it inherited.
        script = (
            "import sys\n"
            "from veil.server.shared import SharedReplayFilter\n"
            f"f = SharedReplayFilter({table})\n"
            f"print(f.check_and_add({KEY!r}, b'a' * 16, {NOW}, {NOW}),"
            f" f.check_and_add({KEY!r}, b'b' * 16, {NOW}, {NOW}))\n"
            "f.close()\n")
        out = subprocess.run([sys.executable, "-c", script], pass_fds=(table,), check=True,
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert out.stdout.split() == ["replay", "None"]
        # And what the other process remembered, this one refuses.
        assert mine.check_and_add(KEY, b"b" * 16, NOW, NOW) == "replay"
        assert len(mine) == 2
    finally:
        mine.close()


def test_two_workers_authenticators_refuse_a_replay_between_them(table: int) -> None:
    """What the CDN way in relies on: an authenticator bound to a Noise ephemeral key (the
    same in a replayed first message) accepted by one worker is refused by the other. The
    positive control: two filters of their own (each worker's, unshared) both accept it."""
    credential = Credential.from_secret(bytes(32))
    binding = os.urandom(32)  # the client's ephemeral key, replayed along
    message = build_auth(credential, binding, NOW)
    one, other = SharedReplayFilter(table), SharedReplayFilter(table)
    try:
        assert verify_auth(message, credential, binding, NOW, one) is None
        assert verify_auth(message, credential, binding, NOW + 1, other) == "replay"
    finally:
        one.close()
        other.close()
    assert verify_auth(message, credential, binding, NOW, ReplayFilter()) is None
    assert verify_auth(message, credential, binding, NOW + 1, ReplayFilter()) is None


def test_stale_stretches_are_forgotten_and_their_regions_reused(table: int) -> None:
    shared = SharedReplayFilter(table)
    try:
        for n in range(10):
            assert shared.check_and_add(KEY, bytes([n]) * 16, NOW, NOW) is None
        assert len(shared) == 10
        later = NOW + 3 * ACCEPT_WINDOW  # NOW's stretch is stale; its region takes a new one
        assert shared.check_and_add(KEY, bytes([0]) * 16, later, later) is None
        assert len(shared) == 1
    finally:
        shared.close()


def test_a_key_flooding_handshakes_is_refused_past_its_bound(table: int) -> None:
    shared = SharedReplayFilter(table, max_entries_per_key=3)
    try:
        results = [shared.check_and_add(KEY, bytes([n]) * 16, NOW, NOW) for n in range(4)]
        assert results == [None, None, None, "too_many_handshakes"]
        assert shared.check_and_add(b"o" * 8, b"x" * 16, NOW, NOW) is None
    finally:
        shared.close()


def test_cost_per_handshake(table: int) -> None:
    """Not a bound (machines differ): the figure docs/operations.md quotes, printed."""
    nonces = [os.urandom(16) for _ in range(TIMED)]
    keys = [os.urandom(8) for _ in range(TIMED)]
    shared, local = SharedReplayFilter(table), ReplayFilter()
    try:
        costs = {}
        for name, replay in (("shared", shared), ("one process", local)):
            start = time.perf_counter()
            for key, nonce in zip(keys, nonces, strict=True):
                assert replay.check_and_add(key, nonce, NOW, NOW) is None
            costs[name] = (time.perf_counter() - start) / TIMED * 1e6
    finally:
        shared.close()
    print(f"\nreplay check per handshake: shared {costs['shared']:.1f} us, "
          f"one process {costs['one process']:.1f} us")


# ------------------------------------------------------------------ sessions and devices
def test_two_workers_count_a_users_sessions_and_devices_together() -> None:
    fd = SharedUsers.create(workers=2, devices=2)
    one, other = SharedUsers(fd, 0), SharedUsers(fd, 1)
    try:
        one.add("ann", "10.0.0.1")
        other.add("ann", "10.0.0.2")
        other.add("ann", None)  # through a CDN: a session, no device
        assert one.sessions("ann") == other.sessions("ann") == 3
        assert len(one.devices("ann")) == 2
        assert one.refusal("ann", "10.0.0.3", max_sessions=64, max_devices=2) \
            == "too_many_devices"
        assert other.refusal("ann", "10.0.0.1", max_sessions=64, max_devices=2) is None
        assert one.refusal("ann", "10.0.0.1", max_sessions=3, max_devices=None) \
            == "too_many_sessions"
        assert one.refusal("bob", "10.0.0.1", max_sessions=1, max_devices=1) is None
        one.remove("ann", "10.0.0.1")
        assert other.refusal("ann", "10.0.0.3", max_sessions=64, max_devices=2) is None
    finally:
        one.close()
        other.close()
        os.close(fd)


def test_a_worker_started_in_a_dead_ones_place_holds_nothing() -> None:
    fd = SharedUsers.create(workers=2, devices=1)
    dead, living = SharedUsers(fd, 1), SharedUsers(fd, 0)
    try:
        dead.add("ann", "10.0.0.1")
        living.add("ann", None)
        dead.close()  # killed: nothing removed
        replacement = SharedUsers(fd, 1)
        try:
            assert living.sessions("ann") == 1
            assert living.devices("ann") == set()
            assert living.refusal("ann", "10.0.0.9", max_sessions=8, max_devices=1) is None
        finally:
            replacement.close()
    finally:
        living.close()
        os.close(fd)
