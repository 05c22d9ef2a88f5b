"""A client blocked on its first way in tells the server through the second, and the operator
hears of it: `/metrics` counts the report for the first way, and `veil serve --on-block CMD`
ran CMD (a tiny script that writes its environment to a file), and `--alert-webhook` got a
`way_in_blocked` post: the users behind the censor are the outside vantage point.

A real `veil serve` listens on two loopback ports (`--listen` twice, the second announced by
`--via tls://`); keys name a test censor (tests/support/blocker.py) as the server's public
address, in front of the first port. The client is veil's own (ClientTunnel) with the
failover test's short timers. Positive control: with the censor passing everything, the same
traffic brings no report and no alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_failover import (
    FAST_FAILOVER,
    FAST_HANDSHAKE_S,
    FAST_SESSIONS,
    request,
)
from tests.support import procs
from tests.support.blocker import Blocker
from tests.support.socks_echo import echo as echo_handler
from tests.support.wait import wait_until
from tests.support.webhook import Receiver, receiving
from veil.client.forward import TcpForward
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address

LOOPBACK = "127.0.0.1"
#: The alert hook: writes what --on-block put in its environment to the file it is given.
HOOK = ("import os, sys\n"
        "with open(sys.argv[1], 'a') as out:\n"
        "    out.write(' '.join(os.environ[k] for k in ('VEIL_WAY_IN', 'VEIL_KIND', "
        "'VEIL_USERS', 'VEIL_ACTIVE_USERS')) + '\\n')\n")
#: The client is on the second way within this (two resets ~0.4 s apart, then a handshake).
SWITCH_WITHIN_S = 10.0
#: The hook is a Python process: its start-up on a loaded CI machine.
HOOK_WITHIN_S = 15.0
#: After the positive control's traffic, how long a hook would have had to show up.
NO_HOOK_GRACE_S = 1.0


@dataclass
class Rig:
    blocker: Blocker
    key: AccessKey
    admin_port: int
    alert_file: Path
    echo_port: int
    webhook: Receiver


@contextlib.asynccontextmanager
async def rig(tmp: Path) -> AsyncIterator[Rig]:
    blocker = Blocker(Address(LOOPBACK, 1))  # its upstream is set once the server listens
    await blocker.start()
    echo = await asyncio.start_server(echo_handler, LOOPBACK, 0)
    hook, alert_file = tmp / "hook.py", tmp / "alerts.txt"
    hook.write_text(HOOK)
    second = procs.unused_port()
    server = None
    webhook = contextlib.ExitStack()
    try:
        receiver = webhook.enter_context(receiving())
        server = procs.start_veil_server(
            tmp, "--listen", f"{LOOPBACK}:{second}", "--via", f"tls://{LOOPBACK}:{second}",
            "--public", str(blocker.address), "--admin", f"{LOOPBACK}:0",
            "--on-block", f"{sys.executable} {hook} {alert_file}",
            "--alert-webhook", receiver.url)
        admin_port = procs.bound_port(server.log, "admin panel on", server.proc)
        blocker.upstream = Address(LOOPBACK, server.port)
        key = AccessKey.parse(server.key)
        assert [str(w) for w in key.ways()] == [str(blocker.address), f"{LOOPBACK}:{second}"]
        yield Rig(blocker, key, admin_port, alert_file, echo.sockets[0].getsockname()[1],
                  receiver)
    finally:
        if server is not None:
            procs.stop(server.proc)
        webhook.close()
        echo.close()
        await blocker.close()


@contextlib.asynccontextmanager
async def tunnel_to(r: Rig) -> AsyncIterator[tuple[ClientTunnel, TcpForward]]:
    tunnel = ClientTunnel(r.key, session_config=FAST_SESSIONS, failover=FAST_FAILOVER,
                          handshake_timeout=FAST_HANDSHAKE_S)
    forward = TcpForward(tunnel, Address(LOOPBACK, 0), Address(LOOPBACK, r.echo_port))
    await forward.start()
    tunnel.start()
    try:
        yield tunnel, forward
    finally:
        await forward.close()
        await tunnel.close()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as reply:
            return str(reply.read().decode())
    text = await asyncio.to_thread(get)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("veil_way_in_") or s.name == "veil_users_active_recent"}


async def until_request_succeeds(forward: TcpForward, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await request(forward):
        assert loop.time() < deadline, f"no request went through within {timeout} s"
        await asyncio.sleep(0.05)


def test_a_blocked_way_is_reported_through_the_other_and_the_hook_runs(tmp_path: Path) -> None:
    async def main() -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
        async with rig(tmp_path) as r:
            r.blocker.set_mode("reset")
            direct = f"tls://{r.blocker.address}"
            async with tunnel_to(r) as (tunnel, forward):
                await until_request_succeeds(forward, SWITCH_WITHIN_S)
                assert tunnel.chooser.current == 1 and tunnel.chooser.blocked(0)
                # The report went before the request's OPEN on the same session: it is
                # counted by the time the echo is back.
                metrics = await scrape(r.admin_port)
            wait_until(lambda: r.alert_file.exists() and r.alert_file.read_text(),
                       HOOK_WITHIN_S, "the --on-block hook to run")
            wait_until(lambda: r.webhook.events(), HOOK_WITHIN_S, "the webhook's post")
            ((_, posted),) = r.webhook.posts
            assert posted["event"] == "way_in_blocked" and posted["way_in"] == direct, posted
            assert (posted["kind"], posted["users"], posted["active_users"]) == ("reset", 1, 1)
            return metrics, r.alert_file.read_text().replace(direct, "DIRECT")

    metrics, alerts = asyncio.run(main())
    reports = {labels: value for (name, labels), value in metrics.items()
               if name == "veil_way_in_blocked_reports_total"}
    assert len(reports) == 1, metrics
    ((labels, value),) = reports.items()
    assert dict(labels)["kind"] == "reset" and value == 1
    assert dict(labels)["way_in"].startswith("tls://127.0.0.1:")
    assert ("veil_way_in_blocked_users", labels[1:]) in metrics
    assert metrics[("veil_way_in_blocked_users", (labels[1],))] == 1
    assert metrics[("veil_users_active_recent", ())] == 1
    assert metrics[("veil_way_in_block_alerts_total", (labels[1],))] == 1
    assert alerts == "DIRECT reset 1 1\n"  # once


def test_no_block_no_report(tmp_path: Path) -> None:
    """The positive control: the same client and traffic through a censor that passes."""
    async def main() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with rig(tmp_path) as r:
            async with tunnel_to(r) as (tunnel, forward):
                await until_request_succeeds(forward, SWITCH_WITHIN_S)
                assert await request(forward)
                assert tunnel.chooser.current == 0 and r.blocker.relayed >= 1
                metrics = await scrape(r.admin_port)
            await asyncio.sleep(NO_HOOK_GRACE_S)
            assert not r.alert_file.exists() and r.webhook.posts == []
            return metrics

    metrics = asyncio.run(main())
    assert not metrics, metrics
