"""The admin panel's web application: HTML pages, the JSON API, ``/metrics``.

Requests are authenticated one of two ways:

* a browser session (cookie ``veil_admin``: HttpOnly, SameSite=Strict, Secure over TLS),
  opened by logging in with the admin password; every POST/PUT/PATCH/DELETE made with it
  must carry the session's CSRF token (form field ``csrf_token`` or header
  ``X-CSRF-Token``) and, when the browser sends one, an ``Origin`` of this panel;
* ``Authorization: Bearer <token>`` with the API token (``veil admin token``), for scripts:
  no ambient credential, so no CSRF token either.

``/metrics`` needs neither on a loopback listener (so Prometheus on the same machine can
scrape it), and the token (or a session) otherwise. Nothing secret is ever put in a URL or a
log line: access keys appear only in response bodies, and those are never cached
(``Cache-Control: no-store``).

User changes go through :class:`veil.manage.users.UserManager`, as the CLI's do, on the
backend's thread (``backend.py``); live state (sessions, gate counters) is the status the
server publishes (:class:`veil.server.status.StatusSource`), read on the event loop, where it
lives. The panel needs nothing else of the server, so it can be built around a stand-in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import ipaddress
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from veil import __version__
from veil.admin import auth, chart, pages
from veil.admin.backend import Backend
from veil.admin.listen import check_admin_listen, is_loopback
from veil.admin.metrics import CONTENT_TYPE, certificate_not_after, make_registry, render
from veil.config import parse_expiry, parse_limit
from veil.errors import ConfigError, StoreError, VeilError
from veil.manage.export import check_trojan_on, export_user
from veil.manage.fleet import STALE_AFTER_S, HostSampler
from veil.manage.state import server_ssl_context
from veil.manage.subscription import subscription_urls
from veil.manage.users import UserManager, UserReport
from veil.store.base import HOUR_S, ServerBeat, SessionEnd, Usage, User, period_start

if TYPE_CHECKING:
    from veil.manage.state import ServerState
    from veil.server.status import StatusSource

log = logging.getLogger("veil.admin")

SESSION_COOKIE = "veil_admin"
LOGIN_COOKIE = "veil_admin_login"  # the login form's CSRF token (double submit)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Requests bodies are small forms and JSON objects; aiohttp's default is 1 MiB.
MAX_BODY = 64 * 1024
# Usage history: at most 31 days of hourly buckets in one response or chart.
MAX_USAGE_HOURS = 31 * 24
USER_CHART_HOURS = 7 * 24
DAY_S = 86400
# Lines on the traffic chart: the users with the most traffic in the range.
TRAFFIC_CHART_USERS = 8
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The users list: a page of this many rows (a table a screen or two long); the API's pages
# are at most MAX_PER_PAGE (a response stays well under a megabyte).
USERS_PER_PAGE = 50
MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000
# A search is a substring of names: names are at most 64 characters.
MAX_SEARCH = 64
# At shutdown, requests in flight get this long (as the server's sessions do).
SHUTDOWN_GRACE_S = 2.0

# An error's code -> HTTP status. Store errors keep their codes in the JSON body.
STATUS_BY_CODE = {"not_found": 404, "exists": 409, "already_revoked": 409, "bad_name": 400,
                  "bad_request": 400, "config_error": 400, "unauthorized": 401,
                  "forbidden": 403, "csrf": 403}
DONE_MESSAGES = {"added": "User added: give them the key below (or let them scan the QR code).",
                 "revoked": "User revoked: their connections are being closed.",
                 "rotated": "New key made: the old one no longer works.",
                 "limit": "Limit set.", "expiry": "Expiry set.",
                 "sites": "Site subnets set.", "reach": "Reach set.",
                 "usage_reset": "Usage reset: this period's traffic is forgotten.",
                 "sessions_ended": "Sessions ended: every server closes them within a second "
                                   "(the app may connect again: revoke or rotate to keep it "
                                   "out).",
                 "session_ended": "Session ended: its server closes it within a second."}

DONE_BY_ACTION = {"revoke": "revoked", "rotate": "rotated", "limit": "limit",
                  "expiry": "expiry", "reset-usage": "usage_reset",
                  "end-sessions": "sessions_ended", "sites": "sites", "reach": "reach"}
# The formats a user's page offers as files to download.
DOWNLOADS = {"clash": ("text/yaml", "yaml"), "sing-box": ("application/json", "json")}

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Cache-Control": "no-store",
                    # same-origin, not no-referrer: with no-referrer, browsers send
                    # "Origin: null" on the panel's own form posts.
                    "Referrer-Policy": "same-origin"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HostPort(Protocol):
    """A listen address (``veil.protocol.address.Address``, ``AdminListen``)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class ApiError(Exception):
    """An error answered as ``{"error": code, "message": ...}`` (or an HTML page)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS_BY_CODE.get(code, 400)


class Admin:
    """One panel's state: the server it administers, its store thread, its sessions."""

    def __init__(self, server: StatusSource, *, metrics_open: bool, secure_cookies: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.metrics_open = metrics_open
        self.secure_cookies = secure_cookies
        self.clock = clock
        self.backend = Backend(server.status().state, clock)
        self.sessions = auth.Sessions()
        self.limiter = auth.LoginLimiter()
        self.verifications = asyncio.Semaphore(auth.MAX_CONCURRENT_VERIFICATIONS)
        self.registry = make_registry(server)
        # The Health page's own: its CPU and traffic rates are since the previous view
        # (the first view's since the panel started).
        self.host = HostSampler()
        self.host.sample()

    async def password_tag(self) -> str:
        return auth.password_tag(await self.backend.setting(auth.PASSWORD_SETTING))


ADMIN = web.AppKey("admin", Admin)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: ``kind`` is "session", "token" or None (nobody yet)."""

    kind: str | None
    session: auth.AdminSession | None = None


CALLER = web.RequestKey("caller", Caller)
ANONYMOUS = Caller(None)


def make_admin_app(server: StatusSource, *, metrics_open: bool,
                   secure_cookies: bool = False) -> web.Application:
    """The panel for ``server``. ``metrics_open``: serve ``/metrics`` without credentials
    (only on a loopback listener); ``secure_cookies``: the listener is TLS."""
    app = web.Application(middlewares=[_headers, _errors, _authenticate],
                          client_max_size=MAX_BODY)
    admin = Admin(server, metrics_open=metrics_open, secure_cookies=secure_cookies)
    app[ADMIN] = admin

    async def backend_ctx(_app: web.Application) -> AsyncIterator[None]:
        await admin.backend.open()
        yield
        await admin.backend.close()

    app.cleanup_ctx.append(backend_ctx)
    r = app.router
    r.add_get("/", _root)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/users", users_page)
    r.add_post("/users", users_add_form)
    r.add_get("/users/{name}", user_page)
    for action in DONE_BY_ACTION:
        r.add_post(f"/users/{{name}}/{action}", user_action_form)
    r.add_get("/users/{name}/export/{format}", user_download)
    r.add_get("/sessions", sessions_page)
    r.add_post("/sessions/{id}/end", session_end_form)
    r.add_get("/traffic", traffic_page)
    r.add_get("/health", health_page)
    r.add_get("/metrics", metrics)
    r.add_get("/api/openapi.yaml", api_openapi)
    r.add_get("/api/users", api_users)
    r.add_post("/api/users", api_add_user)
    r.add_get("/api/users/{name}", api_user)
    r.add_delete("/api/users/{name}", api_revoke)
    r.add_post("/api/users/{name}/revoke", api_revoke)
    r.add_post("/api/users/{name}/rotate", api_rotate)
    r.add_put("/api/users/{name}/limit", api_limit)
    r.add_put("/api/users/{name}/expiry", api_expiry)
    r.add_put("/api/users/{name}/sites", api_sites)
    r.add_put("/api/users/{name}/reach", api_reach)
    r.add_get("/api/users/{name}/usage", api_usage)
    r.add_get("/api/users/{name}/exports", api_exports)
    r.add_post("/api/users/{name}/reset-usage", api_reset_usage)
    r.add_post("/api/users/{name}/end-sessions", api_end_sessions)
    r.add_get("/api/sessions", api_sessions)
    r.add_post("/api/sessions/{id}/end", api_end_session)
    r.add_get("/api/health", api_health)
    r.add_get("/api/fleet", api_fleet)
    return app


def admin_ssl_context(state: ServerState) -> ssl.SSLContext:
    """TLS for a non-loopback panel, with the server's own certificate and key."""
    return server_ssl_context(state)


@dataclass
class AdminServer:
    """A running panel: ``address`` is (host, port) as bound."""

    runner: web.AppRunner
    address: tuple[str, int]
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"{'https' if self.tls else 'http'}://{host}:{self.address[1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_admin(server: StatusSource, listen: HostPort, *,
                      tls: ssl.SSLContext | None = None) -> AdminServer:
    """Serve the panel for ``server`` on ``listen``; a non-loopback address needs ``tls``
    (ConfigError otherwise)."""
    check_admin_listen(listen.host, tls is not None)
    app = make_admin_app(server, metrics_open=is_loopback(listen.host),
                         secure_cookies=tls is not None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise VeilError(f"cannot listen on {listen.host}:{listen.port} for the admin panel: "
                        f"{exc.strerror or exc}", code="admin_listen_failed") from exc
    host, port = runner.addresses[0][:2]
    admin = AdminServer(runner, (str(host), int(port)), tls is not None)
    log.info("admin panel on %s", admin.url)
    return admin


# ------------------------------------------------------------------ middlewares
@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _json_error(code: str, message: str, status: int,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status,
                             headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON under /api/, as a page elsewhere; never a traceback to the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(request, exc.code, exc.message, exc.status)
    except ConfigError as exc:  # user input: a limit or a date that does not parse
        return _error_response(request, "config_error", str(exc), 400)
    except StoreError as exc:
        if exc.code in STATUS_BY_CODE:  # not_found, exists, bad_name...: the caller's doing
            return _error_response(request, exc.code, str(exc), STATUS_BY_CODE[exc.code])
        # The store failed: its message may name a database URL, so it stays in the log.
        log.warning("admin: user store error on %s %s: %s", request.method, request.path, exc)
        return _error_response(request, "store_unavailable",
                               "the user store is unavailable; see the server's log", 503)
    except web.HTTPException as exc:
        if not _is_api(request) or exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status, "bad_request")
        return _error_response(request, code, exc.reason, exc.status)


def _error_response(request: web.Request, code: str, message: str, status: int,
                    headers: dict[str, str] | None = None) -> web.Response:
    if _is_api(request) or request.path == "/metrics":
        return _json_error(code, message, status, headers)
    session = request.get(CALLER, ANONYMOUS).session
    csrf = session.csrf if session is not None else None
    return web.Response(text=pages.error_page(status, message, csrf), status=status,
                        content_type="text/html", headers=headers)


# /favicon.ico: browsers fetch it unasked; a redirect to /login would be pointless.
PUBLIC_PATHS = frozenset({"/login", "/metrics", "/favicon.ico"})


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    admin = request.app[ADMIN]
    request[CALLER] = ANONYMOUS
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not await _token_ok(admin, request, token.strip()):
            return _error_response(request, "unauthorized", "bad or unknown API token", 401,
                                   {"WWW-Authenticate": "Bearer"})
        request[CALLER] = Caller("token")
        return await handler(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        session = admin.sessions.get(session_id, admin.clock(), await admin.password_tag())
        if session is not None:
            request[CALLER] = Caller("session", session)
            if request.method in UNSAFE_METHODS:
                await _check_csrf(request, session)
            return await handler(request)
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    if _is_api(request):
        return _json_error("unauthorized", "log in or send Authorization: Bearer <token>",
                           401, {"WWW-Authenticate": "Bearer"})
    return _redirect("/login")


async def _token_ok(admin: Admin, request: web.Request, token: str) -> bool:
    # A right token is let in whatever the address's failures: 256 random bits cannot be
    # guessed, so the limiter is there for wrong ones (and the log lines they make).
    address = request.remote or "?"
    if auth.token_matches(token, await admin.backend.setting(auth.TOKEN_SETTING)):
        return True
    if admin.limiter.retry_after(address, admin.clock()) is not None:
        return False
    admin.limiter.failed(address, admin.clock())
    log.warning("admin: bad API token from %s", address)
    return False


def _origin_ok(request: web.Request) -> bool:
    """A second line behind the CSRF token: what browsers say about where a request comes
    from must be this panel (scripts send neither header)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


async def _check_csrf(request: web.Request, session: auth.AdminSession) -> None:
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.content_type in ("application/x-www-form-urlencoded",
                                                  "multipart/form-data"):
        field = (await request.post()).get(CSRF_FIELD)
        given = field if isinstance(field, str) else None
    if not _origin_ok(request) or not auth.csrf_ok(given, session):
        log.warning("admin: refused a %s %s without a valid CSRF token", request.method,
                    request.path)
        raise ApiError("csrf", "missing or wrong CSRF token (reload the page)", 403)


def _session(request: web.Request) -> auth.AdminSession:
    session = request[CALLER].session
    if session is None:
        # Token-authenticated requests reach only the JSON API and /metrics.
        raise ApiError("forbidden", "this page needs a browser session", 403)
    return session


# ------------------------------------------------------------------ login
def _redirect(location: str) -> web.Response:
    """303 See Other: after a POST, the browser GETs ``location``."""
    return web.Response(status=303, headers={"Location": location})


def _set_cookie(admin: Admin, response: web.StreamResponse, name: str, value: str,
                path: str = "/") -> None:
    response.set_cookie(name, value, path=path, httponly=True, samesite="Strict",
                        secure=admin.secure_cookies)


async def _root(request: web.Request) -> web.StreamResponse:
    return _redirect("/users")


async def login_form(request: web.Request) -> web.StreamResponse:
    if request[CALLER].kind == "session":
        return _redirect("/users")
    return await _login_page(request, None, 200)


async def _login_page(request: web.Request, message: str | None, status: int,
                      headers: dict[str, str] | None = None) -> web.Response:
    admin = request.app[ADMIN]
    # The form's token stays the same while the cookie lives: a second tab, or any
    # request that lands on /login meanwhile, must not invalidate the form on screen.
    token = request.cookies.get(LOGIN_COOKIE, "")
    if len(token) != auth.CSRF_TOKEN_LENGTH:
        token = auth.new_csrf_token()
    configured = await admin.backend.setting(auth.PASSWORD_SETTING) is not None
    response = web.Response(text=pages.login_page(token, message=message, configured=configured),
                            status=status, content_type="text/html", headers=headers)
    _set_cookie(admin, response, LOGIN_COOKIE, token, path="/login")
    return response


async def _too_many(request: web.Request, wait: float) -> web.StreamResponse:
    retry = str(math.ceil(wait))
    return await _login_page(request, f"Too many failed logins: try again in {retry} s.",
                             429, {"Retry-After": retry})


async def login(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    address = request.remote or "?"
    wait = admin.limiter.retry_after(address, admin.clock())
    if wait is not None:
        return await _too_many(request, wait)
    form = await request.post()
    given, expected = form.get(CSRF_FIELD), request.cookies.get(LOGIN_COOKIE)
    if (not isinstance(given, str) or not _origin_ok(request)
            or not auth.tokens_equal(given, expected)):
        return await _login_page(request, "The login form expired: try again.", 403)
    # Counted as a failure before the password is checked (Argon2 takes a while): parallel
    # attempts see each other, so no more than the limit are ever tried.
    wait = admin.limiter.attempt(address, admin.clock())
    if wait is not None:
        return await _too_many(request, wait)
    password = form.get("password")
    stored = await admin.backend.setting(auth.PASSWORD_SETTING)
    ok = False
    if isinstance(password, str) and stored is not None:
        async with admin.verifications:
            ok = await asyncio.to_thread(auth.verify_password, password, stored)
    if not ok:
        log.warning("admin: failed login from %s", address)
        return await _login_page(request, "Wrong password.", 401)
    admin.limiter.succeeded(address)
    session_id, _session = admin.sessions.create(admin.clock(), auth.password_tag(stored))
    log.info("admin: login from %s", address)
    response = _redirect("/users")
    _set_cookie(admin, response, SESSION_COOKIE, session_id)
    response.del_cookie(LOGIN_COOKIE, path="/login")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        admin.sessions.drop(session_id)
    response = _redirect("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# ------------------------------------------------------------------ data, shared by pages
# and API
def user_json(report: UserReport) -> dict[str, Any]:
    """A user as the API shows it (openapi.yaml, schema User)."""
    return {"name": report.name, "status": report.status, "created_at": report.created_at,
            "revoked_at": report.revoked_at, "expires_at": report.expires_at,
            "last_seen": report.last_seen, "limit_bytes": report.limit_bytes,
            "limit_period": report.limit_period, "used_bytes": report.used.total,
            "used_up_bytes": report.used.up, "used_down_bytes": report.used.down,
            "sites": list(report.sites), "reach": list(report.reach)}


def _report(users: UserManager, user: User, used: Usage, now: float) -> UserReport:
    return UserReport(user.name, user.created_at, user.status(now, used.total), used,
                      user.limit_bytes, user.limit_period, user.expires_at, user.last_seen,
                      user.revoked_at, user.sites, user.reach)


def _report_and_key(users: UserManager, name: str, now: float) -> tuple[UserReport, str | None]:
    user = users.get(name)
    report = _report(users, user, users.store.period_usage(user, now), now)
    return report, (users.access_key(user) if user.revoked_at is None else None)


@dataclass(frozen=True, slots=True)
class Listing:
    """A page of the users list: the rows, how many users match, which page of how many."""

    reports: list[UserReport]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(math.ceil(self.total / self.per_page), 1)


def list_users(users: UserManager, now: float, search: str = "", page: int = 1,
               per_page: int | None = None) -> Listing:
    """Users whose name contains ``search`` (any case), oldest first, page ``page`` of
    ``per_page`` (None: all): usage is looked up for that page only."""
    needle = search.lower()
    matched = [u for u in users.store.list_users() if needle in u.name.lower()]
    size = per_page or max(len(matched), 1)
    chunk = matched[(page - 1) * size:page * size]
    by_period = {period: users.store.usage_by_user(period_start(period, now))
                 for period in {u.limit_period for u in chunk}}
    reports = [_report(users, u, by_period[u.limit_period].get(u.name, Usage()), now)
               for u in chunk]
    return Listing(reports, len(matched), page, size)


@dataclass(frozen=True, slots=True)
class UserExports:
    """What a user's page offers: the veil key, the subscription URLs, and the app formats
    when the server takes Trojan (else ``unavailable`` says why)."""

    veil: str
    subscription_urls: tuple[str, ...]
    trojan: str | None = None
    clash: str | None = None
    sing_box: str | None = None
    unavailable: str | None = None
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"veil": self.veil, "subscription_urls": list(self.subscription_urls),
                "trojan": self.trojan, "clash": self.clash, "sing_box": self.sing_box,
                "unavailable": self.unavailable, "warnings": list(self.warnings)}


def user_exports(state: ServerState, user: User) -> UserExports:
    veil = export_user(state, user, "veil").text
    urls = tuple(subscription_urls(state, user))
    try:
        check_trojan_on(state)
        formats = {fmt: export_user(state, user, fmt) for fmt in ("trojan", "clash", "sing-box")}
    except ConfigError as exc:  # Trojan off, or the certificate unreadable
        return UserExports(veil, urls, unavailable=str(exc))
    warnings = tuple(dict.fromkeys(w for e in formats.values() for w in e.warnings))
    return UserExports(veil, urls, formats["trojan"].text, formats["clash"].text,
                       formats["sing-box"].text, warnings=warnings)


def with_format(url: str, fmt: str) -> str:
    """A subscription URL that asks for ``fmt`` whatever the app's User-Agent."""
    base, sep, fragment = url.partition("#")
    return f"{base}?format={fmt}{sep}{fragment}"


def fleet_json(beats: list[ServerBeat], this: str, now: float) -> list[dict[str, Any]]:
    """Every server's last heartbeat (openapi.yaml, schema Server)."""
    servers = []
    for beat in beats:
        try:
            info = json.loads(beat.info)
        except json.JSONDecodeError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        servers.append({**info, "id": beat.id, "seen_at": beat.seen_at, "this": beat.id == this,
                        "responding": now - beat.seen_at <= STALE_AFTER_S})
    return servers


def sessions_json(admin: Admin) -> list[dict[str, Any]]:
    return [{"id": conn.id, "user": conn.user, "way_in": conn.way_in, "peer": conn.peer,
             "started_at": conn.started_at, "bytes_up": conn.bytes_up,
             "bytes_down": conn.bytes_down, "streams": conn.streams}
            for conn in admin.server.status().connections]


def health_json(admin: Admin) -> dict[str, Any]:
    status = admin.server.status()
    state = status.state
    now = admin.clock()
    not_after = certificate_not_after(state.cert_path)
    return {
        "version": __version__,
        "started_at": status.started_at,
        "uptime_seconds": max(now - status.started_at, 0.0),
        "listen": status.listen,
        "public": str(state.public),
        "ways_in": list(status.ways_in),
        "cover": status.cover_url or "built-in",
        "tun": status.tun,
        "certificate": {"not_after": not_after,
                        "days_left": None if not_after is None else (not_after - now) / DAY_S},
        "sessions_active": len(status.connections),
        "store": "postgresql" if state.db else "sqlite",
        "store_refresh_failures": status.store_refresh_failures,
        "server_id": status.server_id,
        "host": dataclasses.asdict(admin.host.sample()),
    }


def _usage_window(hours: int, now: float) -> tuple[int, int, int]:
    """(start, step, buckets) for the last ``hours``: hourly, or daily past a week."""
    if hours > USER_CHART_HOURS:
        end = int(now) - int(now) % DAY_S + DAY_S
        days = math.ceil(hours / 24)
        return end - days * DAY_S, DAY_S, days
    end = int(now) - int(now) % HOUR_S + HOUR_S
    return end - hours * HOUR_S, HOUR_S, hours


def _series(users: UserManager, name: str, since: int) -> list[tuple[int, Usage]]:
    return users.store.usage_series(name, since)


# ------------------------------------------------------------------ pages
def _users_fault(exc: StoreError | ConfigError) -> bool:
    """Whether the error is the admin's to fix (shown on the form), not the store failing
    (answered by the error middleware)."""
    return isinstance(exc, ConfigError) or exc.code in STATUS_BY_CODE


def _flash(request: web.Request) -> str | None:
    return DONE_MESSAGES.get(request.query.get("done", ""))


async def users_page(request: web.Request) -> web.StreamResponse:
    return await _users_page(request, _flash(request), error=False, status=200)


def _search(request: web.Request) -> str:
    search = request.query.get("q", "").strip()
    if len(search) > MAX_SEARCH:
        raise ApiError("bad_request", f"a search is at most {MAX_SEARCH} characters")
    return search


async def _users_page(request: web.Request, flash: str | None, *, error: bool,
                      status: int) -> web.Response:
    admin = request.app[ADMIN]
    search, page = _search(request), _int_query(request, "page", 1, 1, MAX_PAGE)
    now = admin.clock()
    listing = await admin.backend.call(
        lambda u: list_users(u, now, search, page, USERS_PER_PAGE))
    return web.Response(text=pages.users_page(listing, search, _session(request).csrf,
                                              flash=flash, error=error),
                        status=status, content_type="text/html")


async def users_add_form(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    _session(request)
    form = await request.post()
    name = str(form.get("name", "")).strip()
    limit_text = str(form.get("limit", "")).strip()
    expires_text = str(form.get("expires", "")).strip()
    try:
        limit, period = parse_limit(limit_text) if limit_text else (None, "month")
        expires = parse_expiry(expires_text) if expires_text else None
        await admin.backend.call(lambda u: u.add(name, limit_bytes=limit, limit_period=period,
                                                 expires_at=expires))
    except (StoreError, ConfigError) as exc:
        if not _users_fault(exc):
            raise
        return await _users_page(request, str(exc), error=True,
                                 status=STATUS_BY_CODE.get(exc.code, 400))
    log.info("admin: user %s added", name)
    return _redirect(f"/users/{name}?done=added")


async def user_page(request: web.Request) -> web.StreamResponse:
    return await _user_page(request, _flash(request), error=False, status=200)


async def _user_page(request: web.Request, flash: str | None, *, error: bool,
                     status: int) -> web.Response:
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    start, step, count = _usage_window(USER_CHART_HOURS, admin.clock())

    now, state = admin.clock(), admin.server.status().state

    def load(users: UserManager) -> tuple[UserReport, UserExports | None,
                                          list[tuple[int, Usage]]]:
        user = users.get(name)
        report = _report(users, user, users.store.period_usage(user, now), now)
        exports = user_exports(state, user) if user.revoked_at is None else None
        return report, exports, _series(users, name, start)

    report, exports, series = await admin.backend.call(load)
    svg = chart.line_chart(
        [chart.Series("up", chart.bucketize(((t, u.up) for t, u in series), start, step, count)),
         chart.Series("down", chart.bucketize(((t, u.down) for t, u in series), start, step,
                                              count))],
        start=start, step=step, title=f"Traffic of {name}")
    return web.Response(text=pages.user_page(report, exports, svg, _session(request).csrf,
                                             flash=flash, error=error),
                        status=status, content_type="text/html")


async def user_action_form(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    _session(request)
    name = request.match_info["name"]
    action = request.path.rsplit("/", 1)[1]
    form = await request.post()
    try:
        if action == "revoke":
            await admin.backend.call(lambda u: u.revoke(name))
        elif action == "rotate":
            await admin.backend.call(lambda u: u.rotate(name))
        elif action == "limit":
            limit, period = parse_limit(str(form.get("limit", "")).strip() or "none")
            await admin.backend.call(lambda u: u.set_limit(name, limit, period))
        elif action == "reset-usage":
            await _reset_usage(admin, name)
        elif action == "end-sessions":
            await _end_sessions(admin, name)
        elif action in ("sites", "reach"):
            # Space- or comma-separated, as `veil user limit --site/--reach` takes them.
            values = str(form.get(action, "")).replace(",", " ").split()
            if action == "sites":
                await admin.backend.call(lambda u: u.set_sites(name, values))
            else:
                await admin.backend.call(lambda u: u.set_reach(name, values))
        else:
            expires = parse_expiry(str(form.get("expires", "")).strip() or "never")
            await admin.backend.call(lambda u: u.set_expiry(name, expires))
    except (StoreError, ConfigError) as exc:
        if exc.code == "not_found" or not _users_fault(exc):
            raise
        return await _user_page(request, str(exc), error=True,
                                status=STATUS_BY_CODE.get(exc.code, 400))
    log.info("admin: user %s: %s", name, action)
    return _redirect(f"/users/{name}?done={DONE_BY_ACTION[action]}")


async def _reset_usage(admin: Admin, name: str) -> None:
    now = admin.clock()

    def reset(users: UserManager) -> None:
        user = users.get(name)
        users.store.reset_usage(name, period_start(user.limit_period, now))

    await admin.backend.call(reset)


async def _end_sessions(admin: Admin, name: str, session: int = 0) -> None:
    """Every server (the one with ``session`` alone, when given) ends the sessions, within a
    tick of its user directory (veil.server.live)."""
    end = SessionEnd(name, admin.clock(), admin.server.status().server_id if session else "",
                     session)
    await admin.backend.call(lambda u: u.store.end_sessions(end, end.before))


def _this_session(admin: Admin, text: str) -> tuple[str, int]:
    """(user, id) of the live session ``text`` names on this server; ApiError not_found."""
    if text.isdigit():
        for conn in admin.server.status().connections:
            if conn.id == int(text):
                return conn.user, conn.id
    raise ApiError("not_found", f"no live session {text!r} on this server")


async def session_end_form(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    _session(request)
    user, session = _this_session(admin, request.match_info["id"])
    await _end_sessions(admin, user, session)
    log.info("admin: a session of user %s ended", user)
    return _redirect("/sessions?done=session_ended")


async def user_download(request: web.Request) -> web.StreamResponse:
    """A user's Clash Meta or sing-box configuration as a file to import."""
    admin = request.app[ADMIN]
    _session(request)
    name, fmt = request.match_info["name"], request.match_info["format"]
    if fmt not in DOWNLOADS:
        raise ApiError("not_found", f"no export named {fmt!r}")
    state = admin.server.status().state

    def load(users: UserManager) -> str:
        user = users.get(name)
        if user.revoked_at is not None:
            raise ApiError("not_found", f"user {name!r} is revoked")
        return export_user(state, user, fmt).text + "\n"

    text = await admin.backend.call(load)
    content_type, suffix = DOWNLOADS[fmt]
    return web.Response(text=text, content_type=content_type, headers={
        "Content-Disposition": f'attachment; filename="{name}-{fmt}.{suffix}"'})


async def sessions_page(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    return web.Response(text=pages.sessions_page(sessions_json(admin), _session(request).csrf,
                                                 admin.clock(), flash=_flash(request)),
                        content_type="text/html")


async def traffic_page(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    hours = _int_query(request, "hours", 24, 1, MAX_USAGE_HOURS)
    start, step, count = _usage_window(hours, admin.clock())

    def load(users: UserManager) -> tuple[dict[str, Usage], dict[str, list[tuple[int, Usage]]]]:
        totals = users.store.usage_by_user(start)
        top = sorted(totals, key=lambda n: totals[n].total, reverse=True)[:TRAFFIC_CHART_USERS]
        return totals, {name: _series(users, name, start) for name in top}

    totals, series = await admin.backend.call(load)
    lines = [chart.Series(name, chart.bucketize(((t, u.total) for t, u in points), start, step,
                                                count))
             for name, points in series.items()]
    svg = chart.line_chart(lines, start=start, step=step, title="Traffic per user")
    rows = sorted(((n, u.up, u.down) for n, u in totals.items()), key=lambda r: -(r[1] + r[2]))
    return web.Response(text=pages.traffic_page(svg, rows, hours, _session(request).csrf),
                        content_type="text/html")


async def health_page(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    h = health_json(admin)
    cert = h["certificate"]
    rows = [("Version", f"veil {h['version']}"),
            ("Up for", pages.duration(h["uptime_seconds"])),
            ("Started", pages.when(h["started_at"])),
            ("Listening on", h["listen"]), ("Public address", h["public"]),
            ("Ways in", ", ".join(h["ways_in"])), ("Cover site", h["cover"]),
            ("Full-device tunnels (--tun)", "on" if h["tun"] else "off"),
            ("Certificate expires", "unreadable" if cert["not_after"] is None else
             f"{pages.when(cert['not_after'])} (in {cert['days_left']:.0f} days)"),
            ("Live sessions", str(h["sessions_active"])), ("User store", h["store"]),
            ("Store read failures", str(h["store_refresh_failures"])),
            *pages.host_rows(h["host"])]
    blocked = admin.server.status().blocked_ways
    fleet = await _fleet(admin)
    return web.Response(text=pages.health_page(rows, _session(request).csrf, blocked, fleet),
                        content_type="text/html")


async def _fleet(admin: Admin) -> list[dict[str, Any]]:
    beats = await admin.backend.call(lambda u: u.store.servers())
    return fleet_json(beats, admin.server.status().server_id, admin.clock())


def _int_query(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise ApiError("bad_request", f"{key} must be an integer from {low} to {high}")
    return int(text)


# ------------------------------------------------------------------ metrics
async def metrics(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    if request[CALLER].kind is None:
        if not admin.metrics_open:
            return _json_error("unauthorized", "send Authorization: Bearer <token>", 401,
                               {"WWW-Authenticate": "Bearer"})
        # Open on loopback, for a local Prometheus: but a page from elsewhere whose name was
        # rebound to 127.0.0.1 (DNS rebinding) asks with its own name as Host.
        if not _loopback_host(request.host):
            return _json_error("misdirected", "ask for this address by a loopback name", 421)
    return web.Response(body=render(admin.registry), headers={"Content-Type": CONTENT_TYPE})


def _loopback_host(host: str) -> bool:
    """Host header names this machine: localhost or a loopback literal, any port."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ JSON API
async def api_openapi(request: web.Request) -> web.StreamResponse:
    text = importlib.resources.files("veil.admin").joinpath("openapi.yaml").read_text()
    return web.Response(text=text, content_type="application/yaml")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError("bad_request", f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    return body


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ApiError("bad_request", f"{key} has the wrong type")
    return value


def _limit_from(body: dict[str, Any]) -> tuple[int | None, Any]:
    limit = _optional(body, "limit_bytes", int)
    period = body.get("limit_period", "month")
    if limit is not None and limit < 0:
        raise ApiError("bad_request", "limit_bytes must be >= 0")
    if period not in ("month", "total"):
        raise ApiError("bad_request", "limit_period must be month or total")
    return limit, period


async def api_users(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    search, page = _search(request), _int_query(request, "page", 1, 1, MAX_PAGE)
    per_page = (_int_query(request, "per_page", 1, 1, MAX_PER_PAGE)
                if "per_page" in request.query else None)
    now = admin.clock()
    listing = await admin.backend.call(lambda u: list_users(u, now, search, page, per_page))
    return web.json_response({"users": [user_json(r) for r in listing.reports],
                              "total": listing.total, "page": listing.page,
                              "per_page": listing.per_page})


async def api_add_user(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError("bad_request", "name (a string) is required")
    limit, period = _limit_from(body)
    expires = _optional(body, "expires_at", (int, float))

    def add(users: UserManager) -> tuple[UserReport, str | None]:
        users.add(name, limit_bytes=limit, limit_period=period, expires_at=expires)
        return _report_and_key(users, name, now)

    now = admin.clock()
    report, key = await admin.backend.call(add)
    log.info("admin: user %s added (API)", name)
    return web.json_response({"user": user_json(report), "access_key": key}, status=201)


async def api_user(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    now = admin.clock()
    report, key = await admin.backend.call(lambda u: _report_and_key(u, name, now))
    return web.json_response({"user": user_json(report), "access_key": key})


async def _change(request: web.Request, action: str,
                  change: Callable[[UserManager], object]) -> web.Response:
    admin = request.app[ADMIN]
    name = request.match_info["name"]

    def run(users: UserManager) -> tuple[UserReport, str | None]:
        change(users)
        return _report_and_key(users, name, now)

    now = admin.clock()
    report, key = await admin.backend.call(run)
    log.info("admin: user %s: %s (API)", name, action)
    body: dict[str, Any] = {"user": user_json(report)}
    if action == "rotate":
        body["access_key"] = key
    return web.json_response(body)


async def api_revoke(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    return await _change(request, "revoke", lambda u: u.revoke(name))


async def api_rotate(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    return await _change(request, "rotate", lambda u: u.rotate(name))


async def api_limit(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    limit, period = _limit_from(await _json_body(request))
    return await _change(request, "limit", lambda u: u.set_limit(name, limit, period))


async def api_expiry(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    body = await _json_body(request)
    if "expires_at" not in body:
        raise ApiError("bad_request", "expires_at (a unix time or null) is required")
    expires = _optional(body, "expires_at", (int, float))
    return await _change(request, "expiry", lambda u: u.set_expiry(name, expires))


def _string_list(body: dict[str, Any], field: str) -> list[str]:
    value = body.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError("bad_request", f"{field} (a list of strings) is required")
    return value


async def api_sites(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    sites = _string_list(await _json_body(request), "sites")
    return await _change(request, "sites", lambda u: u.set_sites(name, sites))


async def api_reach(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    reach = _string_list(await _json_body(request), "reach")
    return await _change(request, "reach", lambda u: u.set_reach(name, reach))


async def api_usage(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    hours = _int_query(request, "hours", USER_CHART_HOURS, 1, MAX_USAGE_HOURS)
    now = admin.clock()
    since = int(now) - int(now) % HOUR_S + HOUR_S - hours * HOUR_S

    def load(users: UserManager) -> list[tuple[int, Usage]]:
        users.get(name)
        return _series(users, name, since)

    series = await admin.backend.call(load)
    return web.json_response({
        "name": name, "since": since, "step_seconds": HOUR_S,
        "buckets": [{"start": t, "up_bytes": u.up, "down_bytes": u.down} for t, u in series]})


async def api_exports(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    name, state = request.match_info["name"], admin.server.status().state

    def load(users: UserManager) -> UserExports:
        user = users.get(name)
        if user.revoked_at is not None:
            raise ApiError("not_found", f"user {name!r} is revoked: it has no credentials")
        return user_exports(state, user)

    exports = await admin.backend.call(load)
    return web.json_response({"name": name, **exports.to_json()})


async def api_reset_usage(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    await _reset_usage(admin, name)
    return await _change(request, "reset usage", lambda _u: None)


async def api_end_sessions(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    name = request.match_info["name"]
    await _end_sessions(admin, name)
    return await _change(request, "end sessions", lambda _u: None)


async def api_end_session(request: web.Request) -> web.StreamResponse:
    admin = request.app[ADMIN]
    user, session = _this_session(admin, request.match_info["id"])
    await _end_sessions(admin, user, session)
    log.info("admin: a session of user %s ended (API)", user)
    return web.json_response({"ended": session, "user": user})


async def api_fleet(request: web.Request) -> web.StreamResponse:
    return web.json_response({"servers": await _fleet(request.app[ADMIN])})


async def api_sessions(request: web.Request) -> web.StreamResponse:
    return web.json_response({"sessions": sessions_json(request.app[ADMIN])})


async def api_health(request: web.Request) -> web.StreamResponse:
    return web.json_response(health_json(request.app[ADMIN]))
