"""protocol/noise.py: Noise_NK against an independent implementation, and the stream framing.

The independent implementation is PyPI's ``noiseprotocol`` (its own handshake state machine,
HKDF and nonce handling; it shares only the X25519 and ChaCha20-Poly1305 primitives of
``cryptography`` with veil). With both sides' ephemeral keys fixed, the two must produce the
very same bytes; with fresh keys, each must complete a handshake with the other.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from veil.protocol.noise import (
    DH_SIZE,
    LENGTH_PREFIX_SIZE,
    MAX_BUFFERED,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_MESSAGE_SIZE,
    MAX_NONCE,
    MAX_PLAINTEXT_SIZE,
    PROTOCOL_NAME,
    TAG_SIZE,
    FrameDecoder,
    NoiseError,
    NoiseInitiator,
    NoiseResponder,
    NoiseStreamReader,
    NoiseStreamWriter,
    NoiseTransport,
    StaticKeypair,
    decode_public_key,
    encode_public_key,
    frame,
    generate_static_keypair,
    public_key_from_private,
)

PROLOGUE = b"veil test prologue v1"
# Transport plaintext sizes the interop runs cycle through: empty, small, odd, the maximum.
SIZES = [0, 1, 17, 1000, 4096, 65000, MAX_PLAINTEXT_SIZE]


def fixed_private(label: str) -> bytes:
    """A deterministic X25519 private key, so both implementations can be given the same."""
    return hashlib.sha256(label.encode()).digest()


def fixed_ephemeral(label: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(fixed_private(label))


SERVER = StaticKeypair(fixed_private("server"), public_key_from_private(fixed_private("server")))


def reference(*, initiator: bool, prologue: bytes = PROLOGUE,
              ephemeral: bytes | None = None) -> NoiseConnection:
    """A noiseprotocol peer for SERVER (it holds SERVER's private key as the responder)."""
    peer = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        peer.set_as_initiator()
        peer.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, SERVER.public)
    else:
        peer.set_as_responder()
        peer.set_keypair_from_private_bytes(Keypair.STATIC, SERVER.private)
    if ephemeral is not None:
        peer.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    peer.set_prologue(prologue)
    if ephemeral is None:
        peer.start_handshake()
    else:  # it rightly warns that a fixed ephemeral key is for tests only
        with pytest.warns(UserWarning, match="ephemeral keypairs is already set"):
            peer.start_handshake()
    return peer


def handshake(payload: bytes = b"auth", answer: bytes = b"",
              ) -> tuple[NoiseTransport, NoiseTransport]:
    """(initiator's transport, responder's transport), both veil."""
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    assert responder.read_request(initiator.write_request(payload)) == payload
    message, responder_transport = responder.write_response(answer)
    received, initiator_transport = initiator.read_response(message)
    assert received == answer
    return initiator_transport, responder_transport


def flipped(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ------------------------------------------------------------------ interop
def test_same_bytes_as_noiseprotocol_when_the_ephemeral_keys_are_the_same() -> None:
    veil_initiator = NoiseInitiator(SERVER.public, PROLOGUE, ephemeral=fixed_ephemeral("e-i"))
    veil_responder = NoiseResponder(SERVER.private, PROLOGUE, ephemeral=fixed_ephemeral("e-r"))
    ref_initiator = reference(initiator=True, ephemeral=fixed_private("e-i"))
    ref_responder = reference(initiator=False, ephemeral=fixed_private("e-r"))

    first = veil_initiator.write_request(b"authenticator")
    assert first == bytes(ref_initiator.write_message(b"authenticator"))
    assert len(first) == DH_SIZE + len(b"authenticator") + TAG_SIZE
    assert veil_responder.read_request(first) == bytes(ref_responder.read_message(first))

    second, veil_responder_transport = veil_responder.write_response(b"pad" * 7)
    assert second == bytes(ref_responder.write_message(b"pad" * 7))
    _, veil_initiator_transport = veil_initiator.read_response(second)
    ref_initiator.read_message(second)

    assert veil_initiator_transport.handshake_hash == ref_initiator.get_handshake_hash()
    assert veil_responder_transport.handshake_hash == ref_responder.get_handshake_hash()
    for size in SIZES:
        plaintext = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert veil_initiator_transport.seal(plaintext) == ref_initiator.encrypt(plaintext)
        assert veil_responder_transport.seal(plaintext) == ref_responder.encrypt(plaintext)


def test_veil_initiator_with_noiseprotocol_responder() -> None:
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    peer = reference(initiator=False)
    assert bytes(peer.read_message(initiator.write_request(b"veil auth"))) == b"veil auth"
    received, transport = initiator.read_response(bytes(peer.write_message(b"padding")))
    assert received == b"padding"
    assert peer.handshake_finished
    assert transport.handshake_hash == peer.get_handshake_hash()
    for turn in range(300):
        plaintext = bytes([turn % 251]) * SIZES[turn % len(SIZES)]
        assert bytes(peer.decrypt(transport.seal(plaintext))) == plaintext
        assert transport.open(peer.encrypt(plaintext[::-1])) == plaintext[::-1]


def test_noiseprotocol_initiator_with_veil_responder() -> None:
    peer = reference(initiator=True)
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    assert responder.read_request(bytes(peer.write_message(b"veil auth"))) == b"veil auth"
    message, transport = responder.write_response(b"")
    assert bytes(peer.read_message(message)) == b""
    assert peer.handshake_finished
    assert transport.handshake_hash == peer.get_handshake_hash()
    for turn in range(300):
        plaintext = bytes([turn % 251]) * SIZES[turn % len(SIZES)]
        # Several in a row each way, so the two directions' nonces drift apart.
        for _ in range(turn % 3 + 1):
            assert transport.open(peer.encrypt(plaintext)) == plaintext
        assert bytes(peer.decrypt(transport.seal(plaintext[::-1]))) == plaintext[::-1]


# ------------------------------------------------------------------ failures
def test_a_flipped_bit_anywhere_in_the_first_message_fails() -> None:
    message = NoiseInitiator(SERVER.public, PROLOGUE).write_request(b"authenticator")
    for index in range(len(message)):
        with pytest.raises(NoiseError) as failure:
            NoiseResponder(SERVER.private, PROLOGUE).read_request(flipped(message, index))
        # A changed e gives another es (or, rarely, a low-order point): either way no tag fits.
        assert failure.value.code in {"decrypt_failed", "bad_key"}


def test_a_flipped_bit_anywhere_in_the_second_message_fails() -> None:
    initiator = NoiseInitiator(SERVER.public, PROLOGUE, ephemeral=fixed_ephemeral("e-i"))
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    first = initiator.write_request(b"")
    responder.read_request(first)
    second, _ = responder.write_response(b"padding")
    for index in range(len(second)):
        fresh = NoiseInitiator(SERVER.public, PROLOGUE, ephemeral=fixed_ephemeral("e-i"))
        assert fresh.write_request(b"") == first
        with pytest.raises(NoiseError):
            fresh.read_response(flipped(second, index))
        with pytest.raises(NoiseError) as again:  # a failed handshake stays failed
            fresh.read_response(second)
        assert again.value.code == "failed_earlier"


def test_a_flipped_bit_anywhere_in_a_transport_message_fails_and_finishes_it() -> None:
    for index in range(len(b"some data") + TAG_SIZE):
        sender, receiver = handshake()
        sealed = sender.seal(b"some data")
        with pytest.raises(NoiseError) as failure:
            receiver.open(flipped(sealed, index))
        assert failure.value.code == "decrypt_failed"
        with pytest.raises(NoiseError) as later:
            receiver.open(sealed)
        assert later.value.code == "failed_earlier"


def test_reordered_transport_messages_fail() -> None:
    sender, receiver = handshake()
    sender.seal(b"one")  # lost, or held back by whoever reorders
    with pytest.raises(NoiseError, match="did not decrypt"):
        receiver.open(sender.seal(b"two"))


def test_a_wrong_server_key_fails_at_the_first_message() -> None:
    impostor = generate_static_keypair()
    message = NoiseInitiator(impostor.public, PROLOGUE).write_request(b"authenticator")
    with pytest.raises(NoiseError) as failure:
        NoiseResponder(SERVER.private, PROLOGUE).read_request(message)
    assert failure.value.code == "decrypt_failed"
    # An impostor holding its own key cannot answer the real server's client either.
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    with pytest.raises(NoiseError):
        NoiseResponder(impostor.private, PROLOGUE).read_request(initiator.write_request(b""))


def test_another_prologue_fails_at_the_first_message() -> None:
    message = NoiseInitiator(SERVER.public, b"veil v1").write_request(b"")
    with pytest.raises(NoiseError, match="did not decrypt"):
        NoiseResponder(SERVER.private, b"veil v2").read_request(message)


def test_a_low_order_ephemeral_key_is_refused() -> None:
    message = bytes(DH_SIZE) + bytes(TAG_SIZE)
    with pytest.raises(NoiseError) as failure:
        NoiseResponder(SERVER.private, PROLOGUE).read_request(message)
    assert failure.value.code == "bad_key"


def test_a_replayed_first_message_gives_a_transport_with_other_keys() -> None:
    # Noise accepts a replayed first message (its payload is read twice); refusing the replay is
    # the caller's job: veil's authenticator in that payload goes through auth.ReplayFilter.
    # What Noise does guarantee: the replayer gets fresh keys it cannot use.
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    first = initiator.write_request(b"authenticator")
    genuine, replayed = (NoiseResponder(SERVER.private, PROLOGUE) for _ in range(2))
    assert genuine.read_request(first) == replayed.read_request(first) == b"authenticator"
    genuine_answer, genuine_transport = genuine.write_response()
    _, replayed_transport = replayed.write_response()
    _, client_transport = initiator.read_response(genuine_answer)

    assert genuine_transport.handshake_hash != replayed_transport.handshake_hash
    genuine_data, replayed_data = genuine_transport.seal(b"data"), replayed_transport.seal(b"data")
    assert genuine_data != replayed_data
    assert client_transport.open(genuine_data) == b"data"
    with pytest.raises(NoiseError):
        client_transport.open(replayed_transport.seal(b"more"))


def test_steps_out_of_order_are_refused() -> None:
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    for call in (lambda: initiator.read_response(bytes(64)), lambda: responder.write_response()):
        with pytest.raises(NoiseError, match="cannot") as failure:
            call()
        assert failure.value.code == "out_of_order"
    first = initiator.write_request()
    with pytest.raises(NoiseError, match="cannot write the first message"):
        initiator.write_request()
    responder.read_request(first)
    with pytest.raises(NoiseError, match="cannot read the first message"):
        responder.read_request(first)
    second, _ = responder.write_response()
    initiator.read_response(second)
    with pytest.raises(NoiseError, match="next step is: done"):
        initiator.read_response(second)
    with pytest.raises(NoiseError, match="next step is: done"):
        responder.write_response()


def test_message_sizes_are_checked() -> None:
    cases = [bytes(DH_SIZE + TAG_SIZE - 1), bytes(MAX_MESSAGE_SIZE + 1)]
    for message in cases:
        with pytest.raises(NoiseError) as failure:
            NoiseResponder(SERVER.private, PROLOGUE).read_request(message)
        assert failure.value.code == "bad_size"
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    with pytest.raises(NoiseError, match="over the limit"):
        initiator.write_request(bytes(MAX_HANDSHAKE_PAYLOAD + 1))
    # The refusal changed nothing: the largest payload then goes through, to a real responder.
    largest = initiator.write_request(bytes(MAX_HANDSHAKE_PAYLOAD))
    assert len(largest) == MAX_MESSAGE_SIZE
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    assert responder.read_request(largest) == bytes(MAX_HANDSHAKE_PAYLOAD)
    with pytest.raises(NoiseError, match="over the limit"):
        responder.write_response(bytes(MAX_HANDSHAKE_PAYLOAD + 1))
    answer, _ = responder.write_response(bytes(MAX_HANDSHAKE_PAYLOAD))
    assert initiator.read_response(answer)[0] == bytes(MAX_HANDSHAKE_PAYLOAD)

    sender, receiver = handshake()
    with pytest.raises(NoiseError, match="do not fit"):
        sender.seal(bytes(MAX_PLAINTEXT_SIZE + 1))
    assert len(sender.seal(bytes(MAX_PLAINTEXT_SIZE))) == MAX_MESSAGE_SIZE
    for message in (bytes(TAG_SIZE - 1), bytes(MAX_MESSAGE_SIZE + 1)):
        _, receiver = handshake()
        with pytest.raises(NoiseError) as failure:
            receiver.open(message)
        assert failure.value.code == "bad_size"


def test_a_key_refuses_the_reserved_nonce() -> None:
    sender, receiver = handshake()
    sender.send_cipher.set_nonce(MAX_NONCE - 1)
    receiver.receive_cipher.set_nonce(MAX_NONCE - 1)
    assert receiver.open(sender.seal(b"last")) == b"last"  # nonce 2**64-2 is the last one
    with pytest.raises(NoiseError) as failure:
        sender.seal(b"one more")
    assert failure.value.code == "nonce_exhausted"
    with pytest.raises(NoiseError) as failure:
        receiver.open(bytes(TAG_SIZE))
    assert failure.value.code == "nonce_exhausted"


def test_public_keys_encode_as_43_characters_and_back() -> None:
    keys = generate_static_keypair()
    assert public_key_from_private(keys.private) == keys.public
    text = encode_public_key(keys.public)
    assert len(text) == 43
    assert decode_public_key(text) == keys.public
    assert encode_public_key(keys.private) not in repr(keys)  # the private half stays out of logs
    for bad in ("", "abc", text[:-1], text + "AA", text[:-1] + "!", text[:-1] + "B"):
        with pytest.raises(NoiseError) as failure:
            decode_public_key(bad)
        assert failure.value.code == "bad_key"
    with pytest.raises(NoiseError, match="32 bytes"):
        NoiseInitiator(keys.public[:31])
    with pytest.raises(NoiseError, match="32 bytes"):
        NoiseResponder(keys.private + b"\0")


# ------------------------------------------------------------------ framing
def test_a_handshake_and_transport_data_over_one_framed_stream() -> None:
    initiator = NoiseInitiator(SERVER.public, PROLOGUE)
    responder = NoiseResponder(SERVER.private, PROLOGUE)
    server_decoder = FrameDecoder()
    [first] = server_decoder.feed(frame(initiator.write_request(b"authenticator")))
    assert responder.read_request(first) == b"authenticator"
    second, server_transport = responder.write_response(b"")
    # The server's answer and its first data leave in one write, as a proxy may coalesce them.
    wire = frame(second) + NoiseStreamWriter(server_transport).encode(b"hello")
    client_decoder = FrameDecoder()
    answer, *early = client_decoder.feed(wire)
    _, client_transport = initiator.read_response(answer)
    assert [client_transport.open(message) for message in early] == [b"hello"]
    reader = NoiseStreamReader(server_transport, server_decoder)
    big = bytes(range(256)) * 1000
    assert b"".join(reader.feed(NoiseStreamWriter(client_transport).encode(big))) == big


def test_the_writer_fills_messages_to_the_limit() -> None:
    sender, _ = handshake()
    wire = NoiseStreamWriter(sender).encode(bytes(3 * MAX_PLAINTEXT_SIZE + 5))
    lengths = []
    while wire:
        length = int.from_bytes(wire[:LENGTH_PREFIX_SIZE], "big")
        lengths.append(length)
        wire = wire[LENGTH_PREFIX_SIZE + length:]
    assert lengths == [MAX_MESSAGE_SIZE] * 3 + [5 + TAG_SIZE]
    assert NoiseStreamWriter(sender).encode(b"") == b""
    for size in (0, MAX_PLAINTEXT_SIZE + 1):
        with pytest.raises(ValueError, match="chunk_size"):
            NoiseStreamWriter(sender, chunk_size=size)


@settings(max_examples=200, deadline=None)
@given(plaintexts=st.lists(st.binary(max_size=700), max_size=8),
       chunk_size=st.integers(1, 300),
       cuts=st.lists(st.integers(0, 10_000), max_size=40))
def test_any_fragmentation_decodes_to_the_same_plaintexts(plaintexts: list[bytes],
                                                          chunk_size: int,
                                                          cuts: list[int]) -> None:
    sender, receiver = handshake()
    writer = NoiseStreamWriter(sender, chunk_size)
    wire = b"".join(writer.encode(plaintext) for plaintext in plaintexts)
    reader = NoiseStreamReader(receiver)
    decoded: list[bytes] = []
    edges = sorted({cut % (len(wire) + 1) for cut in cuts} | {0, len(wire)})
    for start, end in itertools.pairwise(edges):
        decoded += reader.feed(wire[start:end])
        assert reader.buffered <= MAX_BUFFERED
    expected = [plaintext[i:i + chunk_size] for plaintext in plaintexts
                for i in range(0, len(plaintext), chunk_size)]
    assert decoded == expected
    assert reader.buffered == 0


def test_the_decoder_holds_at_most_one_incomplete_frame() -> None:
    sender, receiver = handshake()
    wire = NoiseStreamWriter(sender).encode(bytes(2 * MAX_PLAINTEXT_SIZE))
    reader = NoiseStreamReader(receiver)
    decoded: list[bytes] = []
    for index in range(len(wire)):  # the worst fragmentation: one byte per feed
        decoded += reader.feed(wire[index:index + 1])
        assert reader.buffered < MAX_BUFFERED
    assert decoded == [bytes(MAX_PLAINTEXT_SIZE)] * 2
    # Everything complete in one feed is handed out by it; only the incomplete tail waits.
    wire = NoiseStreamWriter(sender).encode(bytes(10 * MAX_PLAINTEXT_SIZE))
    assert len(reader.feed(wire[:-1])) == 9
    assert reader.buffered == MAX_BUFFERED - 1
    assert reader.feed(wire[-1:]) == [bytes(MAX_PLAINTEXT_SIZE)]


def test_a_frame_too_short_for_any_noise_message_is_refused() -> None:
    decoder = FrameDecoder()
    with pytest.raises(NoiseError) as failure:
        decoder.feed(b"\x00\x0f" + bytes(15))
    assert failure.value.code == "bad_size"
    with pytest.raises(NoiseError) as later:
        decoder.feed(b"\x00\x10" + bytes(16))
    assert later.value.code == "failed_earlier"
    with pytest.raises(NoiseError, match="truncated"):
        frame(bytes(TAG_SIZE - 1))
    with pytest.raises(NoiseError, match="over the limit"):
        frame(bytes(MAX_MESSAGE_SIZE + 1))
