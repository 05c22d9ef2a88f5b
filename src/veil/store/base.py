"""The user store interface: who may use the server, and with which credential."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from veil.errors import StoreError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'",
            code="bad_name")
    return name


@dataclass(frozen=True, slots=True)
class User:
    name: str
    secret: bytes
    key_id: bytes
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class UserStore(abc.ABC):
    """Users and their credentials. Implementations must be safe to use from several
    processes at once (the CLI edits the store while the server runs)."""

    @abc.abstractmethod
    def add_user(self, name: str, secret: bytes, key_id: bytes, now: float) -> User:
        """Create a user; StoreError(code="exists") if the name is taken."""

    @abc.abstractmethod
    def get_user(self, name: str) -> User | None: ...

    @abc.abstractmethod
    def find_by_key_id(self, key_id: bytes) -> User | None:
        """The user a client's key id names, revoked or not; None if unknown."""

    @abc.abstractmethod
    def find_by_trojan_hash(self, password_hash: str) -> User | None:
        """The user whose Trojan password has this hex SHA-224, revoked or not; None if
        unknown. The password is derived from the secret (``veil.protocol.trojan``), so the
        store computes the hash itself when a user is added."""

    @abc.abstractmethod
    def list_users(self) -> list[User]: ...

    @abc.abstractmethod
    def revoke(self, name: str, now: float) -> User:
        """Revoke a user; StoreError(code="not_found") if there is none."""

    @abc.abstractmethod
    def close(self) -> None: ...
