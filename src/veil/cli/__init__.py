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
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from veil import __version__
from veil.errors import ConfigError, StoreError, VeilError
from veil.protocol.address import Address, parse_host_port
from veil.protocol.auth import Credential, new_secret

if TYPE_CHECKING:
    from veil.server.state import ServerState
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"veil {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="run the server",
        description="Run the veil server in the foreground: one TLS port that serves a website "
                    "to everybody and a tunnel to holders of a valid access key. On first use it "
                    "initialises the state directory and prints the first user's access key.")
    serve.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"state directory (keys, certificate, users; default {DEFAULT_STATE})")
    serve.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT",
                       help="address to listen on, e.g. 0.0.0.0:443")
    serve.add_argument("--public", metavar="HOST[:PORT]",
                       help="address clients use, written into access keys "
                            "(default: the listen address)")
    serve.add_argument("--cover", metavar="URL",
                       help="web server to show to everybody else, e.g. http://127.0.0.1:8080 "
                            "(default: a built-in static site)")
    serve.add_argument("--cert", type=Path, metavar="FILE",
                       help="certificate chain (PEM) to use instead of a self-signed one")
    serve.add_argument("--key", type=Path, metavar="FILE", help="private key (PEM) for --cert")
    serve.add_argument("--allow-private", action="store_true",
                       help="let clients reach private, loopback and link-local addresses "
                            "(off by default: it exposes the server's own network)")
    serve.add_argument("--no-shaping", dest="shaping", action="store_false",
                       help="do not pad the first writes of sessions and streams (measures "
                            "shaping's cost; makes tunnelled TLS handshakes visible)")

    user = sub.add_parser("user", help="manage users and their access keys",
                          description="Manage users. Works while the server runs.")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser("add", help="create a user and print its access key",
                              description="Create a user and print its access key URI "
                                          "(one line; on a terminal also a QR code).")
    add.add_argument("name")
    add.add_argument("--public", metavar="HOST:PORT",
                     help="server address for keys, needed if no server has run on DIR yet")
    lst = user_sub.add_parser("list", help="list users")
    revoke = user_sub.add_parser("revoke", help="revoke a user's access",
                                 description="Revoke a user: new connections with its key get "
                                             "the cover site.")
    revoke.add_argument("name")
    show = user_sub.add_parser(
        "show", help="print a user's key for veil or for a Trojan app",
        description="Print a user's key: a veil URI (default), a trojan:// link, or a Clash Meta "
                    "or sing-box configuration (every user can also connect with Trojan apps "
                    "on the same port). On a terminal a URI is also shown as a QR code.")
    show.add_argument("name")
    show.add_argument("--format", choices=("veil", "trojan", "clash", "sing-box"),
                      default="veil", help="what to print (default veil)")
    show.add_argument("--png", type=Path, metavar="FILE",
                      help="also write what is printed as a QR code, in a PNG file")
    for p in (add, lst, revoke, show):
        p.add_argument("--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"state directory (default {DEFAULT_STATE})")

    connect = sub.add_parser(
        "connect", help="run the client",
        description="Connect to a veil server and offer local proxies. With no --socks, "
                    f"--http or --forward, a SOCKS5 proxy listens on {DEFAULT_SOCKS}.")
    connect.add_argument("key", metavar="KEY",
                         help="access key (veil://...), or a trojan://PASSWORD@HOST:PORT link "
                              "to any Trojan server (?sni=NAME, &allowInsecure=1, &pin=PIN)")
    connect.add_argument("--socks", type=_address, metavar="HOST:PORT",
                         help="SOCKS5 proxy listen address (CONNECT and UDP ASSOCIATE)")
    connect.add_argument("--socks-auth", metavar="USER:PASSWORD",
                         help="require this username/password on the SOCKS5 port")
    connect.add_argument("--http", type=_address, metavar="HOST:PORT",
                         help="HTTP proxy listen address (CONNECT and plain requests)")
    connect.add_argument("--forward", action="append", default=[],
                         metavar="[LHOST:]LPORT:RHOST:RPORT[/udp]",
                         help="forward a local port to RHOST:RPORT through the tunnel "
                              "(repeatable)")
    connect.add_argument("--pool", type=int, default=1, metavar="N",
                         help="TLS connections to keep to the server (default 1)")
    connect.add_argument("--no-shaping", dest="shaping", action="store_false",
                         help="do not pad the first writes of sessions and streams (measures "
                              "shaping's cost; makes tunnelled TLS handshakes visible)")
    connect.add_argument("--tls", choices=("browser", "openssl"), default="browser",
                         help="TLS client: 'browser' sends Chrome's ClientHello (default); "
                              "'openssl' uses Python's ssl, whose ClientHello no browser sends")

    from veil.lab.cli import add_lab_parser

    add_lab_parser(sub)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop (when installed) until it returns or SIGINT/SIGTERM."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
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
    from veil.server.export import export_user

    if user is None:
        raise StoreError(f"no user named {args.name!r}", code="not_found")
    exported = export_user(state, user, args.format)
    for warning in exported.warnings:
        print(f"veil: warning: {warning}", file=sys.stderr)
    if exported.one_line:
        _print_key(exported.text)
    else:
        print(exported.text, flush=True)
    if args.png is not None:
        import segno

        try:
            segno.make(exported.text, error="l").save(str(args.png), scale=4)
        except segno.DataOverflowError as exc:
            raise ConfigError(f"too long for a QR code: {exc}; try --format trojan") from exc
        except OSError as exc:
            raise VeilError(f"cannot write {args.png}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> None:
    from veil.server.service import ServerOptions, VeilServer
    from veil.server.state import init_state

    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together")
    state, _created = init_state(args.state, listen=args.listen, public=args.public,
                                 cert=args.cert, key=args.key)
    store = state.open_store()
    try:
        if not store.list_users():
            secret = new_secret()
            user = store.add_user(FIRST_USER, secret, Credential.from_secret(secret).key_id,
                                  time.time())
            log.warning("created user %r; its access key is printed on stdout", user.name)
            _print_key(state.access_key(user).to_uri())
    finally:
        store.close()
    options = ServerOptions(listen=args.listen, cover_url=args.cover,
                            allow_private=args.allow_private, shaping=args.shaping)

    async def main(stop: asyncio.Event) -> None:
        server = VeilServer(state, options)
        try:
            await server.start()
        except OSError as exc:
            raise VeilError(f"cannot listen on {args.listen}: {exc.strerror}") from exc
        await stop.wait()
        log.warning("stopping")
        await server.stop()

    _run(main)


def cmd_user(args: argparse.Namespace) -> None:
    from veil.server.state import init_state, load_state

    if args.user_command == "add" and args.public:
        public = parse_host_port(args.public)
        state, _ = init_state(args.state, listen=public, public=args.public)
    else:
        state = load_state(args.state)
    store = state.open_store()
    try:
        if args.user_command == "add":
            secret = new_secret()
            user = store.add_user(args.name, secret, Credential.from_secret(secret).key_id,
                                  time.time())
            _print_key(state.access_key(user).to_uri())
        elif args.user_command == "list":
            print(f"{'NAME':<24} {'CREATED':<20} STATUS")
            for u in store.list_users():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u.created_at))
                print(f"{u.name:<24} {created:<20} {'active' if u.active else 'revoked'}")
        elif args.user_command == "revoke":
            store.revoke(args.name, time.time())
            print(f"revoked {args.name}")
        elif args.user_command == "show":
            _show_user(state, store.get_user(args.name), args)
    finally:
        store.close()


def cmd_connect(args: argparse.Namespace) -> None:
    from veil.client.service import ClientOptions, parse_key, run_client

    key = parse_key(args.key)
    if args.pool < 1 or args.pool > 16:
        raise ConfigError("--pool takes 1 to 16")
    options = ClientOptions.from_args(key, socks=args.socks, http=args.http,
                                      forwards=args.forward, socks_auth=args.socks_auth,
                                      pool=args.pool, default_socks=parse_host_port(DEFAULT_SOCKS),
                                      tls_stack=args.tls, shaping=args.shaping)
    _run(lambda stop: run_client(options, stop))


def cmd_lab(args: argparse.Namespace) -> None:
    from veil.lab.commands import run_lab

    status = run_lab(args)
    if status:
        sys.stdout.flush()
        raise SystemExit(status)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": cmd_serve, "user": cmd_user, "connect": cmd_connect, "lab": cmd_lab}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
