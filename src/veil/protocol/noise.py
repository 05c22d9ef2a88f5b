"""Noise_NK_25519_ChaChaPoly_SHA256, and the framing that carries it over a stream (sans-IO).

Why this exists: on the CDN path a reverse proxy terminates TLS with its own certificate and
sees everything inside, so the tunnel needs its own end-to-end encryption, with the server
authenticated by a key the client already holds (the access key), not by any certificate.
This module is that layer, following the Noise Protocol Framework, revision 34
(https://noiseprotocol.org/noise.html), with the pattern::

    NK:
      <- s
      ...
      -> e, es
      <- e, ee

The server's static X25519 public key is the pre-message ``s`` (it travels in the access key).
The initiator's first message is encrypted to it (``es``): only the holder of the private key
can read that payload (veil puts its authenticator there) or answer it, so a wrong key or an
impostor fails at the first message. ``ee`` then gives both sides forward-secret transport keys.
The client stays anonymous to Noise (veil authenticates users with its own authenticator).

What the caller still owns (this layer cannot): the first message can be replayed verbatim to
any responder, which will accept it (its answer uses fresh keys a replayer cannot read, but
the payload is seen twice), so the authenticator inside needs a replay filter
(protocol/auth.py has one); the first payload is encrypted with ``es`` only, so it is not
forward-secret against a later theft of the server's static key.

Built from ``cryptography``'s X25519 and ChaCha20-Poly1305 and from hashlib's SHA-256. Noise's
HKDF(ck, ikm) is RFC 5869 HKDF with ``salt = ck`` and empty ``info`` (same HMAC chain), so
``cryptography``'s HKDF computes it. Nothing here reads a clock or a socket: bytes in, bytes
out; :class:`FrameDecoder` and :class:`NoiseStreamWriter` carry the messages over a byte stream
(a WebSocket, an HTTP body) with the 2-byte big-endian length the spec suggests (section 13).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.errors import ProtocolError
from veil.protocol.uri import b64url_decode, b64url_encode

PROTOCOL_NAME = b"Noise_NK_25519_ChaChaPoly_SHA256"
DH_SIZE = 32  # DHLEN: an X25519 public key, private key and shared secret
HASH_SIZE = 32  # HASHLEN of SHA-256
TAG_SIZE = 16  # ChaCha20-Poly1305's tag
# The spec's limit on every Noise message (section 3): it keeps a 2-byte length prefix enough.
MAX_MESSAGE_SIZE = 65535
# The largest plaintext one transport message carries: the limit less the tag.
MAX_PLAINTEXT_SIZE = MAX_MESSAGE_SIZE - TAG_SIZE
# The first message is e (32) | encrypted payload | tag; the second the same: the largest
# handshake payload either side can send.
MAX_HANDSHAKE_PAYLOAD = MAX_MESSAGE_SIZE - DH_SIZE - TAG_SIZE
# Nonce 2**64-1 is reserved (section 5.1): a CipherState refuses to use it, so a key is used
# for at most 2**64-1 messages. Long before that veil's sessions end; the check is for safety.
MAX_NONCE = 2**64 - 1
# Every Noise message in NK carries at least a tag, so a shorter frame is garbage: the decoder
# refuses it at its length prefix instead of passing it on.
MIN_MESSAGE_SIZE = TAG_SIZE
_LENGTH = struct.Struct("!H")
LENGTH_PREFIX_SIZE = _LENGTH.size
# What a FrameDecoder holds between two feeds: at most one incomplete frame, that is its
# prefix and a message of the spec's maximum size (64 KiB). Everything complete is handed
# out by the feed that completed it, so no peer can make the buffer grow past this.
MAX_BUFFERED = LENGTH_PREFIX_SIZE + MAX_MESSAGE_SIZE

_BytesLike = bytes | bytearray | memoryview
_NONCE_PAD = bytes(4)  # ChaCha20-Poly1305's 96-bit nonce: 32 zero bits, then n little-endian


class NoiseError(ProtocolError):
    """A Noise handshake or transport message failed; ``code`` says how.

    Codes: ``decrypt_failed`` (a tag did not verify: a forged, corrupted or reordered
    message, or a first message encrypted to another server key), ``bad_key`` (a public key
    of the wrong length or a low-order point), ``bad_size`` (a message truncated, or longer
    than the spec's 65535 bytes, or a plaintext that cannot fit), ``out_of_order`` (a method
    called in a state that does not allow it), ``nonce_exhausted`` (a key reached nonce
    2**64-1), ``failed_earlier`` (this handshake or transport already failed once and is
    finished).
    """

    code = "noise_error"


# ------------------------------------------------------------------ keys
@dataclass(frozen=True, slots=True)
class StaticKeypair:
    """A server's long-term X25519 key pair, as raw 32-byte strings."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never print the private half into a log
        return f"StaticKeypair(public={encode_public_key(self.public)!r})"


def generate_static_keypair() -> StaticKeypair:
    """A fresh server key pair; store ``private`` like a TLS key, publish ``public``."""
    key = X25519PrivateKey.generate()
    return StaticKeypair(_private_bytes(key), _public_bytes(key.public_key()))


def public_key_from_private(private: bytes) -> bytes:
    """The raw public key of a raw 32-byte private key."""
    return _public_bytes(_load_private(private).public_key())


def encode_public_key(public: bytes) -> str:
    """The text form of a raw public key: unpadded base64url, 43 characters (as keys and pins
    are written in veil's URIs)."""
    check_public_key(public)
    return b64url_encode(public)


def decode_public_key(text: str) -> bytes:
    """The inverse of :func:`encode_public_key`; NoiseError (``bad_key``) for anything else."""
    try:
        raw = b64url_decode(text)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise NoiseError("server key is not base64url", code="bad_key") from exc
    if b64url_encode(raw) != text.rstrip("="):
        raise NoiseError("server key is not canonical base64url", code="bad_key")
    return check_public_key(raw)


def check_public_key(public: bytes) -> bytes:
    """``public`` if it is 32 bytes long (any 32 bytes decode as an X25519 key; a low-order
    one fails later, at the key exchange), else NoiseError (``bad_key``)."""
    if len(public) != DH_SIZE:
        raise NoiseError(f"an X25519 public key is {DH_SIZE} bytes, not {len(public)}",
                         code="bad_key")
    return bytes(public)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_private(private: bytes) -> X25519PrivateKey:
    if len(private) != DH_SIZE:
        raise NoiseError(f"an X25519 private key is {DH_SIZE} bytes, not {len(private)}",
                         code="bad_key")
    return X25519PrivateKey.from_private_bytes(private)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # OpenSSL refuses the all-zero result of a low-order point
        raise NoiseError("the peer's key is a low-order point", code="bad_key") from exc


# ------------------------------------------------------------------ CipherState (section 5.1)
class CipherState:
    """A key and its nonce counter: each message uses the next nonce, once."""

    __slots__ = ("_aead", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = None if key is None else ChaCha20Poly1305(key)
        self.nonce = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        """The spec's SetNonce; veil uses it only in tests of nonce exhaustion."""
        if not 0 <= nonce <= MAX_NONCE:
            raise ValueError(f"nonce {nonce} is outside 0..2**64-1")
        self.nonce = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: _BytesLike) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        nonce = self._next_nonce()
        self.nonce += 1
        return self._aead.encrypt(nonce, plaintext, ad)

    def decrypt_with_ad(self, ad: bytes, ciphertext: _BytesLike) -> bytes:
        """The plaintext; NoiseError if the tag fails, and then the nonce does not advance."""
        if self._aead is None:
            return bytes(ciphertext)
        nonce = self._next_nonce()
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag as exc:
            raise NoiseError("a Noise message did not decrypt (forged, corrupted, reordered or "
                             "for another key)", code="decrypt_failed") from exc
        self.nonce += 1
        return plaintext

    def _next_nonce(self) -> bytes:
        if self.nonce >= MAX_NONCE:
            raise NoiseError("this key has used all its nonces; start a new session",
                             code="nonce_exhausted")
        return _NONCE_PAD + self.nonce.to_bytes(8, "little")


# ------------------------------------------------------------------ SymmetricState (section 5.2)
class _SymmetricState:
    __slots__ = ("_chaining_key", "_cipher", "handshake_hash")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_SIZE:
            self.handshake_hash = protocol_name.ljust(HASH_SIZE, b"\0")
        else:
            self.handshake_hash = hashlib.sha256(protocol_name).digest()
        self._chaining_key = self.handshake_hash
        self._cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self._chaining_key, temp_key = _hkdf2(self._chaining_key, input_key_material)
        self._cipher = CipherState(temp_key)

    def mix_hash(self, data: _BytesLike) -> None:
        digest = hashlib.sha256(self.handshake_hash)
        digest.update(data)
        self.handshake_hash = digest.digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self.handshake_hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: _BytesLike) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self.handshake_hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator -> responder, responder -> initiator)."""
        first, second = _hkdf2(self._chaining_key, b"")
        return CipherState(first), CipherState(second)


def _hkdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """Noise's HKDF with two outputs: RFC 5869 with ``salt = chaining_key``, empty ``info``."""
    output = HKDF(algorithm=hashes.SHA256(), length=2 * HASH_SIZE, salt=chaining_key,
                  info=b"").derive(input_key_material)
    return output[:HASH_SIZE], output[HASH_SIZE:]


# ------------------------------------------------------------------ transport
class NoiseTransport:
    """What a finished handshake hands over: one key each way.

    ``seal`` makes the next message to the peer, ``open`` reads the next one from it; messages
    must be opened in the order they were sealed (a stream keeps that order). Once ``open``
    fails (a forged or corrupted message) the transport is finished: every later call raises
    NoiseError (``failed_earlier``), since a stream that lost its integrity cannot recover.
    """

    __slots__ = ("_failed", "_receive", "_send", "handshake_hash")

    def __init__(self, send: CipherState, receive: CipherState, handshake_hash: bytes) -> None:
        self._send = send
        self._receive = receive
        self._failed = False
        self.handshake_hash = handshake_hash
        """Unique to this handshake, equal on both sides (the spec's channel binding)."""

    @property
    def send_cipher(self) -> CipherState:
        return self._send

    @property
    def receive_cipher(self) -> CipherState:
        return self._receive

    def seal(self, plaintext: _BytesLike) -> bytes:
        """One transport message: ``plaintext`` (at most MAX_PLAINTEXT_SIZE) and its tag."""
        self._check_usable()
        if len(plaintext) > MAX_PLAINTEXT_SIZE:
            raise NoiseError(f"{len(plaintext)} bytes do not fit one Noise message (at most "
                             f"{MAX_PLAINTEXT_SIZE}); split them (NoiseStreamWriter does)",
                             code="bad_size")
        return self._send.encrypt_with_ad(b"", plaintext)

    def open(self, ciphertext: _BytesLike) -> bytes:
        """The plaintext of the peer's next transport message."""
        self._check_usable()
        try:
            _check_message_size(len(ciphertext), TAG_SIZE)
            return self._receive.decrypt_with_ad(b"", ciphertext)
        except NoiseError:
            self._failed = True
            raise

    def _check_usable(self) -> None:
        if self._failed:
            raise NoiseError("this Noise transport failed earlier", code="failed_earlier")


def _check_message_size(size: int, minimum: int) -> None:
    if size > MAX_MESSAGE_SIZE:
        raise NoiseError(f"a Noise message of {size} bytes is over the limit of "
                         f"{MAX_MESSAGE_SIZE}", code="bad_size")
    if size < minimum:
        raise NoiseError(f"a Noise message of {size} bytes is truncated (at least {minimum})",
                         code="bad_size")


# ------------------------------------------------------------------ HandshakeState (section 5.3)
class _Step(enum.Enum):
    WRITE_FIRST = "write the first message"
    READ_FIRST = "read the first message"
    WRITE_SECOND = "write the second message"
    READ_SECOND = "read the second message"
    DONE = "done"
    FAILED = "failed"


# The handshake as a table: each role's steps in order; any other call is out of order.
_NEXT_STEP = {
    _Step.WRITE_FIRST: _Step.READ_SECOND,  # initiator
    _Step.READ_SECOND: _Step.DONE,
    _Step.READ_FIRST: _Step.WRITE_SECOND,  # responder
    _Step.WRITE_SECOND: _Step.DONE,
}
# Both messages are e (32 bytes) then an encrypted payload with its tag.
_MIN_HANDSHAKE_MESSAGE = DH_SIZE + TAG_SIZE


class _Handshake:
    __slots__ = ("_ephemeral", "_ephemeral_public", "_remote_ephemeral", "_state", "_step")

    def __init__(self, prologue: bytes, server_public: bytes, first_step: _Step,
                 ephemeral: X25519PrivateKey | None) -> None:
        self._state = _SymmetricState(PROTOCOL_NAME)
        self._state.mix_hash(prologue)
        self._state.mix_hash(server_public)  # the pre-message "<- s"
        key = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
        self._ephemeral: X25519PrivateKey | None = key
        self._ephemeral_public = _public_bytes(key.public_key())
        self._remote_ephemeral = b""
        self._step = first_step

    def _begin(self, step: _Step) -> None:
        if self._step is _Step.FAILED:
            raise NoiseError("this Noise handshake failed earlier", code="failed_earlier")
        if self._step is not step:
            raise NoiseError(f"cannot {step.value} now (the handshake's next step is: "
                             f"{self._step.value})", code="out_of_order")

    def _ephemeral_key(self) -> X25519PrivateKey:
        # _begin lets no step run after _finish dropped the key; this keeps mypy sure of it.
        assert self._ephemeral is not None
        return self._ephemeral

    def _write_e(self) -> bytes:
        self._state.mix_hash(self._ephemeral_public)
        return self._ephemeral_public

    def _read_e(self, message: _BytesLike) -> memoryview:
        """Take the peer's e from the start of ``message``; the rest of it."""
        _check_message_size(len(message), _MIN_HANDSHAKE_MESSAGE)
        view = memoryview(message)
        self._remote_ephemeral = bytes(view[:DH_SIZE])
        self._state.mix_hash(self._remote_ephemeral)
        return view[DH_SIZE:]

    def _begin_write(self, step: _Step, payload: bytes) -> None:
        # Checked before the state changes, so a caller may retry with a shorter payload.
        self._begin(step)
        if len(payload) > MAX_HANDSHAKE_PAYLOAD:
            raise NoiseError(f"a handshake payload of {len(payload)} bytes is over the limit "
                             f"of {MAX_HANDSHAKE_PAYLOAD}", code="bad_size")

    def _finish(self, initiator: bool) -> NoiseTransport:
        to_responder, to_initiator = self._state.split()
        transport = (NoiseTransport(to_responder, to_initiator, self._state.handshake_hash)
                     if initiator else
                     NoiseTransport(to_initiator, to_responder, self._state.handshake_hash))
        # Forward secrecy: the ephemeral private key must not outlive the handshake.
        self._ephemeral = None
        return transport


class NoiseInitiator(_Handshake):
    """The client's side: knows the server's static public key, sends first.

    ``write_request(payload)`` -> first message; ``read_response(message)`` -> the server's
    payload and the :class:`NoiseTransport`. ``prologue`` must equal the responder's (veil
    binds its protocol and version label there: a mismatch fails the first message).
    ``ephemeral`` exists for test vectors only: a reused ephemeral key reuses every key.
    """

    __slots__ = ("_server_public",)

    def __init__(self, server_public: bytes, prologue: bytes = b"", *,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        self._server_public = check_public_key(server_public)
        super().__init__(prologue, self._server_public, _Step.WRITE_FIRST, ephemeral)

    @property
    def ephemeral_public(self) -> bytes:
        """This handshake's e, known before the first message (a binding for what it carries)."""
        return self._ephemeral_public

    def write_request(self, payload: bytes = b"") -> bytes:
        """``-> e, es`` and ``payload`` encrypted to the server's static key."""
        self._begin_write(_Step.WRITE_FIRST, payload)
        message = self._write_e()
        self._state.mix_key(_dh(self._ephemeral_key(), self._server_public))
        message += self._state.encrypt_and_hash(payload)
        self._step = _NEXT_STEP[self._step]
        return message

    def read_response(self, message: _BytesLike) -> tuple[bytes, NoiseTransport]:
        """``<- e, ee``: the server's payload and the transport, or NoiseError (and then this
        handshake is finished)."""
        self._begin(_Step.READ_SECOND)
        try:
            rest = self._read_e(message)
            self._state.mix_key(_dh(self._ephemeral_key(), self._remote_ephemeral))
            payload = self._state.decrypt_and_hash(rest)
        except NoiseError:
            self._step = _Step.FAILED
            raise
        self._step = _NEXT_STEP[self._step]
        return payload, self._finish(initiator=True)


class NoiseResponder(_Handshake):
    """The server's side: holds the static private key, answers.

    ``read_request(message)`` -> the client's payload; ``write_response(payload)`` -> the second
    message and the :class:`NoiseTransport`. A first message for another key, or with another
    prologue, fails in ``read_request`` with NoiseError (``decrypt_failed``).
    """

    __slots__ = ("_static",)

    def __init__(self, static_private: bytes, prologue: bytes = b"", *,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        self._static = _load_private(static_private)
        super().__init__(prologue, _public_bytes(self._static.public_key()), _Step.READ_FIRST,
                         ephemeral)

    @property
    def remote_ephemeral(self) -> bytes:
        """The client's e, after ``read_request`` (what the initiator's payload may bind)."""
        return self._remote_ephemeral

    def read_request(self, message: _BytesLike) -> bytes:
        """``-> e, es``: the client's payload, or NoiseError (and then this handshake is
        finished)."""
        self._begin(_Step.READ_FIRST)
        try:
            rest = self._read_e(message)
            self._state.mix_key(_dh(self._static, self._remote_ephemeral))
            payload = self._state.decrypt_and_hash(rest)
        except NoiseError:
            self._step = _Step.FAILED
            raise
        self._step = _NEXT_STEP[self._step]
        return payload

    def write_response(self, payload: bytes = b"") -> tuple[bytes, NoiseTransport]:
        """``<- e, ee`` with ``payload`` (empty, or padding): the message and the transport."""
        self._begin_write(_Step.WRITE_SECOND, payload)
        message = self._write_e()
        self._state.mix_key(_dh(self._ephemeral_key(), self._remote_ephemeral))
        message += self._state.encrypt_and_hash(payload)
        self._step = _NEXT_STEP[self._step]
        return message, self._finish(initiator=False)


# ------------------------------------------------------------------ stream framing
def frame(message: _BytesLike) -> bytes:
    """One Noise message with its 2-byte big-endian length, as it goes on a stream."""
    _check_message_size(len(message), MIN_MESSAGE_SIZE)
    return _LENGTH.pack(len(message)) + bytes(message)


class FrameDecoder:
    """Cuts a byte stream into the Noise messages :func:`frame` wrote.

    ``feed(data)`` returns every message ``data`` completes, in order; an incomplete one waits
    for the next feed (at most :data:`MAX_BUFFERED` bytes wait). Each input byte is copied at
    most twice (into the buffer when a message spans feeds, then out of it), whatever the
    fragmentation. A length shorter than any Noise message fails with NoiseError
    (``bad_size``), and the decoder is then finished (``failed_earlier``).
    """

    __slots__ = ("_buffer", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for the next feed."""
        return len(self._buffer)

    def feed(self, data: _BytesLike) -> list[bytes]:
        if self._failed:
            raise NoiseError("this frame decoder failed earlier", code="failed_earlier")
        if not data:
            return []
        messages: list[bytes] = []
        if self._buffer:
            self._buffer += data
            with memoryview(self._buffer) as view:
                consumed = self._cut(view, messages)
            del self._buffer[:consumed]  # what is left is one incomplete frame
        else:  # the common case: parse the caller's bytes in place, keep only the tail
            with memoryview(data) as view:
                consumed = self._cut(view, messages)
                self._buffer += view[consumed:]
        return messages

    def _cut(self, view: memoryview, messages: list[bytes]) -> int:
        position, end = 0, len(view)
        while end - position >= LENGTH_PREFIX_SIZE:
            length = view[position] << 8 | view[position + 1]
            if length < MIN_MESSAGE_SIZE:
                self._failed = True
                raise NoiseError(f"a frame of {length} bytes cannot hold a Noise message "
                                 f"(at least {MIN_MESSAGE_SIZE})", code="bad_size")
            start = position + LENGTH_PREFIX_SIZE
            if end - start < length:
                break
            messages.append(bytes(view[start:start + length]))
            position = start + length
        return position


class NoiseStreamWriter:
    """Plaintext of any length -> framed transport messages, ``chunk_size`` plaintext bytes
    each at most (the default fills Noise's 65535-byte messages)."""

    __slots__ = ("_chunk_size", "_transport")

    def __init__(self, transport: NoiseTransport, chunk_size: int = MAX_PLAINTEXT_SIZE) -> None:
        if not 1 <= chunk_size <= MAX_PLAINTEXT_SIZE:
            raise ValueError(f"chunk_size must be 1..{MAX_PLAINTEXT_SIZE}, not {chunk_size}")
        self._transport = transport
        self._chunk_size = chunk_size

    def encode(self, plaintext: _BytesLike) -> bytes:
        """The bytes to send for ``plaintext``; empty input gives no message at all (frame
        ``transport.seal(b"")`` yourself to send an empty one)."""
        parts: list[bytes] = []
        with memoryview(plaintext) as view:
            for start in range(0, len(view), self._chunk_size):
                sealed = self._transport.seal(view[start:start + self._chunk_size])
                parts += (_LENGTH.pack(len(sealed)), sealed)
        return b"".join(parts)


class NoiseStreamReader:
    """Bytes from the stream -> the plaintexts of the transport messages they complete.

    Pass the ``decoder`` that carried the handshake so bytes that arrived with its last
    message are not lost.
    """

    __slots__ = ("_decoder", "_transport")

    def __init__(self, transport: NoiseTransport, decoder: FrameDecoder | None = None) -> None:
        self._transport = transport
        self._decoder = decoder if decoder is not None else FrameDecoder()

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def feed(self, data: _BytesLike) -> list[bytes]:
        return [self._transport.open(message) for message in self._decoder.feed(data)]
