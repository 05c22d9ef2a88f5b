"""Subscriptions without a network: the cover's Responder hook (exact bytes on HTTP/1.1, and
the args it is given on both protocols), tokens, paths, formats and URLs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from veil.cover.http1 import CoverConnection
from veil.cover.http2 import H2CoverConnection
from veil.cover.site import DEFAULT_MTIME, Answer, CoverSite, Request, SiteFile
from veil.manage.export import ServerCertificate
from veil.manage.state import init_state, load_state, record_start
from veil.manage.subscription import (
    TOKEN_CHARS,
    choose_format,
    path_prefixes,
    render,
    subscription_urls,
    token_of_path,
    user_token,
    userinfo,
)
from veil.protocol.address import Address
from veil.protocol.auth import Credential
from veil.protocol.endpoint import parse_endpoint
from veil.store.base import Usage, User

DATE = re.compile(rb"Date: [^\r]*\r\n")
SECRET = bytes(range(32))


class Recorder:
    """Answers ``/hello`` and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[Request] = []

    def answer(self, req: Request) -> Answer | None:
        self.asked.append(req)
        if req.uri != b"/hello":
            return None
        return Answer(b"hi\n", b"text/plain", ((b"X-Extra", b"1"),))


def site_with(responder: Recorder | None) -> CoverSite:
    site = CoverSite({"index.html": SiteFile(b"<html>hi</html>\n", b"text/html", DEFAULT_MTIME)})
    site.responder = responder
    return site


def exchange(site: CoverSite, data: bytes) -> bytes:
    c = CoverConnection(site, now=100.0)
    c.receive_data(data, 100.0)
    return DATE.sub(b"Date: -\r\n", c.data_to_send())


def test_the_site_asks_the_responder_first_and_frames_its_answer_as_nginx() -> None:
    recorder = Recorder()
    site = site_with(recorder)
    got = exchange(site, b"GET /hello?format=x&y=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: u\r\n\r\n")
    assert got == (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: -\r\n"
                   b"Content-Type: text/plain\r\nContent-Length: 3\r\n"
                   b"Connection: keep-alive\r\nX-Extra: 1\r\n\r\nhi\n")
    assert recorder.asked[0].args == b"format=x&y=1"
    assert recorder.asked[0].headers[b"user-agent"] == b"u"
    head = exchange(site, b"HEAD /hello HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.endswith(b"X-Extra: 1\r\n\r\n")


@pytest.mark.parametrize("request_bytes", [
    b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /hello HTTP/1.1\r\n\r\n",  # no Host: nginx's 400 comes first
    b"GET /hello\r\n",  # HTTP/0.9
])
def test_what_the_responder_leaves_is_served_as_without_it(request_bytes: bytes) -> None:
    assert exchange(site_with(Recorder()), request_bytes) == exchange(site_with(None),
                                                                       request_bytes)


def test_args_reach_the_responder_over_h2() -> None:
    recorder = Recorder()
    server = H2CoverConnection(site_with(recorder), now=0.0)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "a"),
                            (":path", "/hello?format=clash")], end_stream=True)
    server.receive_data(client.data_to_send(), 0.0)
    events = client.receive_data(b"".join(server.writes()))
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == b"hi\n" and recorder.asked[0].args == b"format=clash"


@pytest.fixture
def state(tmp_path: Path):  # type: ignore[no-untyped-def]
    state, _ = init_state(tmp_path / "state", listen=Address("127.0.0.1", 8443),
                          public="vpn.example.org:8443")
    record_start(state.directory, trojan=True, via=(
        parse_endpoint("tls://203.0.113.7:443"),
        parse_endpoint("https://cdn.example.net/abcdefghijklmnopqrstuv/"),
        parse_endpoint("wss://cdn.example.net/abcdefghijklmnopqrstuv/")))
    return load_state(state.directory)


def alice(secret: bytes = SECRET) -> User:
    return User("alice", secret, Credential.from_secret(secret).key_id, 1.0)


def test_tokens_hide_the_secret_and_change_with_it(state) -> None:  # type: ignore[no-untyped-def]
    key = state.subscription_key()
    token = user_token(key, alice())
    assert len(token) == TOKEN_CHARS and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert token == user_token(state.subscription_key(), alice())  # stable: nothing stored
    assert token != user_token(key, alice(bytes(32)))  # rotated: another token
    assert base64.urlsafe_b64encode(SECRET).decode()[:8] not in token


def test_paths_urls_and_formats(state) -> None:  # type: ignore[no-untyped-def]
    prefixes = tuple(p.encode() for p in path_prefixes(state))
    assert prefixes == (b"/", b"/abcdefghijklmnopqrstuv/")
    token = b"A" * TOKEN_CHARS
    assert token_of_path(b"/s/" + token, prefixes) == token
    assert token_of_path(b"/abcdefghijklmnopqrstuv/s/" + token, prefixes) == token
    for wrong in (b"/s/" + token[:-1], b"/s/" + token + b"A", b"/x/s/" + token,
                  b"/s/" + token[:-1] + b"!", b"/s" + token):
        assert token_of_path(wrong, prefixes) is None
    urls = subscription_urls(state, alice())
    t = user_token(state.subscription_key(), alice())
    pin = base64.urlsafe_b64encode(state.pin).rstrip(b"=").decode()
    assert urls == [f"https://vpn.example.org:8443/s/{t}#pin={pin}",
                    f"https://203.0.113.7:443/s/{t}#pin={pin}&sni=vpn.example.org",
                    f"https://cdn.example.net/abcdefghijklmnopqrstuv/s/{t}#pin={pin}"]
    assert choose_format(b"format=clash", b"v2rayN/7", trojan=True) == "clash"
    assert choose_format(b"format=nope", None, trojan=True) is None
    assert choose_format(b"", b"clash.meta/1.18", trojan=True) == "clash"
    assert choose_format(b"", b"SFI/1.11", trojan=True) == "sing-box"
    assert choose_format(b"", b"Mozilla/5.0", trojan=True) == "v2rayn"
    assert choose_format(b"", b"Mozilla/5.0", trojan=False) == "veil"


def test_app_formats_need_trojan_and_userinfo_says_zero_for_none(  # type: ignore[no-untyped-def]
        state, tmp_path: Path) -> None:
    user = alice()
    assert userinfo(Usage(5, 7), user) == b"upload=5; download=7; total=0; expire=0"
    cert = ServerCertificate.load(state)
    assert render(state, user, Usage(), "clash", cert) is not None
    no_trojan, _ = init_state(tmp_path / "other", listen=Address("127.0.0.1", 8443))
    assert render(no_trojan, user, Usage(), "clash", cert) is None
    assert render(no_trojan, user, Usage(), "veil", cert) is not None


def test_the_veil_answer_is_signed_by_the_pinned_key_and_tampering_is_refused(  # type: ignore[no-untyped-def]
        state, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from veil.client.subscription import Subscription
    from veil.errors import AuthError

    signer = serialization.load_pem_private_key(state.key_path.read_bytes(), None)
    rendered = render(state, alice(), Usage(), "veil", None, signer)  # type: ignore[arg-type]
    assert rendered is not None
    assert Subscription.parse(rendered.body, signed_by=state.pin).key.secret == SECRET
    doc = json.loads(rendered.body)
    doc["key"] = doc["key"].replace("vpn.example.org", "evil.example.org")
    with pytest.raises(AuthError, match="does not verify"):
        Subscription.parse(json.dumps(doc).encode(), signed_by=state.pin)
    doc.pop("signature")
    with pytest.raises(AuthError, match="not signed"):
        Subscription.parse(json.dumps(doc).encode(), signed_by=state.pin)
    other, _ = init_state(tmp_path / "other", listen=Address("127.0.0.1", 8443))
    with pytest.raises(AuthError, match="another key"):
        Subscription.parse(rendered.body, signed_by=other.pin)
    # fields a newer server adds are ignored; the signature still holds
    newer = json.loads(rendered.body) | {"version": 2, "routing": {"rules": []}}
    assert Subscription.parse(json.dumps(newer).encode(), signed_by=state.pin).version == 2


def test_the_rule_data_list_is_trusted_as_the_key_is(  # type: ignore[no-untyped-def]
        state, tmp_path: Path) -> None:
    """The answer's ``rules`` (each file's SHA-256, which the client checks the files
    against) is taken from a server that presented the pinned key, or signed by that key
    (``signature.rules``, for a CDN); never by the web PKI alone."""
    from cryptography.hazmat.primitives import serialization

    from veil.client.subscription import rule_data_manifest
    from veil.errors import AuthError, TransportError
    from veil.manage.rules import client_manifest

    signer = serialization.load_pem_private_key(state.key_path.read_bytes(), None)
    rendered = render(state, alice(), Usage(), "veil", None, signer)  # type: ignore[arg-type]
    assert rendered is not None
    doc = json.loads(rendered.body)
    expected = client_manifest()["cn"]
    assert rule_data_manifest(doc, pinned=False, pin=state.pin) == expected
    assert rule_data_manifest(doc, pinned=True, pin=state.pin) == expected
    with pytest.raises(AuthError, match="web PKI alone"):
        rule_data_manifest(doc, pinned=False, pin=None)
    other, _ = init_state(tmp_path / "other", listen=Address("127.0.0.1", 8443))
    with pytest.raises(AuthError, match="another key"):
        rule_data_manifest(doc, pinned=False, pin=other.pin)
    # a CDN swapping the list (another file, newer dates) breaks the signature...
    tampered = json.loads(rendered.body)
    tampered["rules"]["cn"]["data"]["domains"]["data_date"] = "2099-12-31"
    with pytest.raises(AuthError, match="does not verify"):
        rule_data_manifest(tampered, pinned=False, pin=state.pin)
    # ... and so does lifting the key's signature onto it: the two cover different texts
    tampered["signature"]["rules"] = tampered["signature"]["value"]
    with pytest.raises(AuthError, match="does not verify"):
        rule_data_manifest(tampered, pinned=False, pin=state.pin)
    unsigned = json.loads(rendered.body)
    del unsigned["signature"]["rules"]  # an answer signed by an older server: key only
    with pytest.raises(AuthError, match="not signed"):
        rule_data_manifest(unsigned, pinned=False, pin=state.pin)
    assert rule_data_manifest({"key": doc["key"]}, pinned=True, pin=None) is None
    broken = json.loads(rendered.body)
    broken["rules"]["cn"]["files"].popitem()
    with pytest.raises(TransportError, match="malformed"):
        rule_data_manifest(broken, pinned=True, pin=state.pin)
