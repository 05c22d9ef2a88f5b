"""The borrowed identity's key fields, options and state, and the gate's recognition of a
sealed hello: accepted once, fresh and for an active user only (server/borrow.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from veil.config import ServerOptions
from veil.errors import ConfigError
from veil.manage.state import init_state
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.auth import Credential, new_secret
from veil.protocol.borrow import HelloSeal
from veil.server.borrow import Borrowed
from veil.server.gate import Authenticator
from veil.store.base import User
from veil.transport.tls13 import TlsClient

NOW = 1_800_000_000.0


def test_a_borrowed_key_round_trips_and_needs_its_server_key() -> None:
    key = AccessKey(Address("203.0.113.7", 443), os.urandom(32), os.urandom(32),
                    "www.example.com", "alice", noise_key=os.urandom(32), borrowed=True)
    uri = key.to_uri()
    assert "borrowed=1" in uri and "sni=www.example.com" in uri
    assert AccessKey.parse(uri) == key
    plain = AccessKey(Address("203.0.113.7", 443), os.urandom(32), os.urandom(32))
    assert "borrowed" not in plain.to_uri() and not AccessKey.parse(plain.to_uri()).borrowed
    with pytest.raises(ConfigError, match="borrowed=1 needs nk= and sni="):
        AccessKey.parse(plain.to_uri() + "&borrowed=1")


@pytest.mark.parametrize("conflict", [{"cover_url": "https://127.0.0.1:8443"},
                                      {"trojan": True}])
def test_borrow_takes_no_cover_of_its_own(conflict: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="--borrow"):
        ServerOptions(listen=Address("127.0.0.1", 8443), borrow=Address("example.com", 443),
                      **conflict)  # type: ignore[arg-type]


def test_the_state_keeps_the_borrowed_site_for_the_keys(tmp_path: Path) -> None:
    listen = Address("127.0.0.1", 8443)
    state, _ = init_state(tmp_path, listen=listen, borrow=Address("www.example.com", 443))
    user = User("alice", new_secret(), b"k" * 8, NOW)
    key = state.access_key(user)
    assert key.borrowed and key.sni == "www.example.com"
    assert key.noise_key == state.noise_public
    kept, _ = init_state(tmp_path, listen=listen)  # a start that does not say keeps it
    assert kept.borrow == Address("www.example.com", 443)
    dropped, _ = init_state(tmp_path, listen=listen, borrow=None)
    assert dropped.borrow is None and not dropped.access_key(user).borrowed


class Users:
    def __init__(self, user: User) -> None:
        self.user = user
        self.revoked = False

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return self.user if key_id == self.user.key_id else None

    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        return None

    def refusal(self, user: User, device: str | None = None) -> str | None:
        return "revoked" if self.revoked else None


def sealed_hello(credential: Credential, server_key: bytes, at: float) -> bytes:
    client = TlsClient("www.example.com", sealer=HelloSeal(credential, server_key, lambda: at))
    client.connect()
    return client.data_to_send()


def test_a_sealed_hello_is_recognised_once_fresh_and_for_an_active_user() -> None:
    secret = new_secret()
    credential = Credential.from_secret(secret)
    users = Users(User("alice", secret, credential.key_id, NOW))
    static = x25519.X25519PrivateKey.generate()
    public = static.public_key().public_bytes_raw()
    clock = [NOW]
    borrow = Borrowed(Address("127.0.0.1", 443), "www.example.com", static, lambda: clock[0])
    authenticator = Authenticator(users, lambda: clock[0])

    hello = sealed_hello(credential, public, NOW)
    recognised = borrow.recognise(hello, authenticator)
    assert recognised is not None and recognised.user.name == "alice"
    assert borrow.recognise(hello, authenticator) is None  # the replay: relayed

    # Another server key, a plain Chrome hello, a hello from 3 minutes ago, a revoked user.
    other = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert borrow.recognise(sealed_hello(credential, other, NOW), authenticator) is None
    plain = TlsClient("www.example.com")
    plain.connect()
    assert borrow.recognise(plain.data_to_send(), authenticator) is None
    assert borrow.recognise(sealed_hello(credential, public, NOW - 180), authenticator) is None
    users.revoked = True
    assert borrow.recognise(sealed_hello(credential, public, NOW), authenticator) is None
    users.revoked = False
    assert borrow.recognise(sealed_hello(credential, public, NOW), authenticator) is not None
    assert borrow.recognise(hello[:-1], authenticator) is None  # cut short: not a hello
