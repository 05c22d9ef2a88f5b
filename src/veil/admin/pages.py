"""The panel's HTML: small server-rendered pages with inline CSS, no script and no external
asset. Every value from outside is escaped here; every form that changes something carries
the session's CSRF token."""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import segno

from veil.manage.users import UserReport, format_bytes
from veil.server.status import WayBlockStatus

if TYPE_CHECKING:
    from veil.admin.app import Listing, UserExports

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
.exports{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:1em}
.exports .card{margin:0}pre.config{max-height:20em;overflow:auto;background:#fff;
 border:1px solid #ddd;padding:.5em;font-size:12px}.note{color:#555;font-size:13px}
nav.pages{margin:.6em 0}nav.pages a,nav.pages strong{margin-right:.6em}
"""


def when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def expiry(moment: float | None) -> str:
    """An expiry as it was given (as `veil user list` shows it): ``2030-01-31`` is stored as
    the end of that day (2030-02-01 00:00 UTC) and shown as that day; another time in UTC."""
    if moment is None:
        return "-"
    end = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    if end.time() == datetime.time():
        return (end.date() - datetime.timedelta(days=1)).isoformat()
    return end.strftime("%Y-%m-%d %H:%M UTC")


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


def _users_href(search: str, page: int) -> str:
    query = {k: v for k, v in (("q", search), ("page", str(page))) if v and v != "1"}
    return "/users" + (f"?{urlencode(query)}" if query else "")


def _page_links(listing: Listing, search: str) -> str:
    """Previous, a window of page numbers around this one, next."""
    if listing.pages <= 1:
        return ""
    page, last = listing.page, listing.pages
    numbers = sorted({1, last, *range(max(page - 2, 1), min(page + 2, last) + 1)})
    links = []
    if page > 1:
        links.append(f'<a href="{_e(_users_href(search, page - 1))}" rel="prev">Previous</a>')
    previous = 0
    for n in numbers:
        if n > previous + 1:
            links.append("<span>...</span>")
        links.append(f"<strong>{n}</strong>" if n == page
                     else f'<a href="{_e(_users_href(search, n))}">{n}</a>')
        previous = n
    if page < last:
        links.append(f'<a href="{_e(_users_href(search, page + 1))}" rel="next">Next</a>')
    return f'<nav class="pages" aria-label="pages">{"".join(links)}</nav>'


def users_page(listing: Listing, search: str, csrf: str, *, flash: str | None = None,
               error: bool = False) -> str:
    rows = []
    for r in listing.reports:
        rows.append(
            f'<tr data-user="{_e(r.name)}"><td><a href="/users/{_e(r.name)}">{_e(r.name)}</a>'
            f'</td><td class="status-{_e(r.status)}">{_e(r.status)}</td>'
            f'<td class="num">{_e(format_bytes(r.used.total))}</td><td>{_e(_limit(r))}</td>'
            f"<td>{_e(expiry(r.expires_at))}</td><td>{_e(when(r.last_seen))}</td>"
            f"<td>{_e(when(r.created_at))}</td></tr>")
    empty = "No user matches." if search else "No users yet."
    table = ('<table id="users"><thead><tr><th>Name</th><th>Status</th>'
             '<th class="num">Used this period</th><th>Limit</th><th>Expires</th>'
             "<th>Last seen</th><th>Created</th></tr></thead><tbody>"
             + ("".join(rows) or f'<tr><td colspan="7">{empty}</td></tr>')
             + "</tbody></table>")
    form = (f'<form method="post" action="/users" class="card" id="add-user">'
            f"{_csrf_field(csrf)}<strong>Add a user</strong> "
            f'<label>Name <input type="text" name="name" required maxlength="64" '
            f'pattern="[A-Za-z0-9][A-Za-z0-9._@\\-]*"></label> '
            f'<label>Limit <input type="text" name="limit" placeholder="50GB/month"></label> '
            f'<label>Expires <input type="text" name="expires" placeholder="YYYY-MM-DD">'
            f"</label> <button>Add</button></form>")
    first = (listing.page - 1) * listing.per_page + 1
    shown = (f"{first}-{first + len(listing.reports) - 1} of {listing.total}"
             if listing.reports else f"0 of {listing.total}")
    find = (f'<form method="get" action="/users" id="search" role="search">'
            f'<label>Find <input type="search" name="q" value="{_e(search)}" maxlength="64" '
            f'placeholder="part of a name"></label> <button>Search</button> '
            f'<span class="note" id="shown">{_e(shown)} users</span></form>')
    pager = _page_links(listing, search)
    return layout("Users", form + find + pager + table + pager, csrf=csrf, active="users",
                  flash=flash, error=error)


def qr_svg(text: str) -> str:
    """The QR code of ``text`` as an inline ``<svg>`` element."""
    return str(segno.make(text, error=QR_ERROR).svg_inline(scale=QR_SCALE, title="QR code"))


def _with_format(url: str, fmt: str) -> str:
    base, sep, fragment = url.partition("#")
    return f"{base}?format={fmt}{sep}{fragment}"


def _export_cards(name: str, exports: UserExports, csrf: str) -> str:
    """The key, the subscription, and the apps' formats, each with its QR code: a URI's own,
    and for the configuration files (a QR of a YAML file is no use: too long, and no app
    scans one) the subscription URL that serves that format."""
    base = f"/users/{name}"
    cards = [f'<div class="card" id="access-key"><strong>veil access key</strong> '
             f"<span class=note>(for <code>veil connect</code>; anyone who has it can use "
             f"this server as {_e(name)})</span>"
             f'<code class="key">{_e(exports.veil)}</code>'
             f'<div class="qr">{qr_svg(exports.veil)}</div></div>']
    if exports.subscription_urls:
        first, *others = exports.subscription_urls
        more = "".join(f'<code class="key">{_e(url)}</code>' for url in others)
        cards.append(
            f'<div class="card" id="subscription"><strong>Subscription URL</strong> '
            f"<span class=note>(apps import it and fetch it again every few hours, so a new "
            f"way in reaches them; it serves the key, so it is as secret as the key)</span>"
            f'<code class="key">{_e(first)}</code>'
            + (f"<p class=note>Through the other ways in:</p>{more}" if more else "")
            + f'<div class="qr">{qr_svg(first)}</div><p>'
            + _button_form(f"{base}/rotate", "Rotate subscription URL and key", csrf,
                           name="rotate-subscription")
            + "</p><p class=note>The URL is made from the key: a new URL needs a new key "
            "(a leaked URL gives the key away), so the old key and URL both stop working."
            "</p></div>")
    if exports.unavailable is not None:
        cards.append(f'<div class="card" id="app-formats"><strong>Trojan, Clash Meta and '
                     f"sing-box</strong><p>{_e(exports.unavailable)}</p></div>")
    else:
        assert exports.trojan and exports.clash and exports.sing_box and exports.subscription_urls
        links = exports.trojan.splitlines()
        cards.append(
            '<div class="card" id="trojan"><strong>Trojan link</strong> '
            "<span class=note>(v2rayN, v2rayNG, Shadowrocket, NekoBox...)</span>"
            + "".join(f'<code class="key">{_e(link)}</code><div class="qr">{qr_svg(link)}</div>'
                      for link in links) + "</div>")
        sub = exports.subscription_urls[0]
        for fmt, card_id, title, text in (("clash", "clash", "Clash Meta (mihomo)",
                                           exports.clash),
                                          ("sing-box", "sing-box", "sing-box", exports.sing_box)):
            url = _with_format(sub, fmt)
            cards.append(
                f'<div class="card" id="{card_id}"><strong>{title}</strong> '
                f'<a href="{_e(base)}/export/{fmt}" download>Download</a>'
                f"<p class=note>Scan to import it as a subscription (it stays up to date):"
                f'</p><code class="key">{_e(url)}</code><div class="qr">{qr_svg(url)}</div>'
                f'<details><summary>Configuration</summary><pre class="config">{_e(text)}'
                f"</pre></details></div>")
    warnings = "".join(f"<li>{_e(w)}</li>" for w in exports.warnings)
    notes = f'<ul class="note" id="export-warnings">{warnings}</ul>' if warnings else ""
    return f'<div class="exports">{"".join(cards)}</div>{notes}'


def user_page(report: UserReport, exports: UserExports | None, chart: str, csrf: str, *,
              flash: str | None = None, error: bool = False) -> str:
    base = f"/users/{report.name}"
    facts = (f"<dl><dt>Status</dt><dd class=\"status-{_e(report.status)}\">"
             f"{_e(report.status)}</dd>"
             f"<dt>Used this period</dt><dd id=\"used\">{_e(format_bytes(report.used.total))} "
             f"(up {_e(format_bytes(report.used.up))}, down "
             f"{_e(format_bytes(report.used.down))})</dd>"
             f"<dt>Limit</dt><dd>{_e(_limit(report))}</dd>"
             f"<dt>Expires</dt><dd>{_e(expiry(report.expires_at))}</dd>"
             f"<dt>Site subnets</dt><dd>{_e(' '.join(report.sites) or '-')}</dd>"
             f"<dt>Reaches</dt><dd>{_e(' '.join(report.reach) or 'the default')}</dd>"
             f"<dt>Last seen</dt><dd>{_e(when(report.last_seen))}</dd>"
             f"<dt>Created</dt><dd>{_e(when(report.created_at))}</dd>"
             f"<dt>Revoked</dt><dd>{_e(when(report.revoked_at))}</dd></dl>")
    if exports is not None:
        key = _export_cards(report.name, exports, csrf)
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
            # Site-to-site (docs/site-to-site.md): space-separated, empty for none.
            f'<form class="inline" method="post" action="{_e(base)}/sites">'
            f"{_csrf_field(csrf)}<label>Site subnets <input type=\"text\" name=\"sites\" "
            f'value="{_e(" ".join(report.sites))}" placeholder="192.168.10.0/24">'
            f"</label> <button>Set site</button></form> "
            f'<form class="inline" method="post" action="{_e(base)}/reach">'
            f"{_csrf_field(csrf)}<label>Reaches <input type=\"text\" name=\"reach\" "
            f'value="{_e(" ".join(report.reach))}" placeholder="office-sh 10.9.0.0/16">'
            f"</label> <button>Set reach</button></form>"
            f"</p><p>"
            + _button_form(f"{base}/reset-usage", "Reset usage (this period)", csrf,
                           name="reset-usage")
            + " "
            + _button_form(f"{base}/end-sessions", "End this user's sessions", csrf,
                           name="end-sessions")
            + " "
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
def sessions_page(sessions: Iterable[Mapping[str, object]], csrf: str, now: float, *,
                  flash: str | None = None) -> str:
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
            f'<td class="num">{_e(s["streams"])}</td><td>'
            + _button_form(f"/sessions/{s['id']}/end", "End this session", csrf,
                           name="end-session")
            + "</td></tr>")
    table = ('<table id="sessions"><thead><tr><th>#</th><th>User</th><th>Way in</th>'
             "<th>Peer</th><th>Started</th><th>For</th><th class=num>Up</th>"
             "<th class=num>Down</th><th class=num>Streams</th><th></th></tr></thead><tbody>"
             + ("".join(rows) or '<tr><td colspan="10">Nobody is connected.</td></tr>')
             + "</tbody></table>")
    note = ("<p class=note>Ending a session closes it; the app may connect again with the "
            "same key (revoke or rotate the user to keep it out).</p>")
    return layout("Live sessions", note + table, csrf=csrf, active="sessions", flash=flash)


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
def _percent(part: float | None, whole: float | None = 100.0) -> str:
    if part is None or not whole:
        return "unknown"
    return f"{100.0 * part / whole:.0f}%"


def _rate(value: float | None) -> str:
    return "unknown" if value is None else f"{format_bytes(int(value))}/s"


def host_rows(host: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The Health page's rows for the host's load (veil.manage.fleet.HostLoad)."""
    cpus = host.get("cpus")
    total, used = host.get("memory_total_bytes"), host.get("memory_used_bytes")
    memory = ("unknown" if total is None or used is None else
              f"{format_bytes(used)} of {format_bytes(total)} ({_percent(used, total)})")
    return [("CPU (since the last view)",
             _percent(host.get("cpu_percent")) + (f" of {cpus} CPUs" if cpus else "")),
            ("Memory in use", memory),
            ("Network in / out (since the last view)",
             f"{_rate(host.get('net_rx_bytes_per_s'))} / {_rate(host.get('net_tx_bytes_per_s'))}")]


def _fleet_table(servers: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in servers:
        host = s.get("host") if isinstance(s.get("host"), dict) else {}
        assert isinstance(host, dict)
        cert = s.get("certificate_not_after")
        memory = _percent(host.get("memory_used_bytes"), host.get("memory_total_bytes"))
        state = "up" if s.get("responding") else f"not responding (last {when(s.get('seen_at'))})"
        rows.append(
            f'<tr data-server="{_e(s["id"])}"><td>{_e(s["id"])}'
            f'{" (this one)" if s.get("this") else ""}</td><td>{_e(state)}</td>'
            f'<td>{_e(s.get("version", "?"))}</td>'
            f"<td>{_e(when(cert) if isinstance(cert, int | float) else 'unreadable')}</td>"
            f'<td class="num">{_e(s.get("sessions_active", "?"))}</td>'
            f'<td class="num">{_e(format_bytes(s.get("bytes_up")))} / '
            f'{_e(format_bytes(s.get("bytes_down")))}</td>'
            f'<td class="num">{_e(_percent(host.get("cpu_percent")))}</td>'
            f'<td class="num">{_e(memory)}</td></tr>')
    return ('<h2>Servers on this store</h2><table id="fleet"><thead><tr><th>Server</th>'
            "<th>State</th><th>Version</th><th>Certificate expires</th>"
            "<th class=num>Live sessions</th><th class=num>Up / down since start</th>"
            "<th class=num>CPU</th><th class=num>Memory</th></tr></thead><tbody>"
            + ("".join(rows) or '<tr><td colspan="8">No heartbeat yet.</td></tr>')
            + "</tbody></table>")


def health_page(rows: Sequence[tuple[str, str]], csrf: str,
                blocked: Sequence[WayBlockStatus] = (),
                fleet: Sequence[Mapping[str, Any]] = ()) -> str:
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return layout("Server health", f'<dl class="card" id="health">{facts}</dl>'
                  + _fleet_table(fleet) + _blocked_table(blocked), csrf=csrf, active="health")


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
