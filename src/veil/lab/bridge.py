"""The censor's I/O: a user-space Ethernet bridge between two interfaces (Linux only).

This kernel has no NFQUEUE and no tc netem, so the censor sits in a network namespace of
its own between two veth ends, with an AF_PACKET socket on each: every frame that arrives on
one end is shown to :class:`veil.lab.censor.Censor` and, unless it says drop, sent out of
the other end unchanged. The sockets use ``PACKET_VNET_HDR``, so TSO super-frames and frames
whose checksum is still to be filled in cross intact (the kernel hands each frame over with
its virtio-net header and takes it back the same way), as ``bench/delaybridge.py`` does.

Run it in the middle namespace, whose kernel must stay silent on the link (IPv6 off):

    ip netns exec censor veil lab censor --a vc --b vs

It prints ``ready`` once both sockets are bound, then one JSON line per flagged flow and per
connection a rule acts on, and a line of counters on stderr when it stops (SIGTERM or
SIGINT). Packets the censor forges (RSTs) leave with the Ethernet addresses of the frame
that caused them (swapped when they go back to its sender) and a virtio-net header that
asks for nothing: their checksums are complete.

With a rules file, the censor's rules are the command line's plus the file's, and the file
is read again whenever its bytes change (checked every ``RULES_POLL_S``); a missing file
holds no rules. Each rule set it applies is printed as ``{"event": "rules", ...}``; a file
that cannot be read keeps the rules in force and prints ``{"event": "rules-error", ...}``.
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
from pathlib import Path
from typing import TextIO

from veil.errors import ConfigError
from veil.lab.censor import Censor, Decision, Rules

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
# How often the rules file is compared with what was last applied: a test that lifts a block
# waits for it (and for the "rules" line), a person does not notice a tenth of a second.
RULES_POLL_S = 0.1
# A rules file is a few lines; anything larger is a mistake, not rules (and is not read).
MAX_RULES_FILE = 256 * 1024
# Forged frames carry a virtio-net header of zeros: no offload, the checksums are complete.
PLAIN_VNET_HDR = bytes(VNET_HDR)


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


class RulesFile:
    """The rules file: read again when its bytes change; the censor gets base + file."""

    def __init__(self, path: Path, base: Rules) -> None:
        self.path = path
        self.base = base
        self._last: bytes | None = None

    def poll(self) -> tuple[Rules | None, str | None]:
        """(the rules to apply, or None when the file did not change; an error, or None)."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_RULES_FILE + 1)
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            return None, f"cannot read {self.path}: {exc.strerror}"
        if data == self._last:
            return None, None
        self._last = data
        if len(data) > MAX_RULES_FILE:
            return None, f"{self.path} is larger than {MAX_RULES_FILE} bytes"
        try:
            return self.base.merged(Rules.parse(data.decode())), None
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"{self.path}: {exc}"


class Bridge:
    """Two packet sockets and the censor between them."""

    def __init__(self, a: str, b: str, censor: Censor, out: TextIO = sys.stdout,
                 rules_file: RulesFile | None = None) -> None:
        self.censor = censor
        self.out = out
        self.rules_file = rules_file
        first, second = open_end(a), open_end(b)
        self.ends = {first.fileno(): (first, second), second.fileno(): (second, first)}
        self.buf = bytearray(MAX_FRAME)
        self.view = memoryview(self.buf)
        self.send_errors = 0

    def _decide(self, n: int) -> Decision | None:
        """The censor's decision on the frame in the buffer; None for one it does not judge."""
        frame = self.view[VNET_HDR:n]
        if len(frame) < ETH_HEADER:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        if ethertype not in ETHERTYPES_IP:
            return None  # ARP and the like cross untouched
        return self.censor.decide(bytes(frame[ETH_HEADER:]), time.monotonic())

    def _send(self, sock: socket.socket, data: bytes | memoryview) -> None:
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE):
                raise
            self.send_errors += 1  # a full device queue is a drop, as on a real link

    def _inject(self, decision: Decision, sock: socket.socket, out: socket.socket) -> None:
        frame = self.view[VNET_HDR:VNET_HDR + ETH_HEADER]
        dst, src, ethertype = bytes(frame[:6]), bytes(frame[6:12]), bytes(frame[12:14])
        for injection in decision.inject:
            if injection.back:  # to the sender: out of the interface its frame came in on
                self._send(sock, PLAIN_VNET_HDR + src + dst + ethertype + injection.packet)
            else:
                self._send(out, PLAIN_VNET_HDR + dst + src + ethertype + injection.packet)

    def _drain(self, sock: socket.socket, out: socket.socket) -> None:
        while True:
            try:
                n, address = sock.recvfrom_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            if address[2] == PACKET_OUTGOING:
                continue
            decision = self._decide(n)
            if decision is None or decision.forward:
                self._send(out, self.view[:n])
            if decision is not None and decision.inject:
                self._inject(decision, sock, out)

    def _report(self) -> None:
        events = self.censor.events
        if not events:
            return
        for event in events:
            self.out.write(json.dumps(event.to_json()) + "\n")
        self.out.flush()
        events.clear()  # written: a censor that runs for days must not keep them all

    def _reload(self) -> None:
        if self.rules_file is None:
            return
        rules, error = self.rules_file.poll()
        line: dict[str, object]
        if error is not None:
            line = {"event": "rules-error", "error": error}
        elif rules is not None:
            self.censor.set_rules(rules)
            line = {"event": "rules", "rules": rules.to_json()}
        else:
            return
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def run(self) -> None:
        poller = select.epoll()
        for fd in self.ends:
            poller.register(fd, select.EPOLLIN)
        self._reload()
        self.out.write("ready\n")
        self.out.flush()
        next_reload = time.monotonic() + RULES_POLL_S
        while True:
            timeout = max(0.0, next_reload - time.monotonic()) if self.rules_file else -1
            for fd, _ in poller.poll(timeout):
                sock, out = self.ends[fd]
                self._drain(sock, out)
            self._report()
            if self.rules_file is not None and time.monotonic() >= next_reload:
                self._reload()
                next_reload = time.monotonic() + RULES_POLL_S

    def close(self) -> None:
        for sock, _ in self.ends.values():
            sock.close()


def run_bridge(a: str, b: str, censor: Censor, rules_file: Path | None = None) -> None:
    """Bridge ``a`` and ``b`` through ``censor`` until SIGTERM or SIGINT; with ``rules_file``,
    the censor's rules are its own plus the file's, applied whenever the file changes."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watcher = RulesFile(rules_file, censor.rules) if rules_file is not None else None
    bridge = Bridge(a, b, censor, rules_file=watcher)
    try:
        bridge.run()
    finally:
        bridge.close()
        stats = censor.stats
        print(f"censor flows={stats.flows} flagged={stats.flagged} forwarded={stats.forwarded} "
              f"dropped={stats.dropped} injected={stats.injected} "
              f"send_errors={bridge.send_errors}", file=sys.stderr,
              flush=True)
