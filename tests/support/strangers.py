"""A gate where nobody holds a credential: every connection is the cover's, as a stranger's
(for tests that compare the cover behind a real Gate with nginx)."""

from __future__ import annotations

from typing import Any

from veil.cover.site import Answer, Request


class NoUsers:
    """The user directory a gate asks: it knows nobody."""

    def find_by_key_id(self, key_id: bytes) -> None:
        return None

    def find_by_trojan_hash(self, password_hash: str) -> None:
        return None

    def refusal(self, user: object, device: str | None = None) -> str | None:
        return None


def never_accept(*_args: Any) -> None:
    """A way in's hand-over that must not be reached: no probe or stranger gets a tunnel."""
    raise AssertionError("no way in may accept a stranger")


class OneSubscription:
    """A responder (veil.cover.site.Responder) answering one path no probe asks for: the
    nginx comparisons run with it in place, as a veil server's site runs with its
    subscriptions, so what it leaves must stay nginx's."""

    def answer(self, req: Request) -> Answer | None:
        if req.uri != b"/s/" + b"A" * 22:
            return None
        return Answer(b"{}", b"application/json")
