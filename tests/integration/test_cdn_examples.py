"""The proxy examples of docs/operations.md ("Behind a CDN"), run as written: each block marked
``<!-- cdn-example: NAME -->`` is taken from the document, its placeholders filled in (the
proxy's name, veil's address, the secret path), and the real program (nginx 1.22, Caddy 2.6)
serves it in front of a real veil server; a client whose direct way is refused moves to the
proxy and its streams arrive byte-exact, over both CDN schemes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cdn_way_in import tunnel_through
from tests.support import procs
from tests.support.cdn import make_ca_and_leaf
from tests.support.socks_echo import echo_target, through_socks
from veil.config import ServerOptions
from veil.manage.state import init_state
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.server.service import VeilServer
from veil.transport.cdn import wire

OPERATIONS = Path(__file__).parents[2] / "docs" / "operations.md"
CADDY = shutil.which("caddy")
TIMEOUT = 30.0
# The examples' placeholders.
PROXY_NAME = "cdn.example.org"
VEIL_ADDRESS = "203.0.113.7:443"
SECRET = "/SECRET/"


def example(name: str) -> str:
    """The fenced block after ``<!-- cdn-example: NAME -->`` in docs/operations.md."""
    match = re.search(rf"<!-- cdn-example: {name} -->\n```\w*\n(.*?)```", OPERATIONS.read_text(),
                      re.DOTALL)
    assert match is not None, f"docs/operations.md has no cdn-example {name}"
    return match.group(1)


def filled(text: str, origin_port: int, secret: str, name: str) -> str:
    return (text.replace(PROXY_NAME, name).replace(VEIL_ADDRESS, f"127.0.0.1:{origin_port}")
            .replace(SECRET, secret))


NGINX_WRAPPER = procs.NGINX_MAIN + """http {{
    access_log off;
""" + procs.NGINX_TEMP_PATHS + """{http_part}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name localhost;
        ssl_certificate {prefix}/cdn-cert.pem;
        ssl_certificate_key {prefix}/cdn-key.pem;
{server_part}
    }}
}}
"""

CADDY_GLOBAL = """{{
    admin off
    auto_https disable_redirects
    storage file_system {prefix}/storage
}}
"""


@contextlib.contextmanager
def proxy(kind: str, origin_port: int, secret: str) -> Iterator[tuple[int, Path]]:
    """The example ``kind`` running on a loopback port; yields (port, its CA file)."""
    prefix = Path(tempfile.mkdtemp(prefix=f"veil-{kind}-example-"))
    try:
        ca_file = make_ca_and_leaf(prefix, "localhost")
        port = procs.unused_port()
        if kind == "nginx":
            text = filled(example("nginx"), origin_port, secret, "localhost")
            http_part, _, server_part = text.partition("# in the server {")
            server_part = server_part.partition("\n")[2]  # the comment's own line
            (prefix / "nginx.conf").write_text(NGINX_WRAPPER.format(
                prefix=prefix, port=port, http_part=http_part, server_part=server_part))
            argv = [procs.NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
            env = None
        else:
            text = filled(example("caddy"), origin_port, secret, f"localhost:{port}")
            site, brace, rest = text.partition("{")
            # The test's certificate instead of one from an ACME CA (the example's proxy gets
            # its own from Let's Encrypt by itself).
            text = (f"{site}{brace}\n    tls {prefix}/cdn-cert.pem {prefix}/cdn-key.pem"
                    f"{rest}")
            (prefix / "Caddyfile").write_text(CADDY_GLOBAL.format(prefix=prefix) + text)
            assert CADDY is not None
            argv = [CADDY, "run", "--config", str(prefix / "Caddyfile"), "--adapter",
                    "caddyfile"]
            env = {**os.environ, "HOME": str(prefix), "XDG_DATA_HOME": str(prefix),
                   "XDG_CONFIG_HOME": str(prefix)}
        log = (prefix / "proxy.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        try:
            procs.wait_port(port, proc=proc)
            yield port, ca_file
        finally:
            procs.stop(proc)
            log.close()
            for name in ("proxy.log", "error.log"):  # shown by pytest when the test fails
                if (prefix / name).exists():
                    print(f"--- {kind} {name}:\n{(prefix / name).read_text()[-4000:]}")
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.parametrize("kind", [
    "nginx",
    pytest.param("caddy", marks=pytest.mark.skipif(
        CADDY is None, reason="needs Debian's caddy (scripts/install-deps installs it)")),
])
def test_the_documented_proxy_carries_the_cdn_ways_in(kind: str, tmp_path: Path) -> None:
    if not Path(procs.NGINX).exists():
        pytest.skip("needs nginx 1.22")
    origin_port = procs.unused_port()
    secret = wire.new_secret_path()
    with proxy(kind, origin_port, secret) as (port, ca_file):
        async def main() -> None:
            ways = tuple(parse_endpoint(f"{scheme}://localhost:{port}{secret}")
                         for scheme in ("https", "wss"))
            listen = Address("127.0.0.1", origin_port)
            state = init_state(tmp_path / "state", listen=listen)[0]
            server = VeilServer(state, ServerOptions(listen=listen, allow_private=True, via=ways))
            await server.start()
            target = await echo_target()
            try:
                key = AccessKey.parse(server.users.access_key(server.users.add("alice")))
                target_port = target.sockets[0].getsockname()[1]
                for way in ways:  # each scheme alone after the refused direct way
                    one_way = AccessKey(key.server, key.secret, key.pin, key.sni, key.label,
                                        (way,), key.noise_key)

                    async def use(socks: Address) -> None:
                        payloads = [os.urandom(100_000) for _ in range(8)]
                        answers = await asyncio.wait_for(asyncio.gather(
                            *(through_socks(socks, target_port, p) for p in payloads)), TIMEOUT)
                        assert answers == payloads
                    await tunnel_through(one_way, use)
            finally:
                target.close()
                await server.stop()

        os.environ["SSL_CERT_FILE"] = str(ca_file)
        try:
            asyncio.run(main())
        finally:
            del os.environ["SSL_CERT_FILE"]
