"""Flow extraction: TCP reassembly per direction, UDP datagrams, and reading pcap files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import synth
from veil.errors import ConfigError
from veil.lab import lifecycle
from veil.lab.flow import Chunk, Direction, Endpoint, Flow, FlowTable, Packet
from veil.lab.pcap import read_flows
from veil.lab.tls import flow_records

C, S = Direction.CLIENT, Direction.SERVER
A, B = Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 443)


def test_tcp_reassembly_out_of_order_and_retransmitted() -> None:
    packets = synth.tcp_packets([(C, b"hello world, this is the client")], segment=8)
    data = packets[3:-1]
    # Deliver the segments shuffled, with one retransmitted and one overlapping.
    order = [data[1], data[0], data[0], data[3], data[2]]
    overlap = Packet(9.0, "tcp", A, B, b"rld, this", 0x18, data[1].seq + 3)
    table = FlowTable()
    for p in [*packets[:3], *order, overlap, packets[-1]]:
        table.add(p)
    (flow,) = table.flows
    assert flow.stream(C) == b"hello world, this is the client"
    assert flow.first_client_packet == data[1].payload  # the first data packet on the wire
    assert flow.saw_handshake and flow.close == "fin"
    assert (flow.client, flow.server) == (A, B)


def test_tls_records_keep_their_order_across_directions() -> None:
    c1, s1, c2 = synth.record(22, b"x" * 300), synth.record(22, b"y" * 90), synth.record(
        23, b"z" * 40)
    flow = synth.tcp_flow([(C, c1), (S, s1), (C, c2)], segment=100)
    records = flow_records(flow)
    assert [(r.direction, r.content_type, r.length) for r in records] == [
        (C, 22, 300), (S, 22, 90), (C, 23, 40)]


def test_each_sides_first_fin_or_rst_is_noted() -> None:
    """Who closed, and when: what veil.lab.lifecycle compares."""
    packets = synth.tcp_packets([(C, b"hello"), (S, b"world")], close="rst")
    fin = synth.tcp_packets([(C, b"hello")])[-1]
    flow = synth.flow_from_packets([*packets[:-1], fin, packets[-1]])
    assert flow.ends == {C: fin.time, S: packets[-1].time}
    assert flow.close == "rst"


def test_roles_without_a_syn_and_a_new_connection_on_the_same_ports() -> None:
    table = FlowTable()
    table.add(Packet(1.0, "tcp", B, A, b"server speaks", 0x18, 100))  # capture began mid-flow
    (flow,) = table.flows
    assert flow.client == A and not flow.saw_handshake  # the ephemeral port is the client
    for p in synth.tcp_packets([(C, b"again")], client=A, server=B):
        table.add(p)
    assert len(table.flows) == 2 and table.flows[1].stream(C) == b"again"


def test_udp_flows_and_limits() -> None:
    table = FlowTable()
    for i in range(100):
        src, dst = (A, B) if i % 2 == 0 else (B, A)
        table.add(Packet(float(i), "udp", src, dst, bytes([i])))
    (flow,) = table.flows
    assert flow.datagrams(C)[:2] == [b"\x00", b"\x02"] and flow.datagrams(S)[0] == b"\x01"
    assert flow.truncated and flow.packets_total == 100


@pytest.mark.parametrize("linktype", ["ethernet", "sll2", "raw"])
def test_pcap_roundtrip(tmp_path: Path, linktype: str) -> None:
    hello = synth.openssl_client_hello()
    packets = synth.tcp_packets([(C, hello), (S, synth.record(22, b"s" * 100))], segment=200)
    packets += [Packet(5.0, "udp", A, Endpoint("10.0.0.2", 53), b"\x12\x34query"),
                Packet(6.0, "ip:47", A, B, b"\x30\x81\x88\x0bgre")]
    path = tmp_path / "capture.pcap"
    synth.write_pcap(path, packets, linktype)
    tcp, udp, gre = read_flows(path)
    assert tcp.stream(C) == hello and tcp.first_client_packet == hello[:200]
    assert udp.transport == "udp" and udp.first_data(C) == b"\x12\x34query"
    assert gre.transport == "ip:47" and gre.first_data(C) == b"\x30\x81\x88\x0bgre"


def test_not_a_capture(tmp_path: Path) -> None:
    bad = tmp_path / "x.pcap"
    bad.write_bytes(b"not a pcap at all")
    with pytest.raises(ConfigError, match="not a pcap"):
        read_flows(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_flows(tmp_path / "missing.pcap")


def _record(length: int) -> bytes:
    return bytes((23, 3, 3)) + length.to_bytes(2, "big") + bytes(length)


def test_a_late_answer_is_not_the_server_speaking_first() -> None:
    """The lifecycle's server-first count: an answer that comes 0.4 s after its request (a
    loaded server, past the 0.3 s moment gap) is the client's moment answered late; the same
    bytes 3 s after the client's last record are the server speaking first (a held close
    that crossed, a heartbeat): the positive control."""
    def life(answer_after: float) -> lifecycle.Lifecycle:
        flow = Flow("tcp", Endpoint("10.0.0.2", 40000), Endpoint("10.0.0.1", 443), 0.0,
                    saw_handshake=True)
        flow.chunks += [Chunk(Direction.CLIENT, 0.0, _record(517)),
                        Chunk(Direction.SERVER, 0.05, _record(2000)),
                        Chunk(Direction.CLIENT, 1.0, _record(48)),
                        Chunk(Direction.SERVER, 1.0 + answer_after, _record(1935))]
        return lifecycle.summarize(flow, moment_gap=0.3, answer_window=1.0)

    assert life(0.05).server_first == 0  # one moment: request and answer
    assert life(0.4).server_first == 0  # two moments, the second a late answer
    assert life(3.0).server_first == 1
