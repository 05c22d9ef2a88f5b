"""The server's outbound bounds (issue #14): descriptor slots per user and for the server,
the resolver's cap and timeout, and a UDP flow's bounds on lookups and on a full socket."""

from __future__ import annotations

import asyncio
import resource
import socket
import threading

import pytest

from veil.net.direct import MAX_RESOLVING_PER_FLOW, DirectDialer, _UdpSocket
from veil.protocol.address import Address
from veil.server import policy
from veil.server.live import MIN_DESCRIPTOR_RESERVE, OutboundSlots
from veil.server.policy import BoundedResolver, ResolverBusy


# ------------------------------------------------------------------ descriptor slots
def test_one_user_stops_at_the_per_user_bound_and_others_carry_on() -> None:
    slots = OutboundSlots(total=10, per_user=4)
    alice = [slots.take("alice") for _ in range(4)]
    assert all(alice)
    assert slots.take("alice") is None
    assert slots.last_bound == "per-user"
    assert slots.take("bob", 2) is not None  # a UDP association of another user
    alice[0].release()  # type: ignore[union-attr]
    alice[0].release()  # type: ignore[union-attr]  # twice gives back once
    assert slots.used_by("alice") == 3
    assert slots.take("alice") is not None
    assert slots.in_use == 6


def test_the_server_bound_holds_over_all_users() -> None:
    slots = OutboundSlots(total=5, per_user=4)
    held = [slots.take("alice") for _ in range(4)]
    assert slots.take("bob", 2) is None  # only one left
    assert slots.last_bound == "server"
    assert slots.take("bob") is not None
    for slot in held:
        slot.release()  # type: ignore[union-attr]
    assert slots.in_use == 1 and slots.used_by("alice") == 0


def test_the_budget_leaves_a_reserve_below_the_descriptor_limit() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    slots = OutboundSlots.for_this_process()
    assert slots.total <= soft - min(MIN_DESCRIPTOR_RESERVE, soft // 2)
    assert slots.total >= soft // 2


# ------------------------------------------------------------------ the server's resolver
def test_the_resolver_refuses_past_its_cap_and_times_out(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck(*_args: object) -> list[object]:
        started.release()
        release.wait(10)
        raise socket.gaierror("gave up")

    monkeypatch.setattr(policy.socket, "getaddrinfo", stuck)
    resolver = BoundedResolver(threads=2, max_pending=3, timeout=0.2)

    async def main() -> None:
        lookups = [asyncio.ensure_future(resolver.getaddrinfo(f"n{i}.test", 53,
                                                                socket.SOCK_DGRAM))
                   for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(ResolverBusy):
            await resolver.getaddrinfo("one-more.test", 53, socket.SOCK_DGRAM)
        results = await asyncio.gather(*lookups, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results)
        # The queued lookup gave its place back at once; the two running hold theirs until
        # their threads are free.
        assert resolver.pending == 2 and resolver.timed_out == 3 and resolver.refused == 1
        release.set()
        for _ in range(50):
            if resolver.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert resolver.pending == 0

    try:
        asyncio.run(main())
    finally:
        release.set()


# ------------------------------------------------------------------ a UDP flow
def test_a_flood_of_unique_names_starts_a_bounded_number_of_lookups() -> None:
    async def main() -> None:
        never = asyncio.Event()
        asked: list[str] = []

        async def slow_resolver(host: str, _port: int,
                                _kind: socket.SocketKind) -> list[tuple[int, str]]:
            asked.append(host)
            await never.wait()
            return []

        dialer = DirectDialer(resolver=slow_resolver)
        flow = dialer.open_udp(lambda *_: None, lambda: None)
        before = len(asyncio.all_tasks())
        for i in range(10_000):
            flow.send(Address(f"n{i}.example", 53), b"q")
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) - before <= MAX_RESOLVING_PER_FLOW
        assert len(asked) == MAX_RESOLVING_PER_FLOW
        assert dialer.dropped.resolving == 10_000 - MAX_RESOLVING_PER_FLOW
        dialer.close()

    asyncio.run(main())


def test_a_full_socket_drops_and_counts_instead_of_buffering() -> None:
    async def main() -> None:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        dialer = DirectDialer()
        flow = dialer.open_udp(lambda *_: None, lambda: None)
        flow.send(Address("127.0.0.1", port), b"first")  # opens the socket
        for _ in range(50):
            await asyncio.sleep(0.01)
            sockets = list(flow._sockets.values())  # type: ignore[attr-defined]
            if sockets:
                break
        udp: _UdpSocket = sockets[0]
        assert udp.transport is not None
        udp.pause_writing()  # what asyncio says when the kernel's send buffer is full
        for _ in range(1000):
            flow.send(Address("127.0.0.1", port), b"x" * 1000)
        assert udp.transport.get_write_buffer_size() == 0
        assert dialer.dropped.paused == 1000
        udp.resume_writing()
        flow.send(Address("127.0.0.1", port), b"after")
        await asyncio.sleep(0.05)
        sink.setblocking(False)
        got = [sink.recv(2048) for _ in range(2)]
        assert got == [b"first", b"after"]
        dialer.close()
        sink.close()

    asyncio.run(main())


# ------------------------------------------------------------------ Trojan's slot hook
def test_a_relay_says_once_when_its_outbound_socket_is_gone() -> None:
    async def main() -> None:
        closed: list[str] = []
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dialer = DirectDialer()
        for name, dest in (("served", Address("127.0.0.1", port)),
                           ("refused", Address("127.0.0.1", 1))):
            ours, theirs = socket.socketpair()
            local, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
            dialer.open_tcp(dest, local, b"hi", on_closed=lambda n=name: closed.append(n))
            for _ in range(100):
                if name in closed:
                    break
                await asyncio.sleep(0.02)
            theirs.close()
        await asyncio.sleep(0.1)
        assert sorted(closed) == ["refused", "served"]
        dialer.close()
        server.close()

    asyncio.run(main())
