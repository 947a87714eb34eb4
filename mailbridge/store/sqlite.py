"""The SQLite backend of :class:`~mailbridge.store.base.Repository`.

:class:`SqliteRepository` owns one ``sqlite3`` connection and is used
from one thread only. The daemon reaches it through
:class:`~mailbridge.store.asyncrepo.AsyncRepository`, which creates the repository on a
dedicated writer thread and runs every call there, so SQLite sees a single writer and the event
loop never blocks on disk. The methods outside the import path are shared with PostgreSQL
(:class:`~mailbridge.store.sql.SqlRepository`), the outbox too
(:class:`~mailbridge.store.outboxsql.SqlOutbox`).

Durability: WAL journal with ``synchronous=FULL``, so a returned ``import_batch`` has been synced
to disk and survives a power cut; only then does the daemon move the messages out of the Inbox.
Writes start with ``BEGIN IMMEDIATE`` so a competing writer (an integrator) shows up as a busy
wait at the start of a transaction, never as a failure half-way through it.

Every ``sqlite3``/``OSError`` leaving this module is mapped to
:class:`~mailbridge.errors.StoreError` (``database_locked``, ``disk_full`` or
``database_error``) after the transaction has been rolled back.

Importing: :meth:`SqliteRepository.import_batch` opens the transaction and hands its cursor to
the shared driver (:func:`mailbridge.store.importer.import_items`) and SQL primitives
(:class:`mailbridge.store.importsql.SqlImport`); which conversation a message joins, followers,
parents and duplicates are decided by :mod:`mailbridge.core.planner` (its docstring lists the
rules). This module holds SQL and nothing that decides.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from mailbridge.errors import StoreError
from mailbridge.store.base import (
    AccountState,
    ImportContext,
    ImportItem,
    ImportResult,
)
from mailbridge.store.importer import import_items
from mailbridge.store.importsql import SqlImport
from mailbridge.store.outboxsql import SqlOutbox
from mailbridge.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
)
from mailbridge.store.sql import (
    Sql,
    SqlRepository,
    now_text,
    q,
    write_account_state,
)

if TYPE_CHECKING:
    from mailbridge.config import (
        ConversationParentSettings,
        FollowerParentSettings,
    )

T = TypeVar("T")


DEFAULT_BUSY_TIMEOUT: Final = 10.0  # seconds a writer waits for an integrator's transaction

# Primary result codes (the low byte of an extended code).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_FULL: Final = 13

# Errors that concern one message's data (a constraint, a value SQLite cannot bind); any other
# sqlite3 error is about the database itself and fails the whole batch.
_MESSAGE_LEVEL_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
)

# SQLite allows 32766 host parameters since 3.32; stay far below for older system libraries.
_CHUNK: Final = 500
# What the database raises when it refuses one message's rows: an SQL error, or a value sqlite3
# cannot bind (an integer over 64 bits raises OverflowError before SQLite sees it).
_REFUSALS: Final = (sqlite3.Error, OverflowError)


def error_code(exc: BaseException) -> str:
    """The catalogue code for a sqlite3 or OS error: database_locked, disk_full, database_error."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk_full"
    if isinstance(exc, sqlite3.Error):
        # Absent on errors raised by Python code rather than by the SQLite library.
        primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        text = str(exc).lower()
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "is locked" in text:
            return "database_locked"
        if primary == _SQLITE_FULL or "disk is full" in text or "no space left" in text:
            return "disk_full"
    return "database_error"


def _store_error(exc: BaseException, action: str) -> StoreError:
    return StoreError(f"{action}: {exc}", code=error_code(exc))


def _is_batch_error(exc: BaseException) -> bool:
    """True when ``exc`` concerns the database (locked, full, corrupt) rather than one message."""
    if isinstance(exc, sqlite3.Error):
        return not isinstance(exc, _MESSAGE_LEVEL_ERRORS)
    return isinstance(exc, OSError | StoreError)


_now = now_text


_q = q


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of ``table`` (empty when it does not exist)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({_q(table)})")}


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating if needed) ``path`` with owner-only permissions and our pragmas."""
    # The umask covers the directory, the database and the -wal/-shm files SQLite creates.
    # It is process-wide; the window is the few system calls below.
    old_umask = os.umask(0o077)
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        if not path.exists():
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: the driver opens no implicit transactions; we issue BEGIN
        # IMMEDIATE / SAVEPOINT / COMMIT ourselves (sqlite-utils honours an open transaction).
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            # FULL syncs the WAL at every commit: a committed import survives a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
    finally:
        os.umask(old_umask)
    return conn


class _SqliteSql:
    """The :class:`~mailbridge.store.sql.Sql` view of a SQLite transaction."""

    like = "LIKE"  # case-insensitive for ASCII in SQLite
    id_column = "id INTEGER PRIMARY KEY"
    link_type = "INTEGER"
    untyped = ""  # no declared type: a property may hold text (subject) or an id (person)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, [tuple(p) for p in params])

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, tuple(params))
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def columns(self, table: str) -> set[str]:
        return _columns(self._conn, table)

    def nocase(self, column: str) -> str:
        return f"{column} COLLATE NOCASE"

    def is_batch_error(self, exc: BaseException) -> bool:
        # SQLite may roll the whole transaction back on its own (a full disk, say).
        return _is_batch_error(exc) or not self._conn.in_transaction

    def is_refusal(self, exc: BaseException) -> bool:
        return isinstance(exc, _REFUSALS)


class SqliteRepository(SqlRepository, SqlOutbox):
    """:class:`~mailbridge.store.base.Repository` on one SQLite file.

    Not thread-safe: create and use it on one thread (``AsyncRepository`` does). Call
    :meth:`migrate` once after opening.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> None:
        self.path = Path(path)
        try:
            self._conn = _connect(self.path, busy_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise _store_error(exc, f"cannot open the database {self.path}") from exc
        self._closed = False
        # Parent specs already prepared on this connection, and the tables known by name for
        # reading conversations back (``conversation()`` shows their links).
        self._ready: set[object] = set()
        self._follower_parents: dict[str, FollowerParentSettings] = {}
        self._conversation_parents: dict[str, ConversationParentSettings] = {}

    # -- transactions -------------------------------------------------------------------------

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            # Nothing useful can be done when even the rollback fails: SQLite rolls back
            # an abandoned transaction when the connection closes.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _transaction(self, action: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction, committed on success, rolled back and mapped on failure.

        Reads get one too, so that the several queries of one answer see one snapshot.
        """
        if self._closed:
            raise StoreError(f"{action}: the database is closed", code="database_error")
        try:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise _store_error(exc, action) from exc
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            self._ready.clear()  # DDL of a prepare in this transaction was rolled back too
            raise _store_error(exc, action) from exc
        except BaseException:
            self._rollback()
            self._ready.clear()
            raise

    @contextlib.contextmanager
    def _sql(self, action: str, *, write: bool) -> Iterator[Sql]:
        with self._transaction(action, write=write) as conn:
            yield _SqliteSql(conn)

    # -- schema -------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version stored in the file (0 for a new file)."""
        try:
            row = self._conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as exc:
            raise _store_error(exc, "read the schema version") from exc
        return int(row[0])

    def migrate(self) -> None:
        # A current schema needs no write transaction (read-only commands beside the daemon).
        with self._transaction("read the schema version", write=False) as conn:
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
                return
        with self._transaction("migrate the database schema", write=True) as conn:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the database {self.path} has schema version {current}, newer than this "
                    f"mailbridge understands ({SCHEMA_VERSION}); upgrade mailbridge",
                    code="database_error",
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                # An int from our own table, not user input; PRAGMA takes no parameters.
                conn.execute(f"PRAGMA user_version = {int(migration.version)}")

    # -- configured tables --------------------------------------------------------------------

    # -- import -------------------------------------------------------------------------------

    def import_batch(
        self, context: ImportContext, items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        if not items:
            return []
        action = f"import {len(items)} message(s) for {context.account}"
        with self._transaction(action, write=True) as conn:
            sql = _SqliteSql(conn)
            self._prepare(sql, context.follower_parents, context.conversation_parents)
            return import_items(SqlImport(sql), context, items, _now())

    # -- account state ------------------------------------------------------------------------

    def set_account_states(self, states: Sequence[AccountState]) -> None:
        """Store several accounts' states in one transaction, without its own fsync.

        The rows are advisory (what ``status`` shows), so this commit runs with
        ``synchronous=NORMAL``: in WAL mode it is then made durable by the next FULL commit
        (the next import), and a power cut can at worst lose a few state changes, never an
        import. With 10,000 accounts a synced commit per state change queued an fsync each in
        front of the imports on the one database thread.
        """
        if not states:
            return
        what = f"record the state of {states[0].account}" + (
            f" and {len(states) - 1} more accounts" if len(states) > 1 else ""
        )
        with self._unsynced_sql(what) as sql:
            for state in states:
                write_account_state(sql, state)

    @contextlib.contextmanager
    def _unsynced_sql(self, action: str) -> Iterator[Sql]:
        """A write transaction committed with ``synchronous=NORMAL``: in WAL mode the commit
        is in the WAL when it returns (a killed process keeps it), made durable on the disk
        by the next FULL commit or checkpoint (a power cut may lose it)."""
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise _store_error(exc, action) from exc
        try:
            with self._sql(action, write=True) as sql:
                yield sql
        finally:
            with contextlib.suppress(sqlite3.Error):  # a closed connection: nothing to restore
                self._conn.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rollback()
        try:
            self._conn.close()
        except sqlite3.Error as exc:
            raise _store_error(exc, "close the database") from exc


def check_writable(path: Path) -> str:
    """Whether the daemon could write the SQLite file at ``path`` (or create it), without
    changing it; raises StoreError saying why not."""
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if os.access(parent, os.W_OK | os.X_OK):
            return f"{path} (will be created)"
        raise StoreError(f"cannot create {path}: {parent} is not writable", code="database_error")
    try:
        conn = sqlite3.connect(path, timeout=2)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock, writes nothing
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _store_error(exc, str(path)) from exc
    return str(path)
