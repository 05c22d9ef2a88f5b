"""Split routing in the client: a :class:`Dialer` that sends each stream the way rules say.

:class:`RoutingDialer` wraps the tunnel and a direct dialer and asks a compiled
:class:`~veil.client.rules.RuleSet` for every new TCP stream and for every UDP destination of
an association. It never resolves a name itself: a name the rules send through the tunnel
goes to the server as a name (the server resolves it), and only a name a rule sends direct is
resolved, by the direct dialer on this host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from veil.client.rules import Action, RuleSet
from veil.errors import VeilError
from veil.net.dialer import DatagramHandler, Dialer, EndingUdpFlow, UdpFlow
from veil.protocol.address import Address

__all__ = ["MAX_UDP_ROUTES_PER_FLOW", "RoutingDialer"]

log = logging.getLogger(__name__)

#: Destinations one UDP association remembers the route of. A decision is cheap but it counts a
#: hit, and a flow sends many datagrams to few destinations (DNS, QUIC, games); a client
#: spraying datagrams at random destinations must not grow this without bound: past it the
#: oldest entry is forgotten.
MAX_UDP_ROUTES_PER_FLOW = 256


class RoutingDialer(Dialer):
    """Tunnel, direct or refuse, per stream and per datagram destination, by ``rules``.

    ``tunnel`` is the veil session (or Trojan) dialer, ``direct`` connects from this host.
    ``wait_ready`` is the tunnel's; ``wait_ready_for`` waits for it only when the destination
    goes through it, so a direct destination is served at once while the tunnel is down or
    still connecting. ``close()`` closes ``direct`` (the caller owns and closes the tunnel).
    """

    def __init__(self, rules: RuleSet, tunnel: Dialer, direct: Dialer,
                 close_direct: Callable[[], None] | None = None) -> None:
        self.rules = rules
        self._tunnel = tunnel
        self._direct = direct
        self._close_direct = close_direct

    async def wait_ready(self, timeout: float) -> bool:
        return await self._tunnel.wait_ready(timeout)

    async def wait_ready_for(self, dest: Address, timeout: float) -> bool:
        # Not counted: open_tcp counts the stream. A blocked destination was refused by the
        # inbound before this; a forward to one is refused by open_tcp, at once.
        if self.rules.decide(dest, "tcp", count=False).action is not Action.TUNNEL:
            return True
        return await self._tunnel.wait_ready(timeout)

    def refusal(self, dest: Address, network: str = "tcp") -> str | None:
        decision = self.rules.decide(dest, network, count=False)
        if decision.action is not Action.BLOCK:
            return None
        self.rules.decide(dest, network)  # count the hit: no open_tcp follows a refusal
        assert decision.rule is not None
        return f"blocked by rule {decision.rule.origin} {decision.rule.text}"

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        action = self.rules.decide(dest, "tcp").action
        if action is Action.TUNNEL:
            self._tunnel.open_tcp(dest, local, early_data)
        elif action is Action.DIRECT:
            self._direct.open_tcp(dest, local, early_data)
        else:
            local.abort()  # a forward has no way to say why: refuse at once

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        return _RoutedUdpFlow(self, on_datagram, on_close)

    def close(self) -> None:
        if self._close_direct is not None:
            self._close_direct()


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
