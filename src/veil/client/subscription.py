"""Following a subscription: ``veil connect https://HOST/s/TOKEN#pin=...``.

The client fetches the subscription (veil.manage.subscription, ``?format=veil``), connects
with the key in it, keeps the last good answer in a cache file, and fetches again every
``refresh_s`` (jittered) on each of the subscription's URLs in turn (the one given first,
then the others the answer lists: the direct port and each CDN way, so a blocked way in
does not stop the refresh). When the key changed (a way in added or moved, a rotated
credential) it starts a tunnel with the new key and retires the old one; streams open on the
old one end with it. If no fetch works at start, the cached answer is used.

Trusting the answer: it holds the user's secret and says where to connect, so it is taken
only from the server itself. ``#pin=`` (every URL ``veil user show --subscription`` prints;
after the first answer, the key's pin) names the server's key: a server that presents it
in TLS is veil's (its own ports: a self-signed certificate); any other certificate must
verify by the web PKI (the system's bundle, or SSL_CERT_FILE's: a CDN's), and the answer
must then be signed by the pinned key (veil.protocol.subscription), so a CDN cannot hand
out another server's key. A URL without a pin, fetched first, is trusted by the web PKI
alone. The fetch uses veil's browser-shaped TLS (Chrome's ClientHello, as the
CDN carrier) and a browser's User-Agent.

Rule data (``veil connect --rules cn``; docs/routing.md "Rule data"): the answer lists the
server's China data (``rules``: provenance, each file's SHA-256 and size), trusted as the key
is: fetched from a server presenting the pinned key, or signed by it (``signature.rules``).
An answer trusted by the web PKI alone gives no rule data. When the listed data is newer than
the client's (packaged, or cached from an earlier fetch), :class:`RuleDataFollower` fetches
the files from the same URL, the same way, checks them against the list and what they hold,
keeps them beside the subscription's cache and hands them to whoever rebuilds the rules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from veil.client import ruledata
from veil.client.ruledata import RuleData
from veil.config import SubscriptionOptions
from veil.errors import AuthError, ConfigError, TransportError, VeilError
from veil.net.client_session import ClientTunnel
from veil.net.dialer import DatagramHandler, Dialer, IPAddress, UdpFlow
from veil.protocol.accesskey import AccessKey, pin_of_der
from veil.protocol.address import Address
from veil.protocol.subscription import check_signature, signed_part, signed_rules_part
from veil.protocol.uri import b64url_decode
from veil.transport.browser_tls import open_browser_tls_connection
from veil.transport.cdn.client import CHROME_HTTP1, verify_certificate

log = logging.getLogger("veil.client")

#: Largest answer read: a key with eight ways in and its URLs is a few KB; this bounds what
#: a server (or whoever answers for it) can make the client hold.
MAX_SUBSCRIPTION_BYTES = 256 * 1024
#: A fetch (connect, TLS, request, answer) that takes longer has failed: the next URL is
#: tried (a blocked way in must not hold the refresh up for long).
FETCH_TIMEOUT_S = 15.0
#: Between fetches when the answer names no interval (the server's REFRESH_HOURS).
DEFAULT_REFRESH_S = 6 * 3600.0
#: Each wait is drawn from +-this share of the interval, so a server's users do not all
#: come back at one moment (and a censor sees no fixed period).
REFRESH_JITTER = 0.2
#: After a refresh in which no URL answered, try again this much sooner (a way that was
#: blocked may be back), bounded below by the interval's floor.
RETRY_SHARE = 0.1
#: Largest rule data file fetched: the packaged gzip lists are 472 KB (domains) and 48 KB
#: (networks); 4 MiB leaves room for years of growth and bounds what a server (or whoever
#: answers for it) can make the client download and hold.
MAX_RULE_DATA_FILE_BYTES = 4 * 1024 * 1024
#: A rule data file not fetched within this has failed (the data in use is kept, the next
#: refresh tries again): 0.5 MB at 20 KB/s, a badly throttled way in, takes 25 s.
RULE_DATA_FETCH_TIMEOUT_S = 60.0
#: The preset whose data the answer lists (veil.manage.rules.client_manifest).
RULE_DATA_PRESET = "cn"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_USER_AGENT = (b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
               b"Chrome/156.0.0.0 Safari/537.36")


@dataclass(frozen=True, slots=True)
class SubscriptionUrl:
    """Where to fetch: ``https://HOST[:PORT]/PATH[#pin=PIN[&sni=NAME]]``."""

    url: str  # without the fragment
    host: str
    port: int
    target: str  # path and query, as requested
    pin: bytes | None
    sni: str | None

    @classmethod
    def parse(cls, text: str) -> SubscriptionUrl:
        parts = urlsplit(text.strip())
        if parts.scheme.lower() != "https" or not parts.hostname:
            raise ConfigError(f"a subscription URL is https://HOST/..., not {text!r}")
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise ConfigError(f"bad port in subscription URL {text!r}") from exc
        fragment = parse_qs(parts.fragment)
        pin = None
        if "pin" in fragment:
            try:
                pin = b64url_decode(fragment["pin"][0])
            except ValueError as exc:
                raise ConfigError(f"bad #pin= in subscription URL: {exc}") from exc
            if len(pin) != 32:
                raise ConfigError("bad #pin= in subscription URL: not a SHA-256")
        sni = fragment.get("sni", [None])[0]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # an IP literal goes into no SNI (open_browser_tls_connection), as from a browser
        return cls(text.strip().partition("#")[0], parts.hostname, port, target, pin,
                   sni or parts.hostname)

    @property
    def authority(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == 443 else f"{host}:{self.port}").encode("idna")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription's answer as this client reads it (fields it does not know are kept
    in ``document`` and ignored)."""

    version: int
    key: AccessKey
    urls: tuple[str, ...]
    refresh_s: float | None
    document: dict[str, object]

    @classmethod
    def parse(cls, body: bytes, *, signed_by: bytes | None = None) -> Subscription:
        """Read an answer; ``signed_by``: the pin whose key must have signed it (AuthError
        otherwise)."""
        try:
            doc = json.loads(body)
            version = doc["version"]
            if not isinstance(version, int) or version < 1:
                raise ValueError(f"version {version!r}")
            key = AccessKey.parse(doc["key"])
            urls = tuple(str(u) for u in doc.get("subscription_urls") or [])
            refresh = doc.get("refresh_s")
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise TransportError(f"not a veil subscription: {exc}") from exc
        if signed_by is not None:
            signature = doc.get("signature")
            try:
                spki = b64url_decode(signature["spki"])
                value = b64url_decode(signature["value"])
            except (TypeError, KeyError, ValueError) as exc:
                raise AuthError("the subscription came through a CDN and is not signed by "
                                "the server's key: not taken", code="unsigned") from exc
            check_signature(spki, signed_by, signed_part(doc), value)
        return cls(version, key, urls,
                   float(refresh) if isinstance(refresh, int | float) and refresh > 0 else None,
                   doc)


class _Answer(asyncio.Protocol):
    """One HTTP/1.1 exchange over the TLS transport: the body of a 200, or an error."""

    def __init__(self, limit: int = MAX_SUBSCRIPTION_BYTES) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
        self.limit = limit
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._status = 0
        self._body = bytearray()

    def data_received(self, data: bytes) -> None:
        try:
            self.h11.receive_data(bytes(data))
            self._pump()
        except h11.RemoteProtocolError as exc:
            self._fail(TransportError(f"the answer is not HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        try:
            self.h11.receive_data(b"")
            self._pump()
        except h11.RemoteProtocolError as exc:
            self._fail(TransportError(f"the answer ended early: {exc}"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(TransportError(f"the connection ended before the answer: {exc}"))

    def _pump(self) -> None:
        while not self.done.done():
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                self._status = event.status_code
                if self._status != 200:
                    self._fail(TransportError(
                        f"answered {self._status}" + (": wrong URL, or the user was revoked"
                                                      if self._status == 404 else "")))
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self.limit:
                    self._fail(TransportError(f"the answer is larger than {self.limit} bytes"))
            elif isinstance(event, h11.EndOfMessage):
                self.done.set_result(bytes(self._body))

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: nobody may wait for it any more


async def fetch(url: SubscriptionUrl, *, timeout: float = FETCH_TIMEOUT_S,
                ca_file: str | None = None,
                pin: bytes | None = None) -> tuple[Subscription, bytes]:
    """Fetch and read one subscription URL: the answer read, and its bytes (for the cache).

    Trust: ``pin`` (else the URL's ``#pin=``) is the server's key. A server that presents it
    in TLS is veil's; any other TLS certificate must verify by the web PKI (a CDN's), and
    then, with a pin known, the answer must be signed by the pinned key. Raises
    TransportError when it cannot fetch, AuthError/TransportError when trust fails."""
    sub, body, _ = await _fetch(url, timeout=timeout, ca_file=ca_file, pin=pin)
    return sub, body


async def _fetch(url: SubscriptionUrl, *, timeout: float, ca_file: str | None,
                 pin: bytes | None) -> tuple[Subscription, bytes, bool]:
    """:func:`fetch`, and whether the server presented the pinned key."""
    pin = pin or url.pin
    target = url.target + ("&" if "?" in url.target else "?") + "format=veil"
    body, pinned = await _get(url, target, pin=pin, ca_file=ca_file, timeout=timeout,
                              limit=MAX_SUBSCRIPTION_BYTES, accept=b"application/json")
    return Subscription.parse(body, signed_by=None if pinned else pin), body, pinned


async def _get(url: SubscriptionUrl, target: str, *, pin: bytes | None, ca_file: str | None,
               timeout: float, limit: int, accept: bytes = b"*/*") -> tuple[bytes, bool]:
    """The body of a 200 to GET ``target`` on ``url``'s server, at most ``limit`` bytes, and
    whether the server presented ``pin`` (else its certificate verified by the web PKI)."""
    answer = _Answer(limit)
    try:
        async with asyncio.timeout(timeout):
            transport = await open_browser_tls_connection(
                url.host, url.port, lambda: answer, server_hostname=url.sni,
                handshake_timeout=timeout, spec=CHROME_HTTP1)
            try:
                tls = transport.get_extra_info("tls_client")
                der = transport.get_extra_info("peer_certificate_der")
                pinned = pin is not None and bool(der) and pin_of_der(der) == pin
                if not pinned:
                    # the secret must not reach an interceptor: the web PKI or nothing
                    verify_certificate(tls.peer_certificate_chain_der, url.host, ca_file)
                request = h11.Request(method="GET", target=target.encode(), headers=[
                    (b"Host", url.authority), (b"User-Agent", _USER_AGENT),
                    (b"Accept", accept), (b"Connection", b"close")])
                transport.write((answer.h11.send(request) or b"")
                                + (answer.h11.send(h11.EndOfMessage()) or b""))
                body = await answer.done
            finally:
                transport.close()
    except TimeoutError as exc:
        raise TransportError(f"no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise TransportError(str(exc)) from exc
    return body, pinned


def rule_data_manifest(document: dict[str, object], *, pinned: bool,
                       pin: bytes | None) -> dict[str, Any] | None:
    """The ``cn`` rule data an answer lists, if it is trusted as the key is: ``pinned`` (the
    server presented the pinned key) or signed by ``pin`` (``signature.rules``). None when
    the answer lists none (an older server); AuthError when it is not trusted, TransportError
    when it is malformed."""
    rules = document.get("rules")
    if rules is None:
        return None
    if not pinned:
        if pin is None:
            raise AuthError("the answer was trusted by the web PKI alone: its rule data is "
                            "not taken", code="unsigned")
        signature = document.get("signature")
        try:
            assert isinstance(signature, dict)
            spki = b64url_decode(signature["spki"])
            value = b64url_decode(signature["rules"])
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise AuthError("the rule data came through a CDN and is not signed by the "
                            "server's key: not taken", code="unsigned") from exc
        check_signature(spki, pin, signed_rules_part(document), value)
    try:
        assert isinstance(rules, dict)
        manifest = rules[RULE_DATA_PRESET]
        for kind in ruledata.KINDS:
            for name in ruledata.INFO_FIELDS:
                assert isinstance(manifest["data"][kind][name], str)
        for name in ruledata.KINDS.values():
            listed = manifest["files"][name]
            assert _SHA256_HEX.match(listed["sha256"]), "sha256"
            assert isinstance(listed["bytes"], int) and listed["bytes"] >= 0, "bytes"
    except (AssertionError, KeyError, TypeError) as exc:
        raise TransportError(f"the answer's rule data list is malformed ({exc!r})") from exc
    checked: dict[str, Any] = manifest
    return checked


def _write_atomically(path: Path, body: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` whole: a reader (or the next start, after a kill or a power cut)
    sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RuleDataCache:
    """Rule data received through a subscription, in a directory beside its cache: each file
    under its SHA-256 (``HEX.gz``), then ``manifest.json`` naming them, written last. A kill
    at any point leaves the last complete set readable (the files it names are removed only
    after a new manifest replaced it)."""

    MANIFEST = "manifest.json"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self) -> RuleData | None:
        """The cached set, checked; None when there is none or it is damaged (logged)."""
        manifest_path = self.directory / self.MANIFEST
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_bytes()[:MAX_SUBSCRIPTION_BYTES])
            blobs = []
            for name in ruledata.KINDS.values():
                digest = manifest["files"][name]
                blob = (self.directory / f"{digest}.gz").read_bytes()[
                    :MAX_RULE_DATA_FILE_BYTES + 1]
                if sha256(blob).hexdigest() != digest:
                    raise ValueError(f"{name} does not match its SHA-256")
                blobs.append(blob)
            data = RuleData(blobs[0], blobs[1], manifest["provenance"],
                            origin=str(manifest["origin"]))
            data.check()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("rule data: the cached copy in %s is not usable (%s); ignored",
                        self.directory, exc)
            return None
        return data

    def save(self, data: RuleData) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = data.file_hashes()
        for name, body in zip(ruledata.KINDS.values(), (data.domains_gz, data.networks_gz),
                              strict=True):
            blob = self.directory / f"{files[name]}.gz"
            if not blob.exists():
                _write_atomically(blob, body)
        manifest = {"version": 1, "origin": data.origin, "provenance": data.provenance,
                    "files": files}
        _write_atomically(self.directory / self.MANIFEST,
                          json.dumps(manifest, indent=2).encode() + b"\n")
        keep = {f"{digest}.gz" for digest in files.values()} | {self.MANIFEST}
        for stale in self.directory.iterdir():
            if stale.name not in keep and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)


#: Called with new rule data once it is in use; awaited before the refresh goes on.
RuleDataListener = Callable[[RuleData], Awaitable[None]]


class RuleDataFollower:
    """The ``cn`` preset's data as a subscription follower has it: the newest of the
    packaged data, the cached copy and what the server lists (:meth:`update`)."""

    def __init__(self, cache: RuleDataCache, *,
                 timeout: float = RULE_DATA_FETCH_TIMEOUT_S) -> None:
        self.cache = cache
        self.timeout = timeout
        self.listeners: list[RuleDataListener] = []
        self.updates = 0  # sets taken from the server and swapped in (tests)
        self._current: RuleData | None = None

    @property
    def current(self) -> RuleData:
        """The data in use: the cached copy when it is newer than the packaged data (read
        at the first call: a start without the server uses it)."""
        if self._current is None:
            packaged = ruledata.packaged()
            cached = self.cache.load()
            self._current = (cached if cached is not None and cached.is_newer_than(packaged)
                             else packaged)
        return self._current

    async def update(self, url: SubscriptionUrl, manifest: dict[str, Any], *,
                     pin: bytes | None, ca_file: str | None) -> bool:
        """Take the data ``manifest`` lists from ``url``'s server if it is newer than the
        current; True when taken. A failure is logged and keeps the current data."""
        current = self.current
        offered = (manifest["data"]["domains"]["data_date"],
                   manifest["data"]["networks"]["data_date"])
        if not ruledata.is_newer(offered, current.dates()):
            return False
        try:
            bodies = [await self._fetch_file(url, name, manifest["files"][name], pin=pin,
                                             ca_file=ca_file)
                      for name in ruledata.KINDS.values()]
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            data = RuleData(bodies[0], bodies[1], dict(manifest["data"]),
                            origin=f"from the subscription ({url.host}), fetched {when}")
            # ~0.3 s of CPU for the real lists: off the event loop
            await asyncio.to_thread(data.check)
        except (VeilError, ValueError) as exc:
            log.warning("rule data: the data of %s offered by %s is not taken: %s; keeping "
                        "the data %s", "/".join(offered), url.host, exc, current.origin)
            return False
        try:
            self.cache.save(data)
        except OSError as exc:
            log.warning("rule data: cannot cache it in %s: %s", self.cache.directory, exc)
        self._current = data
        log.warning("rule data: now %s (domains of %s, networks of %s)", data.origin, *offered)
        for listener in self.listeners:
            await listener(data)
        self.updates += 1  # counted once in force: the listeners swapped it in
        return True

    async def _fetch_file(self, url: SubscriptionUrl, name: str, listed: dict[str, Any], *,
                          pin: bytes | None, ca_file: str | None) -> bytes:
        size = listed["bytes"]
        if size > MAX_RULE_DATA_FILE_BYTES:
            raise TransportError(f"{name} is listed at {size} bytes, more than "
                                 f"{MAX_RULE_DATA_FILE_BYTES}")
        base = url.target.partition("?")[0].rstrip("/")
        # the same URL, the same trust as the answer; the listed SHA-256 decides
        body, _ = await _get(url, f"{base}/rules/{name}", pin=pin, ca_file=ca_file,
                             timeout=self.timeout, limit=size)
        if len(body) != size or sha256(body).hexdigest() != listed["sha256"]:
            raise TransportError(f"{name}: {len(body)} bytes that do not match the listed "
                                 "SHA-256 (truncated or changed on the way)")
        return body


def default_cache_path(url: str) -> Path:
    """``$XDG_CACHE_HOME/veil/subscription-HASH.json`` (HASH of the URL, not the URL: the
    file name must not hold the token)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    name = sha256(url.partition("#")[0].encode()).hexdigest()[:16]
    return Path(base) / "veil" / f"subscription-{name}.json"


def rule_data_cache_path(cache_path: Path) -> Path:
    """Where the rule data received with the subscription cached in ``cache_path`` is kept:
    ``subscription-HASH.rules/`` beside it."""
    return cache_path.with_suffix(".rules")


def save_cache(path: Path, body: bytes) -> None:
    """Write the answer (it holds the user's secret: 0600, replaced whole)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".subscription-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: Path) -> Subscription | None:
    try:
        return Subscription.parse(path.read_bytes()[:MAX_SUBSCRIPTION_BYTES])
    except (OSError, TransportError):
        return None


class Follower:
    """Fetches a subscription from its URLs, caches each good answer, and says what the
    key is now. ``ca_file``: trust these CAs for URLs without a pin (tests)."""

    def __init__(self, options: SubscriptionOptions, *, ca_file: str | None = None,
                 fetch_timeout: float = FETCH_TIMEOUT_S, rule_data: bool = False,
                 rule_data_timeout: float = RULE_DATA_FETCH_TIMEOUT_S) -> None:
        self.options = options
        self.first = SubscriptionUrl.parse(options.url)
        self.cache_path = options.cache or default_cache_path(options.url)
        self.ca_file = ca_file
        self.fetch_timeout = fetch_timeout
        self.current: Subscription | None = None
        self.fetches = 0  # answers fetched (tests)
        #: With ``rule_data`` (``--rules cn``): the preset's data, updated at each refresh.
        self.rule_data = (RuleDataFollower(RuleDataCache(rule_data_cache_path(self.cache_path)),
                                           timeout=rule_data_timeout) if rule_data else None)

    @property
    def pin(self) -> bytes | None:
        """The server's key as this client knows it: the URL's ``#pin=``, else the key's."""
        if self.first.pin is not None:
            return self.first.pin
        return self.current.key.pin if self.current is not None else None

    def urls(self) -> list[str]:
        """The URL given, then the others the last answer named."""
        seen = [self.options.url]
        for url in self.current.urls if self.current is not None else ():
            if url.partition("#")[0] not in (u.partition("#")[0] for u in seen):
                seen.append(url)
        return seen

    async def refresh(self) -> Subscription | None:
        """Fetch from the first URL that answers; None when none did (reasons logged). With
        rule data followed, the data the answer lists is taken too when it is newer."""
        pin = self.pin  # known before this answer: what trusts it
        for text in self.urls():
            try:
                url = SubscriptionUrl.parse(text)
                sub, body, pinned = await _fetch(url, timeout=self.fetch_timeout,
                                                 ca_file=self.ca_file, pin=pin)
            except (VeilError, ConfigError) as exc:
                log.info("subscription: %s: %s", urlsplit(text).hostname, exc)
                continue
            self.fetches += 1
            self.current = sub
            try:
                save_cache(self.cache_path, body)
            except OSError as exc:
                log.warning("subscription: cannot cache it in %s: %s", self.cache_path, exc)
            if self.rule_data is not None:
                await self._update_rule_data(url, sub, pinned=pinned, pin=pin or url.pin)
            return sub
        return None

    async def _update_rule_data(self, url: SubscriptionUrl, sub: Subscription, *,
                                pinned: bool, pin: bytes | None) -> None:
        assert self.rule_data is not None
        try:
            manifest = rule_data_manifest(sub.document, pinned=pinned, pin=pin)
        except VeilError as exc:
            log.warning("rule data: %s: %s; keeping the data %s", url.host, exc,
                        self.rule_data.current.origin)
            return
        if manifest is None:
            log.info("rule data: %s lists none (an older veil); keeping the data %s",
                     url.host, self.rule_data.current.origin)
            return
        await self.rule_data.update(url, manifest, pin=pin, ca_file=self.ca_file)

    async def start(self) -> Subscription:
        """The first answer: fetched, else the cached one; VeilError when neither exists."""
        sub = await self.refresh()
        if sub is not None:
            return sub
        cached = load_cache(self.cache_path)
        if cached is None:
            raise VeilError("cannot fetch the subscription and nothing is cached: "
                            f"{self.options.url.partition('#')[0].rsplit('/', 1)[0]}/...")
        log.warning("subscription: no URL answered; using the copy cached in %s",
                    self.cache_path)
        self.current = cached
        return cached

    def next_wait(self, *, failed: bool) -> float:
        interval = (self.options.refresh_s
                    or (self.current.refresh_s if self.current else None) or DEFAULT_REFRESH_S)
        if failed:
            interval = max(interval * RETRY_SHARE, min(interval, 60.0))
        return interval * random.uniform(1 - REFRESH_JITTER, 1 + REFRESH_JITTER)


class FollowingTunnel(Dialer):
    """A :class:`Dialer` over the tunnel of the subscription's current key: new streams go
    to the newest tunnel; a tunnel whose key is gone is closed."""

    def __init__(self, follower: Follower,
                 make_tunnel: Callable[[AccessKey], ClientTunnel]) -> None:
        assert follower.current is not None, "Follower.start() first"
        self.follower = follower
        self._make = make_tunnel
        self.tunnel = make_tunnel(follower.current.key)
        self._task: asyncio.Task[None] | None = None
        self.key_changes = 0

    @property
    def last_error(self) -> str | None:
        return self.tunnel.last_error

    def start(self) -> None:
        self.tunnel.start()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.tunnel.close()

    async def _follow(self) -> None:
        failed = False
        while True:
            await asyncio.sleep(self.follower.next_wait(failed=failed))
            old_key = self.tunnel.key
            sub = await self.follower.refresh()
            failed = sub is None
            if sub is None:
                log.warning("subscription: no URL answered; keeping the current key")
                continue
            if sub.key.to_uri() == old_key.to_uri():
                continue
            log.warning("subscription: the key changed (ways in: %s); reconnecting",
                        ", ".join(str(way) for way in sub.key.ways()))
            old, self.tunnel = self.tunnel, self._make(sub.key)
            self.key_changes += 1
            self.tunnel.start()
            await old.close()

    # Dialer
    async def wait_ready(self, timeout: float) -> bool:
        return await self.tunnel.wait_ready(timeout)

    async def resolve(self, name: str, timeout: float) -> tuple[IPAddress, ...] | None:
        return await self.tunnel.resolve(name, timeout)

    def open_tcp(self, dest: Address, local: asyncio.Transport, early_data: bytes = b"") -> None:
        self.tunnel.open_tcp(dest, local, early_data)

    def open_udp(self, on_datagram: DatagramHandler, on_close: Callable[[], None]) -> UdpFlow:
        return self.tunnel.open_udp(on_datagram, on_close)
