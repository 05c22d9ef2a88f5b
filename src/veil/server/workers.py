"""``veil serve --workers N``: N worker processes behind one port, and the parent that keeps them.

Why processes: one Python process runs its event loop on one core, and a server with many
users needs all of them (issue #20). Why SO_REUSEPORT sockets made by the parent, as nginx's
``listen ... reuseport`` does: the kernel spreads new connections over the workers' sockets by
a hash of the 4-tuple (a client's connections may land on different workers; nothing in veil
ties a client to one), with no accept hop through the parent and no thundering herd; and
because the parent holds every socket, the connections that arrive for a worker that died
wait in its socket's queue for the worker started in its place instead of being refused.

The parent serves no traffic. It binds the sockets (a ``--listen`` port 0 is picked once, for
all), makes the shared replay table (veil.server.shared) and the TLS ticket keys, starts the
workers (``veil serve`` again, with the same arguments and a hidden ``--worker-of``), restarts
one that exits, forwards SIGHUP (reload), stops them all on SIGTERM/SIGINT (SIGKILL after
:data:`WORKER_STOP_GRACE_S`), and runs the admin panel, whose status is the sum of the
statuses the workers send it every :data:`STATUS_INTERVAL_S` (:func:`merge_statuses`).

Each worker is a whole server on the same store: it writes only its own connections' bytes
(each byte once: the store adds them up, as for a fleet), reloads the users every 0.5 s
(revocation within a second everywhere), and checks authenticators against the shared table.
Each user's sessions and devices are counted over all workers (veil.server.shared), and so
are ``--max-sessions-per-user``, ``--max-devices-per-user`` and ``--max-user-rate`` (each
worker's share of the rate follows its share of the user's sessions). What is per worker, and
so N times the option across the server: ``--max-sessions`` and the descriptor budget; a
traffic limit is overshot by at most what the other workers moved in one refresh interval
(docs/operations.md, "Workers").

A worker learns that the parent is gone from its channel's end of file, and stops: no
orphans, whatever killed the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

from veil.config import ServerOptions
from veil.errors import StoreError, VeilError
from veil.manage.fleet import Facts, HostSampler, heartbeat_info, server_id
from veil.manage.libssl import TICKET_KEYS_SIZE
from veil.manage.state import ServerState, load_state
from veil.protocol.address import Address
from veil.server.live import HEARTBEAT_INTERVAL_S
from veil.server.service import LISTEN_BACKLOG, SHUTDOWN_GRACE_S, VeilServer
from veil.server.shared import SharedUsers, create_replay_table
from veil.server.status import (
    BoundCounts,
    GateCounts,
    ServerStatus,
    WayBlockStatus,
)
from veil.store.base import Usage, UserStore

log = logging.getLogger("veil.server")

#: A worker sends its status this often: the panel and /metrics are at most this old.
STATUS_INTERVAL_S = 1.0
#: The parent looks for exited workers this often: a killed worker is replaced within it
#: (plus the new worker's start, ~1 s of imports and the first user snapshot).
WATCH_INTERVAL_S = 0.2
#: A worker that exits within this long of its start is started again only after this long:
#: a worker that cannot start (a broken store) must not spin the machine.
RESTART_BACKOFF_S = 2.0
#: How long SIGTERM gives the workers to close their sessions (SHUTDOWN_GRACE_S) and write
#: their last usage before they are killed.
WORKER_STOP_GRACE_S = SHUTDOWN_GRACE_S + 8.0
#: How long the parent waits for a started worker to say it is ready.
WORKER_START_TIMEOUT_S = 60.0
#: A status frame's bound (a server with 100,000 connections sends ~10 MiB): past it the
#: parent drops the worker's channel rather than hold more.
MAX_STATUS_FRAME = 64 << 20
_FRAME = struct.Struct("!I")


def reuseport_group(listen: Address, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``listen``, one SO_REUSEPORT group: the first binds (a
    port 0 becomes a port), the rest bind that port."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sockets: list[socket.socket] = []
    port = listen.port
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((listen.host, port))
            port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(exc.errno, exc.strerror, str(listen)) from exc
    return sockets


def worker_argument(index: int, count: int, channel: int, replay: int, users: int,
                    listeners: Sequence[int]) -> str:
    """The hidden ``--worker-of`` value: the worker's place and its inherited descriptors."""
    return ",".join(map(str, (index, count, channel, replay, users, *listeners)))


def parse_worker_argument(text: str) -> tuple[int, int, int, int, int, tuple[int, ...]]:
    index, count, channel, replay, users, *listeners = (int(part) for part in text.split(","))
    return index, count, channel, replay, users, tuple(listeners)


def _worker_environment() -> dict[str, str]:
    """The parent's environment but systemd's notify socket: the parent is the service's
    main process, which alone says READY and STOPPING."""
    return {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}


# ------------------------------------------------------------------ the parent
@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    reader: asyncio.Task[None] | None = None
    started_at: float = 0.0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: The last status it sent (its ``state`` is the parent's).
    status: ServerStatus | None = None


class WorkerPool:
    """The parent of ``--workers N``: see the module docstring. ``command`` is the worker's
    ``veil`` argument list without ``--worker-of`` (the parent's own, as typed)."""

    def __init__(self, state: ServerState, options: ServerOptions, count: int,
                 command: Sequence[str]) -> None:
        self.state = state
        self.options = options
        self.count = count
        self.command = list(command)
        self.started_at = time.time()
        self._workers = [_Worker(i) for i in range(count)]
        self._listeners: list[list[socket.socket]] = []  # per --listen, one per worker
        self._replay_fd = self._users_fd = -1
        self._ticket_keys = os.urandom(TICKET_KEYS_SIZE)
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._beating: asyncio.Task[None] | None = None
        self._store: UserStore | None = None
        self._host = HostSampler()  # rates between two heartbeats
        #: Workers started again after they exited, for the log and tests.
        self.restarts = 0

    @property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(Address(*group[0].getsockname()[:2]) for group in self._listeners)

    @property
    def address(self) -> Address:
        return self.addresses[0]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(w.proc.pid for w in self._workers if w.proc is not None)

    async def start(self) -> None:
        try:
            for listen in (self.options.listen, *self.options.also_listen):
                self._listeners.append(reuseport_group(listen, self.count))
            self._replay_fd = create_replay_table()
            self._users_fd = SharedUsers.create(self.count,
                                                self.options.max_devices_per_user or 0)
            for worker in self._workers:
                self._spawn(worker)
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._watch = loop.create_task(self._watch_workers())
        # In the fleet's table before "listening on", as a single server joins it.
        self._store = await asyncio.to_thread(self.state.open_store)
        await self._beat()
        self._beating = loop.create_task(self._beat_forever())
        log.info("listening on %s (%d workers: %s)", ", ".join(map(str, self.addresses)),
                 self.count, " ".join(map(str, self.pids)))

    async def _wait_ready(self) -> None:
        """Until every worker said it serves; a worker that exits first (a store it cannot
        open, say: it logged why) fails the start at once."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not all(w.ready.is_set() for w in self._workers):
            for worker in self._workers:
                if worker.proc is not None and worker.proc.poll() is not None:
                    raise VeilError(f"worker {worker.index} exited with status "
                                    f"{worker.proc.returncode} while starting (its error is "
                                    f"above)")
            if time.monotonic() > deadline:
                raise VeilError(f"the workers did not start in {WORKER_START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _spawn(self, worker: _Worker) -> int:
        """Start ``worker``'s process; its pid."""
        parent_end, child_end = socket.socketpair()
        fds = [group[worker.index].fileno() for group in self._listeners]
        argument = worker_argument(worker.index, self.count, child_end.fileno(),
                                   self._replay_fd, self._users_fd, fds)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "veil", *self.command, "--worker-of", argument],
                pass_fds=(child_end.fileno(), self._replay_fd, self._users_fd, *fds),
                stdin=subprocess.DEVNULL, env=_worker_environment(),
                # A terminal's Ctrl-C reaches the parent alone, which stops the workers in
                # order (a worker's own SIGINT would look like a crash to restart).
                process_group=0)
        finally:
            child_end.close()
        worker.proc = proc
        parent_end.sendall(self._ticket_keys)
        worker.channel = parent_end
        worker.started_at = time.monotonic()
        worker.ready = asyncio.Event()
        worker.status = None
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker, parent_end))
        return proc.pid

    async def _read(self, worker: _Worker, channel: socket.socket) -> None:
        """The worker's frames: b"ready" once it serves, then its statuses."""
        reader, writer = await asyncio.open_connection(sock=channel)
        try:
            while True:
                head = await reader.readexactly(_FRAME.size)
                (size,) = _FRAME.unpack(head)
                if size > MAX_STATUS_FRAME:
                    log.warning("worker %d sent a status of %d bytes; not reading it",
                                worker.index, size)
                    return
                payload = await reader.readexactly(size)
                if payload == b"ready":
                    worker.ready.set()
                    continue
                fields = pickle.loads(payload)  # noqa: S301 - our own worker, over a socketpair
                worker.status = ServerStatus(state=self.state, **fields)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._beat()
            except StoreError as exc:
                log.warning("could not write the heartbeat: %s", exc)

    async def _beat(self) -> None:
        """The whole server's heartbeat in the fleet's table (the workers write none), from
        the statuses they sent."""
        status = self.status()
        facts = Facts(status.listen, str(self.state.public), self.started_at,
                      len(status.connections), sum(u.up for u in status.user_bytes.values()),
                      sum(u.down for u in status.user_bytes.values()), self.state.cert_path)
        store, host = self._store, self._host
        assert store is not None
        await asyncio.to_thread(lambda: store.beat(server_id(status.listen), time.time(),
                                                   heartbeat_info(facts, host.sample())))

    async def _watch_workers(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for worker in self._workers:
                proc = worker.proc
                if self._stopping or proc is None or proc.poll() is None:
                    continue
                log.warning("worker %d (pid %d) exited with status %d; starting another",
                            worker.index, proc.pid, proc.returncode)
                await self._close_channel(worker)
                # Its connections died with it: they count against no user's limits from now
                # (its replacement would zero them too, a second or more later).
                SharedUsers(self._users_fd, worker.index).close()
                if time.monotonic() - worker.started_at < RESTART_BACKOFF_S:
                    await asyncio.sleep(RESTART_BACKOFF_S)
                if self._stopping:
                    return
                pid = self._spawn(worker)
                self.restarts += 1
                log.info("worker %d started again: pid %d", worker.index, pid)

    async def _close_channel(self, worker: _Worker) -> None:
        if worker.reader is not None:  # its transport closes the socket
            worker.reader.cancel()
            await asyncio.gather(worker.reader, return_exceptions=True)
            worker.reader = None
        if worker.channel is not None:
            worker.channel.close()  # closed already unless the reader never got to open it
            worker.channel = None

    async def reload(self) -> None:
        """SIGHUP to every worker: each re-reads the certificate and users (VeilServer.reload).
        The parent loads the state first, so a self-signed certificate that is due is renewed
        once, here, not by every worker at once (they would write the same file)."""
        self.state = await asyncio.to_thread(load_state, self.state.directory, self.state.db)
        for worker in self._workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for them (SIGKILL after the grace), close the sockets."""
        self._stopping = True
        for task in (self._watch, self._beating):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        running = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE_S
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in %.0f s; killing it", proc.pid,
                            WORKER_STOP_GRACE_S)
                proc.kill()
                proc.wait()
        for worker in self._workers:
            await self._close_channel(worker)
        for group in self._listeners:
            for sock in group:
                sock.close()
        self._listeners = []
        for fd in (self._replay_fd, self._users_fd):
            if fd >= 0:
                os.close(fd)
        self._replay_fd = self._users_fd = -1
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
        log.info("stopped %d worker(s)", len(running))

    def status(self) -> ServerStatus:
        """The whole server as the panel and /metrics see it: the workers' statuses summed
        (:func:`merge_statuses`), each at most STATUS_INTERVAL_S old."""
        statuses = [w.status for w in self._workers if w.status is not None]
        listen = str(self.address) if self._listeners else str(self.options.listen)
        merged = merge_statuses(self.state, listen, self.started_at, statuses)
        return dataclasses.replace(merged, server_id=server_id(listen))


def merge_statuses(state: ServerState, listen: str, started_at: float,
                   statuses: Sequence[ServerStatus]) -> ServerStatus:
    """One status for the whole server: connections of all workers (their ids are disjoint),
    counters summed, the users' table as the first worker read it (they read one store)."""
    if not statuses:
        return ServerStatus(state=state, started_at=started_at, listen=listen)
    first = statuses[0]
    user_bytes: dict[str, Usage] = {}
    for status in statuses:
        for name, usage in status.user_bytes.items():
            held = user_bytes.get(name)
            user_bytes[name] = usage if held is None else Usage(held.up + usage.up,
                                                               held.down + usage.down)
    return ServerStatus(
        state=state, started_at=started_at, listen=listen, server_id=first.server_id,
        cover_url=first.cover_url, tun=first.tun, ways_in=first.ways_in,
        connections=tuple(sorted((c for s in statuses for c in s.connections),
                                 key=lambda c: c.id)),
        user_bytes=user_bytes, users=first.users,
        store_refresh_failures=sum(s.store_refresh_failures for s in statuses),
        gate=GateCounts(
            accepted=_sum_maps(s.gate.accepted for s in statuses),
            cover_plain=sum(s.gate.cover_plain for s in statuses),
            cover_foreign_sni=sum(s.gate.cover_foreign_sni for s in statuses),
            silent=sum(s.gate.silent for s in statuses),
            rejected=_sum_maps(s.gate.rejected for s in statuses),
            tls_failed=sum(s.gate.tls_failed for s in statuses)),
        bounds=_sum_bounds([s.bounds for s in statuses]),
        blocked_ways=_merge_blocks([s.blocked_ways for s in statuses]))


def _sum_maps(maps: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in maps:
        for key, value in mapping.items():
            total[key] = total.get(key, 0) + value
    return total


def _sum_bounds(bounds: Sequence[BoundCounts]) -> BoundCounts:
    udp: dict[str, dict[str, int]] = {}
    for b in bounds:
        for way_in, dropped in b.udp_dropped.items():
            held = udp.setdefault(way_in, {})
            for why, count in dropped.items():
                held[why] = held.get(why, 0) + count
    summed = {f.name: sum(getattr(b, f.name) for b in bounds)
              for f in dataclasses.fields(BoundCounts) if f.name != "udp_dropped"}
    return BoundCounts(udp_dropped=udp, **summed)


def _merge_blocks(per_worker: Sequence[Sequence[WayBlockStatus]]) -> tuple[WayBlockStatus, ...]:
    """Block reports per way in: counts summed; distinct users as the worker that saw the most
    (a user reporting through two workers would be counted twice by a sum)."""
    merged: dict[str, WayBlockStatus] = {}
    for ways in per_worker:
        for way in ways:
            held = merged.get(way.way_in)
            if held is None:
                merged[way.way_in] = way
                continue
            since = [s for s in (held.since, way.since) if s is not None]
            merged[way.way_in] = WayBlockStatus(
                way.way_in, max(held.users, way.users), max(held.active_users, way.active_users),
                min(since) if since else None, _sum_maps((held.reports, way.reports)),
                held.alerts + way.alerts)
    return tuple(merged.values())


# ------------------------------------------------------------------ a worker
def status_fields(status: ServerStatus) -> bytes:
    """A worker's status for its parent, without the state (the parent has its own, and the
    state holds keys that need not cross)."""
    return pickle.dumps({f.name: getattr(status, f.name) for f in dataclasses.fields(status)
                         if f.name != "state"})


def receive_ticket_keys(channel: socket.socket) -> bytes:
    """The ticket keys, the first bytes the parent sends (blocking: before the loop runs)."""
    keys = b""
    while len(keys) < TICKET_KEYS_SIZE:
        chunk = channel.recv(TICKET_KEYS_SIZE - len(keys))
        if not chunk:
            raise ConnectionError("the parent closed the channel before the ticket keys")
        keys += chunk
    return keys


async def report_to_parent(server: VeilServer, channel: socket.socket,
                           stop: asyncio.Event) -> None:
    """Say ready, then send the status every STATUS_INTERVAL_S; set ``stop`` when the parent
    is gone (its end of the channel closed)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=channel)
    gone = loop.create_task(reader.read(1))  # the parent never writes again: b"" is its end
    try:
        writer.write(_FRAME.pack(5) + b"ready")
        while not gone.done():
            await asyncio.wait({gone}, timeout=STATUS_INTERVAL_S)
            if gone.done():
                break
            payload = status_fields(server.status())
            writer.write(_FRAME.pack(len(payload)) + payload)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await gone
        writer.close()
    # Here only when the parent's end closed: it died or was killed (a clean stop SIGTERMs
    # the workers first, and cancels this task).
    if not stop.is_set():
        log.warning("the parent is gone; stopping")
        stop.set()
