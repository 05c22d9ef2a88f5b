"""Is what a destination just sent a site's idle close? (sans-IO)

A website closes an idle connection on its own: nginx, keepalive_timeout after its last
write, sends an HTTP/2 GOAWAY (one 34-byte TLS 1.3 record) and close_notify (19 bytes), then
its FIN. Through veil that close would cross the tunnel when it happens: a moment the server
opens, after a silence, which a browser's connection to a website never shows (nginx only
answers; docs/lab.md, connection-lifecycle). So the server holds such a close until the
client next speaks (``veil.net.driver.TcpRelay``); this module only recognises its bytes.

What counts: after a silence on the stream, at most two TLS records and then the FIN: an
optional short record (an HTTP/2 GOAWAY, with at most a short debug text) and a close alert
(TLS 1.3: an application-data record of 19 bytes, the alert's 2 bytes, its content type and
a 16-byte tag; TLS 1.2: an alert record). Real output after a silence is longer (an HTTP
response's headers alone exceed the short record), or not TLS at all (``ssh host 'sleep 300;
echo done'``), and is never held.
"""

from __future__ import annotations

import enum

__all__ = ["MAX_CLOSE_BYTES", "CloseShape", "idle_close_shape"]

_HEADER = 5
_APPLICATION_DATA, _ALERT = 0x17, 0x15
_TLS12 = b"\x03\x03"  # the legacy version every TLS 1.2 and 1.3 record carries
#: The close alert in TLS 1.3: content type + 2-byte alert + a 16-byte AEAD tag (AES-GCM,
#: ChaCha20-Poly1305: every suite a browser or nginx negotiates).
TLS13_CLOSE_RECORD = 19
#: A TLS 1.2 alert record: 2 bytes, an 8-byte explicit nonce and a 16-byte tag (AES-GCM: 26),
#: or 18 with ChaCha20-Poly1305; 32 leaves room and no more.
TLS12_ALERT_MAX = 32
#: The record before the alert: an HTTP/2 GOAWAY is a 9-byte frame header and 8 bytes (34 in
#: TLS 1.3); a server may add a short debug text. An HTTP response does not fit in this.
GOAWAY_RECORD_MAX = 48
#: The most an idle close can take: two headers, the GOAWAY and the alert.
MAX_CLOSE_BYTES = 2 * _HEADER + GOAWAY_RECORD_MAX + TLS12_ALERT_MAX


class CloseShape(enum.Enum):
    NO = "no"  # not a close: deliver now
    MAYBE = "maybe"  # the start of one: wait (briefly) for the rest
    YES = "yes"  # a whole close: only its FIN may follow


def _is_alert(content_type: int, length: int) -> bool:
    return ((content_type == _APPLICATION_DATA and length == TLS13_CLOSE_RECORD)
            or (content_type == _ALERT and length <= TLS12_ALERT_MAX))


def idle_close_shape(data: bytes | bytearray | memoryview) -> CloseShape:
    """Whether ``data`` (everything the destination sent since its silence) is an idle close,
    the start of one, or not one."""
    size = len(data)
    if size == 0 or size > MAX_CLOSE_BYTES:
        return CloseShape.NO
    position = 0
    records = 0
    while position < size:
        if size - position < _HEADER:
            # A header cut by the read: its first bytes must still fit.
            head = bytes(data[position:size])
            if head[0] not in (_APPLICATION_DATA, _ALERT) or not _TLS12.startswith(head[1:3]):
                return CloseShape.NO
            return CloseShape.MAYBE
        content_type = data[position]
        if content_type not in (_APPLICATION_DATA, _ALERT):
            return CloseShape.NO
        if bytes(data[position + 1 : position + 3]) != _TLS12:
            return CloseShape.NO
        length = int.from_bytes(data[position + 3 : position + _HEADER], "big")
        alert = _is_alert(content_type, length)
        if not alert and (records > 0 or content_type != _APPLICATION_DATA
                          or length > GOAWAY_RECORD_MAX):
            return CloseShape.NO
        end = position + _HEADER + length
        records += 1
        if end > size:
            return CloseShape.MAYBE  # the record's body is still coming
        if alert:
            return CloseShape.YES if end == size else CloseShape.NO
        position = end
    return CloseShape.MAYBE  # a GOAWAY-sized record: its alert may follow
