"""Rule data through the subscription (issue #17: new China lists without a new veil, GitHub
being unreliable from China), on a real server on loopback (``--routing cn``) serving data of
its own (``VEIL_RULEDATA_DIR``, which differs from the packaged data) and veil's real client:
it takes the served data because it is newer, caches it, starts from the cache when the server
is down, ``--explain`` says where the data came from, and a bad, oversized or garbled answer
keeps the data it had."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from pathlib import Path

import pytest

from tests.integration.test_subscription import add, with_server
from tests.support import procs
from tests.support.cdn import cdn_nginx
from tests.support.socks_echo import echo
from tests.support.wait import wait_until_async
from veil.cli import main
from veil.client import ruledata, subscription
from veil.client.rules import Action
from veil.client.service import load_client_rules, run_client
from veil.client.subscription import Follower
from veil.config import ClientOptions, ServerOptions, SubscriptionOptions
from veil.manage import rules as served_rules
from veil.manage.state import init_state
from veil.manage.subscription import subscription_urls
from veil.protocol.address import Address, parse_host_port
from veil.server.service import VeilServer
from veil.transport.cdn import wire

#: Only in the served data: a name the packaged data sends through the tunnel.
SERVED_ONLY = "veil-served-only.example"
#: Newer than any packaged data: the client must prefer it.
SERVED_DATE = "2099-01-01"


def write_data(directory: Path, date: str = SERVED_DATE) -> Path:
    """A rule data directory as scripts/update-ruledata writes one, with small lists."""
    directory.mkdir(parents=True)
    lists = {ruledata.DOMAINS_FILE: [SERVED_ONLY, "example.cn"],
             ruledata.NETWORKS_FILE: ["1.0.1.0/24", "2001:250::/35"]}
    for name, lines in lists.items():
        (directory / name).write_bytes(gzip.compress("\n".join(lines).encode() + b"\n",
                                                     mtime=0))
    provenance = {kind: dict(about, data_date=date, version=f"test-{date}")
                  for kind, about in ruledata.info().items()}
    (directory / ruledata.PROVENANCE_FILE).write_text(json.dumps(provenance))
    return directory


def decides(data: ruledata.RuleData, host: str) -> Action:
    return load_client_rules(("cn",), data.cn_data).decide(Address(host, 443), "tcp").action


@pytest.fixture
def served_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = write_data(tmp_path / "served")
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(directory))
    return directory


def test_a_follower_takes_the_served_data_caches_it_and_starts_from_the_cache_offline(
        tmp_path: Path, served_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache" / "sub.json"
    assert decides(ruledata.packaged(), SERVED_ONLY) is Action.TUNNEL

    async def online(server: VeilServer) -> str:
        user = await add(server, "alice")
        url = subscription_urls(server.state, user)[0]
        follower = Follower(SubscriptionOptions(url, cache), rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 1
        data = follower.rule_data.current
        assert data.dates() == (SERVED_DATE, SERVED_DATE)
        assert data.origin.startswith("from the subscription (127.0.0.1)")
        assert decides(data, SERVED_ONLY) is Action.DIRECT
        assert server.subscriptions is not None
        assert server.subscriptions.rule_files_served == 2
        # the next refresh lists the same data: nothing is fetched again
        await follower.refresh()
        assert follower.rule_data.updates == 1 and server.subscriptions.rule_files_served == 2
        return url

    url = asyncio.run(with_server(tmp_path, online, routing="cn"))
    rules_dir = subscription.rule_data_cache_path(cache)
    assert sorted(p.name for p in rules_dir.iterdir() if not p.name.endswith(".gz")) == [
        "manifest.json"]

    async def offline() -> None:  # the server is gone: the cached answer and data are used
        follower = Follower(SubscriptionOptions(url, cache), fetch_timeout=2.0, rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 0
        assert follower.rule_data.current.dates() == (SERVED_DATE, SERVED_DATE)
        assert decides(follower.rule_data.current, SERVED_ONLY) is Action.DIRECT

    asyncio.run(offline())
    # --explain with the subscription: the cached data, where it came from and its date
    assert main(["connect", url, "--subscription-cache", str(cache), "--rules", "cn",
                 "--explain", SERVED_ONLY]) == 0
    out = capsys.readouterr().out
    assert f"{SERVED_ONLY}:443 -> direct" in out
    assert "cn data: from the subscription (127.0.0.1), fetched " in out
    assert f"data of {SERVED_DATE}" in out


def test_served_data_older_than_the_packaged_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV,
                       str(write_data(tmp_path / "old", date="2001-01-01")))

    async def body(server: VeilServer) -> None:
        user = await add(server, "alice")
        follower = Follower(SubscriptionOptions(subscription_urls(server.state, user)[0],
                                                tmp_path / "sub.json"), rule_data=True)
        await follower.start()
        assert follower.rule_data is not None and follower.rule_data.updates == 0
        assert follower.rule_data.current is ruledata.packaged()
        assert server.subscriptions is not None
        assert server.subscriptions.rule_files_served == 0

    asyncio.run(with_server(tmp_path, body, routing="cn"))


#: How each fault spoils the served file, whether the server's signed list is made to match
#: it (only the content is wrong then), and the reason the client must give.
FAULTS = {
    "oversized": (lambda good: good, False, "more than"),
    "truncated": (lambda good: good[:-9], False, "do not match the listed SHA-256"),
    "tampered": (lambda good: good[:-1] + bytes([good[-1] ^ 1]), False, "do not match"),
    "garbled": (lambda good: b"\x1f\x8b" + b"x" * 90, True, "not gzip"),
    "unparsable": (lambda good: gzip.compress(b"example.cn\n<script>\n", mtime=0), True,
                   "is not a domain suffix"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_answer_keeps_the_data_in_use(tmp_path: Path, served_dir: Path, fault: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The server's files are spoiled after it listed them (as a broken disk or a middlebox
    would): the client refuses them with a reason and keeps the cached data it had."""
    cache = tmp_path / "sub.json"
    name = ruledata.DOMAINS_FILE

    async def body(server: VeilServer) -> None:
        user = await add(server, "alice")
        url = subscription_urls(server.state, user)[0]
        first = Follower(SubscriptionOptions(url, cache), rule_data=True)
        await first.start()
        assert first.rule_data is not None and first.rule_data.updates == 1
        # newer data on the server, then spoiled
        newer = served_rules.served_data()
        newer_dir = write_data(tmp_path / "newer", date="2099-02-01")
        monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(newer_dir))
        files = served_rules.rule_files()
        manifest = served_rules.client_manifest()["cn"]
        assert isinstance(manifest, dict)
        good = files[name][0].body
        spoil, listed, reason = FAULTS[fault]
        spoiled = spoil(good)
        files[name] = (served_rules.RuleFile(spoiled, b"application/gzip"), b'"x"')
        if fault == "oversized":
            monkeypatch.setattr(subscription, "MAX_RULE_DATA_FILE_BYTES", len(good) - 1)
        if listed:
            manifest["files"][name] = {"sha256": served_rules.RuleFile(spoiled, b"").sha256,
                                       "bytes": len(spoiled)}
        follower = Follower(SubscriptionOptions(url, cache), rule_data=True)
        assert follower.rule_data is not None
        assert follower.rule_data.current.dates() == newer.dates()  # from the cache
        with caplog.at_level(logging.WARNING, "veil.client"):
            assert await follower.refresh() is not None
        assert follower.rule_data.updates == 0
        assert follower.rule_data.current.dates() == (SERVED_DATE, SERVED_DATE)
        (line,) = [r.getMessage() for r in caplog.records if "not taken" in r.getMessage()]
        assert reason in line and "keeping the data from the subscription" in line
        # the cache still holds the good data
        reloaded = Follower(SubscriptionOptions(url, cache), rule_data=True).rule_data
        assert reloaded is not None
        assert reloaded.current.dates() == (SERVED_DATE, SERVED_DATE)

    asyncio.run(with_server(tmp_path, body, routing="cn"))


async def echoed_by_name(socks: Address, host: str, port: int, payload: bytes) -> bytes:
    """``payload`` to ``host``:``port`` (given by name) through the SOCKS5 proxy, then a FIN:
    what came back (nothing when the stream was refused, at once or by the server)."""
    reader, writer = await asyncio.open_connection(socks.host, socks.port)
    try:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        name = host.encode()
        writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        head = await asyncio.wait_for(reader.readexactly(4), IO_TIMEOUT_S)
        if head[1] != 0:
            return b""
        await reader.readexactly({1: 4, 4: 16}[head[3]] + 2)  # the bound address
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), IO_TIMEOUT_S)
    finally:
        writer.close()


#: A SOCKS answer or a refresh that takes longer has failed (loopback answers in ms).
IO_TIMEOUT_S = 20.0


def test_a_running_client_swaps_newer_data_in_for_new_connections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``localhost`` is in the second data set only. The server relays to no private address,
    so through the tunnel it is refused and only a DIRECT decision reaches the local echo
    server: after the refresh that brings the second set, new connections to it succeed; a
    connection opened before keeps going."""

    second = tmp_path / "second"
    write_data(second, date="2099-02-01")
    lines = [SERVED_ONLY, "example.cn", "localhost"]
    (second / ruledata.DOMAINS_FILE).write_bytes(gzip.compress("\n".join(lines).encode(),
                                                               mtime=0))
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(write_data(tmp_path / "first")))
    listen = Address("127.0.0.1", procs.unused_port())
    state = init_state(tmp_path / "state", listen=listen)[0]

    async def run() -> None:
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        server = VeilServer(state, ServerOptions(listen=listen, allow_private=False,
                                                 routing="cn"))
        await server.start()
        stop = asyncio.Event()
        client: asyncio.Task[None] | None = None
        try:
            user = await add(server, "alice")
            url = subscription_urls(server.state, user)[0]
            follower = Follower(SubscriptionOptions(url, tmp_path / "sub.json", refresh_s=1.0),
                                rule_data=True)
            first = await follower.start()
            options = ClientOptions.from_args(
                first.key, socks=Address("127.0.0.1", 0), http=None, forwards=[],
                socks_auth=None, connections=1, default_socks=Address("127.0.0.1", 0),
                rules=("cn",))
            with caplog.at_level(logging.INFO, "veil.client"):
                client = asyncio.ensure_future(run_client(options, stop, follower=follower))
                socks = parse_host_port(await wait_until_async(
                    lambda: next((r.getMessage().rsplit(" ", 1)[1] for r in caplog.records
                                  if r.getMessage().startswith("SOCKS5 proxy on")), None),
                    IO_TIMEOUT_S, "the SOCKS5 proxy"))
                # through the tunnel: the server relays to no private address
                assert await echoed_by_name(socks, "localhost", target_port, b"one") == b""
                held_reader, held = await asyncio.open_connection(socks.host, socks.port)
                held.write(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01"
                           + target_port.to_bytes(2, "big"))
                assert (await held_reader.readexactly(12))[2:4] == b"\x05\x00"
                monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(second))
                assert follower.rule_data is not None
                await wait_until_async(lambda: follower.rule_data.updates == 2,  # type: ignore[union-attr]
                                       IO_TIMEOUT_S, "the refresh with the second data")
                assert await echoed_by_name(socks, "localhost", target_port, b"two") == b"two"
                held.write(b"still here")
                assert await held_reader.readexactly(10) == b"still here"
                held.close()
                assert any("cn data from the subscription" in r.getMessage()
                           for r in caplog.records)
        finally:
            stop.set()
            if client is not None:
                await asyncio.wait_for(client, IO_TIMEOUT_S)
            await server.stop()
            target.close()
            await target.wait_closed()

    asyncio.run(run())


def test_through_a_cdn_the_data_is_taken_only_as_the_server_signed_it(
        tmp_path: Path, served_dir: Path) -> None:
    """Through a CDN (nginx here), TLS ends at the CDN: the list of files must carry the
    server's signature (``signature.rules``), and the files the CDN hands over must match it."""

    if not Path(procs.NGINX).exists():
        pytest.skip("needs nginx 1.22")
    port = procs.unused_port()
    secret = wire.new_secret_path()
    with cdn_nginx(port, name="localhost") as cdn:
        async def body(server: VeilServer) -> None:
            user = await add(server, "alice")
            cdn_url = subscription_urls(server.state, user)[1]
            assert cdn_url.startswith(f"https://localhost:{cdn.port}{secret}")
            follower = Follower(SubscriptionOptions(cdn_url, tmp_path / "sub.json"),
                                ca_file=str(cdn.ca_file), rule_data=True)
            await follower.start()
            assert follower.rule_data is not None and follower.rule_data.updates == 1
            assert follower.rule_data.current.dates() == (SERVED_DATE, SERVED_DATE)
            assert follower.rule_data.current.origin.startswith(
                "from the subscription (localhost)")

        asyncio.run(with_server(tmp_path, body, via=(f"https://localhost:{cdn.port}{secret}",),
                                port=port, routing="cn"))


def test_a_bad_data_directory_stops_the_server_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at each subscription request, which would stop every client's refresh."""
    from veil.errors import ConfigError

    bad = write_data(tmp_path / "bad")
    (bad / ruledata.NETWORKS_FILE).write_bytes(b"not gzip")
    monkeypatch.setenv(served_rules.RULEDATA_DIR_ENV, str(bad))

    async def body(server: VeilServer) -> None:
        raise AssertionError("started")

    with pytest.raises(ConfigError, match=r"VEIL_RULEDATA_DIR=.*not gzip"):
        asyncio.run(with_server(tmp_path, body))
