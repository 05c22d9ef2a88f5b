"""The alerting hook: ``veil serve --alert-webhook URL`` posts a small JSON message when

* a user reaches :data:`USAGE_ALERT_SHARE` (80%) of their traffic limit (once per user and
  limit period), and
* the server's certificate expires within :data:`CERT_ALERT_DAYS` (once per certificate: a
  renewal makes a new one).

The body says what happened and nothing secret: the event, the server's id, a user's name
and figures, never a key, a password, a subscription URL or the webhook's own URL (which
often carries the receiver's token, e.g. a chat service's hook): the log names the webhook by
its host only. Servers of a fleet share the store, and each alert is claimed there once
(``UserStore.claim_setting``), so one server sends it, not every one.

Delivery: an HTTP(S) POST (``Content-Type: application/json``); any 2xx is delivered. A
failure (no connection, a timeout, another status) is tried again after
:data:`RETRY_DELAYS_S`, then given up with one log line: an alert is news, and a receiver
down for minutes must not pile up work in the server.

* a way in is unreachable from outside for most of its users: the clients behind a censor
  are the vantage point that matters, and those that moved to another way in report the
  block (server/blocks.py); when the tracker's threshold is crossed, the alert is posted
  (claimed once per way in and :data:`~veil.server.blocks.ALERT_COOLDOWN_S` fleet-wide).

A server down for everybody cannot post about itself, and its clients cannot reach it to
report: an uptime service, or ``veil lab probe`` from another machine, watches for that
(docs/operations.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from veil import __version__
from veil.config import parse_webhook_url
from veil.errors import StoreError
from veil.manage.fleet import certificate_validity
from veil.store.base import UserStore, period_start

if TYPE_CHECKING:
    from veil.manage.state import ServerState
    from veil.server.blocks import BlockAlert
    from veil.server.live import UserDirectory

log = logging.getLogger("veil.server")

#: A user's alert fires at this share of their limit: room to raise the limit or warn them
#: before the cut.
USAGE_ALERT_SHARE = 0.8
#: The certificate alert fires this many days before expiry at most: veil renews its own
#: certificates with a third of their life left (ACME; self-signed ones at most 30 days
#: before, and their lifetime is drawn per install, 30-730 days), so two weeks left means a
#: renewal failed, with time to fix it.
CERT_ALERT_DAYS = 14.0
#: ... and at most this share of the certificate's lifetime before expiry: half the renewal's
#: third, so a short-lived certificate (30 days: renewed 10 days before) does not alert while
#: its renewal is still to come.
CERT_ALERT_SHARE = 1 / 6
#: How often the conditions are checked (seconds): usage moves in minutes, certificates in
#: days; a minute keeps the store's extra reads to one a minute.
CHECK_INTERVAL_S = 60.0
#: Waits before the second and third tries: a receiver restarting comes back within seconds;
#: three tries in ~35 s is the bound on what one alert costs.
RETRY_DELAYS_S = (5.0, 30.0)
#: One POST's deadline (seconds): connect, send and read the status.
POST_TIMEOUT_S = 10.0
#: What is read of the receiver's answer: only its status matters.
MAX_REPLY = 4096


def webhook_label(url: str) -> str:
    """The webhook as logs name it: scheme and host, never the path or query (a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


@dataclass(frozen=True, slots=True)
class Alert:
    key: str  # the claim in the store: one alert per key, fleet-wide
    body: dict[str, object]


class Webhook:
    """Posts alerts to one URL, with bounded retries."""

    def __init__(self, url: str, *, retry_delays: tuple[float, ...] = RETRY_DELAYS_S,
                 timeout: float = POST_TIMEOUT_S) -> None:
        self.url = parse_webhook_url(url)
        self.retry_delays = retry_delays
        self.timeout = timeout
        self.sent = 0
        self.failed = 0

    def _post_once(self, data: bytes) -> int:
        request = urllib.request.Request(  # noqa: S310 (http/https only: parse_webhook_url)
            self.url, data=data, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"veil/{__version__}"})
        context = ssl.create_default_context() if self.url.startswith("https:") else None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310 (checked)
                                        context=context) as reply:
                reply.read(MAX_REPLY)
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    async def post(self, body: dict[str, object]) -> bool:
        data = json.dumps(body).encode()
        label = webhook_label(self.url)
        for attempt in range(len(self.retry_delays) + 1):
            if attempt:
                await asyncio.sleep(self.retry_delays[attempt - 1])
            try:
                status = await asyncio.to_thread(self._post_once, data)
            except (OSError, ValueError) as exc:  # URLError is an OSError; timeouts too
                why = str(getattr(exc, "reason", None) or exc)
            else:
                if 200 <= status < 300:
                    self.sent += 1
                    return True
                why = f"HTTP {status}"
            log.warning("alert webhook %s: %s (try %d of %d)", label, why, attempt + 1,
                        len(self.retry_delays) + 1)
        self.failed += 1
        log.error("alert webhook %s: gave up on a %s alert", label, body.get("event"))
        return False


def usage_alerts(directory: UserDirectory, now: float) -> list[Alert]:
    """Users at or past :data:`USAGE_ALERT_SHARE` of their limit, not revoked."""
    alerts = []
    for name, user in directory.by_name.items():
        if user.limit_bytes is None or user.revoked_at is not None:
            continue
        used = directory.period_usage.get(name, 0)
        if user.limit_bytes and used < USAGE_ALERT_SHARE * user.limit_bytes:
            continue
        start = period_start(user.limit_period, now)
        period = "total" if start is None else str(int(start))
        percent = 100.0 if not user.limit_bytes else round(100.0 * used / user.limit_bytes, 1)
        alerts.append(Alert(f"alert:usage:{name}:{period}", {
            "event": "usage_limit_near", "user": name, "used_bytes": used,
            "limit_bytes": user.limit_bytes, "limit_period": user.limit_period,
            "percent": percent}))
    return alerts


def certificate_alert(validity: tuple[float, float] | None, now: float,
                      days: float = CERT_ALERT_DAYS,
                      share: float = CERT_ALERT_SHARE) -> Alert | None:
    """The alert for a certificate valid ``validity`` (not before, not after; unix seconds)
    once its renewal is overdue: within ``days`` and ``share`` of its lifetime of expiry."""
    if validity is None:
        return None
    not_before, not_after = validity
    if not_after - now > min(days * 86400, (not_after - not_before) * share):
        return None
    return Alert(f"alert:certificate:{int(not_after)}", {
        "event": "certificate_expiring", "not_after": not_after,
        "days_left": round((not_after - now) / 86400, 1)})


def block_alert(alert: BlockAlert, cooldown: float) -> Alert:
    """The alert for a way in most of its users report blocked: claimed once per way in and
    ``cooldown`` window fleet-wide (every server of a fleet may hear the same reports)."""
    return Alert(f"alert:blocked:{alert.way_in}:{int(alert.since // cooldown)}", {
        "event": "way_in_blocked", "way_in": alert.way_in, "kind": alert.kind,
        "users": alert.users, "active_users": alert.active_users, "since": alert.since})


class Alerts:
    """The server's alert task: checks every :data:`CHECK_INTERVAL_S`, claims each alert in
    the store, posts the ones it claimed."""

    def __init__(self, webhook: Webhook, state: Callable[[], ServerState],
                 directory: Callable[[], UserDirectory], server_id: Callable[[], str], *,
                 interval: float = CHECK_INTERVAL_S, cert_days: float = CERT_ALERT_DAYS,
                 cert_share: float = CERT_ALERT_SHARE,
                 clock: Callable[[], float] = time.time) -> None:
        self.webhook = webhook
        self._state = state
        self._directory = directory
        self.server_id = server_id
        self.interval = interval
        self.cert_days = cert_days
        self.cert_share = cert_share
        self._clock = clock
        self._store: UserStore | None = None
        self._posts: set[asyncio.Task[bool] | asyncio.Task[None]] = set()

    async def run(self) -> None:
        self._store = await asyncio.to_thread(self._state().open_store)
        try:
            while True:
                try:
                    await self.check()
                except StoreError as exc:
                    log.warning("alerts: the user store is unavailable: %s", exc)
                await asyncio.sleep(self.interval)
        finally:
            for task in list(self._posts):
                task.cancel()
            await asyncio.gather(*self._posts, return_exceptions=True)
            store, self._store = self._store, None
            await asyncio.to_thread(store.close)

    async def check(self) -> None:
        now = self._clock()
        state = self._state()
        alerts = usage_alerts(self._directory(), now)
        validity = await asyncio.to_thread(certificate_validity, state.cert_path)
        cert = certificate_alert(validity, now, self.cert_days, self.cert_share)
        if cert is not None:
            alerts.append(cert)
        await self._claim_and_post(alerts, now)

    def blocked(self, alert: BlockAlert, cooldown: float) -> None:
        """Post a way-in block now (the tracker decided it is news), not at the next check."""
        if self._store is None:
            return  # not running (starting or stopping): the log line stands for it
        task = asyncio.get_running_loop().create_task(
            self._claim_and_post([block_alert(alert, cooldown)], self._clock()))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _claim_and_post(self, alerts: list[Alert], now: float) -> None:
        if not alerts:
            return
        store = self._store
        assert store is not None
        server = self.server_id()
        try:
            claimed = await asyncio.to_thread(
                lambda: [a for a in alerts if store.claim_setting(a.key, server)])
        except StoreError as exc:
            log.warning("alerts: the user store is unavailable: %s", exc)
            return
        for alert in claimed:
            body = {**alert.body, "server": server, "at": now}
            task = asyncio.get_running_loop().create_task(self.webhook.post(body))
            self._posts.add(task)
            task.add_done_callback(self._posts.discard)
