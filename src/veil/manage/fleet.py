"""What a server says about itself: its host's CPU, memory and network (from /proc), and the
heartbeat it writes to the store so that any server's panel shows the whole fleet. (In
``manage``: the server writes the heartbeat, the panel reads it and the host's load.)

Servers of a fleet share one store (PostgreSQL, or SQLite on one machine). Each writes a
heartbeat every few seconds (veil.server.live: ``HEARTBEAT_INTERVAL_S``) into the store's
``servers`` table: its id (host name and listen address), version, certificate expiry, live
sessions, bytes carried since it started, and its host's load. A panel reads the table; a
server whose last heartbeat is older than :data:`STALE_AFTER_S` shows as not responding.

Host figures come from Linux's /proc (no dependency): CPU from ``/proc/stat`` (the share of
time not idle between two readings), memory from ``/proc/meminfo`` (``MemAvailable``, what
the kernel says a new program could use), and traffic from ``/proc/net/dev`` (every interface
but loopback). Elsewhere (macOS, a container without /proc) they are None: "unknown".
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from veil import __version__

PROC = Path("/proc")
#: A server whose heartbeat is older than this shows as not responding: a few missed beats
#: (a store round trip stalled, a loaded box), not one late one.
STALE_AFTER_S = 30.0
#: Rates over a shorter window are noise (the kernel counts CPU time in 10 ms ticks): a reading
#: sooner than this after the previous one gives the previous one's figures again.
MIN_SAMPLE_INTERVAL_S = 1.0
#: /proc files are a few kB (net/dev grows with interfaces): a bound on what is read of each.
MAX_PROC_READ = 256 * 1024


def server_id(listen: str) -> str:
    """This server's id in a fleet: the host's name and the listen address (two servers on
    one machine differ by port)."""
    return f"{socket.gethostname()} {listen}"


@dataclass(frozen=True, slots=True)
class HostLoad:
    """The host's load: None where unknown."""

    cpu_percent: float | None = None  # busy share of all CPUs since the previous reading
    cpus: int | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None  # total - MemAvailable
    net_rx_bytes_per_s: float | None = None  # every interface but loopback
    net_tx_bytes_per_s: float | None = None
    net_rx_bytes: int | None = None  # since boot
    net_tx_bytes: int | None = None


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(MAX_PROC_READ).decode("ascii", "replace")
    except OSError:
        return None


def cpu_times(text: str) -> tuple[int, int] | None:
    """(busy, total) jiffies from /proc/stat's first line; idle and iowait are not busy."""
    first = text.split("\n", 1)[0].split()
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:9] if v.isdigit()]  # guest time is already in user
    if len(values) < 5:
        return None
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def memory(text: str) -> tuple[int, int] | None:
    """(total, used) bytes from /proc/meminfo."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # kB
    total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    if total is None or available is None:
        return None
    return total, total - available


def network(text: str) -> tuple[int, int] | None:
    """(received, sent) bytes of every interface but loopback, from /proc/net/dev."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or name.strip() == "lo" or len(parts) < 9:
            continue
        rx += int(parts[0])
        tx += int(parts[8])
    return rx, tx


class HostSampler:
    """Reads /proc; rates (CPU, traffic) are over the time since the previous :meth:`sample`.
    Not thread-safe: one caller (the panel's, or the heartbeat's, each has its own)."""

    def __init__(self, proc: Path = PROC) -> None:
        self._proc = proc
        self._last: tuple[float, tuple[int, int] | None, tuple[int, int] | None] | None = None
        self._load = HostLoad()

    def sample(self) -> HostLoad:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < MIN_SAMPLE_INTERVAL_S:
            return self._load
        stat = _read(self._proc / "stat")
        cpu = cpu_times(stat) if stat is not None else None
        meminfo = _read(self._proc / "meminfo")
        mem = memory(meminfo) if meminfo is not None else None
        dev = _read(self._proc / "net" / "dev")
        net = network(dev) if dev is not None else None
        cpu_percent = rx_rate = tx_rate = None
        if self._last is not None:
            then, last_cpu, last_net = self._last
            elapsed = now - then
            if cpu is not None and last_cpu is not None and cpu[1] > last_cpu[1]:
                cpu_percent = 100.0 * (cpu[0] - last_cpu[0]) / (cpu[1] - last_cpu[1])
            if net is not None and last_net is not None and elapsed > 0:
                rx_rate = max(net[0] - last_net[0], 0) / elapsed
                tx_rate = max(net[1] - last_net[1], 0) / elapsed
        self._last = (now, cpu, net)
        self._load = HostLoad(cpu_percent=cpu_percent, cpus=_cpus(stat),
                        memory_total_bytes=mem[0] if mem else None,
                        memory_used_bytes=mem[1] if mem else None,
                        net_rx_bytes_per_s=rx_rate, net_tx_bytes_per_s=tx_rate,
                        net_rx_bytes=net[0] if net else None,
                        net_tx_bytes=net[1] if net else None)
        return self._load


def _cpus(stat: str | None) -> int | None:
    if stat is None:
        return None
    count = sum(1 for line in stat.splitlines() if line.startswith("cpu") and line[3:4].isdigit())
    return count or None


def certificate_validity(path: Path) -> tuple[float, float] | None:
    """When the PEM certificate at ``path`` starts and stops being valid (unix seconds);
    None if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def certificate_not_after(path: Path) -> float | None:
    """When the PEM certificate at ``path`` expires (unix seconds); None if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


@dataclass(frozen=True, slots=True)
class Facts:
    """What the loop knows of the server, taken there (no I/O) for the heartbeat."""

    listen: str
    public: str
    started_at: float
    sessions: int
    bytes_up: int
    bytes_down: int
    cert_path: Path


def heartbeat_info(facts: Facts, host: HostLoad) -> str:
    """The heartbeat's JSON (the panel's ``Server`` schema less ``id``, ``seen_at``,
    ``responding``): read on the store's thread (the certificate is a file)."""
    return json.dumps({
        "version": __version__, "listen": facts.listen, "public": facts.public,
        "started_at": facts.started_at,
        "certificate_not_after": certificate_not_after(facts.cert_path),
        "sessions_active": facts.sessions,
        "bytes_up": facts.bytes_up, "bytes_down": facts.bytes_down, "host": asdict(host)})
