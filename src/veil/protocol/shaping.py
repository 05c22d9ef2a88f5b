"""Traffic shaping: hide the sizes of what the tunnel carries where they give it away.

A tunnel that relays a browser's HTTPS shows the inner TLS handshake in the sizes and
directions of its first outer records: a ClientHello-sized client record, a larger server
flight, then a ~64-byte client Finished (Xue et al., USENIX Security 2024; the lab's
``tls-in-tls`` detector). Small random padding barely helps (the paper: VMess 0.859 -> 0.687
true-positive rate); padding the first flights to sizes that have nothing to do with the
inner messages does (XTLS Vision, NaiveProxy).

:class:`ShapingPolicy` says which writes are padded and to what size; the session applies it
when it hands bytes out (``Session.data_to_send``), with PADDING frames. Cost, with the
defaults: at most ``session_writes`` writes per direction at the start of a session, and the
first ``stream_writes`` writes that carry each new stream's data, are grown to a random
size in [``min_size``, ``max_size``] when smaller: at most ~22 KiB per session and ~2.8 KiB
per stream and direction, nothing on bulk transfers (their writes are larger already).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShapingPolicy:
    #: Writes at the start of a session (per direction) that are padded when small. The lab's
    #: detector, like the paper's classifiers, looks at the first 16 bursts of a connection.
    session_writes: int = 16
    #: Writes carrying a new stream's first data that are padded when small: an inner
    #: handshake (hello, server flight, Finished) takes two or three of them.
    stream_writes: int = 2
    #: A padded write is grown to a random size in this range (bytes on the wire, before TLS):
    #: above any inner Finished or alert, within the range of ordinary web records.
    min_size: int = 900
    max_size: int = 1400

    def padded_size(self, size: int) -> int:
        """The size a write of ``size`` bytes should have (``size`` when it is big enough)."""
        if size >= self.min_size:
            return size
        spread = self.max_size - self.min_size + 1
        return self.min_size + int.from_bytes(os.urandom(2), "big") % spread


#: What veil ships.
DEFAULT_SHAPING = ShapingPolicy()
#: No shaping at all (tests of exact bytes, benchmarks of the bare protocol).
NO_SHAPING = ShapingPolicy(session_writes=0, stream_writes=0)
