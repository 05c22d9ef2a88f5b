"""The one way tests wait for something to happen: poll its condition, with a deadline.

A test never sleeps to wait (a sleep long enough on a loaded CI machine is a slow test
everywhere else, and one too short is a flaky test); it names the condition and how long it
may take. A timeout fails the test with what was awaited, and what was seen instead when the
caller says how to describe it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# How often a condition is polled: short against the timeouts tests use (seconds), long enough
# not to compete for the CPU with the programs under test.
POLL_S = 0.05

Describe = str | Callable[[], str]


def _message(what: Describe, timeout: float) -> str:
    text = what() if callable(what) else what
    return f"timed out after {timeout} s waiting for {text}"


def wait_until(predicate: Callable[[], T], timeout: float, what: Describe, *,
               poll: float = POLL_S) -> T:
    """Call ``predicate`` until it returns something true and return that.

    ``what`` names the condition in the failure (an AssertionError); a callable is called
    only then, to show the state at the deadline (a log tail, the last value seen). An
    exception from ``predicate`` ends the wait at once (a process that died, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        if result := predicate():
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout))
        time.sleep(poll)


async def wait_until_async(predicate: Callable[[], T | Awaitable[T]], timeout: float,
                           what: Describe, *, poll: float = POLL_S) -> T:
    """:func:`wait_until` for a test running in an event loop: the loop keeps running
    between polls. ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout))
        await asyncio.sleep(poll)
