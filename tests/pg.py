"""A real, throw-away PostgreSQL server for tests.

``PgServer.start()`` finds ``initdb``/``pg_ctl`` (Debian layout ``/usr/lib/postgresql/*/bin``
first, then ``PATH``), initialises a cluster in a short temporary directory, and starts it
listening only on a unix socket inside that directory (no TCP port at all). When running as
root the cluster belongs to the ``postgres`` OS user (PostgreSQL refuses to run as root).

Fixtures (import them into a test module):

- ``pg_server`` (session): the running server; skipped when PostgreSQL is not installed,
  except under ``CI`` where that is a failure, so CI never silently skips;
- ``pg_dsn`` (function): a DSN for a freshly created, empty database dropped after the test.

``.ci/install-postgres.sh`` installs the binaries on Debian/Ubuntu.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

_PORT = 5432  # only names the socket file inside our private directory
_SUPERUSER = "postgres"


class PgUnavailable(RuntimeError):
    """PostgreSQL binaries are missing or unusable on this machine."""


def _version_key(path: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", path)
    return tuple(int(n) for n in numbers)


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl`` (newest Debian version first)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True
    )
    for initdb in candidates:
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").is_file():
            return bindir
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; run .ci/install-postgres.sh"
    )


def _run_as_owner(argv: list[str], as_postgres: bool) -> subprocess.CompletedProcess[str]:
    if as_postgres:
        if shutil.which("runuser"):
            argv = ["runuser", "-u", _SUPERUSER, "--", *argv]
        else:
            argv = ["su", _SUPERUSER, "-s", "/bin/sh", "-c", shlex.join(argv)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise PgUnavailable(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@dataclass
class PgServer:
    """A running throw-away cluster; ``stop()`` shuts it down and deletes its files."""

    bindir: Path
    root: Path
    as_postgres: bool
    _counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the unix socket the server listens on."""
        return self.root

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq connection string for ``dbname`` over the unix socket."""
        return make_conninfo(
            host=str(self.socket_dir), port=str(_PORT), user=_SUPERUSER, dbname=dbname
        )

    @classmethod
    def start(cls) -> PgServer:
        """initdb + start a new cluster; raises :class:`PgUnavailable` when impossible."""
        bindir = find_bindir()
        as_postgres = os.geteuid() == 0
        # mkdtemp makes a private 0700 directory; /tmp keeps the socket path short.
        base = "/tmp" if os.path.isdir("/tmp") else None  # noqa: S108
        root = Path(tempfile.mkdtemp(prefix="spg-", dir=base))
        server = cls(bindir=bindir, root=root, as_postgres=as_postgres)
        try:
            if as_postgres:
                try:
                    shutil.chown(root, user=_SUPERUSER, group=None)
                except LookupError as exc:
                    raise PgUnavailable("running as root but no 'postgres' OS user") from exc
            _checked(
                _run_as_owner(
                    [str(bindir / "initdb"), "-D", str(server.datadir), "-U", _SUPERUSER,
                     "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                    as_postgres,
                ),
                "initdb",
            )
            options = " ".join([
                "-c listen_addresses=''",
                f"-c unix_socket_directories={shlex.quote(str(server.socket_dir))}",
                f"-p {_PORT}",
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "-c max_connections=100 -c shared_buffers=32MB",
            ])
            _checked(
                _run_as_owner(
                    [str(bindir / "pg_ctl"), "-D", str(server.datadir), "-l",
                     str(root / "server.log"), "-o", options, "-w", "-t", "60", "start"],
                    as_postgres,
                ),
                "pg_ctl start",
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster."""
        with contextlib.suppress(Exception):
            _run_as_owner(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
                 "stop"],
                self.as_postgres,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """Create a new empty database and return its name."""
        name = f"t{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (skip locally / fail under CI if missing)."""
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty database, dropped after the test."""
    name = pg_server.create_database()
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)
