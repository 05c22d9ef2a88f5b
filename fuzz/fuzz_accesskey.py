"""Access keys: ``AccessKey.parse`` on any text (keys are pasted, scanned from QR codes and
passed on command lines).

Input: UTF-8 text (undecodable bytes are replaced).

Invariants: ``parse`` returns a key or raises ``ConfigError``, nothing else; a parsed key has
a 32-byte secret and pin and a port in range, and survives ``to_uri`` and back unchanged.
"""

from __future__ import annotations

import sys

import harness

from veil.errors import ConfigError
from veil.protocol.accesskey import PIN_SIZE, AccessKey
from veil.protocol.address import Address
from veil.protocol.auth import SECRET_SIZE

MODULES = ("veil.protocol.accesskey", "veil.protocol.uri", "veil.protocol.address")


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        key = AccessKey.parse(text)
    except ConfigError:
        return
    assert len(key.secret) == SECRET_SIZE and len(key.pin) == PIN_SIZE
    assert 0 <= key.server.port <= 0xFFFF
    assert AccessKey.parse(key.to_uri()) == key, "a key changed through to_uri"


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    secret, pin = bytes(range(32)), bytes(range(32, 64))
    keys = {
        "domain": AccessKey(Address("vpn.example.org", 443), secret, pin, "vpn.example.org",
                            "alice"),
        "ipv4": AccessKey(Address("192.0.2.10", 8443), secret, pin),
        "ipv6": AccessKey(Address("2001:db8::10", 443), secret, pin, None, "bob's phone"),
        "sni-and-label": AccessKey(Address("198.51.100.1", 443), secret, pin, "cdn.example",
                                   "été 2026 / #1"),
    }
    out = {name: key.to_uri().encode() for name, key in keys.items()}
    good = keys["domain"].to_uri()
    out.update({
        "truncated-secret": good.replace(good[7:20], "").encode(),
        "no-port": good.replace(":443", "").encode(),
        "bad-port": good.replace(":443", ":70000").encode(),
        "no-pin": good.split("?")[0].encode(),
        "bad-ipv6": b"veil://AAAA@[2001:db8::1:443?pin=AAAA",
        "other-scheme": good.replace("veil://", "vless://").encode(),
        "whitespace": b"  \n" + good.encode() + b"\t ",
        "unicode-host": b"veil://AAAA@\xef\xbd\x85xample.com:443?pin=AAAA",
        "pin-twice": (good + "&pin=AAAA").encode(),
        "empty": b"",
    })
    return out


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
