"""Subscriptions (issue #16, item 4) on a real server on loopback: served on the TLS port over
HTTP/1.1 and HTTP/2 in every format (the apps' formats checked against their schemas), on a
CDN way's secret path through nginx as a CDN; without the right token, or for a revoked
user, the cover's 404 byte for byte; and a client that follows the subscription URL
connects with the key in it and picks up a new way in after the server changed."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import jsonschema
import pytest
import yaml

from tests.support import procs
from tests.support.cdn import cdn_nginx
from tests.support.socks_echo import echo_target, through_socks
from veil.client.socks5 import Socks5Inbound
from veil.client.subscription import Follower, FollowingTunnel, SubscriptionUrl, fetch
from veil.config import ServerOptions, SubscriptionOptions
from veil.errors import AuthError, TransportError
from veil.manage.state import init_state, load_state
from veil.manage.subscription import subscription_urls
from veil.net.client_session import ClientTunnel
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.protocol.trojan import TrojanLink, password_for_secret
from veil.server.service import VeilServer
from veil.store.base import User
from veil.transport.cdn import wire

T = TypeVar("T")
TIMEOUT = 20.0
SCHEMAS = Path(__file__).resolve().parents[1] / "support" / "schemas"
_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def schema(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((SCHEMAS / name).read_text())
    return loaded


def client_context(alpn: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    return context


async def h1_get(port: int, target: str, user_agent: str = "curl/7.88.1") -> bytes:
    """The whole answer to one HTTP/1.1 GET (Connection: close) on the TLS port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   ssl=client_context("http/1.1"),
                                                   server_hostname="localhost")
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: {user_agent}"
                     "\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(-1), TIMEOUT)
    finally:
        writer.close()


async def h2_get(port: int, target: str,
                 user_agent: str = "curl/7.88.1") -> tuple[dict[bytes, bytes], bytes]:
    """Headers and body of one HTTP/2 GET (the h2 library) on the TLS port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   ssl=client_context("h2"),
                                                   server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"),
                              (":authority", "localhost"), (":path", target),
                              ("user-agent", user_agent)], end_stream=True)
        writer.write(conn.data_to_send())
        headers: dict[bytes, bytes] = {}
        body = bytearray()
        while True:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            assert data, "the server closed before the answer ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {bytes(k): bytes(v) for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return headers, bytes(body)
            writer.write(conn.data_to_send())
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in
               (line.partition(b": ") for line in lines[1:])}
    return int(lines[0].split(b" ")[1]), headers, body


async def with_server(tmp: Path, body: Callable[[VeilServer], Awaitable[T]], *,
                      via: tuple[str, ...] = (), port: int | None = None,
                      state_dir: Path | None = None, routing: str = "none") -> T:
    listen = Address("127.0.0.1", port or procs.unused_port())
    directory = state_dir or tmp / "state"
    state = (load_state(directory) if (directory / "config.json").exists()
             else init_state(directory, listen=listen)[0])
    server = VeilServer(state, ServerOptions(
        listen=listen, allow_private=True, trojan=True,
        via=tuple(parse_endpoint(v) for v in via), routing=routing))
    await server.start()
    try:
        return await body(server)
    finally:
        await server.stop()


async def add(server: VeilServer, name: str, **limits: int) -> User:
    """A new user, in the server's live directory at once (not after the next refresh)."""
    user = server.users.add(name, **limits)  # type: ignore[arg-type]
    await server.live.tick()
    return user


def token_path(server: VeilServer, name: str) -> str:
    url = subscription_urls(server.state, server.users.get(name))[0]
    return "/" + url.partition("#")[0].split("/", 3)[3]


def test_each_format_over_http1_and_http2(tmp_path: Path) -> None:
    async def body(server: VeilServer) -> None:
        user = await add(server, "alice", limit_bytes=10**9, expires_at=2_000_000_000)
        port = server.address.port
        path = token_path(server, "alice")
        key = server.users.access_key(user)
        answers: dict[str, list[tuple[dict[bytes, bytes], bytes]]] = {}
        for fmt in ("veil", "clash", "sing-box", "v2rayn"):
            status, headers, got = split(await h1_get(port, f"{path}?format={fmt}"))
            assert status == 200, got
            h2_headers, h2_body = await h2_get(port, f"{path}?format={fmt}")
            assert h2_headers[b":status"] == b"200"
            if fmt == "veil":  # signatures are randomised (ECDSA's nonce, PSS's salt)
                assert (json.loads(h2_body) | {"signature": None}
                        == json.loads(got) | {"signature": None})
            else:
                assert h2_body == got
            assert headers[b"server"] == b"nginx/1.22.1"
            for h in (headers, h2_headers):
                assert h[b"subscription-userinfo"] == (
                    b"upload=0; download=0; total=1000000000; expire=2000000000")
            answers[fmt] = [(headers, got), (h2_headers, h2_body)]
        doc = json.loads(answers["veil"][0][1])
        assert doc["version"] == 1 and doc["key"] == key and doc["label"] == "alice"
        assert doc["usage"]["limit_bytes"] == 10**9 and doc["expires_at"] == 2_000_000_000
        clash = yaml.safe_load(answers["clash"][0][1])
        jsonschema.validate(clash, schema("clash-trojan.schema.json"))
        assert clash["proxies"][0]["client-fingerprint"] == "chrome"
        assert clash["proxies"][0]["password"] == password_for_secret(user.secret)
        jsonschema.validate(json.loads(answers["sing-box"][0][1]),
                            schema("sing-box-trojan.schema.json"))
        (link,) = base64.b64decode(answers["v2rayn"][0][1]).decode().split()
        assert TrojanLink.parse(link).password == password_for_secret(user.secret)
        # by User-Agent, as the apps ask
        for agent, marker in (("clash-verge/v1.7.7", b"proxies:"),
                              ("SFA/1.11.0 (sing-box 1.11.0)", b'"outbounds"'),
                              ("v2rayN/7.0", base64.b64encode(b"trojan://")[:8])):
            _, _, got = split(await h1_get(port, path, user_agent=agent))
            assert marker in got, (agent, got[:80])
        assert server.subscriptions is not None and server.subscriptions.served == 11

    asyncio.run(with_server(tmp_path, body))


def test_a_wrong_token_and_a_revoked_user_get_the_cover_404_byte_for_byte(
        tmp_path: Path) -> None:
    async def body(server: VeilServer) -> None:
        await add(server, "alice")
        port = server.address.port
        path = token_path(server, "alice")
        wrong = path[:-1] + ("A" if path[-1] != "A" else "B")
        # A path of the same shape nobody could answer: the site's ordinary 404.
        plain = "/s/" + "x" * 22

        async def both(target: str) -> tuple[bytes, tuple[dict[bytes, bytes], bytes]]:
            h1 = _DATE.sub(b"\r\nDate: -\r\n", await h1_get(port, target))
            headers, h2_body = await h2_get(port, target)
            headers.pop(b"date")
            return h1, (headers, h2_body)

        reference = await both(plain)
        assert reference[0].startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert await both(wrong) == reference
        assert await both(wrong + "?format=veil") == reference
        assert await both(path + "?format=nonsense") == reference
        assert split(await h1_get(port, path))[0] == 200
        server.users.revoke("alice")
        await server.live.tick()  # what the refresh task does every half second
        assert await both(path) == reference
        assert await both(path + "?format=veil") == reference

    asyncio.run(with_server(tmp_path, body))


def test_served_on_a_cdn_ways_secret_path_through_nginx_as_a_cdn(tmp_path: Path) -> None:
    pytest.importorskip("h11")
    if not Path(procs.NGINX).exists():
        pytest.skip("needs nginx 1.22")
    port = procs.unused_port()
    secret = wire.new_secret_path()
    with cdn_nginx(port, name="localhost") as cdn:
        async def body(server: VeilServer) -> None:
            user = await add(server, "alice")
            urls = subscription_urls(server.state, user)
            assert len(urls) == 2 and "#pin=" in urls[0]
            token = urls[0].split("/s/")[1].partition("#")[0]
            pin = urls[0].partition("#")[2]
            assert urls[1] == f"https://localhost:{cdn.port}{secret}s/{token}#{pin}"
            # through the CDN: its certificate by the web PKI, the answer by the server's key
            sub, body = await fetch(SubscriptionUrl.parse(urls[1]), ca_file=str(cdn.ca_file))
            assert sub.key == AccessKey.parse(server.users.access_key(user))
            assert sub.urls == tuple(urls) and b'"signature"' in body
            # a CDN handing out an answer the pinned key did not sign is refused: here the
            # client pins another server's key, as if the CDN's answer were a stranger's
            other = init_state(tmp_path / "other", listen=Address("127.0.0.1", 1))[0]
            with pytest.raises(AuthError, match="another key"):
                await fetch(SubscriptionUrl.parse(urls[1]), ca_file=str(cdn.ca_file),
                            pin=other.pin)
            direct, _ = await fetch(SubscriptionUrl.parse(urls[0]))
            assert direct.key == sub.key
            # a wrong token through the CDN: the cover's 404, which the client reports
            wrong = urls[1].replace(token, token[:-2] + ("zz" if token[-2:] != "zz" else "yy"))
            with pytest.raises(TransportError, match="404"):
                await fetch(SubscriptionUrl.parse(wrong), ca_file=str(cdn.ca_file))

        asyncio.run(with_server(tmp_path, body, via=(f"https://localhost:{cdn.port}{secret}",),
                                port=port))


def test_a_client_following_the_url_connects_and_picks_up_a_new_way_in(tmp_path: Path) -> None:
    """The server restarts with a further --via: on its next refresh the client has the new
    key (a cached copy is written each time), and streams go through its tunnel."""
    port = procs.unused_port()
    extra = procs.unused_port()
    cache = tmp_path / "cache" / "sub.json"

    async def run() -> None:
        target = await echo_target()
        target_port = target.sockets[0].getsockname()[1]
        holder: dict[str, object] = {}

        async def first(server: VeilServer) -> None:
            user = await add(server, "alice")
            url = subscription_urls(server.state, user)[0]
            follower = Follower(SubscriptionOptions(url, cache, refresh_s=1.0))
            sub = await follower.start()
            assert sub.key.via == () and cache.exists()
            assert oct(cache.stat().st_mode & 0o777) == "0o600"
            tunnel = FollowingTunnel(follower, lambda key: ClientTunnel(key))
            socks = Socks5Inbound(tunnel, Address("127.0.0.1", 0))
            await socks.start()
            tunnel.start()
            holder.update(tunnel=tunnel, socks=socks, follower=follower)
            assert await tunnel.wait_ready(TIMEOUT), tunnel.last_error
            assert await through_socks(socks.address, target_port, b"one") == b"one"

        async def second(server: VeilServer) -> None:
            tunnel = holder["tunnel"]
            assert isinstance(tunnel, FollowingTunnel)
            socks = holder["socks"]
            assert isinstance(socks, Socks5Inbound)
            async with asyncio.timeout(TIMEOUT):
                while tunnel.key_changes == 0:
                    await asyncio.sleep(0.1)
            assert tunnel.tunnel.key.via == (parse_endpoint(f"tls://127.0.0.1:{extra}"),)
            assert json.loads(cache.read_bytes())["key"] == tunnel.tunnel.key.to_uri()
            assert await tunnel.wait_ready(TIMEOUT), tunnel.last_error
            assert await through_socks(socks.address, target_port, b"two") == b"two"

        try:
            await with_server(tmp_path, first, port=port)
            state_dir = tmp_path / "state"
            await with_server(tmp_path, second, port=port, state_dir=state_dir,
                              via=(f"tls://127.0.0.1:{extra}",))
        finally:
            if "socks" in holder:
                await holder["socks"].close()  # type: ignore[attr-defined]
            if "tunnel" in holder:
                await holder["tunnel"].close()  # type: ignore[attr-defined]
            target.close()
            await target.wait_closed()

    asyncio.run(run())


def test_a_client_starts_from_the_cache_when_no_url_answers(tmp_path: Path) -> None:
    cache = tmp_path / "sub.json"

    async def body(server: VeilServer) -> str:
        user = await add(server, "alice")
        url = subscription_urls(server.state, user)[0]
        sub = await Follower(SubscriptionOptions(url, cache)).start()
        assert sub.key == AccessKey.parse(server.users.access_key(user))
        return url

    url = asyncio.run(with_server(tmp_path, body))

    async def offline() -> None:  # the server is gone: the cached copy is used
        sub = await Follower(SubscriptionOptions(url, cache), fetch_timeout=2.0).start()
        assert sub.key.secret == json_key_secret(cache)

    asyncio.run(offline())


def json_key_secret(cache: Path) -> bytes:
    return AccessKey.parse(json.loads(cache.read_bytes())["key"]).secret


def test_the_cli_prints_the_urls_and_connect_follows_one(tmp_path: Path) -> None:
    """``veil user show --subscription`` / ``--json``, then ``veil connect URL`` as a user
    runs it: connected through the key it fetched, with the answer cached."""
    # on a known port: the key a running server serves names the address it started with
    server = procs.start_veil_server_on_a_stated_port(tmp_path / "server")
    try:
        server.add_user("bob")
        show = subprocess.run([*procs.VEIL, "user", "show", "bob", "--subscription", "--state",
                               str(server.state)], capture_output=True, text=True, timeout=30,
                              check=True)
        (url,) = show.stdout.split()
        assert url.startswith(f"https://127.0.0.1:{server.port}/s/") and "#pin=" in url
        shown = json.loads(subprocess.run(
            [*procs.VEIL, "user", "show", "bob", "--json", "--state", str(server.state)],
            capture_output=True, text=True, timeout=30, check=True).stdout)
        assert shown["subscription_urls"] == [url]
        cache = tmp_path / "bob.json"
        client = procs.start_veil_client(tmp_path, url,
                                         extra=("--subscription-cache", str(cache)))
        try:
            doc = json.loads(cache.read_bytes())
            assert doc["key"] == shown["key"] and doc["version"] == 1
            assert "connected to" in client.log_text()
        finally:
            procs.stop(client.proc)
    finally:
        procs.stop(server.proc)
