"""Builds ClientHellos from a :class:`~veil.transport.tls13.profile.ClientHelloSpec`."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from veil.transport.tls13.keys import KeyShare, new_key_share
from veil.transport.tls13.profile import (
    GREASE,
    GREASE_EMPTY,
    GREASE_ONE_BYTE,
    PADDING,
    ClientHelloSpec,
)
from veil.transport.tls13.wire import (
    TLS12,
    ExtensionType,
    HandshakeType,
    extension,
    handshake,
    p8,
    p16,
    u16,
)

_E = ExtensionType
# GREASE seeds, one per place a GREASE value goes (as BoringSSL keeps them per connection).
_CIPHER, _GROUP, _EXT1, _EXT2, _VERSION, _SIGALG = range(6)


def sni_for(host: str | None) -> str | None:
    """The server_name a browser sends for ``host``: none for IP literals (RFC 6066 §3)."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.rstrip(".").lower()
    return None


@dataclass
class HelloContext:
    """What the client keeps of its first ClientHello to answer a HelloRetryRequest."""

    spec: ClientHelloSpec
    server_name: str | None
    client_random: bytes
    session_id: bytes
    grease: list[int]
    order: list[int]  # extension slots in wire order
    rng: random.Random
    key_shares: dict[int, KeyShare] = field(default_factory=dict)
    ech_body: bytes = b""
    offered_extensions: set[int] = field(default_factory=set)

    def grease_value(self, slot: int) -> int:
        return self.grease[slot]


class HelloSealer(Protocol):
    """Marks a ClientHello for a server that recognises its clients from it (a borrowed
    identity: docs/protocol.md), in the legacy_session_id a browser fills with random bytes."""

    def seal(self, client_random: bytes, x25519_public: bytes,
             exchange: Callable[[bytes], bytes]) -> tuple[bytes, bytes]:
        """(legacy_session_id, PSK input of the key schedule) for a hello with this random
        and this X25519 key share; ``exchange(peer_public)`` is the share's X25519."""


def _grease_values(rng: random.Random) -> list[int]:
    seeds = rng.randbytes(6)
    values = [((b & 0xF0) | 0x0A) * 0x0101 for b in seeds]
    if values[_EXT2] == values[_EXT1]:
        values[_EXT2] ^= 0x1010  # two GREASE extensions of one type would be a duplicate
    return values


def _u16s(values: tuple[int, ...], grease: int) -> bytes:
    return b"".join(u16(grease if v == GREASE else v) for v in values)


def new_hello(spec: ClientHelloSpec, host: str | None,
              rng: random.Random | None = None,
              seal: Callable[[HelloContext], bytes] | None = None,
              ) -> tuple[HelloContext, bytes]:
    """The first ClientHello (a handshake message) and the context to finish the handshake.

    ``seal``, given the context with its random and key shares, returns the legacy_session_id
    (instead of random bytes of the same length): a borrowed identity's mark (``client.py``).
    """
    rng = rng or random.SystemRandom()
    order = list(spec.shuffled)
    if spec.shuffle:
        rng.shuffle(order)
    ctx = HelloContext(spec=spec, server_name=sni_for(host),
                       client_random=rng.randbytes(32),
                       session_id=rng.randbytes(spec.session_id_len),
                       grease=_grease_values(rng), order=[*spec.first, *order, *spec.last],
                       rng=rng)
    for group in spec.key_share_groups:
        if group != GREASE:
            ctx.key_shares[group] = new_key_share(group)
    if seal is not None:
        ctx.session_id = seal(ctx)
        if len(ctx.session_id) != spec.session_id_len:
            raise ValueError("a sealed session id must have the profile's length")
    if spec.ech_grease is not None:
        ech = spec.ech_grease
        ctx.ech_body = (b"\x00" + u16(ech.kdf_id) + u16(ech.aead_id) + rng.randbytes(1)
                        + p16(rng.randbytes(ech.enc_len))
                        + p16(rng.randbytes(rng.choice(ech.payload_lens))))
    return ctx, _build(ctx, cookie=None, retry=False)


def retry_hello(ctx: HelloContext, group: int | None, cookie: bytes | None) -> bytes:
    """The second ClientHello after a HelloRetryRequest (RFC 8446 §4.1.2): the same hello
    with one key share, for ``group`` (the same shares if None), and the server's cookie."""
    if group is not None:
        ctx.key_shares = {group: new_key_share(group)}
    return _build(ctx, cookie=cookie, retry=True)


def _build(ctx: HelloContext, *, cookie: bytes | None, retry: bool) -> bytes:
    spec = ctx.spec
    head = (u16(TLS12) + ctx.client_random + p8(ctx.session_id)
            + p16(_u16s(spec.cipher_suites, ctx.grease_value(_CIPHER))) + p8(b"\x00"))
    parts: list[bytes] = []
    offered: set[int] = set()
    padding_at = -1
    for slot in ctx.order:
        if slot == PADDING:
            padding_at = len(parts)
            continue
        body = _extension_body(ctx, slot, cookie, retry)
        if body is None:
            continue
        ext_type, data = body
        offered.add(ext_type)
        parts.append(extension(ext_type, data))
    if padding_at >= 0 and not retry:
        # BoringSSL pads hellos of 256..511 bytes to 512 (RFC 7685; F5 terminators hang on
        # those lengths), with at least one byte of padding.
        length = 4 + len(head) + 2 + sum(map(len, parts))
        low, high = spec.padding_window
        if low <= length < high:
            pad = high - length
            pad = pad - 4 if pad >= 5 else 1
            parts.insert(padding_at, extension(_E.PADDING, bytes(pad)))
            offered.add(_E.PADDING)
    ctx.offered_extensions = offered
    return handshake(HandshakeType.CLIENT_HELLO, head + p16(b"".join(parts)))


def _extension_body(ctx: HelloContext, slot: int, cookie: bytes | None,
                    retry: bool) -> tuple[int, bytes] | None:
    spec = ctx.spec
    if slot == GREASE_EMPTY:
        return ctx.grease_value(_EXT1), b""
    if slot == GREASE_ONE_BYTE:
        return ctx.grease_value(_EXT2), b"\x00"
    fixed = dict(spec.fixed)
    if slot in fixed:
        return slot, fixed[slot]
    group_grease = ctx.grease_value(_GROUP)
    if slot == _E.SERVER_NAME:
        if ctx.server_name is None:
            return None
        name = ctx.server_name.encode("idna")
        return slot, p16(b"\x00" + p16(name))
    if slot == _E.SUPPORTED_GROUPS:
        return slot, p16(_u16s(spec.supported_groups, group_grease))
    if slot == _E.EC_POINT_FORMATS:
        return slot, p8(spec.ec_point_formats)
    if slot == _E.ALPN:
        return slot, p16(b"".join(p8(p) for p in spec.alpn))
    if slot == _E.STATUS_REQUEST:
        return slot, spec.status_request
    if slot == _E.SIGNATURE_ALGORITHMS:
        return slot, p16(_u16s(spec.signature_algorithms, ctx.grease_value(_SIGALG)))
    if slot == _E.KEY_SHARE:
        shares = b""
        for group in spec.key_share_groups:
            # A second hello has only the share the server asked for (OpenSSL refuses any
            # other entry, GREASE included).
            if group == GREASE and not retry:
                shares += u16(group_grease) + p16(b"\x00")
        for group, share in ctx.key_shares.items():
            shares += u16(group) + p16(share.public)
        return slot, p16(shares)
    if slot == _E.PSK_KEY_EXCHANGE_MODES:
        return slot, p8(spec.psk_modes)
    if slot == _E.SUPPORTED_VERSIONS:
        return slot, p8(_u16s(spec.supported_versions, ctx.grease_value(_VERSION)))
    if slot == _E.COMPRESS_CERTIFICATE:
        return slot, p8(_u16s(spec.cert_compression, 0))
    if slot in (_E.APPLICATION_SETTINGS, _E.APPLICATION_SETTINGS_OLD):
        return slot, p16(b"".join(p8(p) for p in spec.alps_protocols))
    if slot == _E.ENCRYPTED_CLIENT_HELLO:
        return (slot, ctx.ech_body) if ctx.ech_body else None
    if slot == _E.COOKIE:
        return (slot, p16(cookie)) if cookie is not None else None
    raise ValueError(f"the profile names extension {slot}, which veil cannot build")
