"""TLS 1.3 record protection (RFC 8446 §5): one object per direction and traffic secret.

The hot path of every byte veil carries, so it is written for few allocations: a write of up to
256 KiB becomes one output buffer holding all its records; received records are opened straight
into the caller's plaintext buffer (``decrypt_into``), so a batch of records becomes one
contiguous run of plaintext.

The AEAD's input and output never overlap: ``cryptography`` 51 and later refuse overlapping
buffers (and earlier releases never promised in-place operation). Sealing therefore assembles
each record's inner plaintext (content plus its type byte) in a 16 KiB scratch buffer owned by
the sealer and encrypts it into the output (``encrypt_into``): the same one copy of the data an
in-place seal made into the output, only into a buffer that stays in the cache. Opening reads
the socket's bytes and writes a separate plaintext buffer, so it never overlapped.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from veil.transport.tls13.keys import SuiteInfo, traffic_keys

MAX_PLAINTEXT = 1 << 14  # TLSPlaintext / TLSInnerPlaintext content limit (§5.1)
MAX_CIPHERTEXT = (1 << 14) + 256  # TLSCiphertext.length limit (§5.2)
HEADER = 5
TAG = 16
# A record's overhead when we seal it: header, inner content type, AEAD tag (no padding).
OVERHEAD = HEADER + 1 + TAG
_SEQ_LIMIT = (1 << 64) - 1
APPLICATION_DATA = 23
# The header of every full record we send: application_data, TLS 1.2, 16 KiB + type + tag.
_FULL_HEADER = bytes((APPLICATION_DATA, 3, 3)) + (MAX_PLAINTEXT + 1 + TAG).to_bytes(2, "big")


def record_header(chunk: int) -> bytes:
    """The header of the record that carries ``chunk`` bytes of content (+ type and tag)."""
    if chunk == MAX_PLAINTEXT:
        return _FULL_HEADER
    length = chunk + 1 + TAG
    return bytes((APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))


class BadRecordMac(Exception):
    """A record did not decrypt (wrong key, tampering, or not a record of this connection)."""


class RecordOverflow(Exception):
    """A record is longer than TLS allows."""


class EmptyRecord(Exception):
    """An inner plaintext made only of padding: no content type (unexpected_message)."""


class RecordSealer:
    """Encrypts our records under one traffic secret."""

    __slots__ = ("_aead", "_inner", "_iv", "seq")

    def __init__(self, info: SuiteInfo, secret: bytes) -> None:
        key, iv = traffic_keys(info, secret)
        self._aead = info.aead(key)
        self._iv = int.from_bytes(iv, "big")
        # One record's TLSInnerPlaintext (content + type), the AEAD's input: never the output.
        self._inner = bytearray(MAX_PLAINTEXT + 1)
        self.seq = 0

    def seal(self, data: bytes | bytearray | memoryview, content_type: int = APPLICATION_DATA,
             ) -> bytearray:
        """``data`` as records of at most 16 KiB of plaintext each, in one buffer."""
        src = memoryview(data).cast("B")
        size = len(src)
        count = max(1, -(-size // MAX_PLAINTEXT))
        if self.seq + count >= _SEQ_LIMIT:
            raise OverflowError("record sequence number exhausted; the connection must end")
        out = bytearray(size + count * OVERHEAD)
        view = memoryview(out)
        inner = memoryview(self._inner)
        encrypt, iv, seq = self._aead.encrypt_into, self._iv, self.seq
        pos = 0
        offset = 0
        while True:
            chunk = min(size - offset, MAX_PLAINTEXT)
            header = record_header(chunk)
            start = pos + HEADER
            end = start + chunk + 1 + TAG
            view[pos:start] = header
            inner[:chunk] = src[offset : offset + chunk]
            inner[chunk] = content_type
            encrypt((iv ^ seq).to_bytes(12, "big"), inner[: chunk + 1], header, view[start:end])
            seq += 1
            pos = end
            offset += chunk
            if offset >= size:
                break
        self.seq = seq
        inner.release()
        view.release()
        return out


    def seal_padded(self, content: bytes, content_type: int, length: int) -> bytes:
        """One record of ``content`` whose body is exactly ``length`` bytes: the rest is the
        zero padding of RFC 8446 §5.4 (a record the size of another server's)."""
        inner_len = length - TAG
        if not len(content) < inner_len <= MAX_PLAINTEXT + 1:
            raise ValueError(f"{len(content)} bytes of content do not fit a {length}-byte "
                             "record")
        if self.seq + 1 >= _SEQ_LIMIT:
            raise OverflowError("record sequence number exhausted; the connection must end")
        header = bytes((APPLICATION_DATA, 3, 3, length >> 8, length & 0xFF))
        inner = content + bytes((content_type,)) + bytes(inner_len - len(content) - 1)
        sealed = self._aead.encrypt((self._iv ^ self.seq).to_bytes(12, "big"), inner, header)
        self.seq += 1
        return header + sealed


class RecordOpener:
    """Decrypts the peer's records under one traffic secret."""

    __slots__ = ("_aead", "_iv", "seq")

    def __init__(self, info: SuiteInfo, secret: bytes) -> None:
        key, iv = traffic_keys(info, secret)
        self._aead = info.aead(key)
        self._iv = int.from_bytes(iv, "big")
        self.seq = 0

    def open_into(self, header: memoryview, body: memoryview, out: memoryview) -> tuple[int, int]:
        """Decrypt one record into ``out``; return (inner content type, content length).

        ``header`` is the 5-byte record header (the additional data), ``body`` the rest of the
        record; ``out`` must have room for ``len(body) - 16`` bytes.
        """
        size = len(body) - TAG
        if size > MAX_PLAINTEXT + 1 + 255 or len(body) > MAX_CIPHERTEXT:
            raise RecordOverflow(f"record of {len(body)} bytes")
        if size < 1:
            raise BadRecordMac("record shorter than its tag")
        nonce = (self._iv ^ self.seq).to_bytes(12, "big")
        target = out[:size]
        try:
            self._aead.decrypt_into(nonce, body, header, target)
        except InvalidTag:
            raise BadRecordMac("record authentication failed") from None
        self.seq += 1
        end = size
        if not target[end - 1]:  # padding: zeros after the content type (§5.4)
            end = len(bytes(target).rstrip(b"\x00"))
            if end == 0:
                raise EmptyRecord("record with no content type")
        if end - 1 > MAX_PLAINTEXT:
            raise RecordOverflow(f"inner plaintext of {end - 1} bytes")
        return target[end - 1], end - 1

    def open_run(self, view: memoryview, pos: int, out: memoryview,
                 filled: int) -> tuple[int, int, int, int]:
        """Open consecutive complete application_data records of ``view`` from ``pos``,
        appending their plaintext to ``out`` at ``filled`` — the hot loop of every download.

        Stops at an incomplete record, a record of another outer type, or one whose inner
        content type is not application data. Returns ``(pos, filled, inner, size)``: where it
        stopped, the plaintext end, and, if it stopped at such an inner record, its content
        type and length (the content is at ``out[filled : filled + size]``); else -1, 0.
        """
        end = len(view)
        iv, seq = self._iv, self.seq
        decrypt = self._aead.decrypt_into
        try:
            while end - pos >= HEADER and view[pos] == APPLICATION_DATA:
                length = (view[pos + 3] << 8) | view[pos + 4]
                if length > MAX_CIPHERTEXT:
                    raise RecordOverflow(f"record of {length} bytes")
                start = pos + HEADER
                if end - start < length:
                    break
                size = length - TAG
                if size < 1:
                    raise BadRecordMac("record shorter than its tag")
                target = out[filled : filled + size]
                try:
                    decrypt((iv ^ seq).to_bytes(12, "big"), view[start : start + length],
                            view[pos:start], target)
                except InvalidTag:
                    raise BadRecordMac("record authentication failed") from None
                seq += 1
                pos = start + length
                inner = target[size - 1]
                if inner == 0:  # padded: the content type is the last non-zero byte
                    self.seq = seq
                    size = len(bytes(target).rstrip(b"\x00"))
                    if size == 0:
                        raise EmptyRecord("record with no content type")
                    inner = target[size - 1]
                size -= 1
                if size > MAX_PLAINTEXT:
                    raise RecordOverflow(f"inner plaintext of {size} bytes")
                if inner != APPLICATION_DATA:
                    return pos, filled, inner, size
                filled += size
            return pos, filled, -1, 0
        finally:
            self.seq = seq
