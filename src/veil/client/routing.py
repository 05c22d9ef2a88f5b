"""Split routing in the client: a :class:`Dialer` that sends each stream the way rules say.

:class:`RoutingDialer` wraps the tunnel and a direct dialer and asks a compiled
:class:`~veil.client.rules.RuleSet` for every new TCP stream and for every UDP destination of
an association. It never asks this host's resolver about a name the rules do not send direct:

* a name a domain rule decides goes that way (``DIRECT``: resolved by the direct dialer on
  this host; ``TUNNEL``: to the server as a name; ``BLOCK``: refused);
* a TCP destination given by a name that no domain rule decides, while address rules
  (IP-CIDR, GEOIP) could (``RuleSet.address_may_decide``), is resolved **by the server**
  through the tunnel (``Dialer.resolve``), and its address decides: ``DIRECT`` connects from
  here to that address, ``TUNNEL`` sends the name as before, ``BLOCK`` refuses. No answer
  (an older server, a Trojan one, a failure, RESOLVE_TIMEOUT_S): the name is tunnelled;
* UDP datagrams to a name are decided by the name alone (no resolution per datagram).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from veil.client.rules import Action, RuleSet, normalize_name
from veil.errors import VeilError
from veil.net.dialer import DatagramHandler, Dialer, EndingUdpFlow, IPAddress, UdpFlow
from veil.protocol.address import Address

__all__ = [
    "MAX_PENDING_RESOLVES",
    "MAX_RESOLVED_NAMES",
    "MAX_UDP_ROUTES_PER_FLOW",
    "RESOLVED_TTL_S",
    "RESOLVE_TIMEOUT_S",
    "UNRESOLVED_TTL_S",
    "RoutingDialer",
]

log = logging.getLogger(__name__)

#: Destinations one UDP association remembers the route of. A decision is cheap but it counts a
#: hit, and a flow sends many datagrams to few destinations (DNS, QUIC, games); a client
#: spraying datagrams at random destinations must not grow this without bound: past it the
#: oldest entry is forgotten.
MAX_UDP_ROUTES_PER_FLOW = 256
#: How long the client waits for the server's answer to a name, once a session is up, before
#: it tunnels the name instead. A resolver answers in milliseconds and the round trip is one;
#: the stream waits for it before it opens, so this is what a dead or slow path adds to it.
RESOLVE_TIMEOUT_S = 3.0
#: How long a name's answer is used. getaddrinfo gives no TTL; a minute spares a page's dozens
#: of connections a round trip each, and is short enough that a CDN's moving addresses, or a
#: name that changes countries, are followed.
RESOLVED_TTL_S = 60.0
#: How long "no answer" is remembered for a name (it is then tunnelled without asking again):
#: shorter, so a failure of the moment (a server restarting, its resolver timing out) is
#: asked again soon.
UNRESOLVED_TTL_S = 10.0
#: Names whose answer is remembered (least recently used dropped first): a browsing session
#: touches hundreds of names in a minute; a client opening streams to random names must not
#: grow it without bound.
MAX_RESOLVED_NAMES = 1024
#: Names being asked of the server at once. Connections to one name share its question; past
#: this many names a new one is tunnelled at once, unasked, so a burst of new names cannot
#: hold thousands of streams waiting on the server.
MAX_PENDING_RESOLVES = 64


class RoutingDialer(Dialer):
    """Tunnel, direct or refuse, per stream and per datagram destination, by ``rules``.

    ``tunnel`` is the veil session (or Trojan) dialer, ``direct`` connects from this host.
    ``wait_ready`` is the tunnel's; ``wait_ready_for`` waits for it only when the destination
    goes through it, so a direct destination is served at once while the tunnel is down or
    still connecting. ``close()`` closes ``direct`` (the caller owns and closes the tunnel).

    A name whose addresses may decide is resolved by the tunnel in ``wait_ready_for`` (every
    inbound calls it before ``open_tcp``), and the answer is remembered for ``open_tcp``; one
    the address rules block makes ``wait_ready_for`` answer False (the inbound's "cannot
    connect": the refusal could not be known before the server answered).
    """

    def __init__(self, rules: RuleSet, tunnel: Dialer, direct: Dialer,
                 close_direct: Callable[[], None] | None = None, *,
                 resolve_timeout: float = RESOLVE_TIMEOUT_S) -> None:
        self.rules = rules
        self._tunnel = tunnel
        self._direct = direct
        self._close_direct = close_direct
        self.resolve_timeout = resolve_timeout
        #: name -> (expiry on the loop's clock, the server's addresses or None: no answer).
        self._answers: OrderedDict[str, tuple[float, tuple[IPAddress, ...] | None]] = (
            OrderedDict())
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Names asked of the server, and of those the ones that got no answer (for tests and
        #: the log at exit).
        self.resolved = 0
        self.unresolved = 0

    async def wait_ready(self, timeout: float) -> bool:
        return await self._tunnel.wait_ready(timeout)

    async def wait_ready_for(self, dest: Address, timeout: float) -> bool:
        # Not counted: open_tcp counts the stream. A blocked destination was refused by the
        # inbound before this; a forward to one is refused by open_tcp, at once.
        if self.rules.address_may_decide(dest, "tcp"):
            # Such a name needs the tunnel whatever the answer says: to be resolved, or to be
            # tunnelled without one. So it waits for a session as a tunnelled stream does (a
            # session still coming up must not make it tunnelled by mistake), then at most
            # resolve_timeout for the answer itself.
            if not await self._tunnel.wait_ready(timeout):
                return False
            await self._resolve(dest.host)
        action = self._route(dest, count=False)[0]
        if action is Action.BLOCK:
            return False
        if action is not Action.TUNNEL:
            return True
        return await self._tunnel.wait_ready(timeout)

    def why_not_ready(self) -> str | None:
        return self._tunnel.why_not_ready()

    def refusal(self, dest: Address, network: str = "tcp") -> str | None:
        if network == "tcp" and self.rules.address_may_decide(dest, network):
            return None  # the server's answer decides (wait_ready_for), a block included
        decision = self.rules.decide(dest, network, count=False)
        if decision.action is not Action.BLOCK:
            return None
        self.rules.decide(dest, network)  # count the hit: no open_tcp follows a refusal
        assert decision.rule is not None
        return f"blocked by rule {decision.rule.origin} {decision.rule.text}"

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        action, target = self._route(dest, count=True)
        if action is Action.TUNNEL:
            self._tunnel.open_tcp(dest, local, early_data)
        elif action is Action.DIRECT:
            self._direct.open_tcp(target, local, early_data)
        else:
            local.abort()  # a forward has no way to say why: refuse at once

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        return _RoutedUdpFlow(self, on_datagram, on_close)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)  # the waiters go on: their names are tunnelled
        self._pending.clear()
        if self._close_direct is not None:
            self._close_direct()

    # ------------------------------------------------------------------ names
    def _route(self, dest: Address, *, count: bool) -> tuple[Action, Address]:
        """The action for a TCP stream to ``dest`` and where to connect for it: ``dest``
        itself, or for a name decided by its server-resolved address, that address (DIRECT)
        or the name (TUNNEL: the server resolves it again, as for any name)."""
        addresses = None
        if self.rules.address_may_decide(dest, "tcp"):
            addresses = self._answer(dest.host)
        if not addresses:
            return self.rules.decide(dest, "tcp", count=count).action, dest
        # IPv4 first: the server may have IPv6 where this host has none.
        chosen = next((a for a in addresses if a.version == 4), addresses[0])
        target = Address(str(chosen), dest.port)
        action = self.rules.decide(target, "tcp", count=count).action
        return action, (target if action is Action.DIRECT else dest)

    def _answer(self, name: str) -> tuple[IPAddress, ...] | None:
        """The server's remembered addresses for ``name``; None: none (yet, or no answer)."""
        entry = self._answers.get(_key(name))
        if entry is None or entry[0] <= asyncio.get_running_loop().time():
            return None
        self._answers.move_to_end(_key(name))
        return entry[1]

    async def _resolve(self, name: str) -> None:
        """Ask the server for ``name`` unless an answer (or that there was none) is
        remembered, and remember it. Connections to one name share one question."""
        key = _key(name)
        entry = self._answers.get(key)
        if entry is not None and entry[0] > asyncio.get_running_loop().time():
            return
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= MAX_PENDING_RESOLVES:
                return  # tunnelled as a name, unasked
            pending = asyncio.get_running_loop().create_future()
            self._pending[key] = pending
            task = asyncio.get_running_loop().create_task(self._ask(key, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: one waiter giving up (its client went away) must not cancel the others'.
        await asyncio.shield(pending)

    async def _ask(self, key: str, pending: asyncio.Future[None]) -> None:
        try:
            addresses = await self._tunnel.resolve(key, self.resolve_timeout)
        except VeilError:
            addresses = None
        finally:
            self._pending.pop(key, None)
        self.resolved += 1
        if addresses is None:
            self.unresolved += 1
            log.debug("routing: no address from the server for a name: tunnelled as a name")
        loop = asyncio.get_running_loop()
        ttl = RESOLVED_TTL_S if addresses else UNRESOLVED_TTL_S
        self._answers[key] = (loop.time() + ttl, addresses or None)
        self._answers.move_to_end(key)
        while len(self._answers) > MAX_RESOLVED_NAMES:
            self._answers.popitem(last=False)
        if not pending.done():
            pending.set_result(None)


def _key(name: str) -> str:
    """How names are remembered: as the rules compare them."""
    return normalize_name(name)


class _RoutedUdpFlow(EndingUdpFlow):
    """One association seen by the client, carried by up to two flows: the tunnel's and the
    direct one, each opened on its first datagram. Blocked destinations are dropped."""

    def __init__(self, dialer: RoutingDialer, on_datagram: DatagramHandler,
                 on_close: Callable[[], None]) -> None:
        super().__init__(on_close)
        self._dialer = dialer
        self._on_datagram = on_datagram
        self._flows: dict[Action, UdpFlow] = {}
        self._routes: dict[Address, Action] = {}
        #: Datagrams dropped by block rules (UDP may drop; this is what a router would do).
        self.blocked = 0

    def send(self, dest: Address, payload: bytes) -> None:
        if self._closed:
            return
        action = self._routes.get(dest)
        if action is None:
            action = self._dialer.rules.decide(dest, "udp").action
            if len(self._routes) >= MAX_UDP_ROUTES_PER_FLOW:
                del self._routes[next(iter(self._routes))]
            self._routes[dest] = action
        if action is Action.BLOCK:
            self.blocked += 1
            return
        flow = self._flows.get(action)
        if flow is None:
            carrier = self._dialer._tunnel if action is Action.TUNNEL else self._dialer._direct
            try:
                flow = carrier.open_udp(self._on_datagram, self._lost)
            except VeilError as exc:
                # The tunnel is down or full: this datagram is lost, as UDP may be; the next
                # one tries again.
                log.debug("routed udp: cannot open the %s flow: %s", action.value, exc.code)
                return
            self._flows[action] = flow
        flow.send(dest, payload)

    def _release(self) -> None:
        for flow in self._flows.values():
            flow.close()
        self._flows.clear()
