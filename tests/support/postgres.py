"""A real, throwaway PostgreSQL server for tests (Debian's packages: apt-get install postgresql).

::

    with postgres_server() as pg:
        url = pg.create_database("users")   # postgresql://veil:<password>@127.0.0.1:<port>/users

The cluster lives in a fresh temporary directory, listens on 127.0.0.1 on a free port (and
on a unix socket in that directory, never the system's), requires a password over TCP (so the
URLs carry one, as in production, and tests can check that it never leaks), and runs with
``fsync=off``: nothing here needs to survive a power cut. It is stopped with
``pg_ctl stop -m immediate`` and its directory deleted, whatever happens.

PostgreSQL refuses to run as root: as root (CI), initdb and pg_ctl run as the ``postgres``
system user; otherwise as the current user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.procs import unused_port

PREFERRED_VERSION = "15"
SUPERUSER = "veil"
# initdb and a start with -w take 1-3 s; a loaded CI machine gets ten times that.
START_TIMEOUT_S = 60


def find_bin_dir() -> Path | None:
    """Debian's PostgreSQL binaries: version 15 if installed, else the newest."""
    dirs = {p.parent.name: p for p in Path("/usr/lib/postgresql").glob("*/bin")
            if (p / "initdb").exists() and (p / "pg_ctl").exists()}
    if PREFERRED_VERSION in dirs:
        return dirs[PREFERRED_VERSION]
    newest = sorted(dirs, key=lambda v: int(v) if v.isdigit() else 0)
    return dirs[newest[-1]] if newest else None


@dataclass(frozen=True)
class PostgresServer:
    port: int
    password: str
    socket_dir: Path
    _pg_ctl: list[str] = field(repr=False, default_factory=list)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection in autocommit mode (close it, or use it in ``with``)."""
        return psycopg.connect(self.url(dbname), autocommit=True)

    def restart(self) -> None:
        """Restart the server (same port and data): every open connection is dropped."""
        subprocess.run([*self._pg_ctl, "-m", "fast", "-w", "-t", str(START_TIMEOUT_S),
                        "restart"], cwd=self.socket_dir, capture_output=True,
                       timeout=START_TIMEOUT_S, check=True)

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; "
                    "scripts/install-deps installs it)")
    as_owner: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run "
                        "PostgreSQL as (it refuses to run as root)")
        as_owner = ["runuser", "-u", "postgres", "--"]
    # Not pytest's tmp_path: its parents are 0700 root, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="veil-pg-"))
    data, log = root / "data", root / "postgres.log"
    started = False
    try:
        password = secrets.token_urlsafe(16)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if as_owner:
            os.chown(root, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)

        def run(*argv: str) -> None:
            done = subprocess.run([*as_owner, *argv], cwd=root, capture_output=True,
                                  text=True, timeout=START_TIMEOUT_S, check=False)
            if done.returncode != 0:
                logged = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}):\n"
                                   f"{done.stdout}{done.stderr}{logged}")

        run(str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER,
            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        port = unused_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        started = True
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
            "-t", str(START_TIMEOUT_S), "-o", options, "start")
        pg_ctl = [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log)]
        yield PostgresServer(port=port, password=password, socket_dir=root, _pg_ctl=pg_ctl)
    finally:
        if started:
            _stop(as_owner, bin_dir, data)
        shutil.rmtree(root, ignore_errors=True)


def _stop(as_owner: list[str], bin_dir: Path, data: Path) -> None:
    try:
        done = subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data),
                               "-m", "immediate", "-w", "stop"], cwd=data.parent,
                              capture_output=True, timeout=START_TIMEOUT_S, check=False)
        stopped = done.returncode == 0
    except subprocess.TimeoutExpired:
        stopped = False
    pid_file = data / "postmaster.pid"
    if not stopped and pid_file.exists():
        # The postmaster this fixture started (its data directory names it) did not stop.
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
