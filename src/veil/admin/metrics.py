"""Prometheus metrics of a running server, read at scrape time from the status it publishes
(:class:`veil.server.status.StatusSource`; nothing is counted twice: the gate, the live
connections and the certificate are the sources of truth).

Names follow Prometheus conventions: a ``veil_`` prefix, base units (bytes, seconds,
timestamps in unix seconds), ``_total`` on counters, labels for what one would sum over.
Every metric is listed in docs/admin.md.

Counters count since the process started (Prometheus handles the reset at a restart).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from veil import __version__

if TYPE_CHECKING:
    from veil.server.status import BoundCounts, StatusSource, WayBlockStatus

#: The content type of :func:`render` (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# What the gate counts (veil.server.status.GateCounts) as the ``reason`` label of
# veil_cover_connections_total; way-in rejections keep their own reason names.
COVER_PLAIN = "plain_text"
COVER_FOREIGN_SNI = "foreign_sni"
COVER_SILENT = "silent"


def certificate_not_after(path: Path) -> float | None:
    """When the PEM certificate at ``path`` expires (unix seconds); None if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


class _CertificateCache:
    """Parses the certificate again only when its file changes (it is renewed in place)."""

    def __init__(self) -> None:
        self._key: tuple[Path, int, int] | None = None
        self._value: float | None = None

    def not_after(self, path: Path) -> float | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            self._key, self._value = key, certificate_not_after(path)
        return self._value


class ServerCollector(Collector):
    """Reads one server's :class:`~veil.server.status.ServerStatus` on every scrape."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source
        self._certificate = _CertificateCache()

    def collect(self) -> Iterable[Metric]:
        status = self.source.status()
        stats = status.gate

        info = InfoMetricFamily("veil_build", "veil's version", labels=["version"])
        info.add_metric([__version__], {})
        yield info
        yield GaugeMetricFamily("veil_start_time_seconds",
                                "When the server started, in unix seconds",
                                value=status.started_at)

        sessions = dict.fromkeys(status.ways_in, 0)
        streams = 0
        for conn in status.connections:
            sessions[conn.way_in] = sessions.get(conn.way_in, 0) + 1
            streams += conn.streams
        active = GaugeMetricFamily("veil_sessions_active",
                                   "Tunnel connections open now, by way in",
                                   labels=["way_in"])
        for way_in, count in sorted(sessions.items()):
            active.add_metric([way_in], count)
        yield active
        yield GaugeMetricFamily("veil_streams_active",
                                "Streams open now in all tunnel connections", value=streams)

        user_bytes = CounterMetricFamily(
            "veil_user_bytes",
            "Bytes carried for each user; direction up is client to server, down the reverse",
            labels=["user", "direction"])
        for name, usage in sorted(status.user_bytes.items()):
            user_bytes.add_metric([name, "up"], usage.up)
            user_bytes.add_metric([name, "down"], usage.down)
        yield user_bytes

        accepted = CounterMetricFamily("veil_handshakes_accepted",
                                       "Connections that presented a valid credential, by "
                                       "way in", labels=["way_in"])
        for way_in in sorted(set(status.ways_in) | set(stats.accepted)):
            accepted.add_metric([way_in], stats.accepted.get(way_in, 0))
        yield accepted

        cover = CounterMetricFamily("veil_cover_connections",
                                    "Connections handed to the cover site, by why",
                                    labels=["reason"])
        reasons = {COVER_PLAIN: stats.cover_plain, COVER_FOREIGN_SNI: stats.cover_foreign_sni,
                   COVER_SILENT: stats.silent}
        for reason, count in stats.rejected.items():
            reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items()):
            cover.add_metric([reason], count)
        yield cover
        yield CounterMetricFamily("veil_tls_handshake_failures",
                                  "Connections whose TLS handshake failed (OpenSSL answered "
                                  "them as it answers anyone)", value=stats.tls_failed)
        yield CounterMetricFamily(
            "veil_probes",
            "Connections that were not a tunnel: probes, scanners and visitors of the cover "
            "site alike (the server cannot tell them apart)",
            value=sum(reasons.values()) + stats.tls_failed)

        statuses = {"active": 0, "revoked": 0, "expired": 0, "over_limit": 0}
        statuses.update(status.users)
        users = GaugeMetricFamily("veil_users", "Users in the store, by status",
                                  labels=["status"])
        for name, count in sorted(statuses.items()):
            users.add_metric([name], count)
        yield users
        yield CounterMetricFamily("veil_store_refresh_failures",
                                  "Times the user store could not be read (the last snapshot "
                                  "stayed in force)", value=status.store_refresh_failures)

        yield from _bound_metrics(status.bounds)
        yield from _block_metrics(status.blocked_ways)

        not_after = self._certificate.not_after(status.state.cert_path)
        if not_after is not None:
            yield GaugeMetricFamily("veil_certificate_expiry_timestamp_seconds",
                                    "When the server's TLS certificate expires, in unix seconds",
                                    value=not_after)


def _bound_metrics(bounds: BoundCounts) -> Iterable[Metric]:
    """Each bound on what peers may make the server hold, as a counter of its hits
    (docs/operations.md, "Limits and their defaults"). Sessions refused at the session bounds
    and keys past their handshake bound are veil_cover_connections_total's reasons
    too_many_sessions, server_full and too_many_handshakes."""
    yield CounterMetricFamily(
        "veil_gate_connections_dropped",
        "Connections closed at accept because the gate already held its maximum of pending "
        "connections (in or before the TLS handshake, or silent after it)",
        value=bounds.pending_dropped)
    yield CounterMetricFamily(
        "veil_replay_filter_unrecorded",
        "Handshakes accepted without being remembered because the replay filter was full",
        value=bounds.replay_unrecorded)
    yield CounterMetricFamily(
        "veil_sessions_closed_for_flood",
        "Sessions closed because their client sent more PINGs or empty DATA frames than a "
        "client needs (a burst of 1,000, then 100 a second)", value=bounds.sessions_flooding)
    outbound = CounterMetricFamily(
        "veil_outbound_refused",
        "Streams and Trojan connections refused at an outbound descriptor bound: one user's "
        "(bound=user) or the server's (bound=server)", labels=["bound"])
    outbound.add_metric(["server"], bounds.outbound_refused_server)
    outbound.add_metric(["user"], bounds.outbound_refused_user)
    yield outbound
    resolver = CounterMetricFamily(
        "veil_resolver_failures",
        "DNS lookups for tunnels that failed at a bound of the process's resolver: too many "
        "already pending (reason=busy) or too slow (reason=timeout)", labels=["reason"])
    resolver.add_metric(["busy"], bounds.resolver_refused)
    resolver.add_metric(["timeout"], bounds.resolver_timed_out)
    yield resolver
    udp = CounterMetricFamily(
        "veil_udp_datagrams_dropped",
        "UDP datagrams to the Internet dropped rather than held, by way in and why: the "
        "outbound socket's send buffer was full (send_buffer_full), too many were waiting for "
        "a socket or a name (queue_full), a new name while the association's lookups were at "
        "their bound (resolving)", labels=["way_in", "reason"])
    for way_in, reasons in sorted(bounds.udp_dropped.items()):
        for reason, count in sorted(reasons.items()):
            udp.add_metric([way_in, reason], count)
    yield udp
    tun = CounterMetricFamily(
        "veil_tun_packets_dropped",
        "Full-device tunnel packets dropped: for a congested or missing session "
        "(reason=congested), a source address not the client's (reason=spoofed), or "
        "site-to-site traffic its --reach does not allow (reason=not_allowed)",
        labels=["reason"])
    tun.add_metric(["congested"], bounds.tun_dropped)
    tun.add_metric(["spoofed"], bounds.tun_spoofed)
    tun.add_metric(["not_allowed"], bounds.tun_filtered)
    yield tun


def _block_metrics(ways: tuple[WayBlockStatus, ...]) -> Iterable[Metric]:
    """What clients reported of the ways in (veil.server.blocks): an operator alerts on
    veil_way_in_blocked_users / veil_users_active_recent, or lets --on-block do it."""
    reports = CounterMetricFamily(
        "veil_way_in_blocked_reports",
        "Block reports from clients, by way in (scheme://host:port, no secret path; other: a "
        "way this server does not announce) and what failed; one user's reports of one way "
        "and kind count once per 5 minutes", labels=["way_in", "kind"])
    users = GaugeMetricFamily(
        "veil_way_in_blocked_users",
        "Distinct users who reported the way in blocked in the last hour", labels=["way_in"])
    alerts = CounterMetricFamily(
        "veil_way_in_block_alerts",
        "Times the share of active users reporting the way in blocked crossed the alert "
        "threshold (and --on-block ran, if given)", labels=["way_in"])
    for way in ways:
        for kind, count in sorted(way.reports.items()):
            reports.add_metric([way.way_in, kind], count)
        users.add_metric([way.way_in], way.users)
        alerts.add_metric([way.way_in], way.alerts)
    yield reports
    yield users
    yield alerts
    if ways:  # the reference for the lines above, absent like them until a report came
        yield GaugeMetricFamily(
            "veil_users_active_recent",
            "Distinct users with a veil session in the last hour (the reference for "
            "veil_way_in_blocked_users)", value=ways[0].active_users)


def make_registry(source: StatusSource) -> CollectorRegistry:
    """A registry of its own (not the global one): several servers in one process, as in the
    tests, each export only themselves."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(source))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
