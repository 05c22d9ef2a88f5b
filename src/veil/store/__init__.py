"""Users, credentials, limits and usage: one interface (``base.UserStore``), two back ends."""

from __future__ import annotations

from pathlib import Path

from veil.store._sql import TrojanHash
from veil.store.base import SecretBox, UserStore
from veil.store.sqlite import SqliteUserStore

__all__ = ["open_store"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(url_or_path: str | Path, *, trojan_hash: TrojanHash, box: SecretBox) -> UserStore:
    """Open the user store at ``url_or_path``: a ``postgresql://`` (or ``postgres://``) URL is
    a PostgreSQL database, anything else the path of a SQLite file."""
    if isinstance(url_or_path, str) and url_or_path.lower().startswith(_POSTGRES_SCHEMES):
        # Imported here: only a PostgreSQL store needs psycopg.
        from veil.store.postgres import PostgresUserStore  # noqa: PLC0415

        return PostgresUserStore(url_or_path, trojan_hash=trojan_hash, box=box)
    return SqliteUserStore(url_or_path, trojan_hash=trojan_hash, box=box)
