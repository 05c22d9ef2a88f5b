"""Block reports (protocol/report.py): the wire bytes, their carrier in a session, and the
client's memory of block episodes (once per way per episode, bounded)."""

from __future__ import annotations

import pytest

from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint, tls_endpoint
from veil.protocol.events import ReportReceived, SessionClosed
from veil.protocol.failover import Failure
from veil.protocol.frames import MAX_PADDING_PAYLOAD, REPORT_TAG, FrameType, frame
from veil.protocol.report import (
    FAILURE_CODES,
    MAX_REPORT_ENTRIES,
    MAX_REPORT_PAYLOAD,
    BlockedWay,
    BlockLog,
    decode_report,
    encode_report,
    way_label,
)
from veil.protocol.session import MAX_REPORTS_PER_SESSION, Session

DIRECT = BlockedWay(0, "tls://203.0.113.7:443", "reset", 12, 1, 5)


def test_exact_wire_bytes_of_a_report() -> None:
    assert encode_report([DIRECT]) == (
        b"VRPT" + bytes([1, 1])  # tag, version 1, one entry
        + bytes([0, 3]) + (12).to_bytes(2, "big") + (1).to_bytes(2, "big")
        + (5).to_bytes(2, "big") + bytes([21]) + b"tls://203.0.113.7:443")


def test_round_trip_of_every_kind() -> None:
    entries = [BlockedWay(i, f"tls://10.0.0.{i}:443", f.name.lower(), 65535, 0, 65535)
               for i, f in enumerate(FAILURE_CODES)]
    assert decode_report(encode_report(entries)) == tuple(entries)


def test_a_kind_unknown_to_the_reader_is_other_and_a_newer_version_is_ignored() -> None:
    payload = bytearray(encode_report([DIRECT]))
    payload[7] = 200  # a failure code a future client knows
    decoded = decode_report(bytes(payload))
    assert decoded is not None and decoded[0].kind == "other"
    payload[4] = 2  # version 2: padding to this reader
    assert decode_report(bytes(payload)) is None


@pytest.mark.parametrize("mangle", [
    lambda p: p[:-1],  # cut short
    lambda p: p + b"x",  # trailing bytes
    lambda p: p[:5] + b"\x00" + p[6:],  # zero entries
    lambda p: p[:5] + bytes([MAX_REPORT_ENTRIES + 1]) + p[6:],
    lambda p: p[:4],  # no header
    lambda p: p[:-3] + b"\xff\x00\x01",  # endpoint not ASCII
])
def test_malformed_reports_are_value_errors(mangle: object) -> None:
    payload = encode_report([DIRECT])
    with pytest.raises(ValueError):
        decode_report(mangle(payload))  # type: ignore[operator]


def test_the_largest_report_is_a_padding_frame_a_server_accepts() -> None:
    longest = "https://" + "a" * 241 + ":8443"
    assert len(longest) == 254
    payload = encode_report([BlockedWay(i, longest, "timeout", 1, 1, 1)
                             for i in range(MAX_REPORT_ENTRIES)])
    assert len(payload) <= MAX_REPORT_PAYLOAD == 4230 <= MAX_PADDING_PAYLOAD  # the docs' figure


def test_a_way_is_named_without_its_secret_path() -> None:
    cdn = parse_endpoint("https://cdn.example.org/s3cr3t-path-0123456789/")
    assert way_label(cdn) == "https://cdn.example.org:443"
    assert "s3cr3t" not in way_label(cdn)
    assert way_label(tls_endpoint(Address("2001:db8::1", 8443))) == "tls://[2001:db8::1]:8443"


# ------------------------------------------------------------------ the carrier
def test_a_server_reads_a_report_carried_as_padding() -> None:
    client, server = Session(client=True, now=0.0), Session(client=False, now=0.0)
    payload = encode_report([DIRECT])
    client.send_report(payload)
    wire = client.data_to_send()
    # The report frame, then (the session's first writes are shaped) zero padding.
    assert wire.startswith(frame(FrameType.PADDING, 0, payload))
    assert server.receive_data(wire, 0.0) == [ReportReceived(payload)]


def test_padding_that_is_not_a_report_is_still_nothing() -> None:
    server = Session(client=False, now=0.0)
    assert server.receive_data(frame(FrameType.PADDING, 0, bytes(300)), 0.0) == []
    assert server.receive_data(frame(FrameType.PADDING, 0, b""), 0.0) == []


def test_reports_past_the_per_session_bound_are_padding_again() -> None:
    client, server = Session(client=True, now=0.0), Session(client=False, now=0.0)
    payload = encode_report([DIRECT])
    for _ in range(MAX_REPORTS_PER_SESSION + 3):
        client.send_report(payload)
    events = server.receive_data(client.data_to_send(), 0.0)
    assert events == [ReportReceived(payload)] * MAX_REPORTS_PER_SESSION
    assert not server.closed


def test_a_client_ignores_a_tagged_padding_from_its_server() -> None:
    client = Session(client=True, now=0.0)
    assert client.receive_data(frame(FrameType.PADDING, 0, REPORT_TAG + b"\x01"), 0.0) == []


def test_a_server_that_does_not_read_reports_takes_them_for_padding() -> None:
    """Compatibility: an old server's session treats every PADDING payload as nothing. Its
    behaviour is this one's with the report bound at 0: no event, no error, no close."""
    client, old_server = Session(client=True, now=0.0), Session(client=False, now=0.0)
    old_server._reports_left = 0
    client.send_report(encode_report([DIRECT]))
    events = old_server.receive_data(client.data_to_send(), 0.0)
    assert not [e for e in events if isinstance(e, (ReportReceived, SessionClosed))]
    assert not old_server.closed


def test_only_reports_go_out_as_reports() -> None:
    client, server = Session(client=True, now=0.0), Session(client=False, now=0.0)
    with pytest.raises(Exception, match="not a block report"):
        client.send_report(b"hello")
    with pytest.raises(Exception, match="only the client"):
        server.send_report(encode_report([DIRECT]))


# ------------------------------------------------------------------ the client's log
WAYS = [(0, "tls://203.0.113.7:443"), (1, "tls://203.0.113.7:8443"),
        (3, "https://cdn.example.org:443")]


def test_a_blocked_way_is_reported_once_through_another_way() -> None:
    log = BlockLog(WAYS)
    log.failed(0, Failure.RESET, 100.0, blocked=False)
    assert log.take(1, 100.0) is None  # one failure is a blip, not a block
    log.failed(0, Failure.RESET, 100.4, blocked=True)
    assert log.take(0, 101.0) is None  # not through the blocked way itself
    report = log.take(1, 100.0 + 14 * 60)
    assert report is not None
    assert decode_report(report) == (
        BlockedWay(0, "tls://203.0.113.7:443", "reset", 14, 13, 2),)
    log.failed(0, Failure.RESET, 1000.0, blocked=True)  # a probe fails: same episode
    assert log.take(1, 1001.0) is None


def test_a_way_that_works_again_ends_the_episode() -> None:
    log = BlockLog(WAYS)
    log.failed(0, Failure.TIMEOUT, 0.0, blocked=True)
    assert log.take(1, 1.0) is not None
    log.succeeded(0)
    log.failed(0, Failure.TIMEOUT, 500.0, blocked=True)  # blocked again: a new episode
    again = log.take(2, 560.0)
    assert again is not None
    decoded = decode_report(again)
    assert decoded == (BlockedWay(0, "tls://203.0.113.7:443", "timeout", 1, 1, 1),)


def test_a_block_that_ended_before_any_session_is_still_reported_once() -> None:
    log = BlockLog(WAYS)
    log.failed(2, Failure.FOREIGN, 0.0, blocked=True)
    log.succeeded(2)
    report = log.take(0, 60.0)
    assert report is not None and decode_report(report)[0].way == 3  # type: ignore[index]
    assert log.take(0, 61.0) is None


def test_a_slow_path_that_never_blocks_reports_nothing() -> None:
    log = BlockLog(WAYS)
    for second in range(50):
        log.failed(0, Failure.TIMEOUT, float(second), blocked=False)
        log.succeeded(0)
    assert log.take(1, 100.0) is None


def test_every_blocked_way_goes_in_one_report() -> None:
    log = BlockLog(WAYS)
    log.failed(0, Failure.RESET, 0.0, blocked=True)
    log.failed(1, Failure.CUT, 0.0, blocked=True)
    report = log.take(2, 0.0)
    assert report is not None
    assert [e.way for e in decode_report(report) or ()] == [0, 1]
