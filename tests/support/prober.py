"""A small active prober for tests: send bytes, record what comes back and how it ends.

The probing itself is the censor lab's (:mod:`veil.lab.probe`), which sees only what a
censor's prober sees: bytes and the way the connection closes (a TLS close_notify, a FIN
without one, a reset, or still open when the prober gives up). This module keeps the
loopback-only helpers the probe tests use.
"""

from __future__ import annotations

import random

from veil.lab.probe import GFW_LENGTHS, Probe, fetch_certificate, run_probe
from veil.lab.probe import Reaction as Outcome

__all__ = ["GFW_LENGTHS", "Outcome", "peer_certificate", "probe_raw", "probe_tls",
           "random_payloads"]

HOST = "127.0.0.1"


def probe_raw(port: int, payload: bytes, wait: float = 1.5) -> Outcome:
    """Send ``payload`` on a fresh TCP connection (no TLS)."""
    return run_probe(HOST, port, Probe("raw", payload), wait)


def probe_tls(port: int, payload: bytes, wait: float = 1.5, sni: str | None = None,
              alpn: list[str] | None = None) -> Outcome:
    """Complete a TLS handshake, then send ``payload`` as one record."""
    return run_probe(HOST, port, Probe("tls", payload, tls=True, sni=sni,
                                       alpn=tuple(alpn or ())), wait)


def peer_certificate(port: int, sni: str | None) -> bytes:
    der = fetch_certificate(HOST, port, sni)
    assert der is not None, "no TLS handshake"
    return der


def random_payloads(seed: int, count: int = 20, max_len: int = 2000) -> list[bytes]:
    """The GFW's random-probe lengths, a spread up to ``max_len``, and ``count`` more."""
    rng = random.Random(seed)
    lengths = [*GFW_LENGTHS, 1, 2, 3, 64, 100, 517, 1000, 1460, max_len]
    lengths += [rng.randint(1, max_len) for _ in range(count)]
    return [rng.randbytes(n) for n in lengths]
