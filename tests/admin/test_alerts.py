"""``veil serve --alert-webhook URL`` (issue #19, item 6): a real server posts to a real HTTP
receiver on loopback when a user reaches 80% of the limit and when the certificate nears
expiry; a receiver that fails is tried a bounded number of times; nothing secret is in a
body or a log line; two servers on one store send each alert once."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import procs
from tests.support.wait import wait_until
from tests.support.webhook import SECRET_PATH, Receiver, receiving
from veil.config import ServerOptions
from veil.errors import ConfigError
from veil.manage.state import ServerState, init_state
from veil.manage.subscription import subscription_urls
from veil.protocol.address import Address
from veil.protocol.trojan import password_for_secret
from veil.server.alerts import Webhook
from veil.server.service import VeilServer
from veil.store.base import Usage

WAIT_S = 10.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as got:
        yield got


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: object, timeout: float = 30.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.close()


def _state(tmp_path: Path) -> tuple[ServerState, int]:
    port = procs.unused_port()
    return init_state(tmp_path / "state", listen=Address("127.0.0.1", port))[0], port


async def _serve(state: ServerState, port: int, url: str, *, cert_days: float = 14.0
                 ) -> VeilServer:
    server = VeilServer(state, ServerOptions(listen=Address("127.0.0.1", port),
                                             allow_private=True, alert_webhook=url))
    assert server.alerts is not None
    server.alerts.interval = 0.2  # the test's pace; a server checks once a minute
    server.alerts.cert_days = cert_days
    server.alerts.cert_share = 1.0 if cert_days > 14 else server.alerts.cert_share
    server.alerts.webhook.retry_delays = (0.1, 0.2)
    await server.start()
    return server


def test_a_user_at_80_percent_is_posted_once_without_secrets(
        tmp_path: Path, receiver: Receiver, loop: Loop,
        caplog: pytest.LogCaptureFixture) -> None:
    state, port = _state(tmp_path)
    caplog.set_level(logging.DEBUG)
    server: VeilServer = loop.run(_serve(state, port, receiver.url))  # type: ignore[assignment]
    second_port = procs.unused_port()
    # A second server of the fleet on the same store: the alert is claimed once.
    second: VeilServer = loop.run(_serve(state, second_port, receiver.url))  # type: ignore[assignment]
    try:
        async def prepare() -> None:
            users = server.users
            users.add("jo", limit_bytes=10_000)
            users.add("kim", limit_bytes=10_000)
            users.store.add_usage({"jo": Usage(4000, 4500), "kim": Usage(3000, 3000)},
                                  time.time())

        loop.run(prepare())
        wait_until(lambda: receiver.posts, WAIT_S, "the usage alert")
        time.sleep(1.0)  # several more checks on both servers: no second post
        assert len(receiver.posts) == 1
        path, body = receiver.posts[0]
        assert path == SECRET_PATH
        assert {k: body[k] for k in ("event", "user", "used_bytes", "limit_bytes",
                                     "percent")} == {
            "event": "usage_limit_near", "user": "jo", "used_bytes": 8500,
            "limit_bytes": 10_000, "percent": 85.0}
        assert body["server"] in (server.live.server_id, second.live.server_id)
        user = server.users.get("jo")
        secrets = [user.secret.hex(), server.users.access_key(user),
                   password_for_secret(user.secret), *subscription_urls(state, user),
                   "T0KEN"]
        text = json.dumps(body) + caplog.text
        assert not [s for s in secrets if s in text]
    finally:
        loop.run(second.stop())
        loop.run(server.stop())


def test_certificate_expiry_is_posted_and_a_failing_receiver_is_retried_a_bounded_time(
        tmp_path: Path, receiver: Receiver, loop: Loop,
        caplog: pytest.LogCaptureFixture) -> None:
    state, port = _state(tmp_path)
    receiver.statuses = [500, 503, 500]  # every try of the first alert fails
    caplog.set_level(logging.WARNING)
    # Every certificate expires within 10,000 days: the alert is due at once.
    server: VeilServer = loop.run(_serve(state, port, receiver.url,  # type: ignore[assignment]
                                         cert_days=10_000))
    try:
        assert server.alerts is not None
        wait_until(lambda: server.alerts.webhook.failed == 1, WAIT_S,  # type: ignore[union-attr]
                   "the alert to be given up")
        time.sleep(0.6)  # more checks: the alert was claimed, it is not posted again
        assert len(receiver.posts) == 3
        assert {body["event"] for _, body in receiver.posts} == {"certificate_expiring"}
        assert "gave up on a certificate_expiring alert" in caplog.text
        assert "http://127.0.0.1" in caplog.text and "T0KEN" not in caplog.text
    finally:
        loop.run(server.stop())


def test_a_webhook_needs_an_http_url() -> None:
    for bad in ("file:///etc/passwd", "ftp://example.org/x", "https://"):
        with pytest.raises(ConfigError):
            Webhook(bad)


def test_serve_refuses_a_bad_webhook_before_it_writes_anything(tmp_path: Path) -> None:
    import subprocess

    from tests.support.procs import VEIL

    state = tmp_path / "state"
    result = subprocess.run([*VEIL, "serve", "--self-signed",
                             "--state", str(state), "--listen", "127.0.0.1:0",
                             "--alert-webhook", "file:///etc/passwd"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--alert-webhook needs an http:// or https:// URL" in result.stderr
    assert not state.exists()


@pytest.mark.parametrize("lifetime_days, left_days, due", [
    (90, 29, False), (90, 15, False), (90, 13.9, True),  # ACME: renewed 30 days before
    (30, 11, False), (30, 9, False), (30, 4.9, True),  # a short self-signed one: 10 days
    (730, 20, False), (730, 13, True)])  # a long self-signed one: renewed 30 days before
def test_a_certificate_alert_waits_until_its_renewal_is_overdue(
        lifetime_days: float, left_days: float, due: bool) -> None:
    from veil.server.alerts import certificate_alert

    now = 1_800_000_000.0
    not_after = now + left_days * 86400
    validity = (not_after - lifetime_days * 86400, not_after)
    assert (certificate_alert(validity, now) is not None) is due
