"""RoutingDialer (veil.client.routing): each stream and datagram goes where the rules say."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from veil.client import routing
from veil.client.routing import RoutingDialer
from veil.client.rulefiles import load_rules
from veil.client.rules import Action, Condition, Rule, RuleSet
from veil.errors import TransportError
from veil.net.dialer import DatagramHandler, Dialer, IPAddress, UdpFlow
from veil.protocol.address import Address


class RecordingFlow(UdpFlow):
    def __init__(self) -> None:
        self.sent: list[tuple[Address, bytes]] = []
        self.closed = False

    def send(self, dest: Address, payload: bytes) -> None:
        self.sent.append((dest, payload))

    def close(self) -> None:
        self.closed = True


class RecordingDialer(Dialer):
    """Remembers what it was asked to carry."""

    def __init__(self, *, udp_fails: bool = False, ready: bool = True) -> None:
        self.tcp: list[Address] = []
        self.waits: list[float] = []
        self._ready = ready
        self.flows: list[RecordingFlow] = []
        self.on_close: list[Callable[[], None]] = []
        self._udp_fails = udp_fails

    async def wait_ready(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self._ready

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        self.tcp.append(dest)

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        if self._udp_fails:
            raise TransportError("tunnel down")
        flow = RecordingFlow()
        self.flows.append(flow)
        self.on_close.append(on_close)
        return flow


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def rules() -> RuleSet:
    return RuleSet([
        Rule(Action.BLOCK, (Condition(suffixes=("ads.test",)),), "r:1",
             "DOMAIN-SUFFIX,ads.test,BLOCK"),
        Rule(Action.DIRECT, (Condition(suffixes=("home.test",)),), "r:2",
             "DOMAIN-SUFFIX,home.test,DIRECT"),
        Rule(Action.TUNNEL, (Condition(),), "r:3", "MATCH,TUNNEL"),
    ])


def make() -> tuple[RoutingDialer, RecordingDialer, RecordingDialer]:
    tunnel, direct = RecordingDialer(), RecordingDialer()
    return RoutingDialer(rules(), tunnel, direct), tunnel, direct


def test_tcp_goes_where_the_rules_say_and_a_block_aborts() -> None:
    dialer, tunnel, direct = make()
    dialer.open_tcp(Address("www.home.test", 443), FakeTransport())
    dialer.open_tcp(Address("example.org", 443), FakeTransport())
    blocked = FakeTransport()
    dialer.open_tcp(Address("x.ads.test", 443), blocked)
    assert direct.tcp == [Address("www.home.test", 443)]
    assert tunnel.tcp == [Address("example.org", 443)]
    assert blocked.aborted
    assert dialer.rules.hits == [1, 1, 1]


def test_refusal_names_the_rule_and_counts_only_blocks() -> None:
    dialer, _, _ = make()
    assert dialer.refusal(Address("home.test", 80)) is None
    assert dialer.refusal(Address("ads.test", 80)) == (
        "blocked by rule r:1 DOMAIN-SUFFIX,ads.test,BLOCK")
    assert dialer.rules.hits == [1, 0, 0]


def test_udp_routes_each_destination_opens_each_carrier_once_and_drops_blocks() -> None:
    dialer, tunnel, direct = make()
    flow = dialer.open_udp(lambda source, payload: None, lambda: None)
    home, away, ads = Address("dns.home.test", 53), Address("1.1.1.1", 53), Address("ads.test", 1)
    for _ in range(3):
        flow.send(home, b"h")
        flow.send(away, b"a")
        flow.send(ads, b"x")
    assert [f.sent for f in direct.flows] == [[(home, b"h")] * 3]
    assert [f.sent for f in tunnel.flows] == [[(away, b"a")] * 3]
    assert dialer.rules.hits == [1, 1, 1]  # once per destination, not per datagram
    flow.close()
    assert direct.flows[0].closed and tunnel.flows[0].closed


def test_a_carrier_ending_ends_the_association_once() -> None:
    dialer, tunnel, direct = make()
    ended: list[bool] = []
    flow = dialer.open_udp(lambda source, payload: None, lambda: ended.append(True))
    flow.send(Address("a.home.test", 53), b"1")
    flow.send(Address("example.org", 53), b"2")
    tunnel.on_close[0]()
    tunnel.on_close[0]()
    assert ended == [True]
    assert direct.flows[0].closed


def test_a_tunnel_that_cannot_open_udp_loses_that_datagram_only() -> None:
    tunnel, direct = RecordingDialer(udp_fails=True), RecordingDialer()
    dialer = RoutingDialer(rules(), tunnel, direct)
    flow = dialer.open_udp(lambda source, payload: None, lambda: None)
    flow.send(Address("example.org", 53), b"lost")
    flow.send(Address("a.home.test", 53), b"kept")
    assert direct.flows[0].sent == [(Address("a.home.test", 53), b"kept")]


def test_the_remembered_routes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "MAX_UDP_ROUTES_PER_FLOW", 4)
    dialer, _, _ = make()
    flow = dialer.open_udp(lambda source, payload: None, lambda: None)
    for port in range(10):
        flow.send(Address("example.org", port), b"")
    assert len(flow._routes) == 4  # type: ignore[attr-defined]
    flow.send(Address("example.org", 0), b"")  # forgotten: decided (and counted) again
    assert dialer.rules.hits[2] == 11


def test_the_base_dialer_refuses_nothing() -> None:
    assert RecordingDialer().refusal(Address("anything", 1)) is None


def test_only_tunnelled_destinations_wait_for_the_tunnel() -> None:
    tunnel, direct = RecordingDialer(ready=False), RecordingDialer()
    dialer = RoutingDialer(rules(), tunnel, direct)

    async def waits() -> list[bool]:
        return [await dialer.wait_ready_for(Address("www.home.test", 443), 5.0),
                await dialer.wait_ready_for(Address("example.org", 443), 5.0)]

    assert asyncio.run(waits()) == [True, False]
    assert tunnel.waits == [5.0]  # asked for example.org only
    assert dialer.rules.hits == [0, 0, 0]  # the stream that follows counts


def test_the_base_dialer_waits_for_itself_for_any_destination() -> None:
    dialer = RecordingDialer(ready=False)
    assert asyncio.run(dialer.wait_ready_for(Address("anything", 1), 3.0)) is False
    assert dialer.waits == [3.0]


def test_a_quic_block_drops_udp_443_and_keeps_the_rest_of_the_association(
        tmp_path: Path) -> None:
    path = tmp_path / "rules.txt"
    path.write_text("QUIC,BLOCK\nDOMAIN-SUFFIX,home.test,DIRECT\nMATCH,TUNNEL\n")
    tunnel, direct = RecordingDialer(), RecordingDialer()
    dialer = RoutingDialer(load_rules([str(path)]), tunnel, direct)
    flow = dialer.open_udp(lambda source, payload: None, lambda: None)
    flow.send(Address("www.home.test", 443), b"quic initial")
    flow.send(Address("example.org", 443), b"quic initial")
    flow.send(Address("dns.home.test", 53), b"query")
    flow.send(Address("example.org", 3478), b"stun")
    assert [f.sent for f in direct.flows] == [[(Address("dns.home.test", 53), b"query")]]
    assert [f.sent for f in tunnel.flows] == [[(Address("example.org", 3478), b"stun")]]
    assert flow.blocked == 2  # type: ignore[attr-defined]


# -- names decided by the address the server resolves them to -------------------------------------

class ResolvingTunnel(RecordingDialer):
    """A tunnel whose server resolves names from ``answers`` (None: no answer)."""

    def __init__(self, answers: dict[str, tuple[str, ...] | None], delay: float = 0.0) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []
        self.delay = delay

    async def resolve(self, name: str, timeout: float) -> tuple[IPAddress, ...] | None:
        self.asked.append(name)
        if self.delay:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.sleep(self.delay)
            except TimeoutError:
                return None
        found = self.answers.get(name)
        return None if found is None else tuple(ipaddress.ip_address(a) for a in found)


def address_rules() -> RuleSet:
    return RuleSet([
        Rule(Action.DIRECT, (Condition(suffixes=("home.test",)),), "r:1",
             "DOMAIN-SUFFIX,home.test,DIRECT"),
        Rule(Action.BLOCK, (Condition(networks_ip=(ipaddress.ip_network("198.51.100.0/24"),)),),
             "r:2", "IP-CIDR,198.51.100.0/24,BLOCK"),
        Rule(Action.DIRECT, (Condition(networks_ip=(ipaddress.ip_network("192.0.2.0/24"),)),),
             "r:3", "IP-CIDR,192.0.2.0/24,DIRECT"),
        Rule(Action.TUNNEL, (Condition(),), "r:4", "MATCH,TUNNEL"),
    ])


async def route(dialer: RoutingDialer, host: str) -> tuple[bool, FakeTransport]:
    dest = Address(host, 443)
    ready = await dialer.wait_ready_for(dest, 1.0)
    local = FakeTransport()
    if ready:
        dialer.open_tcp(dest, local)
    return ready, local


def test_a_name_goes_where_the_address_the_server_resolved_says() -> None:
    async def main() -> None:
        tunnel, direct = ResolvingTunnel({
            "shop.test": ("2001:db8::1", "192.0.2.10"),  # IPv4 preferred: 192.0.2.10, direct
            "news.test": ("203.0.113.5",),  # no address rule: tunnel, as a name
            "ads.test": ("198.51.100.1",),  # blocked by its address
            "broken.test": None,  # no answer: tunnel, as a name
        }), RecordingDialer()
        dialer = RoutingDialer(address_rules(), tunnel, direct)
        for host in ("shop.test", "news.test", "broken.test", "a.home.test"):
            ready, local = await route(dialer, host)
            assert ready and not local.aborted, host
        ready, _ = await route(dialer, "ads.test")
        assert not ready  # the inbound says it cannot connect
        # Direct by address: the direct dialer gets the address, never the name.
        assert direct.tcp == [Address("192.0.2.10", 443), Address("a.home.test", 443)]
        assert tunnel.tcp == [Address("news.test", 443), Address("broken.test", 443)]
        # A name a domain rule decides is never asked about.
        assert sorted(tunnel.asked) == ["ads.test", "broken.test", "news.test", "shop.test"]
        # Each stream counted once, by the rule that decided it.
        assert dialer.rules.hits == [1, 0, 1, 2] and dialer.rules.default_hits == 0
        assert (dialer.resolved, dialer.unresolved) == (4, 1)

    asyncio.run(main())


def test_answers_are_remembered_and_shared_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "MAX_RESOLVED_NAMES", 3)

    async def main() -> None:
        tunnel = ResolvingTunnel({f"n{i}.test": ("192.0.2.1",) for i in range(5)}, delay=0.01)
        dialer = RoutingDialer(address_rules(), tunnel, RecordingDialer())
        # Six connections to one name at once: one question.
        await asyncio.gather(*(route(dialer, "n0.test") for _ in range(6)))
        assert tunnel.asked == ["n0.test"]
        await route(dialer, "n0.test")
        assert tunnel.asked == ["n0.test"]  # remembered
        for i in range(1, 5):
            await route(dialer, f"n{i}.test")
        assert len(dialer._answers) == 3  # the least recently used went first
        await route(dialer, "n0.test")
        assert tunnel.asked.count("n0.test") == 2

    asyncio.run(main())


def test_an_answer_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "RESOLVED_TTL_S", 0.05)

    async def main() -> None:
        tunnel = ResolvingTunnel({"a.test": ("192.0.2.1",)})
        dialer = RoutingDialer(address_rules(), tunnel, RecordingDialer())
        await route(dialer, "a.test")
        await route(dialer, "a.test")
        await asyncio.sleep(0.1)
        await route(dialer, "a.test")
        assert tunnel.asked == ["a.test", "a.test"]

    asyncio.run(main())


def test_a_slow_server_costs_the_resolve_timeout_then_the_name_is_tunnelled() -> None:
    async def main() -> None:
        tunnel, direct = ResolvingTunnel({"slow.test": ("192.0.2.1",)}, delay=5.0), (
            RecordingDialer())
        dialer = RoutingDialer(address_rules(), tunnel, direct, resolve_timeout=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        ready, _ = await route(dialer, "slow.test")
        assert ready and loop.time() - started < 2.0
        assert tunnel.tcp == [Address("slow.test", 443)] and direct.tcp == []

    asyncio.run(main())


def test_a_tunnel_that_cannot_resolve_tunnels_the_name() -> None:
    async def main() -> None:
        tunnel, direct = RecordingDialer(), RecordingDialer()  # the base Dialer: no resolve
        dialer = RoutingDialer(address_rules(), tunnel, direct)
        ready, _ = await route(dialer, "shop.test")
        assert ready and tunnel.tcp == [Address("shop.test", 443)]

    asyncio.run(main())


def test_too_many_names_at_once_are_tunnelled_unasked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "MAX_PENDING_RESOLVES", 2)

    async def main() -> None:
        tunnel = ResolvingTunnel({f"n{i}.test": ("192.0.2.1",) for i in range(4)}, delay=0.05)
        dialer = RoutingDialer(address_rules(), tunnel, RecordingDialer())
        await asyncio.gather(*(route(dialer, f"n{i}.test") for i in range(4)))
        assert len(tunnel.asked) == 2
        assert len(tunnel.tcp) == 2  # the two unasked names went as names

    asyncio.run(main())


def test_a_name_only_an_address_rule_may_let_through_is_not_refused_before_the_answer() -> None:
    """An allow-list (GEOIP/IP-CIDR direct, then MATCH,BLOCK): a name is blocked only if its
    address is not allowed; refusing it by the name's MATCH would block every name."""
    allow_list = RuleSet([
        Rule(Action.DIRECT, (Condition(networks_ip=(ipaddress.ip_network("192.0.2.0/24"),)),),
             "r:1", "IP-CIDR,192.0.2.0/24,DIRECT"),
        Rule(Action.BLOCK, (Condition(),), "r:2", "MATCH,BLOCK"),
    ])

    async def main() -> None:
        tunnel = ResolvingTunnel({"home.test": ("192.0.2.1",), "far.test": ("203.0.113.1",)})
        direct = RecordingDialer()
        dialer = RoutingDialer(allow_list, tunnel, direct)
        for name in ("home.test", "far.test"):
            assert dialer.refusal(Address(name, 443)) is None
        ready, local = await route(dialer, "home.test")
        assert ready and not local.aborted and direct.tcp == [Address("192.0.2.1", 443)]
        ready, _ = await route(dialer, "far.test")
        assert not ready  # blocked by its address, once the server answered
        # UDP names are decided by the name: refused at once by the MATCH.
        assert dialer.refusal(Address("far.test", 443), "udp") is not None

    asyncio.run(main())


def test_a_name_the_answer_would_decide_waits_for_the_tunnel_like_a_tunnelled_one() -> None:
    async def main() -> None:
        tunnel = ResolvingTunnel({"shop.test": ("192.0.2.10",)})
        tunnel._ready = False  # the server cannot be reached
        direct = RecordingDialer()
        dialer = RoutingDialer(address_rules(), tunnel, direct)
        assert not await dialer.wait_ready_for(Address("shop.test", 443), 0.5)
        assert tunnel.waits == [0.5] and tunnel.asked == []  # one wait, no question
        # A name a domain rule sends direct does not wait.
        assert await dialer.wait_ready_for(Address("a.home.test", 443), 0.5)
        assert tunnel.waits == [0.5]

    asyncio.run(main())
