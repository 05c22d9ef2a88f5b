"""What a running server publishes about itself: one frozen snapshot, read on demand.

The admin panel and ``/metrics`` see the server only through :class:`StatusSource`, never
through its gate, live view or options, so the panel can be built around any object that
answers :meth:`StatusSource.status` (a stand-in in a test) and the server's internals can
change without the panel noticing. The panel asks nothing of the server: user changes go
through the store and reach the server at its next refresh.

This module imports no runtime module of ``server/`` (only the standard library and store
types), so ``admin/`` may import it alone. Every field defaults to "nothing happened yet",
so a test builds the status it needs and nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from veil.store.base import Usage

if TYPE_CHECKING:
    from veil.manage.state import ServerState


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """One accepted tunnel connection (a veil session or a Trojan connection), as it is now."""

    #: Unique for the server's lifetime, in the order connections were accepted.
    id: int
    #: The user it authenticated as.
    user: str
    #: The way in it came by ("veil", "trojan").
    way_in: str
    #: The client's address as "host:port" ("?" if unknown).
    peer: str
    #: When it was accepted, in unix seconds.
    started_at: float
    #: Bytes carried since it was accepted, client to server and back.
    bytes_up: int
    bytes_down: int
    #: Streams open in it now (0 for a Trojan connection's single relay).
    streams: int


@dataclass(frozen=True, slots=True)
class GateCounts:
    """What the gate decided about the connections it saw, counted since the server started."""

    #: Connections that presented a valid credential, by way in.
    accepted: Mapping[str, int] = field(default_factory=dict)
    #: Handed to the cover site: not TLS at all / TLS for a name not the server's own.
    cover_plain: int = 0
    cover_foreign_sni: int = 0
    #: Connections that sent nothing to judge them by (before TLS, or once inside it).
    silent: int = 0
    #: Handed to the cover site by a way in that refused them, by the way in's reason.
    rejected: Mapping[str, int] = field(default_factory=dict)
    #: Connections whose TLS handshake failed.
    tls_failed: int = 0


@dataclass(frozen=True, slots=True)
class BoundCounts:
    """How often each bound on what peers may make the server hold was hit, counted since the
    server started (docs/operations.md lists the bounds). Sessions refused at the per-user
    and per-server session bounds, and keys past their handshake bound, are in
    :attr:`GateCounts.rejected` (reasons ``too_many_sessions``, ``server_full``,
    ``too_many_handshakes``); connections silent past their timeout in :attr:`GateCounts.silent`.
    """

    #: Connections closed at accept because the gate held its maximum of pending ones.
    pending_dropped: int = 0
    #: Handshakes accepted without being remembered because the replay filter was full.
    replay_unrecorded: int = 0
    #: Sessions closed for a flood of frames that do nothing (PINGs, empty DATA).
    sessions_flooding: int = 0
    #: Streams (and Trojan connections) refused at a descriptor bound: one user's, the server's.
    outbound_refused_user: int = 0
    outbound_refused_server: int = 0
    #: DNS lookups refused because too many were pending, and lookups that timed out.
    resolver_refused: int = 0
    resolver_timed_out: int = 0
    #: UDP datagrams dropped rather than held, by way in ("veil", "trojan"), then by why:
    #: "send_buffer_full" (the outbound socket's), "queue_full" (waiting for a socket or a
    #: name), "resolving" (a new name while the association's lookups are at their bound).
    udp_dropped: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: Full-device tunnel packets dropped: a session congested or gone / a spoofed source /
    #: site-to-site traffic --reach does not allow (docs/site-to-site.md).
    tun_dropped: int = 0
    tun_spoofed: int = 0
    tun_filtered: int = 0


@dataclass(frozen=True, slots=True)
class WayBlockStatus:
    """What clients reported of one of the server's ways in (veil.server.blocks): blocked for
    how many users, since when."""

    #: The way in as ``scheme://host:port`` (no secret path), or "other" for ways the server
    #: does not announce (an old key's address).
    way_in: str
    #: Distinct users who reported it blocked within the report window (the last hour).
    users: int
    #: Distinct users with a veil session within the same window (the reporters included).
    active_users: int
    #: The earliest failure those users reported, in unix seconds (minute precision).
    since: float | None = None
    #: Reports counted since the server started, by failure kind ("reset", "timeout", ...).
    reports: Mapping[str, int] = field(default_factory=dict)
    #: Times the ``--on-block`` alert fired for it.
    alerts: int = 0


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """A snapshot of one server; nothing in it changes after it was taken."""

    #: The state the server runs with now (a reload replaces it): the store to open, the
    #: certificate file, the public address.
    state: ServerState
    #: When the server started, in unix seconds.
    started_at: float
    #: The address the tunnel port listens on, as "host:port" ("[host]:port" for IPv6).
    listen: str
    #: This server's id in a fleet (veil.manage.fleet.server_id): sessions to end name it.
    server_id: str = ""
    #: The cover site's URL, or None for the built-in site.
    cover_url: str | None = None
    #: Whether full-device tunnels (``--tun``) are on.
    tun: bool = False
    #: The ways in the gate offers, in its order.
    ways_in: tuple[str, ...] = ()
    #: Connections open now, by id.
    connections: tuple[ConnectionStatus, ...] = ()
    #: Bytes carried for each user since the server started (connections closed included).
    user_bytes: Mapping[str, Usage] = field(default_factory=dict)
    #: Users in the server's snapshot of the store, by status ("active", "revoked",
    #: "expired", "over_limit"); a status no user has may be absent.
    users: Mapping[str, int] = field(default_factory=dict)
    #: Times the user store could not be read (the last snapshot stayed in force).
    store_refresh_failures: int = 0
    gate: GateCounts = field(default_factory=GateCounts)
    bounds: BoundCounts = field(default_factory=BoundCounts)
    #: Ways in that clients reported blocked (any report since the server started), in the
    #: server's order of its ways.
    blocked_ways: tuple[WayBlockStatus, ...] = ()


class StatusSource(Protocol):
    """What the admin panel needs of a server: :class:`veil.server.service.VeilServer`
    implements it."""

    def status(self) -> ServerStatus:
        """The server as it is now. Called on the server's event loop; cheap enough for
        every page view and scrape (no I/O)."""
        ...
