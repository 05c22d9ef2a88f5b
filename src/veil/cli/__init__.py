"""The ``veil`` command: the composition root, where every part is wired together.

Errors the user can fix (bad flags, bad keys, a port in use) print one line to stderr and
exit with status 2 (usage) or 1 (anything else); never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from veil import __version__
from veil.config import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_USER,
    DEFAULT_REFUSED_TCP_PORTS,
    DEFAULT_SYSTEM_PROXY_HTTP,
    DEFAULT_TUN_POOL,
    DEFAULT_TUN_POOL6,
    MAX_CONNECTIONS,
    ROUTING_PRESETS,
    ClientOptions,
    ServerOptions,
    SubscriptionOptions,
    parse_expiry,
    parse_key,
    parse_limit,
    parse_port_list,
    parse_rate,
    parse_via,
    parse_webhook_url,
    parse_workers,
)
from veil.errors import ConfigError, StoreError, VeilError
from veil.protocol.address import Address, parse_host_port

if TYPE_CHECKING:
    from veil.admin.listen import AdminListen
    from veil.client.ruledata import RuleData
    from veil.manage.state import ServerState
    from veil.manage.users import UserManager
    from veil.protocol.accesskey import AccessKey
    from veil.protocol.trojan import TrojanLink
    from veil.server.service import VeilServer
    from veil.server.workers import WorkerPool
    from veil.store.base import User

log = logging.getLogger("veil")

DEFAULT_STATE = Path(os.environ.get("VEIL_STATE", "~/.local/share/veil")).expanduser()
DEFAULT_SOCKS = "127.0.0.1:1080"
FIRST_USER = "default"

DESCRIPTION = """\
veil: a VPN whose server looks like an ordinary HTTPS website.

  on the server:   veil serve --state DIR --listen 0.0.0.0:443 --public my.example.org
                   (prints an access key: veil://...)
  on the laptop:   veil connect 'veil://...'          (SOCKS5 proxy on 127.0.0.1:1080)
"""


def _address(text: str) -> Address:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _workers(text: str) -> int:
    try:
        return parse_workers(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _webhook_url(text: str) -> str:
    try:
        return parse_webhook_url(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port_list(text: str) -> tuple[int, ...]:
    try:
        return parse_port_list(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _admin_address(text: str) -> AdminListen:
    from veil.admin.listen import parse_admin_listen

    try:
        return parse_admin_listen(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: INFO by default, -v adds veil's DEBUG, -vv every "
                             "library's too (asyncio...); may come after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run the server",
        description="Run the veil server in the foreground: one TLS port that serves a website "
                    "to everybody and a tunnel to holders of a valid access key. On first use it "
                    "initialises the state directory and prints the first user's access key.")
    serve.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"state directory (keys, certificate, users; default {DEFAULT_STATE})")
    serve.add_argument("--listen", type=_address, required=True, action="append",
                       metavar="HOST:PORT",
                       help="address to listen on, e.g. 0.0.0.0:443; repeat it for more ports "
                            "(announce them to clients with --via)")
    serve.add_argument("--via", action="append", default=[], metavar="URL",
                       help="another way in to this server, written into every key after the "
                            "public address: tls://HOST:PORT (an extra --listen port, or an "
                            "address your firewall forwards here), or https://CDNHOST/SECRET/ "
                            "(wss:// for a WebSocket) through a CDN or reverse proxy that "
                            "forwards /SECRET/ to this port (SECRET: 16+ random characters, e.g. "
                            "`openssl rand -hex 12`; docs/operations.md, \"Behind a CDN\"). "
                            "Repeatable, in order of preference; clients move to the next when "
                            "one is blocked. Only announced (listening is --listen's); "
                            "remembered in DIR/config.json")
    serve.add_argument("--on-block", metavar="CMD",
                       help="run CMD (split like a shell's words, run without a shell) when "
                            "at least half the users active in the last hour report a way in "
                            "blocked; it gets VEIL_WAY_IN, VEIL_KIND, VEIL_USERS, "
                            "VEIL_ACTIVE_USERS and VEIL_SINCE; at most once an hour per way "
                            "(docs/operations.md, \"Blocked ways in\")")
    serve.add_argument("--alert-webhook", metavar="URL", type=_webhook_url,
                       help="POST a JSON alert to URL when a user reaches 80%% of the limit "
                            "or the certificate expires within 14 days (docs/operations.md, "
                            "\"Alerts\")")
    serve.add_argument("--public", metavar="HOST[:PORT]",
                       help="address clients use, written into access keys "
                            "(default: the listen address)")
    serve.add_argument("--borrow", metavar="HOST[:PORT]",
                       help="EXPERIMENTAL: borrow this real site's identity (a server without "
                            "a domain): every TLS connection but a veil client's is relayed "
                            "to it untouched, and keys name it as their SNI; port 443 by "
                            "default (docs/protocol.md, \"Borrowed identity\")")
    serve.add_argument("--cover", metavar="URL",
                       help="web server to show to everybody else, e.g. http://127.0.0.1:8080 "
                            "(default: a built-in static site)")
    serve.add_argument("--admin", type=_admin_address, metavar="HOST:PORT",
                       help="also serve the admin panel, API and /metrics there (off by "
                            "default), e.g. 127.0.0.1:8080; a non-loopback address needs "
                            "https://HOST:PORT (TLS with the server's certificate). Set its "
                            "password with `veil admin passwd`; docs/admin.md")
    serve.add_argument("--cert", type=Path, metavar="FILE",
                       help="certificate chain (PEM) to use instead of a self-signed one")
    serve.add_argument("--key", type=Path, metavar="FILE", help="private key (PEM) for --cert")
    serve.add_argument("--acme-directory", metavar="URL",
                       help="ACME CA to get the certificate for a --public DNS name from, "
                            "validated on this port (TLS-ALPN-01) (default: Let's Encrypt for "
                            "a public name; docs/operations.md, \"Certificates\")")
    serve.add_argument("--acme-ca-bundle", type=Path, metavar="FILE",
                       help="CA certificates (PEM) that check --acme-directory's TLS")
    serve.add_argument("--acme-email", metavar="ADDR",
                       help="contact address the ACME CA may write to (optional)")
    serve.add_argument("--self-signed", action="store_true",
                       help="present the state's self-signed certificate, no ACME, even for "
                            "a DNS name; a first start on an IP address needs it (or --public "
                            "NAME, or --borrow HOST): a prober sees a certificate no public "
                            "website shows")
    serve.add_argument("--allow-private", action="store_true",
                       help="let clients reach private, loopback and link-local addresses "
                            "(off by default: it exposes the server's own network)")
    serve.add_argument("--refuse-ports", type=_port_list, metavar="PORTS",
                       default=DEFAULT_REFUSED_TCP_PORTS,
                       help="TCP destination ports no client may reach, e.g. 25,6881-6889, "
                            "or 'none' (default: "
                            f"{','.join(map(str, DEFAULT_REFUSED_TCP_PORTS))}, SMTP: VPS "
                            "providers suspend servers that relay spam)")
    serve.add_argument("--block-bittorrent", action="store_true",
                       help="refuse BitTorrent (peer handshakes, tracker requests, DHT and uTP) "
                            "on veil and Trojan streams: swarms see the server's address, and "
                            "copyright notices go to its owner (not --tun's packets; encrypted "
                            "BitTorrent is not recognised)")
    serve.add_argument("--no-shaping", dest="shaping", action="store_false",
                       help="do not pad the first writes of sessions and streams (measures "
                            "shaping's cost; makes tunnelled TLS handshakes visible)")
    serve.add_argument("--trojan", action="store_true",
                       help="also accept Trojan apps (v2rayN, Shadowrocket, Clash Meta, "
                            "sing-box...; `veil user show --format trojan|clash|sing-box`). "
                            "Off by default: it costs a gap a prober can measure (a "
                            "stranger's HTTP/2 SETTINGS ~10 ms after the handshake instead "
                            "of at once as from nginx); docs/operations.md")
    serve.add_argument("--routing", choices=ROUTING_PRESETS, default="none",
                       help="routing rules for the apps: with 'cn', `veil user show --format "
                            "clash|sing-box` and the subscriptions route as `veil connect "
                            "--rules cn` (China direct, the rest through veil), with lists "
                            "this server serves on each user's subscription path; 'none' "
                            "(default): everything through veil. Each start writes it "
                            "to DIR/config.json for `veil user show`; docs/routing.md, \"Apps\"")
    serve.add_argument("--tun", action="store_true",
                       help="also serve full-device tunnels (veil connect --tun; Linux, root): "
                            "a TUN device, an address per session, NAT to the outside")
    serve.add_argument("--pool", metavar="CIDR",
                       help=f"IPv4 addresses for --tun clients (default {DEFAULT_TUN_POOL})")
    serve.add_argument("--pool6", metavar="CIDR",
                       help=f"IPv6 addresses for --tun clients (default {DEFAULT_TUN_POOL6}; "
                            "'none': no IPv6, which clients then block)")
    serve.add_argument("--max-sessions-per-user", type=int,
                       default=DEFAULT_MAX_SESSIONS_PER_USER, metavar="N",
                       help="sessions (veil sessions and Trojan connections) one user may "
                            "hold at once; more get the cover site "
                            f"(default {DEFAULT_MAX_SESSIONS_PER_USER})")
    serve.add_argument("--max-devices-per-user", type=int, metavar="N",
                       help="client addresses one user may be connected from at once (veil "
                            "and Trojan, not through a CDN, whose address is its edge's); a "
                            "further device gets the cover site until one disconnects "
                            "(default: any number)")
    serve.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                       help=f"sessions the server holds at once (default {DEFAULT_MAX_SESSIONS})")
    serve.add_argument("--max-user-rate", metavar="RATE",
                       help="bandwidth one user may use in each direction, over all their "
                            "sessions: e.g. 100Mbit or 20MB (per second; default unlimited)")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N",
                       help="server processes sharing the port, to use N cores: a number, or "
                            "'auto' for one per CPU (default 1: one process). They share the "
                            "replay filter, TLS tickets, usage and per-user limits; "
                            "--max-sessions holds per worker (docs/operations.md, "
                            "\"Workers\")")
    # A worker of --workers, started by its parent: its place and inherited descriptors.
    serve.add_argument("--worker-of", help=argparse.SUPPRESS)
    serve.add_argument("--db", metavar="URL", default=os.environ.get("VEIL_DB"),
                       help="keep users in PostgreSQL (postgresql://USER:PASSWORD@HOST/DB) "
                            "instead of DIR/users.db, so several servers share them; "
                            "remembered in DIR/config.json (env VEIL_DB). Every server of a "
                            "fleet needs a copy of DIR/store.key")

    user = sub.add_parser(
        "user", help="manage users, their access keys, limits and usage",
        description="Manage users. Works while the server runs: a running server picks every "
                    "change up within a second (a revoked, rotated, expired or over-limit "
                    "user's live sessions are closed), and a change returns once every "
                    "running server on the store has it (or says which did not).")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser("add", help="create a user and print its access key",
                              description="Create a user and print its access key URI "
                                          "(one line; on a terminal also a QR code).")
    add.add_argument("name")
    add.add_argument("--public", metavar="HOST:PORT",
                     help="server address for keys, needed if no server has run on DIR yet")
    lst = user_sub.add_parser(
        "list", help="list users with usage, limit, last seen and status",
        description="List users: name, created, usage this period (this month, or all time "
                    "for a /total limit), limit, last seen, status.")
    revoke = user_sub.add_parser("revoke", help="revoke a user's access",
                                 description="Revoke a user: live sessions are closed and new "
                                             "connections with its key get the cover site.")
    revoke.add_argument("name")
    restore = user_sub.add_parser("restore", help="undo a revocation",
                                  description="Restore a revoked user: its key (the one it "
                                              "had) works again.")
    restore.add_argument("name")
    delete = user_sub.add_parser("delete", help="remove a revoked user and its usage",
                                 description="Delete a revoked user and its usage, so that "
                                             "the name can be used again (revoke it first).")
    delete.add_argument("name")
    rotate = user_sub.add_parser(
        "rotate", help="give a user a new key; the old one stops working",
        description="Replace a user's credential and print the new access key. Sessions "
                    "using the old key are closed.")
    rotate.add_argument("name")
    limit = user_sub.add_parser(
        "limit", help="set or remove a user's traffic limit, expiry, site and reach",
        description="Set a user's traffic limit (up + down), expiry date, site subnets "
                    "and/or what it may reach among the sites (docs/site-to-site.md).")
    limit.add_argument("name")
    limit.add_argument("--reach", action="append", metavar="CIDR|SITE",
                       help="site subnets this user may reach: a CIDR or a site's name "
                            "(repeatable; replaces the list; 'none' empties it). Without: a "
                            "site reaches every other site, a user none")
    for p in (add, limit):
        p.add_argument("--site", action="append", metavar="CIDR",
                       help="make the user a site (an office's gateway, `veil connect KEY "
                            "--tun --site`) whose LAN is this subnet (repeatable; replaces "
                            "the list; 'none' makes it an ordinary user again)")
    for p in (add, limit):
        p.add_argument("--limit", metavar="SIZE[/PERIOD]",
                       help="traffic allowed, up + down: e.g. 50GB (per month), 50GB/month, "
                            "1TiB/total, or none")
        p.add_argument("--expires", metavar="DATE",
                       help="last day of access (YYYY-MM-DD, UTC, inclusive), an ISO 8601 "
                            "time, or never")
    show = user_sub.add_parser(
        "show", help="print a user's key for veil or for a Trojan app",
        description="Print a user's key: a veil URI (default), a trojan:// link, or a Clash Meta "
                    "or sing-box configuration (every user can also connect with Trojan apps "
                    "on the same port when the server runs with `veil serve --trojan`; the "
                    "Trojan formats are refused otherwise, and before the server's first "
                    "start). On a terminal a URI is also shown as a QR code.")
    show.add_argument("name")
    show.add_argument("--format", choices=("veil", "trojan", "clash", "sing-box"),
                      default="veil", help="what to print (default veil)")
    show.add_argument("--subscription", action="store_true",
                      help="print the user's subscription URL on each way in instead (apps "
                           "and `veil connect URL` fetch the current key from it)")
    show.add_argument("--png", type=Path, metavar="FILE",
                      help="also write what is printed as a QR code, in a PNG file")
    for p in (lst, show):
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    for p in (add, lst, revoke, restore, delete, rotate, limit, show):
        p.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"state directory (default {DEFAULT_STATE})")
        p.add_argument("--db", metavar="URL", default=os.environ.get("VEIL_DB"),
                       help="user store: postgresql://USER:PASSWORD@HOST/DB (default: the one "
                            "the server was started with, else DIR/users.db; env VEIL_DB)")

    connect = sub.add_parser(
        "connect", help="run the client",
        description="Connect to a veil server and offer local proxies. With no --socks, "
                    f"--http or --forward, a SOCKS5 proxy listens on {DEFAULT_SOCKS}.")
    connect.add_argument("key", metavar="KEY",
                         help="access key (veil://...), a subscription URL "
                              "(https://HOST/s/TOKEN#pin=..., from `veil user show "
                              "--subscription`: followed as the operator changes the key), or "
                              "a trojan://PASSWORD@HOST:PORT link to any Trojan server "
                              "(?sni=NAME, &allowInsecure=1, &pin=PIN)")
    connect.add_argument("--subscription-cache", type=Path, metavar="FILE",
                         help="with a subscription URL: where its last good answer is kept "
                              "(default: $XDG_CACHE_HOME/veil/)")
    connect.add_argument("--refresh", type=float, metavar="SECONDS",
                         help="with a subscription URL: fetch it again this often (default: "
                              "what it says, 6 hours; jittered)")
    connect.add_argument("--socks", type=_address, metavar="HOST:PORT",
                         help="SOCKS5 proxy listen address (CONNECT and UDP ASSOCIATE)")
    connect.add_argument("--socks-auth", metavar="USER:PASSWORD",
                         help="require this username/password on the SOCKS5 port")
    connect.add_argument("--http", type=_address, metavar="HOST:PORT",
                         help="HTTP proxy listen address (CONNECT and plain requests)")
    connect.add_argument("--system-proxy", action="store_true",
                         help="point this desktop's proxy settings at veil while it runs and "
                              "put them back on exit (GNOME, KDE, macOS, Windows): HTTP and "
                              "HTTPS to the HTTP proxy (--http, default "
                              f"{DEFAULT_SYSTEM_PROXY_HTTP}), SOCKS to the SOCKS5 proxy; "
                              "settings left by a killed client are restored at the next "
                              "start")
    connect.add_argument("--http-auth", metavar="USER:PASSWORD",
                         help="require this username/password on the HTTP proxy "
                              "(Proxy-Authorization: Basic)")
    connect.add_argument("--allow-lan", action="store_true",
                         help="let other machines use --socks/--http without a password, and "
                              "--forward ports (refused unless said: an open proxy into the "
                              "tunnel for everyone on the network)")
    connect.add_argument("--forward", action="append", default=[],
                         metavar="[LHOST:]LPORT:RHOST:RPORT[/udp]",
                         help="forward a local port to RHOST:RPORT through the tunnel "
                              "(repeatable; LPORT 0 lets the system pick one, logged at start)")
    connect.add_argument("--connections", type=int, metavar="N",
                         help="TLS connections to keep to the server, 1 to "
                              f"{MAX_CONNECTIONS} (default 1)")
    connect.add_argument("--stripe", action="store_true",
                         help="spread each download or upload over all --connections (after "
                              "its first 512 KiB): faster on a lossy long link, where one "
                              "connection gets what its congestion control allows")
    # The old name of --connections: --pool is serve's address range. Hidden, and warned of.
    connect.add_argument("--pool", dest="deprecated_pool", type=int, help=argparse.SUPPRESS)
    connect.add_argument("--no-shaping", dest="shaping", action="store_false",
                         help="do not pad the first writes of sessions and streams (measures "
                              "shaping's cost; makes tunnelled TLS handshakes visible)")
    connect.add_argument("--keepalive", metavar="SECONDS[:TIMEOUT]",
                         help="when the server has been silent SECONDS, send a ping with the "
                              "next request or data, and reconnect when no answer comes within "
                              f"TIMEOUT (default {DEFAULT_KEEPALIVE[0]:g}:"
                              f"{DEFAULT_KEEPALIVE[1]:g}, Chromium's); an idle tunnel never "
                              "pings")
    connect.add_argument("--tls", choices=("browser", "openssl"), default="browser",
                         help="TLS client: 'browser' sends Chrome's ClientHello (default); "
                              "'openssl' uses Python's ssl, whose ClientHello no browser sends")
    connect.add_argument("--tun", action="store_true",
                         help="send all of this machine's traffic through the tunnel (Linux, "
                              "root): a TUN device, routes, DNS and a kill switch, all undone "
                              "on exit")
    connect.add_argument("--site", action="store_true",
                         help="with --tun: be an office's gateway (the key is a site's, `veil "
                              "user add NAME --site CIDR`): route only the other sites' "
                              "subnets into the tunnel, never the default route, and forward "
                              "for this LAN (docs/site-to-site.md)")
    connect.add_argument("--exclude", action="append", default=[], metavar="CIDR",
                         help="with --tun: keep this range outside the tunnel, e.g. the LAN "
                              "(repeatable)")
    connect.add_argument("--rules", action="append", default=[], metavar="FILE|cn",
                         help="split routing: a rules file (TYPE,VALUE,ACTION lines; actions "
                              "TUNNEL, DIRECT, BLOCK; RULE-SET pulls in sing-box .json or "
                              "Clash lists), or cn for the China preset; repeatable, first "
                              "match wins, no match = tunnel (docs/routing.md)")
    connect.add_argument("--explain", action="append", default=[], metavar="HOST[:PORT]",
                         help="with --rules: print which rule sends HOST (port 443 unless "
                              "said) where and why, then exit without connecting")
    connect.add_argument("--tun-cleanup", action="store_true",
                         help="undo what a --tun client that crashed left (routes, firewall, "
                              "DNS) and exit; --tun does this by itself when it starts")

    from veil.lab.cli import add_lab_parser

    add_lab_parser(sub)
    from veil.admin.cli import add_admin_parser

    add_admin_parser(sub, DEFAULT_STATE)
    from veil.cli.doctor import add_doctor_parser

    add_doctor_parser(sub)
    return parser


def _setup_logging(verbosity: int) -> None:
    """INFO by default; ``-v``: veil's own DEBUG lines; ``-vv``: every library's too."""
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity >= 1:
        logging.getLogger("veil").setLevel(logging.DEBUG)


def _take_verbosity(argv: Sequence[str]) -> tuple[list[str], int]:
    """``-v``/``-vv``/``--verbose`` wherever they are (before ``--``): a user who types
    ``veil serve ... -v`` means the same as ``veil -v serve ...``. Never an option's value:
    argparse takes no value that starts with "-" but a negative number."""
    rest: list[str] = []
    count = 0
    for index, arg in enumerate(argv):
        if arg == "--":
            rest += argv[index:]
            break
        if arg == "--verbose":
            count += 1
        elif len(arg) > 1 and arg.startswith("-") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
        else:
            rest.append(arg)
    return rest, count


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop (when installed) until it returns or SIGINT/SIGTERM."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows' event loops have no signal handlers
                signal.signal(sig, lambda _sig, _frame: loop.call_soon_threadsafe(stop.set))
        await main(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(runner())
    else:
        uvloop.run(runner())


def _print_key(uri: str) -> None:
    print(uri, flush=True)
    if sys.stdout.isatty():
        import segno

        segno.make(uri, error="m").terminal(compact=True)


def _show_user(state: ServerState, user: User | None, args: argparse.Namespace) -> None:
    from veil.manage.export import export_user

    if user is None:
        raise StoreError(f"no user named {args.name!r}", code="not_found")
    exported = export_user(state, user, args.format)
    for warning in exported.warnings:
        print(f"veil: warning: {warning}", file=sys.stderr)
    if exported.one_line:
        _print_key(exported.text)
    else:
        print(exported.text, flush=True)
    if args.format == "veil" and state.via and sys.stdout.isatty():
        print("ways in, in order: " + ", ".join(way.url for way in state.ways()))
    if args.png is not None:
        import segno

        try:
            segno.make(exported.text, error="l").save(str(args.png), scale=4)
        except segno.DataOverflowError as exc:
            raise ConfigError(f"too long for a QR code: {exc}; try --format trojan") from exc
        except OSError as exc:
            raise VeilError(f"cannot write {args.png}: {exc.strerror or exc}") from exc


def _command(text: str | None) -> tuple[str, ...]:
    """``--on-block CMD``: its words (quoted as in a shell), run later without a shell."""
    if text is None:
        return ()
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"--on-block: {exc}") from exc
    if not words:
        raise ConfigError("--on-block needs a command")
    return words


# --------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> None:
    from veil.manage.state import CONFIG_NAME, init_state

    options = ServerOptions(
        listen=args.listen[0], also_listen=tuple(args.listen[1:]), via=parse_via(args.via),
        cover_url=args.cover, cert=args.cert, key=args.key,
        allow_private=args.allow_private, refused_tcp_ports=args.refuse_ports,
        block_bittorrent=args.block_bittorrent,
        shaping=args.shaping,
        max_sessions_per_user=args.max_sessions_per_user, max_sessions=args.max_sessions,
        max_devices_per_user=args.max_devices_per_user,
        user_rate=parse_rate(args.max_user_rate) if args.max_user_rate else None,
        tun=args.tun, pool=args.pool, pool6=args.pool6, trojan=args.trojan,
        on_block=_command(args.on_block), routing=args.routing,
        alert_webhook=args.alert_webhook,
        acme_directory=args.acme_directory, acme_ca_bundle=args.acme_ca_bundle,
        acme_email=args.acme_email, self_signed=args.self_signed,
        borrow=parse_host_port(args.borrow, 443) if args.borrow else None,
        workers=args.workers)
    if args.worker_of is not None:
        _serve_worker(args, options)
        return
    if args.admin is not None:
        from veil.admin.listen import check_admin_listen

        check_admin_listen(args.admin.host, args.admin.tls)
    # A start that cannot listen must not initialise anything: the first start records the
    # address keys name, and a wrong one would outlive the failure in every key.
    for listen in (options.listen, *options.also_listen):
        _check_can_listen(listen)
    if not args.state.exists() or (args.state.is_dir()
                                   and not (args.state / CONFIG_NAME).exists()):
        _check_certificate_choice(options, args.public)
    existed = args.state.exists()
    before = set(os.listdir(args.state)) if existed and args.state.is_dir() else set()
    try:
        state, created = init_state(args.state, listen=options.listen, public=args.public,
                                    cert=options.cert, key=options.key, db=args.db,
                                    via=options.via, borrow=options.borrow)
    except BaseException:
        if not existed or not before:
            _undo_first_start(args.state, before, existed)
        raise
    _say_address_mismatch(state.public, (options.listen, *options.also_listen))
    serving = asyncio.Event()  # set once the server listens (and the admin panel, if any)
    try:
        _serve(args, options, state, serving)
    except BaseException:
        if created and not serving.is_set():
            _undo_first_start(args.state, before, existed)
        raise


def _check_certificate_choice(options: ServerOptions, public: str | None) -> None:
    """Self-signed only when asked for (issue #18): a first start that would show strangers
    a self-signed certificate names the choices instead of taking the one a censor sees."""
    import ipaddress

    from veil.manage.acme import public_ca_may_issue

    if options.self_signed or options.cert is not None or options.borrow is not None:
        return
    try:
        host = parse_host_port(public, options.listen.port).host if public else \
            options.listen.host
    except ValueError:
        return  # init_state says what is wrong with --public
    if host in ("0.0.0.0", "::"):
        return  # init_state asks for --public
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if options.acme_directory is None and not public_ca_may_issue(host):
            raise ConfigError(
                f"no public CA issues a certificate for {host}, so strangers would be shown a "
                f"self-signed one: name a CA that does (--acme-directory URL), bring one "
                f"(--cert/--key), or say --self-signed") from None
        return  # a certificate from a CA over ACME: the default with a name
    raise ConfigError(
        f"keys would name this server by its IP address {host}: strangers would be shown a "
        f"self-signed certificate and clients would send no server name, which public "
        f"websites rarely show. Choose one: --public NAME[:PORT] (a DNS name that points "
        f"here: a CA's certificate over ACME), --borrow HOST (a real site's identity, "
        f"experimental), or --self-signed (as it is, visibly); docs/operations.md, "
        f"\"Certificates\"")


def _check_can_listen(listen: Address) -> None:
    """Raise VeilError now when ``listen`` cannot be bound (in use, not this host's address,
    a privileged port): the server binds it again a moment later, with the same options."""
    from veil.server.service import _listening_socket

    if listen.port == 0:
        return  # the system picks a free port
    try:
        _listening_socket(listen).close()
    except OSError as exc:
        raise VeilError(f"cannot listen on {listen}: {exc.strerror}") from exc


def _undo_first_start(directory: Path, before: set[str], existed: bool) -> None:
    """Remove what a failed first start created in ``directory`` (and it, if it made it)."""
    import shutil

    with contextlib.suppress(OSError):
        for name in set(os.listdir(directory)) - before:
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not existed:
            directory.rmdir()


def _say_address_mismatch(public: Address, listens: Sequence[Address]) -> None:
    """Warn when keys name a port (or an IP address) this server does not listen on: right
    only when something forwards it here (a NAT or firewall rule, a load balancer)."""
    import ipaddress

    ports = {listen.port for listen in listens}
    if 0 in ports:
        return  # the system picks the port: nothing to compare yet
    if public.port not in ports:
        log.warning("keys name %s, but this server listens on %s: clients reach it only if "
                    "something forwards port %d here (else start with --public HOST:PORT, "
                    "then hand out the keys again)", public,
                    ", ".join(map(str, listens)), public.port)
        return
    try:
        ipaddress.ip_address(public.host)
    except ValueError:
        return  # a name: where it points is DNS's business
    hosts = {listen.host for listen in listens}
    if public.host not in hosts and not hosts & {"0.0.0.0", "::"}:
        log.warning("keys name %s, but this server listens on %s: clients reach it only if "
                    "something forwards that address here", public,
                    ", ".join(map(str, listens)))


def _serve(args: argparse.Namespace, options: ServerOptions, state: ServerState,
           serving: asyncio.Event) -> None:
    from veil.manage.users import UserManager
    from veil.server.service import VeilServer

    users = UserManager(state, state.open_store())
    try:
        if not users.store.list_users():
            user = users.add(FIRST_USER)
            if os.environ.get("INVOCATION_ID") and not sys.stdout.isatty():
                # A systemd service: stdout is the journal, which keeps it for months and
                # shows it to every member of adm and systemd-journal. Say where it is.
                log.info("created user %r; show its access key with: veil user show %s "
                            "--state %s", user.name, user.name, args.state)
            else:
                log.info("created user %r; its access key is printed on stdout", user.name)
                _print_key(users.access_key(user))
    finally:
        users.store.close()
    _raise_open_file_limit()

    if options.workers > 1:
        _serve_workers(args, options, state, serving)
        return

    async def main(stop: asyncio.Event) -> None:
        server = VeilServer(state, options)
        try:
            await server.start()
        except OSError as exc:
            raise VeilError(f"cannot listen on {exc.filename or options.listen}: "
                            f"{exc.strerror}") from exc
        admin = None
        if args.admin is not None:
            from veil.admin.app import admin_ssl_context, start_admin

            try:
                admin = await start_admin(
                    server, args.admin,
                    tls=admin_ssl_context(state) if args.admin.tls else None)
            except BaseException:
                await server.stop()
                raise
        serving.set()
        await _serve_until_stopped(server, stop)
        if admin is not None:
            await admin.stop()
        await server.stop()

    _run(main)


def _serve_workers(args: argparse.Namespace, options: ServerOptions, state: ServerState,
                   serving: asyncio.Event) -> None:
    """``--workers N``: the parent (veil.server.workers), which runs the admin panel."""
    from veil.server.acme import acme_directory_for
    from veil.server.workers import WorkerPool

    if acme_directory_for(options, state) is not None and options.borrow is None:
        # A CA's validation connection may reach any worker, and only the one that ordered
        # holds the challenge.
        raise ConfigError("--workers with a certificate over ACME is not supported yet: use "
                          "--cert/--key, --self-signed, or one worker")
    command = [*(["-" + "v" * args.verbosity] if args.verbosity else []), "serve",
               *args.serve_argv]

    async def main(stop: asyncio.Event) -> None:
        pool = WorkerPool(state, options, options.workers, command)
        try:
            await pool.start()
        except OSError as exc:
            raise VeilError(f"cannot listen on {exc.filename or options.listen}: "
                            f"{exc.strerror}") from exc
        admin = None
        try:
            if args.admin is not None:
                from veil.admin.app import admin_ssl_context, start_admin

                admin = await start_admin(
                    pool, args.admin, tls=admin_ssl_context(state) if args.admin.tls else None)
            serving.set()
            await _serve_until_stopped(pool, stop)
        finally:
            if admin is not None:
                await admin.stop()
            await pool.stop()

    _run(main)


def _serve_worker(args: argparse.Namespace, options: ServerOptions) -> None:
    """One worker of ``--workers N``, started by the parent with ``--worker-of``."""
    import socket

    from veil.manage.state import load_state
    from veil.server.service import VeilServer
    from veil.server.shared import WorkerRole
    from veil.server.workers import (
        parse_worker_argument,
        receive_ticket_keys,
        report_to_parent,
    )

    index, count, channel_fd, replay_fd, users_fd, listener_fds = parse_worker_argument(
        args.worker_of)
    # Every line says which worker wrote it: they share the parent's stderr.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s [worker {index} pid {os.getpid()}]: "
            f"%(message)s"))
    channel = socket.socket(fileno=channel_fd)
    role = WorkerRole(index, count, tuple(socket.socket(fileno=fd) for fd in listener_fds),
                      replay_fd, receive_ticket_keys(channel), users_fd)
    state = load_state(args.state, args.db)
    _raise_open_file_limit()

    async def main(stop: asyncio.Event) -> None:
        server = VeilServer(state, options, worker=role)
        await server.start()
        reporter = asyncio.get_running_loop().create_task(
            report_to_parent(server, channel, stop))
        try:
            await _serve_until_stopped(server, stop, daily=False)
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await server.stop()

    _run(main)


# The self-signed certificate is renewed when a third of its life is left; a server that runs
# for months re-reads it daily so the renewal happens without a restart.
CERT_RELOAD_INTERVAL_S = 24 * 3600.0


async def _serve_until_stopped(server: VeilServer | WorkerPool, stop: asyncio.Event, *,
                               daily: bool = True) -> None:
    """Tell systemd we are ready, reload on SIGHUP (and daily unless not ``daily``: a worker's
    parent reloads it), return on SIGINT/SIGTERM."""
    from veil.server.systemd import notify

    loop = asyncio.get_running_loop()
    reload = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    if daily:
        loop.call_later(CERT_RELOAD_INTERVAL_S, reload.set)
    notify("READY=1", f"STATUS=listening on {server.address}")
    stopping = loop.create_task(stop.wait())
    while True:
        reloading = loop.create_task(reload.wait())
        await asyncio.wait({stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            reloading.cancel()
            break
        reload.clear()
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await server.reload()
        except VeilError as exc:  # e.g. a damaged certificate: keep serving with the old one
            log.error("reload failed, still serving as before: %s", exc)
        if daily:
            loop.call_later(CERT_RELOAD_INTERVAL_S, reload.set)
        notify("READY=1", f"STATUS=listening on {server.address}")
    log.info("stopping")
    notify("STOPPING=1")


def _raise_open_file_limit() -> None:
    """Every connection is a descriptor (two while relayed): lift the soft limit, often 1024,
    to the hard one, as Go's runtime does for its servers."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


def _expiry(moment: float | None) -> str:
    """An expiry as it was given: ``--expires 2027-06-30`` is stored as the end of that day
    (2027-07-01 00:00 UTC) and shown as ``2027-06-30``; another time in UTC."""
    import datetime

    if moment is None:
        return "never"
    end = datetime.datetime.fromtimestamp(moment, datetime.UTC)
    if end.time() == datetime.time():
        return (end.date() - datetime.timedelta(days=1)).isoformat()
    return end.strftime("%Y-%m-%d %H:%M UTC")


def _confirm(manager: UserManager) -> None:
    """Wait until the running servers on the store have the edit; say so when not all do."""
    missing = manager.confirm().describe()
    if missing is not None:
        print(f"veil: note: {missing}", file=sys.stderr, flush=True)


def _networks_arg(values: list[str] | None) -> list[str]:
    """``--site``/``--reach`` as given: each may hold several, comma-separated; ``none``
    alone empties the list."""
    found = [v.strip() for value in values or () for v in value.split(",") if v.strip()]
    return [] if [v.lower() for v in found] == ["none"] else found


def cmd_user(args: argparse.Namespace) -> None:
    import json

    from veil.manage.state import init_state, load_state
    from veil.manage.users import UserManager, format_bytes

    if args.user_command == "add" and args.public:
        public = parse_host_port(args.public)
        state, _ = init_state(args.state, listen=public, public=args.public, db=args.db)
    else:
        state = load_state(args.state, db=args.db)
    limit = parse_limit(args.limit) if getattr(args, "limit", None) else None
    expires = parse_expiry(args.expires) if getattr(args, "expires", None) else None
    manager = UserManager(state, state.open_store())
    command = args.user_command
    try:
        if command == "add":
            user = manager.add(args.name, limit_bytes=limit[0] if limit else None,
                               limit_period=limit[1] if limit else "month",
                               expires_at=expires, sites=_networks_arg(args.site))
            _confirm(manager)  # the key is printed once the running servers accept it
            _print_key(manager.access_key(user))
        elif command == "list":
            rows = manager.report()
            if args.json:
                print(json.dumps([r.to_json() for r in rows], indent=2))
                return
            print(f"{'NAME':<20} {'CREATED':<16} {'USED':>10} {'LIMIT':>16} "
                  f"{'EXPIRES':<20} {'LAST SEEN':<16} STATUS")
            for r in rows:
                limit_text = ("-" if r.limit_bytes is None
                              else f"{format_bytes(r.limit_bytes)}/{r.limit_period}")
                # A site's subnets and a reach list, when there are any, after the status:
                # the columns before keep their places for whoever reads them by position.
                nets = (f" site {','.join(r.sites)}" if r.sites else "") + (
                    f" reach {','.join(r.reach)}" if r.reach else "")
                print(f"{r.name:<20} {_when(r.created_at):<16} {format_bytes(r.used.total):>10} "
                      f"{limit_text:>16} {_expiry(r.expires_at):<20} "
                      f"{_when(r.last_seen):<16} {r.status}{nets}")
        elif command == "revoke":
            manager.revoke(args.name)
            _confirm(manager)
            print(f"revoked {args.name}")
        elif command == "restore":
            manager.restore(args.name)
            _confirm(manager)
            print(f"restored {args.name}: its key works again")
        elif command == "delete":
            manager.delete(args.name)
            _confirm(manager)
            print(f"deleted {args.name}")
        elif command == "rotate":
            user = manager.rotate(args.name)
            _confirm(manager)
            _print_key(manager.access_key(user))
        elif command == "limit":
            if (limit is None and args.expires is None and args.site is None
                    and args.reach is None):
                raise ConfigError("say --limit SIZE[/PERIOD], --expires DATE, --site CIDR "
                                  "and/or --reach CIDR|SITE")
            if args.site is not None:
                manager.set_sites(args.name, _networks_arg(args.site))
            if args.reach is not None:
                manager.set_reach(args.name, _networks_arg(args.reach))
            if limit is not None:
                manager.set_limit(args.name, *limit)
            if args.expires is not None:
                manager.set_expiry(args.name, expires)
            _confirm(manager)
            report = next(r for r in manager.report() if r.name == args.name)
            print(f"{args.name}: limit "
                  f"{format_bytes(report.limit_bytes)}/{report.limit_period}, "
                  f"expires {_expiry(report.expires_at)}, site "
                  f"{' '.join(report.sites) or '-'}, reach {' '.join(report.reach) or '-'}, "
                  f"status {report.status}")
        elif command == "show":
            user = manager.get(args.name)
            if args.json:
                report = next(r for r in manager.report() if r.name == args.name)
                from veil.manage.export import export_user
                from veil.manage.subscription import subscription_urls

                print(json.dumps({**report.to_json(),
                                  "key": export_user(state, user, args.format).text,
                                  "ways_in": [way.url for way in state.ways()],
                                  "subscription_urls": subscription_urls(state, user)},
                                 indent=2))
                return
            if args.subscription:
                from veil.manage.subscription import subscription_urls

                if not user.active:
                    print(f"veil: warning: user {user.name!r} is revoked: its subscription "
                          "answers 404", file=sys.stderr)
                for url in subscription_urls(state, user):
                    print(url, flush=True)
                return
            _show_user(state, user, args)
    finally:
        manager.store.close()


def cmd_connect(args: argparse.Namespace) -> None:
    import dataclasses

    from veil.client.service import run_client

    if args.key.strip().lower().startswith("https://"):
        # A subscription: its first answer (fetched, or cached) is the key to start with.
        from veil.client.subscription import Follower

        # --rules cn: the preset's data follows the subscription too
        follower = Follower(SubscriptionOptions(args.key, args.subscription_cache,
                                                args.refresh), rule_data="cn" in args.rules)
        if args.explain:  # no connection: the data a start would use (the cached copy)
            _explain(args.rules, args.explain,
                     follower.rule_data.current if follower.rule_data is not None else None)
            return

        async def follow(stop: asyncio.Event) -> None:
            first = await follower.start()
            options = dataclasses.replace(_connect_options(args, first.key),
                                          subscription=follower.options)
            await run_client(options, stop, follower=follower)

        _run(follow)
        return
    if args.explain:
        _explain(args.rules, args.explain)
        return
    options = _connect_options(args, parse_key(args.key))
    if args.tun_cleanup:
        from veil.client.service import tun_cleanup

        print("restored" if tun_cleanup() else "nothing to restore")
        return
    _run(lambda stop: run_client(options, stop))


#: The port --explain assumes when HOST has none: most new connections are HTTPS.
EXPLAIN_DEFAULT_PORT = 443


def _explain(rule_sources: list[str], hosts: list[str], data: RuleData | None = None) -> None:
    """``connect --rules ... --explain HOST``: the deciding rule per host, no connection.
    ``data``: the ``cn`` preset's (a subscription's cached copy), else the packaged data."""
    import datetime

    from veil.client import ruledata
    from veil.client.service import load_client_rules

    if not rule_sources:
        raise ConfigError("--explain needs --rules: without rules everything goes through "
                          "the tunnel")
    data = data or ruledata.packaged()
    rules = load_client_rules(tuple(rule_sources), data.cn_data)
    for host in hosts:
        print(rules.explain(parse_host_port(host, EXPLAIN_DEFAULT_PORT)))
    if "cn" in rule_sources:
        # Where the preset's data comes from, how old it is, and the attribution DB-IP's
        # licence asks for.
        print(f"cn data: {data.origin}")
        today = datetime.datetime.now(datetime.UTC).date()
        for kind, about in data.info().items():
            age = (today - datetime.date.fromisoformat(about["data_date"])).days
            print(f"cn {kind}: {about['source']} {about['version'][:12]}, data of "
                  f"{about['data_date']} ({age} days old; {about['licence']}; "
                  f"{about['attribution']})")


def _connect_options(args: argparse.Namespace, key: AccessKey | TrojanLink) -> ClientOptions:
    connections = args.connections
    if args.deprecated_pool is not None:
        log.warning("connect --pool is deprecated: say --connections %d", args.deprecated_pool)
        if connections is None:  # --connections, when said too, wins
            connections = args.deprecated_pool
    options = ClientOptions.from_args(key, socks=args.socks, http=args.http,
                                      forwards=args.forward, socks_auth=args.socks_auth,
                                      connections=1 if connections is None else connections,
                                      default_socks=parse_host_port(DEFAULT_SOCKS),
                                      tls_stack=args.tls, shaping=args.shaping, tun=args.tun,
                                      tun_exclude=tuple(args.exclude),
                                      keepalive=args.keepalive, http_auth=args.http_auth,
                                      allow_lan=args.allow_lan, rules=tuple(args.rules),
                                      system_proxy=args.system_proxy, tun_site=args.site,
                                      stripe=args.stripe)
    return options


def cmd_lab(args: argparse.Namespace) -> None:
    from veil.lab.commands import run_lab

    status = run_lab(args)
    if status:
        sys.stdout.flush()
        raise SystemExit(status)


def cmd_admin(args: argparse.Namespace) -> None:
    from veil.admin.cli import run_admin

    if (args.admin_command == "passwd" and not args.password_stdin
            and not sys.stdin.isatty()):
        # getpass would fall back to reading stdin with a warning, then end at its EOF.
        raise ConfigError("no terminal to ask for the password on: pipe it in with "
                          "--password-stdin")

    run_admin(args)


def cmd_doctor(args: argparse.Namespace) -> None:
    from veil.cli.doctor import run_doctor

    status = run_doctor(args)
    if status:
        raise SystemExit(status)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": cmd_serve, "user": cmd_user, "connect": cmd_connect, "lab": cmd_lab,
    "admin": cmd_admin, "doctor": cmd_doctor}


#: Store answers that mean the request named something wrong (a user that does not exist, a
#: name already taken), which exit 2 like a mistyped option, not 1 like a store that failed:
#: a script can tell "fix the command" from "try again later".
_WRONG_REQUEST_CODES = frozenset({"not_found", "exists", "already_revoked", "not_revoked",
                                  "bad_usage"})


def _is_a_wrong_request(exc: Exception) -> bool:
    if isinstance(exc, ConfigError):
        return True
    return isinstance(exc, StoreError) and exc.code in _WRONG_REQUEST_CODES


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv, verbosity = _take_verbosity(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.verbosity = args.verbose + verbosity
    if args.command == "serve":  # what --workers starts its workers with
        args.serve_argv = argv[argv.index("serve") + 1:]
    _setup_logging(args.verbosity)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2 if _is_a_wrong_request(exc) else 1
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 1
    except EOFError:
        # input() with nothing to read: no terminal, and no --password-stdin or the like.
        # After the prompt, which has no newline of its own.
        print("\nveil: error: nothing more to read on stdin", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout closed early (`veil user list | head`): nothing more to say, to anyone.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, then gone
        return 141
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
