"""The parent of ``--workers`` shows one server: its panel's status is the workers' summed
(veil.server.workers.merge_statuses), and a worker's status crosses to it without the state."""

from __future__ import annotations

import pickle
from pathlib import Path

from veil.manage.state import init_state
from veil.protocol.address import Address
from veil.server.status import (
    BoundCounts,
    ConnectionStatus,
    GateCounts,
    ServerStatus,
    WayBlockStatus,
)
from veil.server.workers import merge_statuses, status_fields
from veil.store.base import Usage


def _connection(conn_id: int, user: str) -> ConnectionStatus:
    return ConnectionStatus(id=conn_id, user=user, way_in="veil", peer="192.0.2.1:5",
                            started_at=1.0, bytes_up=10, bytes_down=20, streams=1)


def test_the_workers_statuses_add_up(tmp_path: Path) -> None:
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 8443))
    one = ServerStatus(
        state=state, started_at=1.0, listen="127.0.0.1:8443", server_id="host 127.0.0.1:8443",
        ways_in=("veil",), connections=(_connection(3, "ann"), _connection(1, "bob")),
        user_bytes={"ann": Usage(1, 2)}, users={"active": 2}, store_refresh_failures=1,
        gate=GateCounts(accepted={"veil": 2}, cover_plain=1, rejected={"replay": 1}),
        bounds=BoundCounts(replay_unrecorded=1, udp_dropped={"veil": {"queue_full": 2}}),
        blocked_ways=(WayBlockStatus("tls://a:1", users=1, active_users=2, since=5.0,
                                     reports={"reset": 1}),))
    other = ServerStatus(
        state=state, started_at=2.0, listen="127.0.0.1:8443", server_id="host 127.0.0.1:8443",
        ways_in=("veil",), connections=(_connection(2, "ann"),),
        user_bytes={"ann": Usage(10, 20), "bob": Usage(5, 5)}, users={"active": 2},
        gate=GateCounts(accepted={"veil": 1, "trojan": 1}, rejected={"replay": 2}),
        bounds=BoundCounts(replay_unrecorded=2, udp_dropped={"veil": {"queue_full": 1,
                                                                       "resolving": 1}}),
        blocked_ways=(WayBlockStatus("tls://a:1", users=2, active_users=1, since=3.0,
                                     reports={"reset": 2, "timeout": 1}, alerts=1),))
    merged = merge_statuses(state, "127.0.0.1:8443", 0.5, [one, other])
    assert [c.id for c in merged.connections] == [1, 2, 3]
    assert merged.user_bytes == {"ann": Usage(11, 22), "bob": Usage(5, 5)}
    assert merged.users == {"active": 2}  # one store, read by each: not added up
    assert merged.gate.accepted == {"veil": 3, "trojan": 1}
    assert merged.gate.rejected == {"replay": 3} and merged.gate.cover_plain == 1
    assert merged.bounds.replay_unrecorded == 3
    assert merged.bounds.udp_dropped == {"veil": {"queue_full": 3, "resolving": 1}}
    assert merged.store_refresh_failures == 1 and merged.started_at == 0.5
    (way,) = merged.blocked_ways
    assert (way.users, way.active_users, way.since, way.alerts) == (2, 2, 3.0, 1)
    assert way.reports == {"reset": 3, "timeout": 1}
    # Before any worker reported: an empty status of the server, not an error.
    assert merge_statuses(state, "127.0.0.1:8443", 0.5, []).connections == ()
    # What a worker sends leaves its state (keys) behind; the parent puts its own back.
    fields = pickle.loads(status_fields(one))
    assert "state" not in fields and ServerStatus(state=state, **fields) == one
