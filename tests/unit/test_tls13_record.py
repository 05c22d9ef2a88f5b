"""The record layer: sealing equals the AEAD's plain encrypt, for every suite and the sizes
around record boundaries; the AEAD never gets overlapping buffers; opening handles padding,
limits and tampering."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from veil.transport.tls13.keys import SUITES, traffic_keys
from veil.transport.tls13.record import (
    APPLICATION_DATA,
    MAX_PLAINTEXT,
    BadRecordMac,
    RecordOpener,
    RecordOverflow,
    RecordSealer,
)


def split(records: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        out.append(records[pos : pos + 5 + length])
        pos += 5 + length
    return out


@pytest.mark.parametrize("suite", sorted(SUITES))
@pytest.mark.parametrize("size", [1, 100, MAX_PLAINTEXT - 1, MAX_PLAINTEXT, MAX_PLAINTEXT + 1,
                                  3 * MAX_PLAINTEXT, 100_000])
def test_sealing_equals_plain_aead(suite: int, size: int) -> None:
    info = SUITES[suite]
    secret = os.urandom(info.hash_len)
    key, iv = traffic_keys(info, secret)
    aead: AESGCM | ChaCha20Poly1305 = info.aead(key)
    data = os.urandom(size)
    records = split(bytes(RecordSealer(info, secret).seal(data)))
    assert len(records) == -(-size // MAX_PLAINTEXT)
    opener = RecordOpener(info, secret)
    out = b""
    for seq, record in enumerate(records):
        chunk = data[seq * MAX_PLAINTEXT : (seq + 1) * MAX_PLAINTEXT]
        nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
        assert record[5:] == aead.encrypt(nonce, chunk + b"\x17", record[:5])
        assert record[:3] == b"\x17\x03\x03"
        view = memoryview(record)
        plain = memoryview(bytearray(len(record)))
        inner, length = opener.open_into(view[:5], view[5:], plain)
        assert inner == 23
        out += plain[:length]
    assert out == data


def test_opening_rejects_tampering_and_oversize() -> None:
    info = SUITES[0x1301]
    secret = os.urandom(32)
    record = bytearray(RecordSealer(info, secret).seal(b"data"))
    record[7] ^= 0x80
    view = memoryview(bytes(record))
    with pytest.raises(BadRecordMac):
        RecordOpener(info, secret).open_into(view[:5], view[5:], memoryview(bytearray(64)))
    big = memoryview(bytes(5 + 16384 + 257))
    with pytest.raises(RecordOverflow):
        RecordOpener(info, secret).open_into(big[:5], big[5:], memoryview(bytearray(20000)))


class NoOverlapAead:
    """Wraps a real AEAD and fails as cryptography >= 51 does when the input and output of an
    ``*_into`` call share memory — checked here on whichever release is installed."""

    def __init__(self, aead: AESGCM | ChaCha20Poly1305) -> None:
        self.aead = aead
        self.calls = 0

    @staticmethod
    def check(data: object, buf: memoryview) -> None:
        source = data.obj if isinstance(data, memoryview) else data
        assert source is not buf.obj, "the AEAD's input and output are one buffer"

    def encrypt_into(self, nonce: bytes, data: memoryview, aad: bytes, buf: memoryview) -> int:
        self.check(data, buf)
        self.calls += 1
        return self.aead.encrypt_into(nonce, data, aad, buf)

    def decrypt_into(self, nonce: bytes, data: memoryview, aad: memoryview,
                     buf: memoryview) -> int:
        self.check(data, buf)
        self.calls += 1
        return self.aead.decrypt_into(nonce, data, aad, buf)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_the_aead_never_gets_overlapping_buffers(suite: int) -> None:
    info = SUITES[suite]
    secret = os.urandom(info.hash_len)
    sealer, opener = RecordSealer(info, secret), RecordOpener(info, secret)
    sealer._aead = checked_sealer = NoOverlapAead(sealer._aead)  # type: ignore[assignment]
    opener._aead = checked_opener = NoOverlapAead(opener._aead)  # type: ignore[assignment]
    data = os.urandom(2 * MAX_PLAINTEXT + 7)
    records = sealer.seal(data) + sealer.seal(bytearray(b"x"), APPLICATION_DATA)
    assert checked_sealer.calls == 4
    plain = memoryview(bytearray(len(records)))
    pos, filled, inner, _ = opener.open_run(memoryview(records), 0, plain, 0)
    assert (pos, filled, inner) == (len(records), len(data) + 1, -1)
    assert bytes(plain[:filled]) == data + b"x"
    assert checked_opener.calls == 4
