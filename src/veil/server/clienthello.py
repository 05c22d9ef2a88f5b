"""Just enough of a TLS ClientHello parser to read the SNI (RFC 8446 4.1.2, RFC 6066 3) and
the ALPN protocols (RFC 7301; an ACME TLS-ALPN-01 validation offers only ``acme-tls/1``).

The gate uses it to send connections for other names straight to an https:// cover site, so
a prober sees that site's real certificate. Anything unexpected returns None: the caller then
treats the bytes like any other TLS connection (OpenSSL, like nginx's, decides what to say).
"""

from __future__ import annotations

import struct

RECORD_HEADER = 5
HANDSHAKE = 0x16
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
# A ClientHello fits one record; Chrome's with a post-quantum key share is ~1.8 KB.
MAX_RECORD = 16384 + 256


def record_length(head: bytes) -> int | None:
    """Total bytes (header included) of the TLS record starting ``head``, or None."""
    if len(head) < RECORD_HEADER or head[0] != HANDSHAKE or head[1] != 3:
        return None
    (length,) = struct.unpack_from("!H", head, 3)
    return RECORD_HEADER + length if length <= MAX_RECORD else None


def _extensions(record: bytes) -> dict[int, bytes] | None:
    """A ClientHello record's extensions by type (the first of each), or None if malformed."""
    try:
        pos = RECORD_HEADER
        if record[pos] != CLIENT_HELLO:
            return None
        pos += 4 + 2 + 32  # handshake header, legacy_version, random
        pos += 1 + record[pos]  # session id
        (n,) = struct.unpack_from("!H", record, pos)
        pos += 2 + n  # cipher suites
        pos += 1 + record[pos]  # compression methods
        (ext_total,) = struct.unpack_from("!H", record, pos)
        pos += 2
        end = min(pos + ext_total, len(record))
        found: dict[int, bytes] = {}
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", record, pos)
            pos += 4
            found.setdefault(ext_type, record[pos : pos + ext_len])
            pos += ext_len
    except (IndexError, struct.error):
        return None
    return found


def server_name(record: bytes) -> str | None:
    """The host name in a ClientHello record's SNI extension; None if absent or malformed."""
    body = (_extensions(record) or {}).get(EXT_SERVER_NAME)
    if body is None:
        return None
    try:
        # server_name_list length (2), name_type (1), host_name length (2), name
        (name_len,) = struct.unpack_from("!H", body, 3)
        if body[2] != 0:
            return None
        return body[5 : 5 + name_len].decode("ascii").lower()
    except (IndexError, struct.error, UnicodeDecodeError):
        return None


def alpn_protocols(record: bytes) -> tuple[bytes, ...]:
    """The protocols a ClientHello record offers in its ALPN extension (RFC 7301), in order;
    empty if none or malformed."""
    body = (_extensions(record) or {}).get(EXT_ALPN)
    if body is None or len(body) < 2:
        return ()
    protocols: list[bytes] = []
    pos, end = 2, min(2 + int.from_bytes(body[:2], "big"), len(body))
    while pos < end:
        length = body[pos]
        protocols.append(body[pos + 1 : pos + 1 + length])
        pos += 1 + length
    return tuple(protocols)
