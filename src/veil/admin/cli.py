"""``veil admin``: set the admin panel's password, make its API token.

Both write a setting into the user store, so they work while the server runs (a running
panel picks the change up within a second) and, with a shared PostgreSQL store, for every
server of a fleet at once. Neither stores a secret in the clear: the password as an
Argon2id hash, the token as its SHA-256.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from veil.admin.auth import (
    MIN_PASSWORD_LENGTH,
    PASSWORD_SETTING,
    TOKEN_SETTING,
    hash_password,
    new_api_token,
)
from veil.errors import ConfigError
from veil.manage.state import load_state
from veil.store.base import UserStore

ADMIN_DESCRIPTION = """\
The admin panel (veil serve --admin 127.0.0.1:8080): its password and API token.

  veil admin passwd --state DIR      set the password (asked twice; or --password-stdin)
  veil admin token --state DIR       print a new API token for scripts (shown once)

Details: docs/admin.md.
"""


def add_admin_parser(sub: Any, default_state: Path) -> None:
    """Add ``admin`` and its subcommands to the ``veil`` subparsers ``sub``."""
    admin = sub.add_parser("admin", help="the admin panel's password and API token",
                           description=ADMIN_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    passwd = admin_sub.add_parser(
        "passwd", help="set the admin password",
        description="Set the password of the admin panel (stored as an Argon2id hash). Open "
                    "browser sessions end within a second.")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    token = admin_sub.add_parser(
        "token", help="make a new API token (replaces the old one)",
        description="Print a new token for the admin API and /metrics (Authorization: "
                    "Bearer TOKEN). It is shown once: only its SHA-256 is stored. The "
                    "previous token stops working.")
    token.add_argument("--revoke", action="store_true",
                       help="remove the token instead: no script can use the API")
    for p in (passwd, token):
        p.add_argument("--state", type=Path, default=default_state, metavar="DIR",
                       help=f"state directory (default {default_state})")
        p.add_argument("--db", metavar="URL", default=os.environ.get("VEIL_DB"),
                       help="user store: postgresql://USER:PASSWORD@HOST/DB (default: the "
                            "one the server was started with, else DIR/users.db; env VEIL_DB)")


def _open_store(args: argparse.Namespace) -> UserStore:
    return load_state(args.state, db=args.db).open_store()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New admin password: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the passwords differ")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} "
                          "characters")
    return password


def run_admin(args: argparse.Namespace) -> None:
    if args.admin_command == "passwd":
        encoded = hash_password(_read_password(args.password_stdin))
        store = _open_store(args)
        try:
            store.set_setting(PASSWORD_SETTING, encoded)
        finally:
            store.close()
        print("admin password set", file=sys.stderr)
    elif args.admin_command == "token":
        store = _open_store(args)
        try:
            if args.revoke:
                store.set_setting(TOKEN_SETTING, None)
                print("API token removed", file=sys.stderr)
                return
            token, digest = new_api_token()
            store.set_setting(TOKEN_SETTING, digest)
        finally:
            store.close()
        print(token, flush=True)
        print("this token is shown once; the previous one no longer works", file=sys.stderr)
