"""The in-path censor's decisions, sans-IO: IP packets in, forward or drop out."""

from __future__ import annotations

import random

import pytest

from tests.lab import synth
from veil.lab.censor import Censor
from veil.lab.flow import Direction, Endpoint, Packet

C, S = Direction.CLIENT, Direction.SERVER
SS_SERVER = Endpoint("10.0.0.2", 8388)


def ip(packet: Packet) -> bytes:
    return synth.ip_frame(packet, "raw")


def run(censor: Censor, packets: list[Packet], at: float = 0.0) -> list[bool]:
    return [censor.packet(ip(p), at + p.time) for p in packets]


def test_fully_encrypted_flow_is_dropped_and_its_triple_blocked() -> None:
    censor = Censor()
    first = synth.tcp_packets([(C, random.Random(1).randbytes(200)), (C, b"more")],
                              server=SS_SERVER, close="none")
    decisions = run(censor, first)
    assert decisions == [True, True, True, False, False]  # handshake passes, data dropped
    (event,) = censor.events
    assert event.detector == "fully-encrypted" and event.blocked
    assert event.until == pytest.approx(first[3].time + 180.0)
    # A new connection from the same client to the same server port: dropped at the SYN.
    again = synth.tcp_packets([(C, b"GET / HTTP/1.1\r\n\r\n")], server=SS_SERVER,
                              client=Endpoint("10.0.0.1", 40001))
    assert run(censor, again[:1], at=10.0) == [False]
    # The server's packets still pass; another port of the same server is not blocked.
    assert run(censor, [Packet(11.0, "tcp", SS_SERVER, synth.CLIENT, b"", 0x10, 1)]) == [True]
    other = synth.tcp_packets([(C, b"GET / HTTP/1.1\r\n\r\n")],
                              server=Endpoint("10.0.0.2", 80))
    assert all(run(censor, other, at=12.0))
    # After the residual period the triple is free again.
    assert run(censor, again, at=200.0) == [True] * len(again)
    assert censor.stats.flagged == 1 and censor.stats.dropped == 3


def test_tls_and_http_cross() -> None:
    censor = Censor()
    tls = synth.tcp_packets([(C, synth.openssl_client_hello()),
                             (S, synth.record(22, random.Random(2).randbytes(100)))])
    assert all(run(censor, tls))
    assert censor.events == []


def test_wireguard_initiation_is_dropped() -> None:
    censor = Censor()
    init = Packet(1.0, "udp", synth.CLIENT, Endpoint("10.0.0.2", 51820),
                  b"\x01\x00\x00\x00" + random.Random(3).randbytes(144))
    assert run(censor, [init]) == [False]
    assert censor.events[0].detector == "protocol-signatures"


def test_probability_residual_and_choice_of_detectors() -> None:
    never = Censor(probability=0.0)
    packets = synth.tcp_packets([(C, random.Random(4).randbytes(200))], server=SS_SERVER)
    assert all(run(never, packets))
    assert never.events[0].blocked is False
    short = Censor(residual=5.0)
    run(short, packets)
    assert short.events[0].until == pytest.approx(packets[3].time + 5.0)
    fingerprint_only = Censor(block=("clienthello-fingerprint",))
    assert all(run(fingerprint_only, packets))  # random bytes have no ClientHello
    with pytest.raises(ValueError, match="cannot block on"):
        Censor(block=("nonsense",))


def test_inspection_stops_after_the_first_packets() -> None:
    censor = Censor()
    # 30 plain-text exchanges, then random bytes: too late to be looked at.
    exchanges = [(C, b"PING\r\n"), (S, b"PONG\r\n")] * 15 + [(C, random.Random(5).randbytes(200))]
    assert all(run(censor, synth.tcp_packets(exchanges, server=SS_SERVER)))
    assert censor.events == []


def test_decided_flows_are_not_kept() -> None:
    """A flow let through is forgotten (its later packets cross without being stored); a new
    connection on the same ports is inspected afresh."""
    censor = Censor()
    exchanges = [(C, b"PING\r\n"), (S, b"PONG\r\n")] * 15 + [(S, bytes(60_000))] * 3
    assert all(run(censor, synth.tcp_packets(exchanges, server=SS_SERVER)))
    assert censor._table.flows == [] and censor.stats.flows == 1
    reused = synth.tcp_packets([(C, random.Random(6).randbytes(200))], server=SS_SERVER)
    assert run(censor, reused, at=50.0)[3] is False  # same ports, new SYN, caught
    assert censor.stats.flows == 2 and len(censor.events) == 1
