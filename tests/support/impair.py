"""A user-space impairment bridge for tests: delay, random loss and blackholing, per direction.

This kernel has neither ``tc netem`` nor NFQUEUE, so a bad link is built the way the censor
lab builds its in-path censor (:mod:`veil.lab.bridge`, whose packet sockets this reuses): two
veth ends in a namespace of their own, an AF_PACKET socket on each, and every frame that
arrives on one end goes out of the other one, unless this program decides otherwise::

    [client] c0 ==== a [bridge ns: this program] b ==== s0 [server]

Per direction (``a2b``: arrived on ``a``, leaves by ``b``; ``b2a`` the other way) it can

- delay every frame by a fixed number of milliseconds, counted from its arrival: frames wait
  in one FIFO queue per direction whose departure times never decrease (a frame departs at
  ``max(arrival + delay, departure of the frame before it)``), so a delay changed at run time
  never reorders a direction, and a burst of N frames leaves ``delay`` later, not ``N * delay``;
- drop a random fraction of frames, drawn from that direction's own ``random.Random`` (seeded:
  the same frame sequence loses the same frames, whatever the other direction does);
- blackhole: drop everything, ARP included, and the frames already queued when they come due
  (a cut cable loses what is on it), until switched back.

It is controlled at run time through its stdin, one command a line, one JSON line answered on
stdout per command (so when :meth:`BridgeProcess.set` returns, the change is in force)::

    set a2b|b2a|both [delay=MS] [loss=FRACTION] [blackhole=0|1]
    stats

It exits on SIGTERM/SIGINT or when stdin closes (the test that drove it is gone), and writes
its counters to stderr on the way out.

GSO/TSO. ``veil.lab.bridge.open_end`` sets ``PACKET_VNET_HDR``: the kernel hands every frame
over with its virtio-net header and takes it back the same way, so TSO super-frames (up to
64 KiB) and frames whose checksum is still to be filled in cross intact, without ethtool
(not installed here). But a lost super-frame would be ~45 segments lost at once: loss would
come in bursts, and 2 % of frames would be far less than 2 % of segments. So the test sets
``gso_max_segs 1`` on the *sending* veths (:func:`one_segment_per_frame`; the bridge's own
veth ends never coalesce: veth GRO needs ethtool or XDP). What actually arrives is counted
(``gso_frames``: frames whose vnet header carries a GSO type; ``max_frame``: the largest
Ethernet frame). Measured on this kernel (6.18, veth, MTU 1500), 16 MiB of one TCP connection
through the bridge: without the setting, 277 frames, 270 of them GSO, up to 65,226 bytes;
with it, 11,592 frames, none GSO, none over 1,514 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from veil.lab.bridge import MAX_FRAME, PACKET_OUTGOING, VNET_HDR, open_end

DIRECTIONS = ("a2b", "b2a")
# Frames waiting for their departure in one direction; beyond this a frame is tail-dropped
# (counted as ``overflow``), as a router's queue would, so a sender that outruns the delay
# cannot grow the bridge without bound. 40 ms of 1 Gbit/s in 1514-byte frames is ~3,300.
MAX_QUEUED = 50_000
# Offset of gso_type in struct virtio_net_hdr (flags u8, gso_type u8, ...); 0 is GSO_NONE.
VNET_GSO_TYPE = 1
# The controller's waits: the bridge importing veil and binding two sockets on a busy 2-core
# box, and the answer to one command (the loop answers between two batches of frames).
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 5.0
STOP_GRACE_S = 3.0


@dataclass
class Impairment:
    """What one direction does to its frames."""

    delay_ms: float = 0.0
    loss: float = 0.0
    """Fraction of frames dropped at random, 0..1."""
    blackhole: bool = False

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"delay must be >= 0 and loss within 0..1, not {self}")


@dataclass
class LinkStats:
    """Counters of one direction; ``frames`` arrived = forwarded + every kind of drop + queued."""

    frames: int = 0
    forwarded: int = 0
    lost: int = 0
    blackholed: int = 0
    overflow: int = 0
    send_errors: int = 0
    gso_frames: int = 0
    max_frame: int = 0


@dataclass
class _Link:
    """One direction: where its frames go, what is done to them, and its departure queue."""

    out: socket.socket
    rng: random.Random
    impairment: Impairment = field(default_factory=Impairment)
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    last_departure: float = 0.0
    stats: LinkStats = field(default_factory=LinkStats)


class ImpairBridge:
    """Two packet sockets and one impaired link each way between them (runs in the namespace)."""

    def __init__(self, a: str, b: str, seed: int = 0) -> None:
        sock_a = open_end(a)
        try:
            sock_b = open_end(b)
        except BaseException:
            sock_a.close()
            raise
        self.socks = (sock_a, sock_b)
        self.links = {"a2b": _Link(sock_b, random.Random(seed * 2)),
                      "b2a": _Link(sock_a, random.Random(seed * 2 + 1))}
        self._by_fd = {sock_a.fileno(): (sock_a, self.links["a2b"]),
                       sock_b.fileno(): (sock_b, self.links["b2a"])}
        self.buf = bytearray(MAX_FRAME)
        self.view = memoryview(self.buf)
        self._control = b""
        self._running = True

    # ------------------------------------------------------------------ configuration
    def set(self, direction: str, **changes: Any) -> None:
        """Change ``delay_ms``, ``loss`` and/or ``blackhole`` of ``a2b``, ``b2a`` or ``both``."""
        names = DIRECTIONS if direction == "both" else (direction,)
        for name in names:
            if name not in self.links:
                raise ValueError(f"direction must be a2b, b2a or both, not {direction!r}")
        for name in names:
            link = self.links[name]
            link.impairment = Impairment(**{**asdict(link.impairment), **changes})

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: {**asdict(link.stats), **asdict(link.impairment), "queued": len(link.queue)}
                for name, link in self.links.items()}

    # ------------------------------------------------------------------ frames
    def _drain(self, sock: socket.socket, link: _Link) -> None:
        buf, view, stats, queue = self.buf, self.view, link.stats, link.queue
        while True:
            try:
                n, address = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            if address[2] == PACKET_OUTGOING:
                continue  # our own sends, on kernels without PACKET_IGNORE_OUTGOING
            stats.frames += 1
            stats.max_frame = max(stats.max_frame, n - VNET_HDR)
            if buf[VNET_GSO_TYPE]:
                stats.gso_frames += 1
            impairment = link.impairment
            if impairment.blackhole:
                stats.blackholed += 1
            elif impairment.loss and link.rng.random() < impairment.loss:
                stats.lost += 1
            elif not impairment.delay_ms and not queue:
                self._send(link, view[:n])
            elif len(queue) >= MAX_QUEUED:
                stats.overflow += 1
            else:
                now = time.monotonic()
                departure = max(now + impairment.delay_ms / 1000.0, link.last_departure)
                link.last_departure = departure
                queue.append((departure, bytes(view[:n])))

    def _send(self, link: _Link, frame: bytes | memoryview) -> None:
        try:
            link.out.send(frame)
            link.stats.forwarded += 1
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE):
                raise
            link.stats.send_errors += 1  # a full device queue is a drop, as on a real link

    def _release(self) -> float | None:
        """Send every frame that is due; return when the next one is (None: none queued)."""
        now = time.monotonic()
        next_due: float | None = None
        for link in self.links.values():
            queue = link.queue
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                if link.impairment.blackhole:
                    link.stats.blackholed += 1
                else:
                    self._send(link, frame)
            if queue and (next_due is None or queue[0][0] < next_due):
                next_due = queue[0][0]
        return next_due

    # ------------------------------------------------------------------ control
    def _command(self, line: str) -> dict[str, Any]:
        words = line.split()
        if words == ["stats"]:
            return {"ok": True, "stats": self.stats()}
        if len(words) >= 2 and words[0] == "set":
            changes: dict[str, Any] = {}
            for word in words[2:]:
                key, _, value = word.partition("=")
                if key == "delay":
                    changes["delay_ms"] = float(value)
                elif key == "loss":
                    changes["loss"] = float(value)
                elif key == "blackhole":
                    changes["blackhole"] = value not in ("0", "off", "false")
                else:
                    raise ValueError(f"unknown setting {key!r}")
            self.set(words[1], **changes)
            return {"ok": True}
        raise ValueError(f"unknown command {line!r}")

    def _read_control(self, fd: int, out: IO[str]) -> None:
        data = os.read(fd, 4096)
        if not data:
            self._running = False  # whoever drove us is gone
            return
        self._control += data
        while b"\n" in self._control:
            raw, self._control = self._control.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                reply = self._command(line)
            except (ValueError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            out.write(json.dumps(reply) + "\n")
            out.flush()

    def run(self, control: int | None = None, out: IO[str] = sys.stdout) -> None:
        """Bridge frames until stopped; commands are read from the ``control`` fd."""
        poller = select.epoll()
        for fd in self._by_fd:
            poller.register(fd, select.EPOLLIN)
        if control is not None:
            poller.register(control, select.EPOLLIN)
        out.write("ready\n")
        out.flush()
        next_due: float | None = None
        while self._running:
            timeout = -1.0 if next_due is None else max(0.0, next_due - time.monotonic())
            for fd, _ in poller.poll(timeout):
                if fd == control:
                    self._read_control(fd, out)
                else:
                    self._drain(*self._by_fd[fd])
            next_due = self._release()
        poller.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


# ---------------------------------------------------------------------- the test's side
def one_segment_per_frame(ns: str, dev: str) -> None:
    """Make ``dev`` (in namespace ``ns``) send one TCP segment per frame, so that the bridge's
    loss is per segment (see the module docstring)."""
    subprocess.run(["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1"], check=True,
                   capture_output=True, timeout=10)


class BridgeProcess:
    """The test's handle on a bridge running in namespace ``ns``, a process it started.

    It is stopped by its PID (:meth:`close`), and stops by itself if this process dies (its
    stdin closes).
    """

    def __init__(self, ns: str, a: str, b: str, log: Path, *, seed: int = 0) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()),
                 "--a", a, "--b", b, "--seed", str(seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self._pending = b""
        try:
            line = self._readline(START_TIMEOUT_S)
            if line != "ready":
                raise RuntimeError(f"impair bridge did not start ({line!r}): {self._log_tail()}")
        except BaseException:
            self.close()
            raise

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"impair bridge: no answer in {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"impair bridge exited: {self._log_tail()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode().strip()

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._readline(REPLY_TIMEOUT_S))
        if not reply.get("ok"):
            raise ValueError(f"impair bridge refused {command!r}: {reply.get('error')}")
        return reply

    def set(self, direction: str = "both", *, delay_ms: float | None = None,
            loss: float | None = None, blackhole: bool | None = None) -> None:
        """Change one direction (``a2b``, ``b2a``) or ``both``; in force when this returns."""
        words = [f"set {direction}"]
        if delay_ms is not None:
            words.append(f"delay={delay_ms}")
        if loss is not None:
            words.append(f"loss={loss}")
        if blackhole is not None:
            words.append(f"blackhole={int(blackhole)}")
        self._ask(" ".join(words))

    def blackhole(self, on: bool = True, direction: str = "both") -> None:
        self.set(direction, blackhole=on)

    def clear(self) -> None:
        """A perfect link again: no delay, no loss, no blackhole."""
        self.set("both", delay_ms=0, loss=0, blackhole=False)

    def stats(self) -> dict[str, dict[str, Any]]:
        stats: dict[str, dict[str, Any]] = self._ask("stats")["stats"]
        return stats

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="first interface")
    parser.add_argument("--b", required=True, help="second interface")
    parser.add_argument("--seed", type=int, default=0, help="seed of the loss draws")
    parser.add_argument("--delay", type=float, default=0.0, help="delay in ms, each direction")
    parser.add_argument("--loss", type=float, default=0.0,
                        help="fraction of frames lost, each direction")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bridge = ImpairBridge(args.a, args.b, args.seed)
    try:
        bridge.set("both", delay_ms=args.delay, loss=args.loss)
        bridge.run(control=sys.stdin.fileno())
    finally:
        bridge.close()
        print("impair " + json.dumps(bridge.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
