"""The store contract's fixtures: each test gets a fresh, empty store of each back end."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, postgres_server
from veil.store import open_store
from veil.store.base import SecretBox, UserStore

STORE_KEY = bytes(range(32))
BOX = SecretBox(STORE_KEY)


def trojan_hash(secret: bytes) -> str:
    """Stands in for veil.protocol.trojan's derivation (the store layer only stores it)."""
    return hashlib.sha224(b"trojan password of " + secret).hexdigest()


@dataclass
class Backend:
    """One database of one back end; ``open`` gives another store on it, as a second process
    or server would have."""

    kind: str
    location: str | Path
    server: PostgresServer | None = None
    opened: list[UserStore] = field(default_factory=list)

    def open(self, box: SecretBox = BOX) -> UserStore:
        store = open_store(self.location, trojan_hash=trojan_hash, box=box)
        self.opened.append(store)
        return store

    def raw_contents(self) -> bytes:
        """Everything the database holds, as an attacker with a copy of it would read it."""
        if self.server is None:
            path = Path(self.location)
            return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
        with self.server.admin(str(self.location).rsplit("/", 1)[1]) as conn:
            rows = [conn.execute(f"SELECT t::text FROM {table} t").fetchall()
                    for table in ("users", "usage", "settings", "meta")]
        return "\n".join(str(row[0]) for table in rows for row in table).encode()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        chosen = Backend("sqlite", tmp_path / "users.db")
    else:
        server: PostgresServer = request.getfixturevalue("pg")
        chosen = Backend("postgres", server.create_database(f"t{uuid.uuid4().hex}"), server)
    try:
        yield chosen
    finally:
        for store in chosen.opened:
            store.close()


@pytest.fixture
def store(backend: Backend) -> UserStore:
    return backend.open()
