"""The borrowed-identity detector (lab/borrowed.py) against a real nginx as the borrowed site.

Positive control: a naive borrowed server, which relays strangers to nginx but serves its own
clients with its own OpenSSL handshake and accepts a replayed hello, is caught both ways
(passively: its clients' handshakes differ from nginx's; actively: a replayed hello of one of
its clients gets its handshake, not nginx's). Negative control: strangers it relays, and
nginx itself, pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.borrow import (
    NAIVE_MARK,
    TARGET_NAME,
    MarkedRandom,
    NaiveBorrowedServer,
    Target,
    recorded_handshake,
    target_nginx,
)
from veil.lab import borrowed
from veil.lab.flow import Flow
from veil.transport.tls13 import TlsClient


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if not Path(procs.NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    with target_nginx() as site:
        yield site


def test_a_naive_borrowed_server_is_caught_passively_and_by_replay(
        target: Target, tmp_path: Path) -> None:
    async def run() -> None:
        naive = NaiveBorrowedServer(target.port, tmp_path)
        await naive.start()
        try:
            reference = await recorded_handshake(target.port, TlsClient(TARGET_NAME))
            stranger = await recorded_handshake(naive.port, TlsClient(TARGET_NAME))
            # OpenSSL's two tickets: the naive server has no HTTP/2 SETTINGS to send.
            own = await recorded_handshake(
                naive.port, TlsClient(TARGET_NAME, rng=MarkedRandom(NAIVE_MARK)), post=2)
            assert naive.accepted == 1
            ref_shape = borrowed.flow_shape(reference)
            assert ref_shape is not None
            # nginx (OpenSSL): ServerHello, one CCS, four encrypted records (EncryptedExtensions,
            # Certificate, CertificateVerify, Finished), then two tickets and its SETTINGS.
            assert ref_shape.change_cipher_spec == 1 and len(ref_shape.flight) == 4
            assert ref_shape.post_handshake is not None
            assert len(ref_shape.post_handshake) == 3

            stranger_verdict = borrowed.judge(ref_shape, _shape(stranger), "passive")
            assert not stranger_verdict.flagged, stranger_verdict.evidence
            own_verdict = borrowed.judge(ref_shape, _shape(own), "passive")
            assert own_verdict.flagged
            assert any("first flight" in e for e in own_verdict.evidence), own_verdict.evidence

            # The prober replays each recorded hello to the server and to the target.
            loop = asyncio.get_running_loop()
            for flow, caught in ((stranger, False), (own, True)):
                hello = borrowed.client_hello_records(flow)
                # Both at once: each waits for its server to go quiet.
                answer, direct = await asyncio.gather(*(
                    loop.run_in_executor(None, borrowed.replay_hello, "127.0.0.1", port, hello)
                    for port in (naive.port, target.port)))
                verdict = borrowed.judge(borrowed.answer_shape(direct),
                                         borrowed.answer_shape(answer), "replay")
                assert verdict.flagged is caught, verdict.evidence
            assert naive.accepted == 2  # it took the replay for one of its own
        finally:
            await naive.close()

    asyncio.run(run())


def _shape(flow: Flow) -> borrowed.HandshakeShape:
    shape = borrowed.flow_shape(flow)
    assert shape is not None
    return shape


def test_shapes_read_from_bytes() -> None:
    """The parser on hand-made records: a HelloRetryRequest, an alert, a short read."""
    hello_body = (b"\x03\x03" + borrowed.HRR_RANDOM + b"\x20" + bytes(32) + b"\x13\x01\x00"
                  + b"\x00\x0c" + b"\x00\x2b\x00\x02\x03\x04" + b"\x00\x33\x00\x02\x00\x1d")
    message = b"\x02" + len(hello_body).to_bytes(3, "big") + hello_body
    data = (b"\x16\x03\x03" + len(message).to_bytes(2, "big") + message
            + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05" + bytes(5)
            + b"\x17\x03\x03\x00\x09")  # a record cut short is not counted
    shape = borrowed.answer_shape(data)
    assert shape.server_hello is not None
    assert shape.server_hello.hello_retry and shape.server_hello.group == 0x001D
    assert shape.server_hello.version == 0x0304
    assert shape.server_hello.extensions == ((0x2B, 2), (0x33, 2))
    assert (shape.change_cipher_spec, shape.flight, shape.post_handshake) == (1, (5,), None)
    refused = borrowed.answer_shape(b"\x15\x03\x03\x00\x02\x02\x28")
    assert refused.alert and refused.server_hello is None
    found = borrowed.differences(shape, refused)
    assert found[0] == "one answered with a ServerHello, the other did not"
    assert borrowed.parse_server_hello(hello_body[:-1]) is None


def test_a_name_that_does_not_resolve_to_the_server_is_reported() -> None:
    """What no code can fix, reported: the borrowed name's addresses against the server's
    (positive control: a server on 127.0.0.2 naming localhost)."""
    assert not borrowed.judge_name("127.0.0.1", "localhost").flagged
    verdict = borrowed.judge_name("127.0.0.2", "localhost")
    assert verdict.flagged and verdict.labels == ("sni-dns-mismatch",)
