"""Block reports: a client tells its server, through a way in that works, which other way in
was blocked for it, so that the operator learns "the direct IP is blocked for most users"
(docs/protocol.md, "Block reports"). Sans-IO: bytes and ``now`` in, bytes out.

The carrier is a PADDING frame whose payload begins with :data:`REPORT_TAG` (veil pads with
zero bytes, so no padding of veil's begins so). Every server ignores a PADDING payload, so an
old server takes a report for padding, and a new client keeps working with it; a new server
reads it (veil.protocol.session, ``ReportReceived``). Version 1::

    "VRPT" | version (1) | count (1) | count x entry
    entry:  way (1) | kind (1) | first seen (u16) | last seen (u16) | attempts (u16)
            | endpoint length (1) | endpoint (ASCII)

``way`` is the way's index in the key (0: the key's own HOST:PORT, then each ``via``);
``endpoint`` is ``scheme://host:port`` of that way, never its path (a CDN way's path is a
secret, and the server knows its own ways); ``first seen`` and ``last seen`` are minutes
before the report was sent (the client's clock is never compared with the server's);
``kind`` is a :class:`~veil.protocol.failover.Failure` code (:data:`FAILURE_CODES`). Nothing
about the user's traffic is in it: no destination, no address of the user's own.

:class:`BlockLog` is the client's side: fed with each failure and success on each way, it
says what to report on a session that came up through another way, once per way per block
episode.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from veil.protocol.endpoint import Endpoint
from veil.protocol.failover import Failure
from veil.protocol.frames import MAX_PADDING_PAYLOAD, REPORT_TAG

REPORT_VERSION = 1
#: Entries in one report: one per way of a key (its address and at most MAX_VIA more, see
#: veil.protocol.endpoint), so a client never has more to say at once.
MAX_REPORT_ENTRIES = 16
#: An endpoint's length fits one byte; ``https://`` + a 253-character name + ``:65535`` does
#: not, and such a way is reported by its index alone (an empty endpoint).
MAX_ENDPOINT_LABEL = 255
#: Minutes and attempts are u16: 45 days, 65,535 attempts; larger values are sent as these.
MAX_U16 = 0xFFFF
#: Wire codes of the failure kinds. Stable: a code is never reused; a kind a reader does not
#: know is counted as "other".
FAILURE_CODES = {Failure.REFUSED: 1, Failure.UNREACHABLE: 2, Failure.RESET: 3, Failure.CUT: 4,
                 Failure.TIMEOUT: 5, Failure.FOREIGN: 6, Failure.SILENT: 7}
#: The label a reader gives each code (metrics, the panel, the alert hook's VEIL_KIND).
KIND_NAMES = {code: failure.name.lower() for failure, code in FAILURE_CODES.items()}
OTHER_KIND = "other"

_HEAD = struct.Struct("!4sBB")
_ENTRY = struct.Struct("!BBHHHB")
#: The largest report: still a PADDING frame the receiver accepts (MAX_PADDING_PAYLOAD).
MAX_REPORT_PAYLOAD = _HEAD.size + MAX_REPORT_ENTRIES * (_ENTRY.size + MAX_ENDPOINT_LABEL)
assert MAX_REPORT_PAYLOAD <= MAX_PADDING_PAYLOAD


@dataclass(frozen=True, slots=True)
class BlockedWay:
    """One way in that failed for the reporting client."""

    #: Its index in the key's ways (0: the key's own HOST:PORT).
    way: int
    #: ``scheme://host:port``, no path ("" when too long to send).
    endpoint: str
    #: What failed (a Failure's name in lower case, or "other" for a code unknown here).
    kind: str
    #: Minutes before the report since the first and the latest failure of this episode.
    first_seen_min: int
    last_seen_min: int
    #: Failed attempts in this episode.
    attempts: int

    def __post_init__(self) -> None:
        if not 0 <= self.way <= 0xFF:
            raise ValueError(f"way index {self.way} out of range")
        if len(self.endpoint) > MAX_ENDPOINT_LABEL or not self.endpoint.isascii():
            raise ValueError("endpoint label too long or not ASCII")
        for value in (self.first_seen_min, self.last_seen_min, self.attempts):
            if not 0 <= value <= MAX_U16:
                raise ValueError(f"{value} is not a u16")


def way_label(endpoint: Endpoint) -> str:
    """How reports, metrics and the panel name a way in: ``scheme://host:port``, never the
    secret path of a CDN way."""
    if endpoint.address is None:
        return endpoint.url.partition("/")[0] + "//?"
    return f"{endpoint.scheme}://{endpoint.address}"


def encode_report(entries: Sequence[BlockedWay]) -> bytes:
    """A report's PADDING payload (version 1)."""
    if not 1 <= len(entries) <= MAX_REPORT_ENTRIES:
        raise ValueError(f"a report holds 1 to {MAX_REPORT_ENTRIES} entries")
    parts = [_HEAD.pack(REPORT_TAG, REPORT_VERSION, len(entries))]
    for entry in entries:
        code = next((c for f, c in FAILURE_CODES.items() if f.name.lower() == entry.kind), 0)
        label = entry.endpoint.encode("ascii")
        parts.append(_ENTRY.pack(entry.way, code, entry.first_seen_min, entry.last_seen_min,
                                 entry.attempts, len(label)))
        parts.append(label)
    return b"".join(parts)


def decode_report(payload: bytes) -> tuple[BlockedWay, ...] | None:
    """The entries of a report; None for a version this veil does not read (a newer
    client's: ignored, like padding). ValueError for a malformed version-1 report."""
    if len(payload) < _HEAD.size:
        raise ValueError("report shorter than its header")
    tag, version, count = _HEAD.unpack_from(payload)
    if tag != REPORT_TAG:
        raise ValueError("not a report")
    if version != REPORT_VERSION:
        return None
    if not 1 <= count <= MAX_REPORT_ENTRIES:
        raise ValueError(f"report with {count} entries")
    entries = []
    pos = _HEAD.size
    for _ in range(count):
        if len(payload) < pos + _ENTRY.size:
            raise ValueError("report cut short")
        way, code, first, last, attempts, size = _ENTRY.unpack_from(payload, pos)
        pos += _ENTRY.size
        label = payload[pos : pos + size]
        pos += size
        if len(label) != size:
            raise ValueError("report cut short")
        try:
            text = label.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("endpoint not ASCII") from None
        if not text.isprintable():
            raise ValueError("endpoint not printable")
        entries.append(BlockedWay(way, text, KIND_NAMES.get(code, OTHER_KIND), first, last,
                                  attempts))
    if pos != len(payload):
        raise ValueError("trailing bytes in report")
    return tuple(entries)


@dataclass(slots=True)
class _Episode:
    failure: Failure
    first: float
    last: float
    attempts: int = 0
    blocked: bool = False  # the chooser blocked the way during this episode
    sent: bool = False
    over: bool = False  # the way worked again; kept only until reported


class BlockLog:
    """The client's memory of block episodes, one per way at most (so it is bounded by the
    key's ways): an episode begins with a way's first failure, becomes reportable once the
    way is blocked (the chooser's judgement: two failures in a row, or one conclusive), and
    is reported once, on the next session that comes up through another way. A success on
    the way ends it; a block that ended before any report could go is still reported."""

    def __init__(self, ways: Sequence[tuple[int, str]]) -> None:
        """``ways``: per way the tunnel uses, its index in the key and its label."""
        self._ways = tuple((index, label if len(label) <= MAX_ENDPOINT_LABEL else "")
                           for index, label in ways)
        self._episodes: dict[int, _Episode] = {}

    def failed(self, way: int, failure: Failure, now: float, *, blocked: bool) -> None:
        episode = self._episodes.get(way)
        if episode is None or episode.over:
            episode = self._episodes[way] = _Episode(failure, now, now)
        episode.failure, episode.last = failure, now
        episode.attempts += 1
        episode.blocked = episode.blocked or blocked

    def succeeded(self, way: int) -> None:
        episode = self._episodes.get(way)
        if episode is None:
            return
        if episode.blocked and not episode.sent:
            episode.over = True
        else:
            del self._episodes[way]

    def pending(self, through: int) -> bool:
        return any(self._reportable(way, episode, through)
                   for way, episode in self._episodes.items())

    def take(self, through: int, now: float) -> bytes | None:
        """The report to send on a session that came up on way ``through``, or None; what it
        holds is not reported again."""
        entries = []
        for way, episode in sorted(self._episodes.items()):
            if not self._reportable(way, episode, through):
                continue
            episode.sent = True
            index, label = self._ways[way]
            entries.append(BlockedWay(
                index, label, episode.failure.name.lower(),
                min(MAX_U16, int((now - episode.first) // 60)),
                min(MAX_U16, int((now - episode.last) // 60)), min(MAX_U16, episode.attempts)))
        for way in [w for w, e in self._episodes.items() if e.over and e.sent]:
            del self._episodes[way]
        return encode_report(entries[:MAX_REPORT_ENTRIES]) if entries else None

    @staticmethod
    def _reportable(way: int, episode: _Episode, through: int) -> bool:
        return episode.blocked and not episode.sent and way != through
