"""The one timer an asyncio adapter keeps for its sans-IO object.

A sans-IO object (the tunnel's :class:`~veil.protocol.session.Session`, a cover connection)
never reads the clock: ``get_timer()`` says when it next wants ``handle_timer(now)``. Its
asyncio adapter has one "transmit, then re-arm" step: write what the object queued, then hand
``get_timer()`` to :meth:`LoopTimer.set`, which keeps exactly one ``loop.call_at`` armed for
that deadline (the model of aioquic's asyncio adapter).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["LoopTimer"]


class LoopTimer:
    """One ``loop.call_at`` handle, moved only when the deadline changes.

    ``on_fire(now)`` runs with the loop's time once the deadline has passed; the timer is
    disarmed by then, so ``on_fire`` calls the sans-IO object's ``handle_timer(now)`` and
    transmits, which re-arms it if more is due.
    """

    __slots__ = ("_handle", "_loop", "_on_fire", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_fire: Callable[[float], None]) -> None:
        self._loop = loop
        self._on_fire = on_fire
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def set(self, when: float | None) -> None:
        """Arm for ``when`` (loop time), or disarm for None. The deadline already armed costs
        nothing: this runs after every write."""
        if when == self._when:
            return
        self.cancel()
        if when is not None:
            self._handle = self._loop.call_at(when, self._fire)
            self._when = when

    def cancel(self) -> None:
        """Disarm; a later :meth:`set` arms again."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._when = None

    def _fire(self) -> None:
        self._handle = None
        self._when = None
        self._on_fire(self._loop.time())
