"""User management shared by the CLI and the admin panel: one place that makes credentials,
applies limits and reports usage, so both front ends behave the same."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from veil.errors import ConfigError, StoreError
from veil.manage import presence
from veil.manage.state import ServerState
from veil.protocol.auth import Credential, new_secret
from veil.store.base import LimitPeriod, NetworkKind, Usage, User, UserStore, period_start

#: The settings a ``veil serve --tun`` records its address pools under (one per server:
#: ``tun_pools:<server id>`` = "10.77.0.0/16 fd77::/64"), so that a site overlapping a
#: running server's pool is refused when it is added, not found out by its packets.
TUN_POOLS_SETTING = "tun_pools:"
#: ``veil serve --tun``'s default pools (veil.config.DEFAULT_TUN_POOL/6, which manage/ may not
#: import: tests/unit/test_site_users.py keeps them equal): refused to sites even before a
#: server has recorded its own.
DEFAULT_POOLS = ("10.77.0.0/16", "fd77::/64")


def site_networks(values: Iterable[str], what: str = "--site") -> tuple[str, ...]:
    """CIDRs as typed (``192.168.10.0/24``) in the form the store keeps; a host address
    with a prefix (192.168.10.1/24) is refused, as it is most likely a typo of the subnet."""
    out: list[str] = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value.strip())))
        except ValueError as exc:
            raise ConfigError(f"{what} takes a subnet such as 192.168.10.0/24: {exc}") from None
    return tuple(out)


def format_bytes(count: int | None) -> str:
    """A byte count as people read it (``1.5 GB``; ``-`` for none): output, so it lives with
    the reports it formats; the parsers of what people type are in :mod:`veil.config`."""
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class UserReport:
    """One row of ``veil user list`` and of the panel's user table."""

    name: str
    created_at: float
    status: str  # active | revoked | expired | over_limit
    used: Usage  # in the current limit period
    limit_bytes: int | None
    limit_period: LimitPeriod
    expires_at: float | None
    last_seen: float | None
    revoked_at: float | None
    sites: tuple[str, ...] = ()
    reach: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "created_at": self.created_at, "status": self.status,
                "used_bytes": self.used.total, "up_bytes": self.used.up,
                "down_bytes": self.used.down, "limit_bytes": self.limit_bytes,
                "limit_period": self.limit_period, "expires_at": self.expires_at,
                "last_seen": self.last_seen, "revoked_at": self.revoked_at,
                "sites": list(self.sites), "reach": list(self.reach)}


class UserManager:
    """Every edit of the users goes through here, and each one, once committed, moves the
    store's change token (veil.manage.presence) so that :meth:`confirm` can wait for the
    running servers to load it."""

    def __init__(self, state: ServerState, store: UserStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.store = store
        self._clock = clock
        #: The change token of this manager's last edit (0: none yet).
        self.last_change = 0

    def _changed(self) -> None:
        self.last_change = presence.note_change(self.store)

    def confirm(self, timeout: float = presence.CONFIRM_TIMEOUT_S) -> presence.Confirmation:
        """Wait until every running server on this store has loaded the last edit."""
        return presence.wait_confirmed(self.store, self.last_change, timeout=timeout,
                                       clock=self._clock)

    def get(self, name: str) -> User:
        user = self.store.get_user(name)
        if user is None:
            raise StoreError(f"no user named {name!r}", code="not_found")
        return user

    def add(self, name: str, *, limit_bytes: int | None = None,
            limit_period: LimitPeriod = "month", expires_at: float | None = None,
            sites: Sequence[str] = ()) -> User:
        """Create a user (a site with ``sites``). A key that could not work from the start is
        refused: a limit of nothing, an expiry already past, or site subnets that overlap
        another site's or a server's address pool (ConfigError, before anything is made)."""
        if limit_bytes is not None and limit_bytes <= 0:
            raise ConfigError("a limit of 0 lets nothing through: give a size, or none")
        if expires_at is not None and expires_at <= self._clock():
            raise ConfigError("that expiry is already past: the key would never work")
        nets = site_networks(sites)
        if nets:
            self._check_sites(name, nets)
        secret = new_secret()
        user = self.store.add_user(name, secret, Credential.from_secret(secret).key_id,
                                   self._clock(), limit_bytes=limit_bytes,
                                   limit_period=limit_period, expires_at=expires_at)
        if nets:
            user = self._set_networks(name, "site", nets)
        self._changed()
        return user

    def _set_networks(self, name: str, kind: NetworkKind, values: tuple[str, ...]) -> User:
        try:
            return self.store.set_networks(name, kind, values)
        except StoreError as exc:
            if exc.code in ("overlap", "bad_network"):  # the operator's to fix: exit 2
                raise ConfigError(str(exc)) from None
            raise

    def _check_sites(self, name: str, nets: tuple[str, ...]) -> None:
        """Refuse subnets that overlap a server's address pool or another site's (the store
        checks the sites again in its transaction: this is for adding a user, which must
        not leave a user behind when its sites are refused)."""
        pools = list(DEFAULT_POOLS)
        for value in self.store.settings_with_prefix(TUN_POOLS_SETTING).values():
            pools += value.split()
        taken = [(ipaddress.ip_network(p), "the tunnel address pool") for p in pools]
        taken += [(ipaddress.ip_network(cidr), f"site {user.name!r}")
                  for user in self.store.list_users() if user.name != name
                  for cidr in user.sites]
        for mine in map(ipaddress.ip_network, nets):
            for theirs, owner in taken:
                if mine.version == theirs.version and mine.overlaps(theirs):
                    raise ConfigError(f"site subnet {mine} overlaps {theirs} of {owner}")

    def set_sites(self, name: str, sites: Sequence[str]) -> User:
        nets = site_networks(sites)
        self._check_sites(name, nets)
        user = self._set_networks(name, "site", nets)
        self._changed()
        return user

    def set_reach(self, name: str, reach: Sequence[str]) -> User:
        """What ``name`` may reach among the sites: CIDRs and site names (a name must be a
        site now: a typo would otherwise allow nothing, silently)."""
        values: list[str] = []
        sites = {user.name for user in self.store.list_users() if user.sites}
        for typed in reach:
            value = typed.strip()
            if "/" in value or value.replace(".", "").isdigit() or ":" in value:
                values += site_networks([value], "--reach")
            elif value in sites:
                values.append(value)
            else:
                raise ConfigError(f"--reach {value}: no site of that name (give a site or "
                                  "a CIDR)")
        user = self._set_networks(name, "reach", tuple(values))
        self._changed()
        return user

    def revoke(self, name: str) -> User:
        user = self.store.revoke(name, self._clock())
        self._changed()
        return user

    def restore(self, name: str) -> User:
        """Undo a revocation: the user's key (the one it had) works again."""
        user = self.store.restore(name)
        self._changed()
        return user

    def delete(self, name: str) -> None:
        """Remove a revoked user and its usage; the name may be used again."""
        self.store.delete(name)
        self._changed()

    def rotate(self, name: str) -> User:
        secret = new_secret()
        user = self.store.rotate(name, secret, Credential.from_secret(secret).key_id,
                                 self._clock())
        self._changed()
        return user

    def set_limit(self, name: str, limit_bytes: int | None,
                  limit_period: LimitPeriod = "month") -> User:
        user = self.store.set_limit(name, limit_bytes, limit_period)
        self._changed()
        return user

    def set_expiry(self, name: str, expires_at: float | None) -> User:
        user = self.store.set_expiry(name, expires_at)
        self._changed()
        return user

    def access_key(self, user: User) -> str:
        return self.state.access_key(user).to_uri()

    def report(self, now: float | None = None) -> list[UserReport]:
        now = self._clock() if now is None else now
        by_period = {period: self.store.usage_by_user(period_start(period, now))
                     for period in ("month", "total")}
        rows = []
        for user in self.store.list_users():
            used = by_period[user.limit_period].get(user.name, Usage())
            rows.append(UserReport(user.name, user.created_at, user.status(now, used.total),
                                   used, user.limit_bytes, user.limit_period, user.expires_at,
                                   user.last_seen, user.revoked_at, user.sites, user.reach))
        return rows
