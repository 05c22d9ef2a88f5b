"""The censor's I/O: a user-space Ethernet bridge between two interfaces (Linux only).

This kernel has no NFQUEUE and no tc netem, so the censor sits in a network namespace of
its own between two veth ends, with an AF_PACKET socket on each: every frame that arrives on
one end is shown to :class:`veil.lab.censor.Censor` and, unless it says drop, sent out of
the other end unchanged. The sockets use ``PACKET_VNET_HDR``, so TSO super-frames and frames
whose checksum is still to be filled in cross intact (the kernel hands each frame over with
its virtio-net header and takes it back the same way), as ``bench/delaybridge.py`` does.

Run it in the middle namespace, whose kernel must stay silent on the link (IPv6 off):

    ip netns exec censor veil lab censor --a vc --b vs

It prints ``ready`` once both sockets are bound, then one JSON line per flagged flow, and a
line of counters on stderr when it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import signal
import socket
import struct
import sys
import time
from typing import TextIO

from veil.errors import ConfigError
from veil.lab.censor import Censor

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
VNET_HDR = 10  # struct virtio_net_hdr, without the num_buffers field
ETH_HEADER = 14
ETHERTYPES_IP = (0x0800, 0x86DD)
# One receive buffer, reused: a GSO frame from a veth can carry 64 KiB of payload.
MAX_FRAME = 256 * 1024
# Deep enough to absorb bursts between two turns of the loop.
SOCKET_BUFFER = 8 * 1024 * 1024


def open_end(ifname: str) -> socket.socket:
    """A packet socket that sees every frame arriving on ``ifname`` (and only that one)."""
    if not hasattr(socket, "AF_PACKET"):
        raise ConfigError("veil lab censor needs Linux (AF_PACKET sockets)")
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # nothing until bound
    except PermissionError as exc:
        raise ConfigError("veil lab censor needs root (CAP_NET_RAW)") from exc
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    with contextlib.suppress(OSError):  # older kernels: outgoing frames filtered below
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    try:
        sock.bind((ifname, ETH_P_ALL))
        index = socket.if_nametoindex(ifname)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot open interface {ifname!r}: {exc.strerror}") from exc
    membership = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
    sock.setblocking(False)
    return sock


class Bridge:
    """Two packet sockets and the censor between them."""

    def __init__(self, a: str, b: str, censor: Censor, out: TextIO = sys.stdout) -> None:
        self.censor = censor
        self.out = out
        first, second = open_end(a), open_end(b)
        self.ends = {first.fileno(): (first, second), second.fileno(): (second, first)}
        self.buf = bytearray(MAX_FRAME)
        self.view = memoryview(self.buf)
        self.send_errors = 0
        self._reported = 0

    def _forward(self, n: int) -> bool:
        frame = self.view[VNET_HDR:n]
        if len(frame) < ETH_HEADER:
            return True
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        if ethertype not in ETHERTYPES_IP:
            return True  # ARP and the like cross untouched
        return self.censor.packet(bytes(frame[ETH_HEADER:]), time.monotonic())

    def _drain(self, sock: socket.socket, out: socket.socket) -> None:
        while True:
            try:
                n, address = sock.recvfrom_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            if address[2] == PACKET_OUTGOING or not self._forward(n):
                continue
            try:
                out.send(self.view[:n])
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE):
                    raise
                self.send_errors += 1  # a full device queue is a drop, as on a real link

    def _report(self) -> None:
        events = self.censor.events
        for event in events[self._reported:]:
            self.out.write(json.dumps(event.to_json()) + "\n")
        if len(events) > self._reported:
            self.out.flush()
            self._reported = len(events)

    def run(self) -> None:
        poller = select.epoll()
        for fd in self.ends:
            poller.register(fd, select.EPOLLIN)
        self.out.write("ready\n")
        self.out.flush()
        while True:
            for fd, _ in poller.poll():
                sock, out = self.ends[fd]
                self._drain(sock, out)
            self._report()

    def close(self) -> None:
        for sock, _ in self.ends.values():
            sock.close()


def run_bridge(a: str, b: str, censor: Censor) -> None:
    """Bridge ``a`` and ``b`` through ``censor`` until SIGTERM or SIGINT."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bridge = Bridge(a, b, censor)
    try:
        bridge.run()
    finally:
        bridge.close()
        stats = censor.stats
        print(f"censor flows={stats.flows} flagged={stats.flagged} forwarded={stats.forwarded} "
              f"dropped={stats.dropped} send_errors={bridge.send_errors}", file=sys.stderr,
              flush=True)
