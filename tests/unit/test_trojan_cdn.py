"""server/trojan.py's CDN side, sans network: which protocol a carrier's first bytes go to
(:class:`TrojanOrNoise`), however the CDN cuts them, and what the Trojan service's transport
over a carrier counts and holds (:class:`CarrierTrojan`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from veil.protocol.address import Address
from veil.protocol.trojan import Command, TrojanRequest, build_request, password_hash
from veil.server.trojan import CarrierTrojan, TrojanOrNoise, TrojanWayIn
from veil.store.base import User
from veil.transport.ratelimit import TokenBucket

ALICE = User("alice", b"s" * 32, b"12345678", 0.0)
PASSWORD = "alice's password"
DESTINATION = Address("127.0.0.1", 7)


class Users:
    def __init__(self, refused: str | None = None) -> None:
        self.refused = refused

    def find_by_key_id(self, key_id: bytes) -> User | None:
        return None

    def find_by_trojan_hash(self, digest: str) -> User | None:
        return ALICE if digest == password_hash(PASSWORD) else None

    def refusal(self, user: User, device: str | None = None) -> str | None:
        return self.refused


class Stream(asyncio.Transport):
    """A carrier stream that records what is done to it."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 1)})
        self.written = bytearray()
        self.reading = True
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class Record(asyncio.Protocol):
    def __init__(self) -> None:
        self.made: asyncio.BaseTransport | None = None
        self.got = bytearray()
        self.paused = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = transport

    def data_received(self, data: bytes) -> None:
        self.got += data

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.paused -= 1


class Setup:
    def __init__(self, refused: str | None = None) -> None:
        self.served: list[tuple[asyncio.Transport, User, TrojanRequest, bytes]] = []
        self.noise = Record()
        self.stream = Stream()
        self.relay = Record()
        way_in = TrojanWayIn(Users(refused), self.serve)
        self.demux = TrojanOrNoise(way_in, lambda: self.noise)
        self.demux.connection_made(self.stream)

    def serve(self, transport: asyncio.Transport, user: User, request: TrojanRequest,
              rest: bytes) -> None:
        """What TrojanService.serve does first: its relay becomes the protocol."""
        self.served.append((transport, user, request, rest))
        transport.set_protocol(self.relay)

    def feed(self, data: bytes, piece: int) -> None:
        for at in range(0, len(data), piece):
            self.demux.data_received(data[at:at + piece])


@pytest.mark.parametrize("piece", [1, 7, 57, 4096])
def test_a_trojan_request_cut_anywhere_is_served_with_the_bytes_after_it(piece: int) -> None:
    setup = Setup()
    request = build_request(password_hash(PASSWORD), Command.CONNECT, DESTINATION)
    setup.feed(request + b"early", piece)
    ((transport, user, parsed, rest),) = setup.served
    assert isinstance(transport, CarrierTrojan) and user is ALICE
    assert parsed.destination == DESTINATION
    # What came with the request's last piece is the rest; the relay gets what follows.
    assert rest + setup.relay.got == b"early"
    assert setup.noise.made is None


@pytest.mark.parametrize("piece", [1, 4096])
def test_veils_noise_first_message_goes_to_noise_at_its_first_byte(piece: int) -> None:
    setup = Setup()
    first = b"\x00\x70" + os.urandom(112)  # a frame length, then a Noise NK first message
    setup.demux.data_received(first[:1])
    assert setup.noise.made is setup.stream and setup.noise.got == first[:1]
    setup.feed(first[1:], piece)
    assert setup.noise.got == first and setup.served == []


@pytest.mark.parametrize(("password", "refused"), [("wrong", None), (PASSWORD, "revoked")])
def test_a_refused_request_goes_to_noise_with_every_byte(password: str,
                                                         refused: str | None) -> None:
    """As a stranger's bytes do: a holder of the path cannot tell a Trojan refusal."""
    setup = Setup(refused)
    request = build_request(password_hash(password), Command.CONNECT, DESTINATION) + b"x"
    setup.feed(request, 5)
    assert setup.served == [] and setup.noise.got == request


def test_a_known_password_waits_for_the_rest_but_not_past_the_bound() -> None:
    setup = Setup()
    head = password_hash(PASSWORD).encode() + b"\r\n\x01\x03\xff"  # a 255-byte name follows
    setup.demux.data_received(head)
    assert setup.served == [] and setup.noise.made is None
    setup.demux.data_received(b"a" * 4096)  # a name that never ends: past MAX_WAIT_BYTES
    assert setup.served == [] and setup.noise.got == head + b"a" * 4096


def test_the_carrier_transport_counts_holds_and_passes_flow_control_on() -> None:
    async def run() -> None:
        setup = Setup()
        request = build_request(password_hash(PASSWORD), Command.CONNECT, DESTINATION)
        setup.demux.data_received(request)
        ((transport, *_),) = setup.served
        assert isinstance(transport, CarrierTrojan)
        relay = setup.relay
        setup.demux.data_received(b"up" * 10)
        transport.write(b"down")
        assert relay.got == b"up" * 10 and setup.stream.written == b"down"
        assert transport.get_extra_info("byte_counts") == (20, 4)
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
        transport.pause_reading()
        assert not setup.stream.reading
        transport.resume_reading()
        assert setup.stream.reading
        setup.demux.pause_writing()
        assert relay.paused == 1
        setup.demux.resume_writing()
        assert relay.paused == 0
        # A user's rate: reading pauses once the bucket is spent, and comes back.
        transport.set_rate_limits(TokenBucket(1_000_000, burst=10), None)
        setup.demux.data_received(b"x" * 20)
        assert not setup.stream.reading
        await asyncio.sleep(0.05)
        assert setup.stream.reading
        transport.close()
        assert setup.stream.closing and transport.is_closing()

    asyncio.run(run())
