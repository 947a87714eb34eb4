"""A throwaway PostgreSQL cluster: a real database server for tests and ``scripts/bench``.

Usage::

    with PostgresCluster(workdir) as cluster:
        url = cluster.create_database("t1")   # postgresql://mb@127.0.0.1:PORT/t1
        ... connect with url and password=cluster.password ...

The cluster is isolated from any system PostgreSQL (Debian starts one on port 5432 when the
package is installed): its own data directory inside ``workdir``, a free loopback port, and its
Unix socket in ``workdir`` too. It follows ``/work/shared/notes/postgresql-for-tests.md``:

* ``initdb`` refuses to run as root, so as root the server tools run as the ``postgres`` user
  (``runuser``) on a ``workdir`` that user owns.
* TCP connections need the password (``scram-sha-256``), so a test that forgets to pass it
  fails as a production config would; the socket in ``workdir`` trusts its local user.
* ``fsync=off``: a test cluster does not outlive an operating-system crash, and syncing costs
  seconds on a loaded machine. ``pg_ctl -m immediate stop`` still is a server crash (the next
  start runs crash recovery), which is what a test of "kill the database" wants.

One cluster per test session; each test gets a fresh database (``CREATE DATABASE ... TEMPLATE
template0``), which takes a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from mailbridge.testing.dovecot import HOST, free_port

# The superuser initdb creates; the tests connect as it.
SUPERUSER = "mb"

_START_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it


class PostgresError(RuntimeError):
    """The test cluster could not be created, started or used. The message quotes its log."""


class PostgresNotInstalledError(PostgresError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Debian's (``/usr/lib/postgresql/VERSION/bin``, newest version first) is preferred: those
    binaries are not on PATH, and one on PATH may be another build with other defaults. A PATH
    entry is used only when no Debian package is installed. Raises PostgresNotInstalledError
    naming the fix.
    """
    debian = sorted(
        (p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")),
        key=lambda bindir: _version_key(bindir / "x"),
        reverse=True,
    )
    candidates = [*debian]
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresNotInstalledError(
        "PostgreSQL is not installed (need initdb, pg_ctl and postgres from Debian's "
        "postgresql package, in /usr/lib/postgresql/VERSION/bin). Run scripts/test, which "
        "apt-installs it, or 'apt-get install postgresql'."
    )


class PostgresCluster:
    """One isolated PostgreSQL server for tests. Use as a context manager, or start()/stop().

    ``port`` is its loopback TCP port; connect as :data:`SUPERUSER` with ``password``.
    """

    host: str = HOST
    user: str = SUPERUSER

    def __init__(self, workdir: Path, *, fsync: bool = False) -> None:
        """``fsync``: sync to disk as a production server does (``scripts/bench``); tests
        leave it off (see the module docstring)."""
        self.workdir = Path(workdir)
        self.fsync = fsync
        self.bindir = find_bindir()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "postgresql.log"
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self._initialised = False

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """initdb (once), then start on a free loopback port and wait until it accepts."""
        if not self._initialised:
            self._initdb()
        problem = ""
        for attempt in range(_START_ATTEMPTS):
            # A restart keeps its port (clients reconnect to the same URL) unless it is taken.
            if not self.port or attempt:
                self.port = free_port()
            result = self._tool(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -k {self.workdir} -h {self.host}"
                f" -c fsync={'on' if self.fsync else 'off'}",
                "start",
            )
            if result.returncode == 0:
                return
            problem = result.stdout + result.stderr
        raise PostgresError(f"pg_ctl start failed: {problem.strip()}\n{self.log_text()[-2000:]}")

    def stop(self, *, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` (the default) is a crash, and quick."""
        if not self.running:
            return
        result = self._tool("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        if result.returncode != 0 and self.running:
            raise PostgresError(f"pg_ctl stop failed: {(result.stdout + result.stderr).strip()}")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- databases -------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """The ``postgresql://`` URL of ``database`` (without the password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL. ``name`` is a plain identifier."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE DATABASE needs that)."""
        import psycopg  # imported here: the cluster module is also used where psycopg is not

        with psycopg.connect(
            self.url(database), password=self.password, autocommit=True, connect_timeout=30
        ) as conn:
            conn.execute(sql.encode())

    # -- internals -------------------------------------------------------------------------------

    def _initdb(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.password + "\n", encoding="utf-8")
        pwfile.chmod(0o600)
        if self._as_postgres:
            # The server runs as 'postgres': it must own its directory and enter its parent.
            shutil.chown(self.workdir, user="postgres", group="postgres")
            shutil.chown(pwfile, user="postgres", group="postgres")
            self.workdir.chmod(0o755)
        try:
            result = self._tool(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",  # fsync=off's cousin: nothing here must survive an OS crash
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed: {(result.stdout + result.stderr).strip()}")
        self._initialised = True

    def _tool(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / name), *args]
        if self._as_postgres:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            command = [runuser, "-u", "postgres", "--", *command]
        with contextlib.suppress(FileNotFoundError):
            return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        raise PostgresNotInstalledError(f"cannot run {command[0]}")
