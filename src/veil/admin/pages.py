"""The panel's HTML: small server-rendered pages with inline CSS, no script and no external
asset. Every value from outside is escaped here; every form that changes something carries
the session's CSRF token."""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence

import segno

from veil.manage.users import UserReport, format_bytes
from veil.server.status import WayBlockStatus

# QR codes: medium error correction, as `veil user show` prints them; 4 px modules fit a
# veil key (~120 characters) in under 300 px.
QR_ERROR = "m"
QR_SCALE = 4

NAV = (("users", "/users", "Users"), ("sessions", "/sessions", "Live sessions"),
       ("traffic", "/traffic", "Traffic"), ("health", "/health", "Health"))

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;
 align-items:center}
header a{color:#ddd;text-decoration:none}header a.on{color:#fff;font-weight:600}
header form{margin-left:auto}main{padding:1em 1.5em;max-width:1000px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e4e4e4}
th{background:#f0f0f0}td.num,th.num{text-align:right}
.flash{background:#e8f4ff;border:1px solid #9cc9f5;padding:.5em .8em;margin:.5em 0}
.error{background:#ffecec;border-color:#f5a3a3}
.status-active{color:#07690f}.status-revoked,.status-expired,.status-over_limit{color:#a40e26}
form.inline{display:inline}input[type=text],input[type=password]{padding:.3em}
button{padding:.3em .8em;cursor:pointer}button.danger{color:#a40e26}
.key{word-break:break-all;font-family:monospace;background:#fff;border:1px solid #ddd;
 padding:.5em;display:block}
dl{display:grid;grid-template-columns:max-content auto;gap:.3em 1.2em}dt{font-weight:600}
.card{background:#fff;border:1px solid #e4e4e4;padding:.8em 1em;margin:1em 0}
svg.chart{display:block;max-width:100%;height:auto;margin-top:.5em}
"""


def when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _e(value: object) -> str:
    return html.escape(str(value))


def _csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf_token" value="{_e(csrf)}">'


def _button_form(action: str, label: str, csrf: str, *, danger: bool = False,
                 name: str = "") -> str:
    cls = ' class="danger"' if danger else ""
    test_id = f' data-action="{_e(name)}"' if name else ""
    return (f'<form class="inline" method="post" action="{_e(action)}">{_csrf_field(csrf)}'
            f"<button{cls}{test_id}>{_e(label)}</button></form>")


def layout(title: str, body: str, *, csrf: str | None, active: str = "",
           flash: str | None = None, error: bool = False) -> str:
    nav = ""
    if csrf is not None:
        links = "".join(f'<a href="{href}"{" class=on" if key == active else ""}>{label}</a>'
                        for key, href, label in NAV)
        nav = (f"<strong>veil admin</strong>{links}"
               f'<form method="post" action="/logout">{_csrf_field(csrf)}'
               f"<button>Log out</button></form>")
    else:
        nav = "<strong>veil admin</strong>"
    message = ""
    if flash:
        message = f'<p class="flash{" error" if error else ""}" role="status">{_e(flash)}</p>'
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)} - veil admin</title><style>{CSS}</style></head>"
            f"<body><header>{nav}</header><main><h1>{_e(title)}</h1>{message}{body}"
            f"</main></body></html>")


# ------------------------------------------------------------------ login
def login_page(csrf: str, *, message: str | None = None, configured: bool = True) -> str:
    if not configured:
        message = ("No admin password is set. On the server, run "
                   "`veil admin passwd --state DIR`, then log in.")
    body = (f'<form method="post" action="/login" class="card">{_csrf_field(csrf)}'
            f'<label>Password <input type="password" name="password" autofocus '
            f'autocomplete="current-password" required></label> '
            f"<button>Log in</button></form>")
    return layout("Log in", body, csrf=None, flash=message, error=message is not None)


# ------------------------------------------------------------------ users
def _limit(report: UserReport) -> str:
    if report.limit_bytes is None:
        return "unlimited"
    per = "month" if report.limit_period == "month" else "total"
    return f"{format_bytes(report.limit_bytes)}/{per}"


def users_page(reports: Sequence[UserReport], csrf: str, *, flash: str | None = None,
               error: bool = False) -> str:
    rows = []
    for r in reports:
        rows.append(
            f'<tr data-user="{_e(r.name)}"><td><a href="/users/{_e(r.name)}">{_e(r.name)}</a>'
            f'</td><td class="status-{_e(r.status)}">{_e(r.status)}</td>'
            f'<td class="num">{_e(format_bytes(r.used.total))}</td><td>{_e(_limit(r))}</td>'
            f"<td>{_e(when(r.expires_at))}</td><td>{_e(when(r.last_seen))}</td>"
            f"<td>{_e(when(r.created_at))}</td></tr>")
    table = ('<table id="users"><thead><tr><th>Name</th><th>Status</th>'
             '<th class="num">Used this period</th><th>Limit</th><th>Expires</th>'
             "<th>Last seen</th><th>Created</th></tr></thead><tbody>"
             + ("".join(rows) or '<tr><td colspan="7">No users yet.</td></tr>')
             + "</tbody></table>")
    form = (f'<form method="post" action="/users" class="card" id="add-user">'
            f"{_csrf_field(csrf)}<strong>Add a user</strong> "
            f'<label>Name <input type="text" name="name" required maxlength="64" '
            f'pattern="[A-Za-z0-9][A-Za-z0-9._@\\-]*"></label> '
            f'<label>Limit <input type="text" name="limit" placeholder="50GB/month"></label> '
            f'<label>Expires <input type="text" name="expires" placeholder="YYYY-MM-DD">'
            f"</label> <button>Add</button></form>")
    return layout("Users", form + table, csrf=csrf, active="users", flash=flash, error=error)


def qr_svg(text: str) -> str:
    """The QR code of ``text`` as an inline ``<svg>`` element."""
    return str(segno.make(text, error=QR_ERROR).svg_inline(scale=QR_SCALE, title="QR code"))


def user_page(report: UserReport, access_key: str | None, chart: str, csrf: str, *,
              flash: str | None = None, error: bool = False) -> str:
    base = f"/users/{report.name}"
    facts = (f"<dl><dt>Status</dt><dd class=\"status-{_e(report.status)}\">"
             f"{_e(report.status)}</dd>"
             f"<dt>Used this period</dt><dd>{_e(format_bytes(report.used.total))} "
             f"(up {_e(format_bytes(report.used.up))}, down "
             f"{_e(format_bytes(report.used.down))})</dd>"
             f"<dt>Limit</dt><dd>{_e(_limit(report))}</dd>"
             f"<dt>Expires</dt><dd>{_e(when(report.expires_at))}</dd>"
             f"<dt>Last seen</dt><dd>{_e(when(report.last_seen))}</dd>"
             f"<dt>Created</dt><dd>{_e(when(report.created_at))}</dd>"
             f"<dt>Revoked</dt><dd>{_e(when(report.revoked_at))}</dd></dl>")
    if access_key is not None:
        key = (f'<div class="card" id="access-key"><strong>Access key</strong> (anyone who '
               f"has it can use this server as {_e(report.name)})"
               f'<code class="key">{_e(access_key)}</code>'
               f'<div class="qr">{qr_svg(access_key)}</div></div>')
    else:
        key = '<p class="card">This user is revoked: its key no longer works.</p>'
    actions = ""
    if report.revoked_at is None:
        actions = (
            f'<div class="card"><strong>Change</strong><p>'
            f'<form class="inline" method="post" action="{_e(base)}/limit">'
            f"{_csrf_field(csrf)}<label>Limit <input type=\"text\" name=\"limit\" "
            f'value="{_e(_limit(report))}"></label> <button>Set limit</button></form> '
            f'<form class="inline" method="post" action="{_e(base)}/expiry">'
            f"{_csrf_field(csrf)}<label>Expires <input type=\"text\" name=\"expires\" "
            f'placeholder="YYYY-MM-DD or never"></label> <button>Set expiry</button></form>'
            f"</p><p>"
            + _button_form(f"{base}/rotate", "Rotate key (the old one stops working)", csrf,
                           name="rotate")
            + " "
            + _button_form(f"{base}/revoke", "Revoke", csrf, danger=True, name="revoke")
            + "</p></div>")
    body = (facts + key + actions
            + f'<div class="card"><strong>Traffic, last 7 days</strong>{chart}</div>')
    return layout(f"User {report.name}", body, csrf=csrf, active="users", flash=flash,
                  error=error)


# ------------------------------------------------------------------ sessions
def sessions_page(sessions: Iterable[Mapping[str, object]], csrf: str, now: float) -> str:
    rows = []
    for s in sessions:
        started = float(str(s["started_at"]))
        rows.append(
            f'<tr data-user="{_e(s["user"])}"><td>{_e(s["id"])}</td>'
            f'<td><a href="/users/{_e(s["user"])}">{_e(s["user"])}</a></td>'
            f'<td>{_e(s["way_in"])}</td><td>{_e(s["peer"])}</td><td>{_e(when(started))}</td>'
            f"<td>{_e(duration(now - started))}</td>"
            f'<td class="num">{_e(format_bytes(int(str(s["bytes_up"]))))}</td>'
            f'<td class="num">{_e(format_bytes(int(str(s["bytes_down"]))))}</td>'
            f'<td class="num">{_e(s["streams"])}</td></tr>')
    table = ('<table id="sessions"><thead><tr><th>#</th><th>User</th><th>Way in</th>'
             "<th>Peer</th><th>Started</th><th>For</th><th class=num>Up</th>"
             "<th class=num>Down</th><th class=num>Streams</th></tr></thead><tbody>"
             + ("".join(rows) or '<tr><td colspan="9">Nobody is connected.</td></tr>')
             + "</tbody></table>")
    return layout("Live sessions", table, csrf=csrf, active="sessions")


# ------------------------------------------------------------------ traffic
TRAFFIC_RANGES = ((24, "24 hours"), (168, "7 days"), (720, "30 days"))


def traffic_page(chart: str, totals: Sequence[tuple[str, int, int]], hours: int,
                 csrf: str) -> str:
    ranges = " | ".join(
        f"<strong>{label}</strong>" if h == hours else f'<a href="/traffic?hours={h}">{label}</a>'
        for h, label in TRAFFIC_RANGES)
    rows = "".join(
        f'<tr><td><a href="/users/{_e(name)}">{_e(name)}</a></td>'
        f'<td class="num">{_e(format_bytes(up))}</td>'
        f'<td class="num">{_e(format_bytes(down))}</td>'
        f'<td class="num">{_e(format_bytes(up + down))}</td></tr>'
        for name, up, down in totals)
    table = ('<table id="traffic"><thead><tr><th>User</th><th class=num>Up</th>'
             "<th class=num>Down</th><th class=num>Total</th></tr></thead><tbody>"
             + (rows or '<tr><td colspan="4">No traffic in this period.</td></tr>')
             + "</tbody></table>")
    body = f'<p>{ranges}</p><div class="card">{chart}</div>{table}'
    return layout("Traffic per user", body, csrf=csrf, active="traffic")


# ------------------------------------------------------------------ health
def health_page(rows: Sequence[tuple[str, str]], csrf: str,
                blocked: Sequence[WayBlockStatus] = ()) -> str:
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return layout("Server health", f'<dl class="card" id="health">{facts}</dl>'
                  + _blocked_table(blocked), csrf=csrf, active="health")


def _blocked_table(ways: Sequence[WayBlockStatus]) -> str:
    """Ways in that clients reported blocked: for how many of the active users, since when."""
    rows = "".join(
        f'<tr><td>{_e(w.way_in)}</td>'
        f'<td class="num">{w.users} of {w.active_users}</td>'
        f"<td>{_e(when(w.since))}</td>"
        f"<td>{_e(', '.join(f'{k} {n}' for k, n in sorted(w.reports.items())))}</td>"
        f'<td class="num">{w.alerts}</td></tr>'
        for w in ways)
    return ('<h2>Ways in reported blocked</h2><table id="blocked"><thead><tr><th>Way in</th>'
            "<th class=num>Users (last hour)</th><th>Since</th><th>Reports</th>"
            "<th class=num>Alerts</th></tr></thead><tbody>"
            + (rows or '<tr><td colspan="5">No client reported a blocked way in.</td></tr>')
            + "</tbody></table>")


def error_page(status: int, message: str, csrf: str | None) -> str:
    return layout(f"Error {status}", f"<p>{_e(message)}</p>", csrf=csrf)
