"""The gate's SNI reader (``server/clienthello.py``), on the raw bytes a client sends first.

Input: the bytes, as the gate peeks them: the record header, then the record.

Invariants: ``record_length`` and ``server_name`` never raise; a length is at least the header
and at most ``MAX_RECORD`` plus it; a name is lowercase ASCII and comes from the record's own
bytes.
"""

from __future__ import annotations

import random
import struct
import sys

import harness

from veil.server import clienthello
from veil.transport.tls13.hello import new_hello
from veil.transport.tls13.profile import CHROME

MODULES = ("veil.server.clienthello",)


def test_one_input(data: bytes) -> None:
    total = clienthello.record_length(data[: clienthello.RECORD_HEADER])
    if total is not None:
        assert clienthello.RECORD_HEADER <= total <= clienthello.RECORD_HEADER + \
            clienthello.MAX_RECORD
        data = data[:total]
    name = clienthello.server_name(data)
    if name is not None:
        assert name.isascii() and name == name.lower()
        assert name.encode() in data.lower(), "a name that is not in the record"


# ------------------------------------------------------------------ seeds
def _record(body: bytes) -> bytes:
    return b"\x16\x03\x01" + struct.pack("!H", len(body)) + body


def _hello(extensions: bytes) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(extensions)) + extensions
    return _record(b"\x01" + len(body).to_bytes(3, "big") + body)


def _sni(name: bytes, name_type: int = 0) -> bytes:
    entry = bytes((name_type,)) + struct.pack("!H", len(name)) + name
    data = struct.pack("!H", len(entry)) + entry
    return struct.pack("!HH", 0, len(data)) + data


def seeds() -> dict[str, bytes]:
    chrome = new_hello(CHROME, "www.example.com", random.Random(1))[1]
    return {
        "chrome": _record(chrome),
        "chrome-no-sni": _record(new_hello(CHROME, None, random.Random(2))[1]),
        "minimal": _hello(_sni(b"example.com")),
        "uppercase": _hello(_sni(b"EXAMPLE.com")),
        "sni-after-other": _hello(struct.pack("!HH", 0x0A0A, 2) + b"\x00\x00"
                                  + _sni(b"b.example")),
        "bad-name-type": _hello(_sni(b"example.com", 1)),
        "name-too-long": _hello(_sni(b"example.com")[:-3]),
        "non-ascii": _hello(_sni("bücher.example".encode())),
        "no-extensions": _hello(b""),
        "ext-length-lies": _hello(struct.pack("!HH", 5, 0xFFFF)),
        "sslv2": b"\x80\x2e\x01\x00\x02\x00\x15",
        "http": b"GET / HTTP/1.1\r\n\r\n",
        "header-only": b"\x16\x03\x01\x40\x00",
        "oversized": b"\x16\x03\x01\xff\xff" + bytes(8),
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
