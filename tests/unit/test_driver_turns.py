"""The session driver parses at most FRAMES_PER_TURN frames of one peer per event-loop turn:
a read full of tiny frames is parsed over several turns, the peer is not read meanwhile, and
every other callback of the loop runs between them."""

from __future__ import annotations

import asyncio
import itertools

from veil.net.driver import FRAMES_PER_TURN, SessionDriver
from veil.protocol.frames import FrameType, frame, pack_u32
from veil.protocol.session import Session, SessionConfig

# One TLS read's worth (256 KiB) of the smallest useful frame: WINDOW(+1) on the session.
WINDOW_FRAME = frame(FrameType.WINDOW, 0, pack_u32(1))
FLOOD = WINDOW_FRAME * ((256 << 10) // len(WINDOW_FRAME))


class RecordingTransport(asyncio.Transport):
    """What the driver needs of its transport, recording whether it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written = bytearray()

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed twice"
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16 * 1024, 64 * 1024)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_read_of_tiny_frames_is_parsed_over_several_turns() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        session = Session(client=False, now=loop.time(),
                          config=SessionConfig(keepalive_interval=None))
        driver = SessionDriver(session)
        transport = RecordingTransport()
        driver.connection_made(transport)
        frames = len(FLOOD) // len(WINDOW_FRAME)

        turns_seen: list[int] = []  # frames still unparsed each time another callback runs

        def another_connection() -> None:
            turns_seen.append(session.input_held // len(WINDOW_FRAME))
            if session.input_held:
                loop.call_soon(another_connection)

        buffer = bytearray(FLOOD)
        driver.data_received(memoryview(buffer))
        buffer[:] = bytes(len(buffer))  # the carrier reuses its buffer at once
        assert session.input_held == (frames - FRAMES_PER_TURN) * len(WINDOW_FRAME)
        assert not transport.reading
        loop.call_soon(another_connection)
        for _ in range(frames // FRAMES_PER_TURN + 2):
            await asyncio.sleep(0)
        assert session.input_held == 0 and not session.closed
        assert transport.reading
        # Other callbacks ran between the session's turns, each turn FRAMES_PER_TURN frames.
        assert len(turns_seen) >= frames // FRAMES_PER_TURN
        steps = {a - b for a, b in itertools.pairwise(turns_seen) if b}
        assert steps == {FRAMES_PER_TURN}
        driver.close()

    asyncio.run(main())
