"""The subscriptions on the server's own port: the built-in site's
:class:`~veil.cover.site.Responder` for ``/s/TOKEN`` and ``/SECRET/s/TOKEN``.

It answers from the live user directory (veil.server.live, refreshed every half second), so
a request never waits for the store, and a revoked or rotated user's old URL is the cover's
404 within one refresh. What it answers and how tokens are made: veil.manage.subscription.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.cover.site import Answer, Request
from veil.errors import ConfigError
from veil.manage import rules
from veil.manage.export import ServerCertificate
from veil.manage.state import ServerState
from veil.manage.subscription import (
    choose_format,
    path_prefixes,
    render,
    rule_file_of_path,
    token_of_path,
    user_token,
)
from veil.protocol.subscription import SigningKey
from veil.server.live import Live, UserDirectory
from veil.store.base import Usage, User

log = logging.getLogger("veil.server")


class SubscriptionResponder:
    """Answers subscription requests of active (and expired or over-limit: they still learn
    why) users; everything else, revoked users included, is left to the site."""

    def __init__(self, state: Callable[[], ServerState], live: Live, *,
                 routing: bool = False) -> None:
        """``routing``: the server runs with ``--routing`` (the exports name the rule files),
        so they are built now (~0.2 s), not in the event loop at the first request."""
        self._state = state
        self._live = live
        first = state()
        self._key = first.subscription_key()
        try:
            self._cert: ServerCertificate | None = ServerCertificate.load(first)
        except ConfigError as exc:
            log.warning("subscriptions give veil keys only: %s", exc)
            self._cert = None
        self._signer: SigningKey | None = None
        try:
            key = serialization.load_pem_private_key(first.key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("subscriptions go unsigned (cannot read %s: %s): clients take them "
                        "from the server's own port only, not through a CDN",
                        first.key_path, exc)
        else:
            if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                self._signer = key
            else:
                log.warning("subscriptions go unsigned (only EC and RSA keys sign): clients "
                            "take them from the server's own port only, not through a CDN")
        self._seen: UserDirectory | None = None
        self._by_token: dict[bytes, str] = {}
        # key id -> token: an HMAC once per user and credential, not per snapshot
        self._tokens: dict[bytes, bytes] = {}
        self.served = 0  # answers given (tests, status)
        self.rule_files_served = 0  # rule files given (tests, status)
        # the data every veil answer lists: a bad VEIL_RULEDATA_DIR stops the start (a
        # ConfigError) instead of failing each subscription request
        rules.served_data()
        if routing:
            rules.rule_files()

    def _rebuild(self, directory: UserDirectory) -> None:
        tokens = {user.key_id: self._tokens.get(user.key_id) or user_token(self._key, user).encode()
                  for user in directory.by_name.values()}
        self._tokens = tokens
        self._by_token = {tokens[user.key_id]: name for name, user in directory.by_name.items()}
        self._seen = directory

    def _lookup(self, token: bytes) -> tuple[User, Usage] | None:
        directory = self._live.directory
        name = self._by_token.get(token)
        if name is None and directory is not self._seen:
            # A token the last map did not have may be a user added since: the map is
            # rebuilt at most once per snapshot, and only on a miss (a hit needs no O(users)
            # work, so a user's fetch costs a dictionary lookup).
            self._rebuild(directory)
            name = self._by_token.get(token)
        if name is None:
            return None
        user = directory.by_name.get(name)
        # Gone, rotated since the map was made (its token is another now), or revoked: 404.
        if (user is None or self._tokens.get(user.key_id) != token
                or directory.refused.get(name) == "revoked"):
            return None
        return user, directory.period_parts.get(name, Usage())

    def answer(self, req: Request) -> Answer | None:
        state = self._state()
        prefixes = tuple(p.encode() for p in path_prefixes(state))
        token = token_of_path(req.uri, prefixes)
        if token is None:
            return self._rule_file(req, prefixes)
        found = self._lookup(token)
        if found is None:
            return None
        user, used = found
        fmt = choose_format(req.args, req.headers.get(b"user-agent"), trojan=bool(state.trojan))
        if fmt is None:
            return None
        rendered = render(state, user, used, fmt, self._cert, self._signer)
        if rendered is None:
            return None
        self.served += 1
        return Answer(rendered.body, rendered.content_type, rendered.headers)

    def _rule_file(self, req: Request, prefixes: tuple[bytes, ...]) -> Answer | None:
        """A rule file under a valid token's path (veil.manage.rules), else None (the
        site's 404). Built on first use when ``--routing`` is off: a one-time ~0.2 s."""
        asked = rule_file_of_path(req.uri, prefixes)
        if asked is None or self._lookup(asked[0]) is None:
            return None
        served, etag = rules.rule_files()[asked[1]]
        self.rule_files_served += 1
        return Answer(served.body, served.content_type,
                      ((b"ETag", etag), (b"Cache-Control", b"no-cache")))
