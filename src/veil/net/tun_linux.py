"""Linux TUN devices with the kernel's offloads, and the few netlink/nftables steps around them.

A :class:`TunDevice` is opened with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` and TSO enabled
(``TUNSETOFFLOAD``), so one read returns a 10-byte ``virtio_net_hdr`` and a TCP
*super-packet* of up to 64 KiB that the kernel has not segmented yet; a write takes the same
and the kernel segments (or delivers it whole to a local socket). veil carries these pairs as
they are (veil.protocol.ip), so a bulk transfer costs one read, one frame and one write per
64 KiB instead of per 1,500 bytes. (The idea is wireguard-go's ``tun/offload_linux.go``;
wireguard-go must split and coalesce itself because WireGuard's packets are per-segment,
veil's frames need not be.)

Netlink (addresses, MTU, routes) uses pyroute2's synchronous ``IPRoute``, which runs its own
event loop: callers in a running loop call these helpers through ``asyncio.to_thread``.
nftables rulesets go through the ``nft`` program (``nft -f -``), one table per purpose, so
that removing veil's rules is deleting its table and touches nobody else's.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from veil.errors import ConfigError, VeilError
from veil.protocol.ip import GSO_HEADER_SIZE, MAX_IP_DATAGRAM

try:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
except ImportError:  # a dependency on Linux; _iproute() says what is missing
    IPRoute = None

    class NetlinkError(Exception):  # type: ignore[no-redef]
        code = 0

TUN_PATH = "/dev/net/tun"
# ioctl numbers from <linux/if_tun.h> (_IOW('T', n, int)).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16
# Packets read per readiness callback before yielding to the event loop: enough to amortise
# the callback, few enough that the TLS side gets to write between batches.
READ_BATCH = 64
# ... and at most this many bytes, so that one TLS write stays a few super-packets long.
READ_BATCH_BYTES = 256 * 1024
# Packets waiting for the writer thread; past this the kernel is behind and packets are
# dropped. Enough for a TLS read's worth of small packets (a 256 KiB batch of 500-byte
# packets); at most 32 MiB of super-packets.
MAX_WRITE_QUEUE = 512
# Packets at least this large are written by the writer thread (see _Writer).
THREAD_WRITE_MIN = 8 * 1024
# How long closing waits for the writer thread to finish its queue.
WRITER_JOIN_S = 2.0
# How long an nft or sysctl step may take before we call it broken.
COMMAND_TIMEOUT_S = 10.0


class TunError(VeilError):
    code = "tun"


class TunDevice:
    """An open TUN device in vnet-header mode. ``offload`` says whether TSO is on."""

    def __init__(self, name: str, *, offload: bool = True) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise ConfigError(f"interface name too long: {name!r}")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(f"cannot open {TUN_PATH}: {exc.strerror} (needs root or "
                           "CAP_NET_ADMIN)") from exc
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.name = result[:IFNAMSIZ].rstrip(b"\0").decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", GSO_HEADER_SIZE))
            if sys.byteorder == "big":
                # The header is little-endian on veil's wire; have the kernel speak that.
                fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
            self.offload = False
            if offload:
                self.offload = _set_offload(fd)
        except OSError as exc:
            os.close(fd)
            raise TunError(f"cannot set up TUN device {name}: {exc.strerror}") from exc
        self.fd = fd
        self._writer = _Writer(fd)

    def read(self) -> bytes:
        """One offload header + packet; raises BlockingIOError when none is waiting."""
        return os.read(self.fd, MAX_IP_DATAGRAM)

    def write(self, datagram: bytes | memoryview) -> None:
        """Queue one offload header + packet for the kernel (see :class:`_Writer`)."""
        self._writer.put(datagram)

    def close(self) -> None:
        self._writer.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Writer:
    """Writes packets to the device, the large ones from a thread of its own.

    A write of a 64 KiB super-packet is where the kernel does its share of the work
    (segmenting, forwarding, NAT, handing it to the receiving socket): a quarter of the event
    loop's time at full speed. In a thread (``os.write`` releases the GIL) that overlaps with
    the loop decrypting the next records. A small packet (an ACK, DNS, a game's UDP) is not
    worth a thread hand-off, which costs more than its write: it is written at once, unless
    packets queued before it are still unwritten (then it queues too: packets keep their
    order).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tun-writer", daemon=True)
        self._thread.start()
        # Two counters, each written by one thread only: equal when nothing is pending.
        self._queued = 0
        self._written = 0
        self.dropped = 0

    def put(self, datagram: bytes | memoryview) -> None:
        if self._queued == self._written and len(datagram) < THREAD_WRITE_MIN:
            try:
                os.write(self._fd, datagram)
            except OSError:
                self.dropped += 1  # refused by the kernel (bad offload header, no route)
            return
        if self._queued - self._written >= MAX_WRITE_QUEUE:
            self.dropped += 1  # the kernel is behind: drop, as a full router queue does
            return
        self._queued += 1
        self._queue.put(datagram)

    def _run(self) -> None:
        get = self._queue.get
        while (item := get()) is not None:
            try:
                os.write(self._fd, item)
            except OSError:
                self.dropped += 1  # see put()
            self._written += 1

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(WRITER_JOIN_S)


def _set_offload(fd: int) -> bool:
    """Enable checksum offload and TSO; False when the kernel takes neither (then every read
    is one packet).

    Not USO (UDP segmentation, kernel 6.2+): the super-packets go to the *peer's* kernel as
    they are, and an older one refuses UDP_L4 GSO writes (EINVAL) - QUIC from applications
    that use UDP_SEGMENT would then be lost. TCP segmentation is accepted by every kernel
    that has vnet headers.
    """
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


class PacketPump:
    """Reads a TUN device whenever it is readable and hands each packet to ``sink``."""

    def __init__(self, device: TunDevice, sink: Callable[[bytes], None], *,
                 on_batch_end: Callable[[], None] | None = None) -> None:
        self.device = device
        self._sink = sink
        self._on_batch_end = on_batch_end
        self._loop = asyncio.get_running_loop()
        self._reading = False

    def resume(self) -> None:
        if not self._reading and self.device.fd >= 0:
            self._reading = True
            self._loop.add_reader(self.device.fd, self._on_readable)

    def pause(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.device.fd)

    def _on_readable(self) -> None:
        read = self.device.read
        sink = self._sink
        budget = READ_BATCH_BYTES
        try:
            for _ in range(READ_BATCH):
                try:
                    packet = read()
                except BlockingIOError:
                    return
                except OSError:
                    return  # the device went away (closing); the owner stops the pump
                sink(packet)
                budget -= len(packet)
                if not self._reading or budget <= 0:
                    return  # paused by the sink (congested), or enough for one write
        finally:
            # The sink queues; this is where the batch leaves, in one write per session.
            if self._on_batch_end is not None:
                self._on_batch_end()


# ---------------------------------------------------------------- netlink
def _iproute() -> Any:
    if IPRoute is None:
        raise TunError("TUN mode needs pyroute2 (pip install pyroute2)")
    # pyroute2 logs every netlink message at DEBUG; veil's -vv is for veil's own messages.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pyroute2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return IPRoute()


def configure_link(name: str, addresses: Iterable[ipaddress.IPv4Interface
                                                  | ipaddress.IPv6Interface],
                   mtu: int) -> int:
    """Give the device its addresses and MTU and bring it up; returns its index."""
    try:
        return _configure_link(name, addresses, mtu)
    except NetlinkError as exc:
        raise TunError(f"cannot configure {name}: {exc}") from exc


def _configure_link(name: str, addresses: Iterable[ipaddress.IPv4Interface
                                                   | ipaddress.IPv6Interface],
                    mtu: int) -> int:
    with _iproute() as ipr:
        index = int(ipr.link_lookup(ifname=name)[0])
        ipr.link("set", index=index, mtu=mtu)
        for iface in addresses:
            # A TUN device is IFF_NOARP, so IPv6 runs no duplicate-address detection on it:
            # the address is usable at once.
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen)
        ipr.link("set", index=index, state="up")
        return index


def flush_addresses(name: str) -> None:
    with _iproute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        if indexes:
            ipr.flush_addr(index=indexes[0])


def route_get(destination: str) -> tuple[str | None, int]:
    """(gateway or None when on-link, output interface index) the kernel uses now."""
    with _iproute() as ipr:
        msg = next(iter(ipr.route("get", dst=destination)))
        gateway = msg.get_attr("RTA_GATEWAY")
        return (str(gateway) if gateway else None), int(msg.get_attr("RTA_OIF"))


def add_route(destination: str, *, oif: int, gateway: str | None = None,
              replace: bool = False) -> bool:
    """Add a route. With ``replace`` one with the same key is overwritten (routes on our own
    device); without, an existing one is left alone and False returned (it is not ours to
    delete later)."""
    kwargs: dict[str, Any] = {"dst": destination, "oif": oif}
    if gateway:
        kwargs["gateway"] = gateway
    with _iproute() as ipr:
        try:
            ipr.route("replace" if replace else "add", **kwargs)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and not replace:
                return False
            raise TunError(f"cannot add a route to {destination}: {exc}") from exc
    return True


def delete_route(destination: str, *, oif: int | None = None,
                 gateway: str | None = None) -> bool:
    """Delete a route; False when it was not there (already gone is fine on restore)."""
    kwargs: dict[str, Any] = {"dst": destination}
    if oif is not None:
        kwargs["oif"] = oif
    if gateway:
        kwargs["gateway"] = gateway
    with _iproute() as ipr:
        try:
            ipr.route("del", **kwargs)
        except NetlinkError:
            return False
    return True


# ---------------------------------------------------------------- nftables and sysctl
def nft(ruleset: str) -> None:
    """Apply an nftables ruleset (``nft -f -``), atomically: all of it or nothing."""
    program = shutil.which("nft") or "/usr/sbin/nft"
    if not Path(program).exists():
        raise TunError("TUN mode needs nftables (apt-get install nftables)")
    proc = subprocess.run([program, "-f", "-"], input=ruleset, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise TunError(f"nft failed: {proc.stderr.strip()}")


def nft_delete_table(family: str, name: str) -> bool:
    """Delete one of our tables; False when there was none."""
    program = shutil.which("nft") or "/usr/sbin/nft"
    proc = subprocess.run([program, "delete", "table", family, name], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    return proc.returncode == 0


def read_sysctl(name: str) -> str:
    return Path("/proc/sys", name.replace(".", "/")).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    """Set a sysctl of this process's network namespace (net.* sysctls are per namespace)."""
    try:
        Path("/proc/sys", name.replace(".", "/")).write_text(value)
    except OSError as exc:
        raise TunError(f"cannot set {name}: {exc.strerror}") from exc


def netns_id() -> int:
    """An identity of this process's network namespace, to name per-namespace state."""
    return os.stat("/proc/self/ns/net").st_ino
