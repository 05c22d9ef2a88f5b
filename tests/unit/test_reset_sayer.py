"""Why the server cut an application's connection reaches the user at INFO, once per reason
per ten seconds: a page of fifty refused trackers is one line, and the next line counts them."""

from __future__ import annotations

import logging

import pytest

from veil.net.client_session import RESET_REPEAT_S, ResetSayer
from veil.protocol.frames import ResetCode


def test_one_line_per_reason_per_period_and_the_repeats_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    sayer = ResetSayer(clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="veil.client")
    for stream in range(1, 51):
        sayer.say(stream, ResetCode.REFUSED_DESTINATION)
    sayer.say(51, ResetCode.RESOLVE_FAILED)  # another reason is said at once
    now[0] += RESET_REPEAT_S
    sayer.say(53, ResetCode.REFUSED_DESTINATION)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said == [
        "a request failed: the server answered refused destination",
        "a request failed: the server answered resolve failed",
        "a request failed: the server answered refused destination "
        "(and 49 more since the last such line)",
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 49
