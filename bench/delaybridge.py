#!/usr/bin/env python3
"""A user-space Ethernet bridge that delays (and optionally drops) every frame.

This kernel has no ``tc netem`` and no NFQUEUE, so a WAN-like link is built
from two veth ends inside a namespace of their own (``middle``): this program
opens an AF_PACKET socket on each end and forwards every frame it receives on
one end out of the other one, ``--delay`` milliseconds after it arrived.

Frames wait in one heap keyed by their departure time, so delays overlap: a
frame's delay starts when it arrives, whatever is already queued, and a burst
of N frames leaves after ``delay``, not ``N * delay``.

The sockets use ``PACKET_VNET_HDR``: the kernel hands over each frame with its
virtio-net header (GSO size and type, checksum offsets), and takes it back the
same way. That lets TSO super-frames and frames whose checksum is still to be
filled in cross the bridge intact, with no ethtool on the veth ends.

It never touches an IP address: the two ends have none, and the namespace it
runs in should have IPv6 disabled so its kernel stays silent. Run it inside
that namespace, e.g.::

    ip netns exec veilbench-1-middle python3 bench/delaybridge.py \\
        --a vbmc --b vbms --delay 50 --loss 0.5

With ``--udp-budget MB`` it plays a network that throttles QUIC the way users
of UDP tunnels report: UDP passes until that many megabytes (both directions
together) have crossed, then every UDP frame is dropped; TCP is untouched.

It prints ``ready`` on stdout once both sockets are bound, and a line of
counters on stderr when it stops (SIGTERM or SIGINT). SIGUSR1 prints the
counters as one JSON line on stdout and starts them (and the UDP budget) over:
the bench sends it before each tunnel it measures, so each one meets a fresh
budget.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import json
import random
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4

# Where a frame's headers sit after the virtio-net header PACKET_VNET_HDR puts
# in front of it (struct virtio_net_hdr: 10 bytes).
VNET_HDR_LEN = 10
ETHERTYPE_AT = VNET_HDR_LEN + 12
L3_AT = VNET_HDR_LEN + 14
ETH_IPV4 = b"\x08\x00"
ETH_IPV6 = b"\x86\xdd"
IPPROTO_UDP = 17

# A GSO frame from a veth can be up to 64 KiB of payload (more with BIG TCP);
# one receive buffer this large is reused for every frame.
MAX_FRAME = 256 * 1024
# Socket buffers deep enough to hold a full delayed window at a few Gbit/s is
# not the point; they only have to absorb bursts between two event-loop turns.
SOCKET_BUFFER = 8 * 1024 * 1024
# Queued frames beyond this are dropped (a router's tail drop), so a sender
# that ignores congestion cannot grow this process without bound.
MAX_QUEUED = 200_000


def open_end(ifname: str) -> socket.socket:
    """An AF_PACKET socket that sees every frame arriving on ``ifname``."""
    # Protocol 0 at creation: the socket receives nothing until bound to the
    # one interface, so no frame of another interface can slip in first.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    # Older kernels lack it: outgoing frames are then filtered by pkttype.
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.bind((ifname, ETH_P_ALL))
    ifindex = socket.if_nametoindex(ifname)
    # Promiscuous: frames addressed to the MAC on the far side must be seen.
    mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


class Bridge:
    """Two packet sockets and the departure heap between them."""

    def __init__(self, a: str, b: str, delay_s: float, loss: float, seed: int | None,
                 udp_budget: int | None = None) -> None:
        self.ends = {}
        sa, sb = open_end(a), open_end(b)
        self.ends[sa.fileno()] = (sa, sb)
        self.ends[sb.fileno()] = (sb, sa)
        self.delay_s = delay_s
        self.loss = loss
        self.rng = random.Random(seed)
        # (departure time, arrival sequence, output socket, frame)
        self.heap: list[tuple[float, int, socket.socket, bytes]] = []
        self.seq = 0
        self.buf = bytearray(MAX_FRAME)
        self.view = memoryview(self.buf)
        self.udp_budget = udp_budget  # bytes of UDP let through; None: no limit
        self.stats = self._zero()

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"forwarded": 0, "lost": 0, "overflow": 0, "send_errors": 0,
                "udp_bytes": 0, "udp_dropped": 0}

    def report_and_reset(self) -> None:
        """SIGUSR1: the counters since the last reset, as JSON; the UDP budget starts over."""
        print(json.dumps(self.stats), flush=True)
        self.stats = self._zero()

    def _is_udp(self, n: int) -> bool:
        buf = self.buf
        if n <= L3_AT + 9:
            return False
        ethertype = bytes(buf[ETHERTYPE_AT:ETHERTYPE_AT + 2])
        if ethertype == ETH_IPV4:
            return buf[L3_AT + 9] == IPPROTO_UDP
        # IPv6: only a UDP next header right after the fixed header counts.
        return ethertype == ETH_IPV6 and buf[L3_AT + 6] == IPPROTO_UDP

    def _drain(self, sock: socket.socket, out: socket.socket) -> None:
        while True:
            try:
                n, addr = sock.recvfrom_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            now = time.monotonic()
            if addr[2] == PACKET_OUTGOING:
                continue
            if self.udp_budget is not None and self._is_udp(n):
                if self.stats["udp_bytes"] >= self.udp_budget:
                    self.stats["udp_dropped"] += 1
                    continue
                self.stats["udp_bytes"] += n - VNET_HDR_LEN
            if self.loss and self.rng.random() < self.loss:
                self.stats["lost"] += 1
                continue
            if len(self.heap) >= MAX_QUEUED:
                self.stats["overflow"] += 1
                continue
            self.seq += 1
            heapq.heappush(self.heap, (now + self.delay_s, self.seq, out, bytes(self.view[:n])))

    def _release(self) -> None:
        heap = self.heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, out, frame = heapq.heappop(heap)
            try:
                out.send(frame)
                self.stats["forwarded"] += 1
            except OSError as exc:
                # A full device queue is a drop, as on a real link.
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE):
                    raise
                self.stats["send_errors"] += 1

    def run(self) -> None:
        ep = select.epoll()
        for fd in self.ends:
            ep.register(fd, select.EPOLLIN)
        print("ready", flush=True)
        while True:
            timeout = max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else -1
            for fd, _ in ep.poll(timeout):
                sock, out = self.ends[fd]
                self._drain(sock, out)
            self._release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="first interface (e.g. the end toward the client)")
    p.add_argument("--b", required=True, help="second interface (e.g. the end toward the server)")
    p.add_argument("--delay", type=float, default=50.0, help="one-way delay in ms (each direction)")
    p.add_argument("--loss", type=float, default=0.0,
                   help="percent of frames dropped, independently in each direction")
    p.add_argument("--seed", type=int, default=None, help="seed of the loss draws")
    p.add_argument("--udp-budget", type=float, default=None, metavar="MB",
                   help="drop every UDP frame once this many megabytes of UDP have crossed")
    args = p.parse_args(argv)
    if not 0.0 <= args.loss <= 100.0 or args.delay < 0:
        p.error("--loss must be within 0..100 and --delay >= 0")

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    budget = None if args.udp_budget is None else int(args.udp_budget * 1e6)
    bridge = Bridge(args.a, args.b, args.delay / 1000.0, args.loss / 100.0, args.seed, budget)
    signal.signal(signal.SIGUSR1, lambda _s, _f: bridge.report_and_reset())
    try:
        bridge.run()
    finally:
        print("delaybridge " + " ".join(f"{k}={v}" for k, v in bridge.stats.items()),
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
