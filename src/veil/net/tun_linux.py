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
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from veil.errors import ConfigError, VeilError
from veil.protocol.ip import GSO_HEADER_SIZE, MAX_IP_DATAGRAM

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
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
IFNAMSIZ = 16
# Packets read per readiness callback before yielding to the event loop: enough to amortise
# the callback, few enough that the TLS side gets to write between batches.
READ_BATCH = 64
# ... and at most this many bytes, so that one TLS write stays a few super-packets long.
READ_BATCH_BYTES = 256 * 1024
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

    def read(self) -> bytes:
        """One offload header + packet; raises BlockingIOError when none is waiting."""
        return os.read(self.fd, MAX_IP_DATAGRAM)

    def write(self, datagram: bytes | memoryview) -> None:
        """Hand one offload header + packet to the kernel; a packet it refuses is dropped
        (a malformed header from the peer, or no route), as a router drops it."""
        with contextlib.suppress(OSError):
            os.write(self.fd, datagram)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _set_offload(fd: int) -> bool:
    """Enable checksum offload and TSO (and UDP segmentation offload where the kernel has
    it, 6.2+); False when the kernel takes none of it (then every read is one packet)."""
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    for flags in (base | TUN_F_USO4 | TUN_F_USO6, base):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return True
    return False


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
    try:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - a dependency on Linux
        raise TunError("TUN mode needs pyroute2 (pip install pyroute2)") from exc
    # pyroute2 logs every netlink message at DEBUG; veil's -vv is for veil's own messages.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("pyroute2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return IPRoute()


def configure_link(name: str, addresses: Iterable[ipaddress.IPv4Interface
                                                  | ipaddress.IPv6Interface],
                   mtu: int) -> int:
    """Give the device its addresses and MTU and bring it up; returns its index."""
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
        gateway = msg.get("RTA_GATEWAY")
        return (str(gateway) if gateway else None), int(msg.get("RTA_OIF"))


def add_route(destination: str, *, oif: int, gateway: str | None = None,
              table: int | None = None) -> None:
    """Add a route; one that is already there (same key) is replaced."""
    kwargs: dict[str, Any] = {"dst": destination, "oif": oif}
    if gateway:
        kwargs["gateway"] = gateway
    if table is not None:
        kwargs["table"] = table
    with _iproute() as ipr:
        ipr.route("replace", **kwargs)


def delete_route(destination: str, *, oif: int | None = None,
                 gateway: str | None = None) -> bool:
    """Delete a route; False when it was not there (already gone is fine on restore)."""
    kwargs: dict[str, Any] = {"dst": destination}
    if oif is not None:
        kwargs["oif"] = oif
    if gateway:
        kwargs["gateway"] = gateway
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]  # noqa: PLC0415

    with _iproute() as ipr:
        try:
            ipr.route("del", **kwargs)
        except NetlinkError:
            return False
    return True


def link_index(name: str) -> int | None:
    with _iproute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        return int(indexes[0]) if indexes else None


def delete_link(name: str) -> None:
    with _iproute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        if indexes:
            ipr.link("del", index=indexes[0])


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


def nft_table_exists(family: str, name: str) -> bool:
    program = shutil.which("nft") or "/usr/sbin/nft"
    proc = subprocess.run([program, "list", "table", family, name], capture_output=True,
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
