"""The record layer's cost, in one process: veil's sealer against the in-place seal it replaced.

Until December 2026 `RecordSealer.seal` copied each record's plaintext into the output buffer
and encrypted it there, in place (`encrypt_into` with overlapping input and output).
cryptography 51 refuses overlapping buffers, so the sealer now assembles each record's inner
plaintext in a 16 KiB scratch buffer and encrypts it into the output. Both make one copy of
the data; this measures whether the scratch buffer costs anything. The in-place variant is
kept here (only here) as the reference, and runs only where the installed cryptography still
allows it (< 51); elsewhere its row says so.

    python3 bench/record.py [--samples 30]

Prints MB/s of plaintext sealed (the fastest sample) per suite and write size, and the ratio
scratch / in-place. Opening is unchanged (it never overlapped) and not measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import cryptography

from veil.transport.tls13.keys import SUITES, traffic_keys
from veil.transport.tls13.record import (
    APPLICATION_DATA,
    HEADER,
    MAX_PLAINTEXT,
    OVERHEAD,
    TAG,
    RecordSealer,
    record_header,
)

WRITE_SIZES = (1024, 16 * 1024, 256 * 1024)  # a small write, one record, a full batch


class InPlaceSealer:
    """The seal veil used before: plaintext copied into the output, encrypted in place."""

    def __init__(self, suite: int, secret: bytes) -> None:
        info = SUITES[suite]
        key, iv = traffic_keys(info, secret)
        self._aead = info.aead(key)
        self._iv = int.from_bytes(iv, "big")
        self.seq = 0

    def seal(self, data: bytes) -> bytearray:
        src = memoryview(data)
        size = len(src)
        count = max(1, -(-size // MAX_PLAINTEXT))
        out = bytearray(size + count * OVERHEAD)
        view = memoryview(out)
        encrypt, iv, seq = self._aead.encrypt_into, self._iv, self.seq
        pos = offset = 0
        while offset < size:
            chunk = min(size - offset, MAX_PLAINTEXT)
            header = record_header(chunk)
            start = pos + HEADER
            end = start + chunk + 1 + TAG
            view[pos:start] = header
            view[start : start + chunk] = src[offset : offset + chunk]
            view[start + chunk] = APPLICATION_DATA
            encrypt((iv ^ seq).to_bytes(12, "big"), view[start : start + chunk + 1], header,
                    view[start:end])
            seq += 1
            pos, offset = end, offset + chunk
        self.seq = seq
        return out


def rate(seal: Callable[[bytes], bytearray], data: bytes, samples: int) -> float:
    """MB/s of plaintext: the fastest of ``samples`` timings of about 4 MB each (the minimum
    filters out what the other processes on the machine took)."""
    number = max(1, (4 << 20) // len(data))
    best = min(timeit.repeat(lambda: seal(data), repeat=samples, number=number))
    return number * len(data) / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=30,
                        help="timings of ~4 MB per case; the fastest is kept")
    args = parser.parse_args()
    print(f"cryptography {cryptography.__version__}, Python {sys.version.split()[0]}")
    print(f"{'suite':<30} {'write':>8} {'scratch MB/s':>13} {'in place MB/s':>14} {'ratio':>6}")
    for suite, info in sorted(SUITES.items()):
        secret = os.urandom(info.hash_len)
        for size in WRITE_SIZES:
            data = os.urandom(size)
            scratch = rate(RecordSealer(info, secret).seal, data, args.samples)
            try:
                InPlaceSealer(suite, secret).seal(data)
            except ValueError as exc:  # cryptography >= 51: "must not overlap"
                print(f"{info.suite.name:<30} {size:>8} {scratch:>13.0f} {'refused':>14}"
                      f"   ({exc})")
                continue
            in_place = rate(InPlaceSealer(suite, secret).seal, data, args.samples)
            print(f"{info.suite.name:<30} {size:>8} {scratch:>13.0f} {in_place:>14.0f} "
                  f"{scratch / in_place:>6.2f}")


if __name__ == "__main__":
    main()
