"""One daemon per SQLite database.

Two ``mailbridge run`` processes on one SQLite file would each open an IDLE session per account,
fetch every message twice and race to MOVE it; several daemons share accounts only through
PostgreSQL, whose leases give each account one holder (README "PostgreSQL and several
daemons"). The daemon therefore holds an exclusive ``flock(2)`` on ``<database>.lock`` for its
whole life: the kernel releases it when the process ends, however it ends (kill -9 included),
so a stale lock file never blocks a restart. The file holds the holder's pid, for the message.
``run --once`` and the other commands do not take it: they are meant to work beside the daemon.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mailbridge.errors import ConfigError, StoreError

__all__ = ["DatabaseLock", "lock_path"]


def lock_path(database: Path) -> Path:
    """``/var/lib/mailbridge/mailbridge.db`` -> ``/var/lib/mailbridge/mailbridge.db.lock``."""
    return database.with_name(database.name + ".lock")


class DatabaseLock:
    """The daemon's claim on a SQLite database; :meth:`release` (or process exit) gives it up."""

    def __init__(self, database: Path) -> None:
        """Take the lock at once or raise :class:`ConfigError` (code ``database_in_use``)
        naming the other daemon's pid, or :class:`StoreError` (``database_error``) when the
        lock file cannot be opened (another user's). The lock file is created owner-only
        (0600), a missing directory 0700."""
        # The file the path leads to: two paths to one database (a symbolic link) meet here.
        self.path = lock_path(database.resolve())
        try:
            # As the store creates it: the database's directory is the daemon's own (0700).
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot open the daemon's lock file {self.path}: {exc.strerror or exc} (the "
                "user the daemon runs as must own the database's directory and its files; "
                f"e.g. chown -R mailbridge: {self.path.parent})",
                code="database_error",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another mailbridge daemon (pid {holder}) already serves the database "
                f"{database} (it holds {self.path})",
                path="database",
                code="database_in_use",
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race the next holder)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
