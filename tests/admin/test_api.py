"""The admin panel against a real in-process VeilServer: login, sessions, CSRF, rate limit,
API token, the JSON API validated against openapi.yaml, and the listener's TLS rule."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.admin.conftest import PASSWORD, Client, Harness, bearer
from tests.admin.openapi import Spec
from tests.support import procs
from tests.support.procs import VEIL
from tests.support.wait import wait_until
from veil.admin import auth
from veil.admin.app import admin_ssl_context, start_admin
from veil.admin.auth import LOGIN_MAX_FAILURES, LOGIN_WINDOW_S
from veil.admin.listen import AdminListen, check_admin_listen
from veil.errors import ConfigError


def cookie_attrs(set_cookie: list[str], name: str) -> set[str]:
    """The attributes of cookie ``name`` in Set-Cookie headers, lowercased."""
    for raw in set_cookie:
        if raw.startswith(f"{name}="):
            return {part.strip().lower() for part in raw.split(";")[1:]}
    raise AssertionError(f"no Set-Cookie for {name}: {set_cookie}")


# ------------------------------------------------------------------ login and sessions
@pytest.mark.smoke
def test_login_opens_a_strict_httponly_session(harness: Harness) -> None:
    client = harness.client()
    assert "httponly" in cookie_attrs(client.get("/login").set_cookies(), "veil_admin_login")
    reply = client.login()
    assert reply.status == 303 and reply.headers["Location"] == "/users"
    attrs = cookie_attrs(reply.set_cookies(), "veil_admin")
    assert {"httponly", "samesite=strict", "path=/"} <= attrs
    assert "secure" not in attrs  # plain HTTP on loopback: a Secure cookie would be dropped
    assert client.get("/users").status == 200


def test_a_wrong_password_opens_no_session(harness: Harness) -> None:
    client = harness.client()
    reply = client.login("not the password")
    assert reply.status == 401
    assert "Wrong password" in reply.text
    assert "veil_admin" not in client.cookies
    assert client.get("/users").status == 303


def test_login_needs_the_forms_csrf_token(harness: Harness) -> None:
    client = harness.client()
    client.login_form()
    reply = client.request("POST", "/login", form={"password": PASSWORD})
    assert reply.status == 403
    reply = client.request("POST", "/login", form={"csrf_token": "forged", "password": PASSWORD})
    assert reply.status == 403
    assert "veil_admin" not in client.cookies


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords that reached Argon2, in order."""
    seen: list[str] = []
    real_verify = auth.verify_password

    def counting_verify(password: str, encoded: str) -> bool:
        seen.append(password)
        return real_verify(password, encoded)

    monkeypatch.setattr(auth, "verify_password", counting_verify)
    return seen


def test_login_is_rate_limited_per_address(harness: Harness, verified: list[str]) -> None:
    admin = harness.another_admin()  # its own limiter
    client = harness.client(admin)
    for _ in range(LOGIN_MAX_FAILURES):
        assert client.login("guess").status == 401
    verified.clear()
    for password in ("guess", PASSWORD):  # locked out: even the right password waits
        reply = client.login(password)
        assert reply.status == 429
        assert 0 < int(reply.headers["Retry-After"]) <= LOGIN_WINDOW_S
    assert verified == []  # no Argon2 work for a locked-out address
    assert "veil_admin" not in client.cookies
    # Another address is not locked out.
    assert Client(admin.address[1], source="127.0.0.2").login().status == 303


def test_parallel_wrong_passwords_are_not_all_tried(harness: Harness,
                                                    verified: list[str]) -> None:
    admin = harness.another_admin()  # its own limiter
    attempts = 3 * LOGIN_MAX_FAILURES
    clients = [harness.client(admin) for _ in range(attempts)]
    forms = [client.login_form() for client in clients]
    statuses: list[int] = []

    def attempt(client: Client, token: str) -> None:
        reply = client.request("POST", "/login", form={"csrf_token": token, "password": "x"})
        statuses.append(reply.status)

    threads = [threading.Thread(target=attempt, args=pair)
               for pair in zip(clients, forms, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(statuses) == attempts
    assert len(verified) <= LOGIN_MAX_FAILURES, len(verified)
    assert statuses.count(429) >= attempts - LOGIN_MAX_FAILURES


def test_a_right_token_works_from_a_locked_out_address(harness: Harness) -> None:
    admin = harness.another_admin()
    client = harness.client(admin)
    for _ in range(LOGIN_MAX_FAILURES):
        assert client.get("/api/health", headers=bearer("veil_admin_guess")).status == 401
    assert client.get("/api/health", headers=bearer(harness.token)).status == 200


def test_logout_ends_the_session(harness: Harness, logged_in: Client) -> None:
    stale = harness.client()
    stale.cookies = dict(logged_in.cookies)
    reply = logged_in.request("POST", "/logout", form={"csrf_token": logged_in.csrf()})
    assert reply.status == 303 and reply.headers["Location"] == "/login"
    assert "veil_admin" not in logged_in.cookies
    assert stale.get("/users").status == 303  # the server forgot it, not just the browser


def test_without_a_session_pages_redirect_and_the_api_answers_401(harness: Harness) -> None:
    client = harness.client()
    reply = client.get("/users")
    assert reply.status == 303 and reply.headers["Location"] == "/login"
    client.cookies["veil_admin"] = "made-up-session-id"
    assert client.get("/sessions").status == 303
    for method, path in (("GET", "/api/users"), ("POST", "/api/users"),
                         ("DELETE", "/api/users/alice")):
        reply = client.request(method, path)
        assert reply.status == 401
        assert reply.json()["error"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"] == "Bearer"


def test_changes_with_the_cookie_need_the_csrf_token(harness: Harness,
                                                     logged_in: Client) -> None:
    csrf = logged_in.csrf()
    reply = logged_in.request("POST", "/api/users", json_body={"name": "csrf-victim"})
    assert reply.status == 403 and reply.json()["error"] == "csrf"
    reply = logged_in.request("POST", "/users", form={"name": "csrf-victim"})
    assert reply.status == 403
    reply = logged_in.request("POST", "/users/alice/revoke", form={"csrf_token": "forged"})
    assert reply.status == 403
    # The right token but a foreign Origin: a cross-site form.
    reply = logged_in.request("POST", "/users", form={"name": "csrf-victim", "csrf_token": csrf},
                              headers={"Origin": "https://evil.example"})
    assert reply.status == 403
    reply = logged_in.request("POST", "/users", form={"name": "csrf-victim", "csrf_token": csrf},
                              headers={"Sec-Fetch-Site": "cross-site"})
    assert reply.status == 403
    # The panel's newer actions are held to the same rule (forms, and the API with the cookie).
    for path in ("/users/alice/reset-usage", "/users/alice/end-sessions", "/sessions/1/end",
                 "/api/users/alice/reset-usage", "/api/users/alice/end-sessions",
                 "/api/sessions/1/end"):
        assert logged_in.request("POST", path, form={"csrf_token": "forged"}).status == 403, path
    assert logged_in.request("POST", "/users/alice/end-sessions", form={"csrf_token": csrf},
                             headers={"Origin": "https://evil.example"}).status == 403
    names = [u["name"] for u in logged_in.get("/api/users").json()["users"]]
    assert "csrf-victim" not in names
    assert harness.server.users.get("alice").revoked_at is None
    # With the token, from the panel's own origin, it works.
    reply = logged_in.request("POST", "/api/users", json_body={"name": "csrf-ok"},
                              headers={"X-CSRF-Token": csrf, "Origin": logged_in.origin})
    assert reply.status == 201
    reply = logged_in.request("POST", "/users", form={"name": "csrf-ok-form", "csrf_token": csrf})
    assert reply.status == 303 and reply.headers["Location"] == "/users/csrf-ok-form?done=added"


def test_the_user_forms_change_users_and_show_errors(harness: Harness,
                                                      logged_in: Client) -> None:
    csrf = logged_in.csrf()
    form = {"csrf_token": csrf}
    reply = logged_in.request("POST", "/users", form={**form, "name": "frank",
                                                      "limit": "2GB/total"})
    assert reply.status == 303
    key = logged_in.get("/api/users/frank").json()["access_key"]
    assert logged_in.request("POST", "/users/frank/rotate", form=form).status == 303
    page = logged_in.get("/users/frank?done=rotated")
    assert "the old one no longer works" in page.text and "<svg" in page.text
    assert key not in page.text
    assert logged_in.request("POST", "/users/frank/limit",
                             form={**form, "limit": "10GB/month"}).status == 303
    assert logged_in.request("POST", "/users/frank/expiry",
                             form={**form, "expires": "2030-01-31"}).status == 303
    # Site-to-site: frank becomes a site, and the seed's alice may reach it.
    assert logged_in.request("POST", "/users/frank/sites",
                             form={**form, "sites": "192.168.10.0/24, fd10::/64"}).status == 303
    assert logged_in.request("POST", "/users/alice/reach",
                             form={**form, "reach": "frank"}).status == 303
    assert "192.168.10.0/24 fd10::/64" in logged_in.get("/users/frank?done=sites").text
    reply = logged_in.request("POST", "/users/alice/sites",
                              form={**form, "sites": "192.168.0.0/16"})
    assert reply.status == 400 and "overlaps 192.168.10.0/24 of site" in reply.text
    assert logged_in.get("/api/users/alice").json()["user"]["reach"] == ["frank"]
    user = logged_in.get("/api/users/frank").json()["user"]
    assert (user["limit_bytes"], user["limit_period"]) == (10 * 10**9, "month")
    assert user["expires_at"] == 1896134400  # the end of 2030-01-31, UTC
    # Shown as given, on the user's page and in the list, as `veil user list` shows it.
    for page_text in (logged_in.get("/users/frank").text, logged_in.get("/users").text):
        assert "2030-01-31" in page_text and "2030-02-01" not in page_text
    reply = logged_in.request("POST", "/users/frank/limit", form={**form, "limit": "lots"})
    assert reply.status == 400 and "bad limit" in reply.text
    reply = logged_in.request("POST", "/users", form={**form, "name": "frank"})
    assert reply.status == 409 and "frank" in reply.text
    reply = logged_in.request("POST", "/users", form={**form, "name": "<b>x</b>"})
    assert reply.status == 400 and "<b>x</b>" not in reply.text
    assert logged_in.request("POST", "/users/nobody/revoke", form=form).status == 404
    assert logged_in.get("/users/nobody").status == 404


def test_every_page_renders(logged_in: Client) -> None:
    for path, marker in (("/users", 'id="users"'), ("/users/alice", 'id="access-key"'),
                         ("/sessions", 'id="sessions"'), ("/traffic", "<svg"),
                         ("/traffic?hours=168", "<svg"), ("/traffic?hours=720", "<svg"),
                         ("/health", "Certificate expires")):
        reply = logged_in.get(path)
        assert reply.status == 200, path
        assert reply.headers.get_content_type() == "text/html"
        assert marker in reply.text, path
        assert "<script" not in reply.text and "http://" not in reply.text.replace(
            'xmlns="http://www.w3.org/2000/svg"', "")  # no script, no external asset
    assert logged_in.get("/traffic?hours=0").status == 400
    assert logged_in.get("/").headers["Location"] == "/users"


def test_the_api_token_authenticates_scripts(harness: Harness) -> None:
    client = harness.client()
    reply = client.request("POST", "/api/users", json_body={"name": "scripted"},
                           headers=bearer(harness.token))
    assert reply.status == 201  # no CSRF token: a bearer token is no ambient credential
    assert reply.json()["access_key"].startswith("veil://")
    reply = client.get("/api/users", headers=bearer(harness.token + "x"))
    assert reply.status == 401 and reply.json()["error"] == "unauthorized"
    # A token reaches the API, not the pages.
    assert client.get("/users", headers=bearer(harness.token)).status == 403


def test_responses_forbid_caching_framing_and_foreign_content(logged_in: Client) -> None:
    for path in ("/users/alice", "/api/users/alice", "/login"):
        headers = logged_in.get(path).headers
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Referrer-Policy"] == "same-origin"


# ------------------------------------------------------------------ the API vs openapi.yaml
@pytest.mark.smoke
def test_every_api_operation_matches_the_openapi_document(harness: Harness) -> None:
    spec = Spec()
    c = harness.client()
    auth = bearer(harness.token)

    def call(method: str, template: str, path: str | None = None, **kw: object) -> object:
        kw.setdefault("headers", auth)
        reply = c.request(method, path or template, **kw)  # type: ignore[arg-type]
        return spec.check(template, method, reply)

    users = call("GET", "/api/users")
    assert "alice" in [u["name"] for u in users["users"]]  # type: ignore[index]
    added = call("POST", "/api/users", json_body={"name": "bob", "limit_bytes": 10**9,
                                                  "limit_period": "total"})
    assert added["user"]["limit_bytes"] == 10**9  # type: ignore[index]
    assert added["access_key"].startswith("veil://")  # type: ignore[index]
    assert call("POST", "/api/users", json_body={"name": "bob"}
                )["error"] == "exists"  # type: ignore[index]
    assert call("POST", "/api/users", json_body={"name": "no spaces"}
                )["error"] == "bad_name"  # type: ignore[index]
    assert call("POST", "/api/users", body=b"{not json",
                headers={"Content-Type": "application/json", **auth}
                )["error"] == "bad_request"  # type: ignore[index]
    got = call("GET", "/api/users/{name}", "/api/users/bob")
    assert got["access_key"] == added["access_key"]  # type: ignore[index]
    assert call("GET", "/api/users/{name}", "/api/users/nobody"
                )["error"] == "not_found"  # type: ignore[index]
    limited = call("PUT", "/api/users/{name}/limit", "/api/users/bob/limit",
                   json_body={"limit_bytes": 5 * 10**9, "limit_period": "month"})
    assert limited["user"]["limit_bytes"] == 5 * 10**9  # type: ignore[index]
    call("PUT", "/api/users/{name}/limit", "/api/users/bob/limit",
         json_body={"limit_bytes": -1})
    expiring = call("PUT", "/api/users/{name}/expiry", "/api/users/bob/expiry",
                    json_body={"expires_at": 4102444800})
    assert expiring["user"]["expires_at"] == 4102444800  # type: ignore[index]
    call("PUT", "/api/users/{name}/expiry", "/api/users/bob/expiry", json_body={})
    # Site-to-site (docs/site-to-site.md): a site's subnets, and what a user may reach.
    sited = call("PUT", "/api/users/{name}/sites", "/api/users/bob/sites",
                 json_body={"sites": ["192.168.77.0/24"]})
    assert sited["user"]["sites"] == ["192.168.77.0/24"]  # type: ignore[index]
    assert call("PUT", "/api/users/{name}/sites", "/api/users/alice/sites",
                json_body={"sites": ["192.168.0.0/16"]}
                )["error"] == "config_error"  # type: ignore[index]
    call("PUT", "/api/users/{name}/sites", "/api/users/bob/sites", json_body={})
    reaching = call("PUT", "/api/users/{name}/reach", "/api/users/alice/reach",
                    json_body={"reach": ["bob"]})
    assert reaching["user"]["reach"] == ["bob"]  # type: ignore[index]
    call("PUT", "/api/users/{name}/reach", "/api/users/alice/reach", json_body={"reach": 1})
    rotated = call("POST", "/api/users/{name}/rotate", "/api/users/bob/rotate")
    assert rotated["access_key"] != added["access_key"]  # type: ignore[index]
    usage = call("GET", "/api/users/{name}/usage", "/api/users/bob/usage?hours=24")
    assert usage["buckets"] == []  # type: ignore[index]
    call("GET", "/api/users/{name}/usage", "/api/users/bob/usage?hours=0")
    call("GET", "/api/users/{name}/usage", "/api/users/nobody/usage")
    revoked = call("DELETE", "/api/users/{name}", "/api/users/bob")
    assert revoked["user"]["status"] == "revoked"  # type: ignore[index]
    assert call("GET", "/api/users/{name}", "/api/users/bob"
                )["access_key"] is None  # type: ignore[index]
    assert call("POST", "/api/users/{name}/revoke", "/api/users/bob/revoke"
                )["error"] == "already_revoked"  # type: ignore[index]
    call("POST", "/api/users", json_body={"name": "carol"})
    call("POST", "/api/users/{name}/revoke", "/api/users/carol/revoke")
    call("DELETE", "/api/users/{name}", "/api/users/nobody")
    call("POST", "/api/users/{name}/rotate", "/api/users/nobody/rotate")
    # Search and pages (tests/admin/test_operations.py: 2,500 users).
    paged = call("GET", "/api/users", "/api/users?q=O&page=1&per_page=1")
    assert paged["total"] >= 2 and len(paged["users"]) == 1  # type: ignore[index]
    call("GET", "/api/users", "/api/users?page=x")
    exports = call("GET", "/api/users/{name}/exports", "/api/users/alice/exports")
    assert exports["veil"].startswith("veil://")  # type: ignore[index]
    call("GET", "/api/users/{name}/exports", "/api/users/nobody/exports")
    reset = call("POST", "/api/users/{name}/reset-usage", "/api/users/alice/reset-usage")
    assert reset["user"]["used_bytes"] == 0  # type: ignore[index]
    call("POST", "/api/users/{name}/end-sessions", "/api/users/alice/end-sessions")
    call("POST", "/api/sessions/{id}/end", "/api/sessions/12345/end")
    fleet = call("GET", "/api/fleet")
    assert [s["this"] for s in fleet["servers"]] == [True]  # type: ignore[index]
    assert call("GET", "/api/sessions")["sessions"] == []  # type: ignore[index]
    health = call("GET", "/api/health")
    assert health["ways_in"] == ["veil"]  # type: ignore[index]  # Trojan: off by default
    # Each install draws its certificate's lifetime (30 days to two years): the panel reports
    # what the certificate on disk says.
    cert = x509.load_pem_x509_certificate(harness.state.cert_path.read_bytes())
    expected = (cert.not_valid_after_utc.timestamp() - time.time()) / 86400
    assert abs(health["certificate"]["days_left"] - expected) < 1  # type: ignore[index]
    # Without credentials, every operation answers the documented 401.
    c_anon = harness.client()
    for path, method in spec.operations():
        concrete = path.replace("{name}", "alice").replace("{id}", "1")
        spec.check(path, method, c_anon.request(method.upper(), concrete))

    exercised = {(p, m) for p, m, status in spec.seen if status.startswith("2")}
    assert exercised | NEEDS_A_SESSION == spec.operations(), spec.operations() - exercised


# Operations whose success needs a live tunnel session: test_operations.py's
# test_end_this_session_on_the_sessions_page_and_in_the_api checks them against the document.
NEEDS_A_SESSION = {("/api/sessions/{id}/end", "post")}


def test_every_api_route_is_documented(harness: Harness) -> None:
    spec = Spec()
    routes = {(r.resource.canonical, r.method.lower())
              for r in harness.admin.runner.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/")
              and r.method != "HEAD" and r.resource.canonical != "/api/openapi.yaml"}
    assert routes == spec.operations()


def test_the_openapi_document_is_served(logged_in: Client) -> None:
    reply = logged_in.get("/api/openapi.yaml")
    assert reply.status == 200
    assert reply.text.startswith("openapi: 3.1")


# ------------------------------------------------------------------ listener and TLS
def test_a_public_address_without_tls_is_refused(harness: Harness) -> None:
    for host in ("0.0.0.0", "192.0.2.7", "::", "admin.example.org"):
        with pytest.raises(ConfigError, match="without TLS"):
            harness.run(start_admin(harness.server, AdminListen(host, 0)))
    check_admin_listen("192.0.2.7", tls=True)  # with TLS it is allowed
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_admin_listen(host, tls=False)


def test_over_tls_the_cookies_are_secure(harness: Harness) -> None:
    admin = harness.another_admin(tls=admin_ssl_context(harness.state))
    assert admin.url.startswith("https://")
    client = harness.client(admin)
    reply = client.login()
    assert reply.status == 303
    assert {"secure", "httponly", "samesite=strict"} <= cookie_attrs(reply.set_cookies(),
                                                                     "veil_admin")
    assert client.get("/health").status == 200


# ------------------------------------------------------------------ secrets
def test_no_secret_in_logs_or_urls(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = harness.client()
    locations = []
    reply = client.login()
    locations.append(reply.headers["Location"])
    csrf = client.csrf()
    reply = client.request("POST", "/users", form={"name": "dave", "csrf_token": csrf})
    locations.append(reply.headers["Location"])
    key = client.get("/api/users/dave").json()["access_key"]
    reply = client.request("POST", "/users/dave/rotate", form={"csrf_token": csrf})
    locations.append(reply.headers["Location"])
    new_key = client.get("/api/users/dave").json()["access_key"]
    harness.client().get("/api/users", headers=bearer(harness.token))
    harness.client().get("/api/users", headers=bearer("veil_admin_wrong"))
    # The server thread logs the last request's record last: once it is in, all are.
    wait_until(lambda: any("bad API token" in r.getMessage() for r in caplog.records), 5,
               "the server thread's last log record")
    secrets = [PASSWORD, harness.token, key, new_key, client.cookies["veil_admin"], csrf,
               key.split("://", 1)[1].split("@", 1)[0]]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "admin: login from" in logged and "user dave added" in logged
    for secret in secrets:
        assert secret not in logged
        for location in locations:
            assert secret not in location
    assert all(re.fullmatch(r"/users(/dave\?done=\w+)?", loc) for loc in locations), locations


# ------------------------------------------------------------------ veil admin
def veil_admin(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEIL, "admin", *args], input=stdin, capture_output=True, text=True,
                          timeout=30)


def status_becomes(h: Harness, token: str, status: int, timeout: float = 10.0) -> None:
    """Poll /api/health with ``token`` until it answers ``status`` (the settings cache)."""
    def answer() -> int:
        return h.client().get("/api/health", headers=bearer(token)).status

    wait_until(lambda: answer() == status, timeout, lambda: f"{status}, still {answer()}")


def test_veil_admin_passwd_and_token_change_a_running_panel(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        state = str(h.state.directory)
        client = h.client()
        assert client.login().status == 303
        short = veil_admin("passwd", "--state", state, "--password-stdin", stdin="short\n")
        assert short.returncode == 2 and "too short" in short.stderr
        new_password = "a new and longer password"
        done = veil_admin("passwd", "--state", state, "--password-stdin",
                          stdin=new_password + "\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and new_password not in done.stderr
        # The session opened under the old password ends (the panel rereads within 1 s).
        wait_until(lambda: client.get("/users").status != 200, 5,
                   "the old session to end after a password change", poll=0.1)
        assert h.client().login(PASSWORD).status == 401
        assert h.client().login(new_password).status == 303

        made = veil_admin("token", "--state", state)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert token.startswith("veil_admin_") and token not in made.stderr
        # The panel rereads its settings within a second: wait for the change, not a second.
        status_becomes(h, token, 200)
        assert h.client().get("/api/health", headers=bearer(h.token)).status == 401
        assert veil_admin("token", "--state", state, "--revoke").returncode == 0
        status_becomes(h, token, 401)
    finally:
        h.close()


@pytest.mark.slow
def test_veil_serve_admin_serves_the_panel_next_to_the_server(tmp_path: Path) -> None:
    server = procs.start_veil_server(tmp_path, "--admin", "127.0.0.1:0")
    try:
        admin_port = procs.bound_port(server.log, "admin panel on", server.proc)
        client = Client(admin_port)
        assert client.get("/login").status == 200
        assert client.get("/api/health").status == 401
        assert b"veil_build_info" in client.get("/metrics").body
    finally:
        assert procs.stop(server.proc) == 0
    log = server.log.read_text()
    assert f"admin panel on http://127.0.0.1:{admin_port}" in log
    refused = subprocess.run([*VEIL, "serve", "--self-signed",
                              "--state", str(tmp_path / "state"), "--listen",
                              "127.0.0.1:0", "--admin", "0.0.0.0:8080"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "without TLS" in refused.stderr
