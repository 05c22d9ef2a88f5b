"""A real VeilServer and its admin panel, in-process on loopback, and a small HTTP client.

The server runs on an event loop in a background thread (as in ``veil serve``, the panel
shares the tunnel's loop), so tests stay synchronous: plain sockets, subprocess clients and
Playwright's sync API all work from the test's thread.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import procs
from veil.admin.app import AdminServer, start_admin
from veil.admin.auth import PASSWORD_SETTING, TOKEN_SETTING, hash_password, new_api_token
from veil.admin.listen import AdminListen
from veil.config import ServerOptions
from veil.manage.state import ServerState, init_state
from veil.protocol.address import Address
from veil.server.service import VeilServer

T = TypeVar("T")
PASSWORD = "correct horse battery staple"
FIRST_USER = "alice"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Harness:
    """A VeilServer with an admin panel, on a loop in a thread of its own."""

    def __init__(self, directory: Path, *, trojan: bool = False) -> None:
        self.directory = directory
        self.trojan = trojan
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        # Named up front: the state records it as the address keys carry. Taken meanwhile,
        # VeilServer.start raises at once (see procs.unused_port).
        port = procs.unused_port()
        self.state: ServerState = init_state(directory / "state",
                                             listen=Address("127.0.0.1", port))[0]
        self.token, digest = new_api_token()
        store = self.state.open_store()
        try:
            store.set_setting(PASSWORD_SETTING, hash_password(PASSWORD))
            store.set_setting(TOKEN_SETTING, digest)
        finally:
            store.close()
        self.server: VeilServer = self.run(self._start_server(port))
        self.admin: AdminServer = self.run(start_admin(self.server,
                                                       AdminListen("127.0.0.1", 0)))
        self.first_key = self.run(self._add(FIRST_USER))
        self._extra: list[AdminServer] = []

    async def _start_server(self, port: int) -> VeilServer:
        # Built on the loop's thread: the server's store belongs to the thread that opened it.
        server = VeilServer(self.state, ServerOptions(listen=Address("127.0.0.1", port),
                                                      allow_private=True, trojan=self.trojan))
        await server.start()
        return server

    async def _add(self, name: str) -> str:
        users = self.server.users
        return users.access_key(users.add(name))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def another_admin(self, *, tls: ssl.SSLContext | None = None) -> AdminServer:
        """One more panel for the same server (its own sessions and rate limiter)."""
        admin = self.run(start_admin(self.server, AdminListen("127.0.0.1", 0), tls=tls))
        self._extra.append(admin)
        return admin

    def client(self, admin: AdminServer | None = None) -> Client:
        admin = admin or self.admin
        return Client(admin.address[1], tls=admin.tls)

    def close(self) -> None:
        try:
            for admin in [*self._extra, self.admin]:
                self.run(admin.stop())
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get_content_type() == "application/json", self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []


class Client:
    """HTTP/1.1 to the panel, with a cookie jar and no redirect following."""

    def __init__(self, port: int, *, tls: bool = False, source: str = "127.0.0.1") -> None:
        self.port = port
        self.tls = tls
        self.source = (source, 0)  # another loopback address is another client address
        self.cookies: dict[str, str] = {}

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, *, form: dict[str, str] | None = None,
                json_body: Any = None, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=30, context=context,
                source_address=self.source)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                              source_address=self.source)
        all_headers = dict(headers or {})
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.headers, response.read())
        finally:
            conn.close()
        for raw in reply.set_cookies():
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0].strip('"')
            if value and "Max-Age=0" not in raw and "expires=Thu, 01 Jan 1970" not in raw:
                self.cookies[name.strip()] = value
            else:
                self.cookies.pop(name.strip(), None)
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def login_form(self) -> str:
        page = self.get("/login")
        assert page.status == 200, page.text
        match = _CSRF.search(page.text)
        assert match is not None
        return match.group(1)

    def login(self, password: str = PASSWORD) -> Reply:
        csrf = self.login_form()
        return self.request("POST", "/login", form={"csrf_token": csrf, "password": password})

    def csrf(self) -> str:
        """The session's CSRF token, as a page's forms carry it."""
        page = self.get("/users")
        assert page.status == 200, page.text
        match = _CSRF.search(page.text)
        assert match is not None
        return match.group(1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def plain_http_probe(port: int) -> bytes:
    """What a prober sending plain HTTP to the tunnel port gets back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("admin"))
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def trojan_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A harness whose server takes Trojan (``--trojan``): every export is on a user's page."""
    h = Harness(tmp_path_factory.mktemp("admin-trojan"), trojan=True)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def logged_in(harness: Harness) -> Client:
    client = harness.client()
    reply = client.login()
    assert reply.status == 303, reply.text
    return client
