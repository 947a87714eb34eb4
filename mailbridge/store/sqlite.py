"""The SQLite backend of :class:`~mailbridge.store.base.Repository`, and its asyncio wrapper.

:class:`SqliteRepository` owns one ``sqlite3`` connection (wrapped by sqlite-utils) and is used
from one thread only. The daemon reaches it through :class:`AsyncRepository`, which creates the
repository on a dedicated writer thread and runs every call there, so SQLite sees a single
writer and the event loop never blocks on disk.

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

import asyncio
import contextlib
import errno
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlite_utils import Database

from mailbridge.core.planner import timestamp_text
from mailbridge.errors import ConfigError, StoreError
from mailbridge.store.base import (
    RESOLVED_REMOVED,
    AccountState,
    ConversationDetail,
    ConversationSummary,
    FailureInfo,
    FailureRecord,
    ImportContext,
    ImportItem,
    ImportResult,
    Reconciliation,
    Repository,
    StoredMessage,
)
from mailbridge.store.importer import import_items
from mailbridge.store.importsql import SqlImport
from mailbridge.store.importsql import q as _q
from mailbridge.store.schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    from mailbridge.config import (
        ConversationParentSettings,
        FollowerParentSettings,
        Settings,
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


iso = timestamp_text  # ``value`` as ISO-8601 UTC text in the one shape the schema uses


def parse_time(value: object) -> datetime | None:
    """A timestamp column back as an aware datetime; None for NULL or text we cannot read
    (integrators write these columns too)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _now() -> str:
    return iso(datetime.now(UTC))


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of ``table`` (empty when it does not exist)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({_q(table)})")}


def _like_pattern(search: str) -> str:
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


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


def split_defects(value: object) -> tuple[str, ...]:
    """The defects column back as a tuple (an integrator may have written NULL or '')."""
    return tuple(line for line in value.splitlines() if line) if isinstance(value, str) else ()


class _SqliteCursor:
    """The :class:`~mailbridge.store.importsql.Cursor` of a SQLite transaction."""

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

    def nocase(self, column: str) -> str:
        return f"{column} COLLATE NOCASE"

    def is_batch_error(self, exc: BaseException) -> bool:
        # SQLite may roll the whole transaction back on its own (a full disk, say).
        return _is_batch_error(exc) or not self._conn.in_transaction


class SqliteRepository:
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
        # Plugins could change the connection behind our back; recursive triggers are an
        # integrator's choice, not ours.
        self._db = Database(self._conn, recursive_triggers=False, execute_plugins=False)
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

    # -- schema -------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version stored in the file (0 for a new file)."""
        try:
            row = self._conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as exc:
            raise _store_error(exc, "read the schema version") from exc
        return int(row[0])

    def migrate(self) -> None:
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

    def prepare(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        with self._transaction("prepare the configured parent tables", write=True) as conn:
            self._prepare(conn, follower_parents, conversation_parents)

    def _prepare(
        self,
        conn: sqlite3.Connection,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        """Create what is missing, check what exists (ConfigError naming the key path)."""
        if all(spec in self._ready for spec in (*follower_parents, *conversation_parents)):
            return
        # Columns that search paths read from a follower parent table (``person.company``):
        # a table mailbridge creates gets them, an existing one must have them.
        wanted: dict[str, set[str]] = {}
        for cp in conversation_parents:
            for prop in cp.properties:
                if prop.search_table and prop.search_column:
                    wanted.setdefault(prop.search_table, set()).add(prop.search_column)
        follower_columns = _columns(conn, "follower")
        for i, fp in enumerate(follower_parents):
            path = f"follower_parents[{i}]"
            extra = sorted(wanted.get(fp.table, set()) - {"id", fp.address_column, fp.name_column})
            existing = _columns(conn, fp.table)
            if not existing:
                definitions = [
                    "id INTEGER PRIMARY KEY",
                    f"{_q(fp.address_column)} TEXT NOT NULL DEFAULT ''",
                ]
                if fp.name_column is not None:
                    definitions.append(f"{_q(fp.name_column)} TEXT NOT NULL DEFAULT ''")
                definitions.extend(_q(column) for column in extra)
                conn.execute(f"CREATE TABLE {_q(fp.table)} ({', '.join(definitions)})")
                # Followers are matched by address, case-insensitively.
                conn.execute(
                    f"CREATE INDEX {_q(fp.table + '_' + fp.address_column)}"
                    f" ON {_q(fp.table)} ({_q(fp.address_column)} COLLATE NOCASE)"
                )
            else:
                for key, column in (
                    ("table", "id"),
                    ("address_column", fp.address_column),
                    ("name_column", fp.name_column),
                ):
                    if column is not None and column not in existing:
                        raise ConfigError(
                            f"{path}.{key}: the existing table {fp.table!r} has no column "
                            f"{column!r}",
                            path=f"{path}.{key}",
                        )
            if fp.table not in follower_columns:
                conn.execute(f"ALTER TABLE follower ADD COLUMN {_q(fp.table)} INTEGER")
                conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {_q('follower_' + fp.table)}"
                    f" ON follower ({_q(fp.table)})"
                )
            self._follower_parents[fp.table] = fp
        conversation_columns = _columns(conn, "conversation")
        for i, cp in enumerate(conversation_parents):
            path = f"conversation_parents[{i}]"
            existing = _columns(conn, cp.table)
            if not existing:
                definitions = ["id INTEGER PRIMARY KEY"]
                # No declared type: a property may hold text (subject) or an id (person).
                definitions.extend(_q(prop.column) for prop in cp.properties)
                conn.execute(f"CREATE TABLE {_q(cp.table)} ({', '.join(definitions)})")
            elif "id" not in existing:
                raise ConfigError(
                    f"{path}.table: the existing table {cp.table!r} has no column 'id'",
                    path=f"{path}.table",
                )
            for j, prop in enumerate(cp.properties):
                where = f"{path}.properties[{j}]"
                if existing and prop.column not in existing:
                    raise ConfigError(
                        f"{where}.column: the existing table {cp.table!r} has no column "
                        f"{prop.column!r}",
                        path=f"{where}.column",
                    )
                if prop.search_table and prop.search_column:
                    found = _columns(conn, prop.search_table)
                    if not found or prop.search_column not in found or "id" not in found:
                        what = (
                            f"no table {prop.search_table!r}"
                            if not found
                            else f"{prop.search_table!r} has no column "
                            f"{'id' if 'id' not in found else prop.search_column!r}"
                        )
                        raise ConfigError(
                            f"{where}.search_path: {what} in the database",
                            path=f"{where}.search_path",
                        )
            if cp.table not in conversation_columns:
                conn.execute(f"ALTER TABLE conversation ADD COLUMN {_q(cp.table)} INTEGER")
                conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {_q('conversation_' + cp.table)}"
                    f" ON conversation ({_q(cp.table)})"
                )
            self._conversation_parents[cp.table] = cp
        self._ready.update((*follower_parents, *conversation_parents))

    # -- import -------------------------------------------------------------------------------

    def import_batch(
        self, context: ImportContext, items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        if not items:
            return []
        action = f"import {len(items)} message(s) for {context.account}"
        with self._transaction(action, write=True) as conn:
            self._prepare(conn, context.follower_parents, context.conversation_parents)
            return import_items(SqlImport(_SqliteCursor(conn)), context, items, _now())

    # -- failures -----------------------------------------------------------------------------

    def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        if not failures:
            return
        with self._transaction(f"record import failures for {account}", write=True) as conn:
            now = _now()
            # A new failure of a known message: one more attempt, the latest reason, unresolved
            # again; its old Failed-folder UID is stale once it is moved there anew.
            conn.executemany(
                "INSERT INTO importfailure (account, uid, folderuid, messagekey, messageid,"
                " subject, fromaddress, date, size, code, reason, attempts, firstfailed,"
                " lastfailed, resolved) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, NULL)"
                " ON CONFLICT (account, messagekey) DO UPDATE SET uid = excluded.uid,"
                " folderuid = NULL, messageid = excluded.messageid, subject = excluded.subject,"
                " fromaddress = excluded.fromaddress, date = excluded.date, size = excluded.size,"
                " code = excluded.code, reason = excluded.reason,"
                " attempts = importfailure.attempts + 1, lastfailed = excluded.lastfailed,"
                " resolved = NULL, resolution = NULL",
                [
                    (
                        account,
                        f.uid,
                        f.message_key,
                        f.message_id,
                        f.subject,
                        f.from_address.strip().lower(),
                        iso(f.date) if f.date is not None else None,
                        f.size,
                        f.code,
                        f.reason,
                        now,
                        now,
                    )
                    for f in failures
                ],
            )

    def set_failure_folder_uids(self, account: str, folder_uids: dict[str, int]) -> None:
        if not folder_uids:
            return
        with self._transaction(f"record Failed-folder UIDs for {account}", write=True) as conn:
            conn.executemany(
                "UPDATE importfailure SET folderuid = ? WHERE account = ? AND messagekey = ?",
                [(uid, account, key) for key, uid in folder_uids.items()],
            )

    def failures(
        self, account: str | None = None, *, include_resolved: bool = False
    ) -> list[FailureRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        if not include_resolved:
            clauses.append("resolved IS NULL")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._transaction("read import failures", write=False):
            rows = list(
                self._db.query(
                    f"SELECT * FROM importfailure{where} ORDER BY lastfailed DESC, id DESC", params
                )
            )
        return [_failure_record(row) for row in rows]

    def reconcile_failures(
        self,
        account: str,
        uidvalidity: int,
        present: Collection[int],
        known: Sequence[FailureRecord],
    ) -> Reconciliation:
        listed = set(present)
        # Rows without a Failed-folder UID (no UIDPLUS, or cleared below) cannot be matched by
        # UID: they are left alone. Only rows read before the listing count (see the protocol).
        gone = [
            (record.id, record.folder_uid)
            for record in known
            if record.account == account
            and record.resolved is None
            and record.folder_uid is not None
            and record.folder_uid not in listed
        ]
        with self._transaction(f"reconcile the Failed folder of {account}", write=True) as conn:
            row = conn.execute(
                "SELECT faileduidvalidity FROM accountstate WHERE account = ?", (account,)
            ).fetchone()
            remembered = row[0] if row is not None else None
            if remembered != uidvalidity:
                # Remembered in the account's row; an account never seen before (a 'sync'
                # before the first 'run') gets one in state 'stopped', as record_sweep does.
                conn.execute(
                    "INSERT INTO accountstate (account, state, detail, updated, faileduidvalidity)"
                    " VALUES (?, 'stopped', '', ?, ?) ON CONFLICT (account) DO UPDATE SET"
                    " faileduidvalidity = excluded.faileduidvalidity",
                    (account, _now(), uidvalidity),
                )
            if remembered is not None and remembered != uidvalidity:
                # The folder was recreated (or its UIDs reset): every stored Failed-folder UID
                # names a message of its previous incarnation, or another message now. Resolve
                # nothing; forget those UIDs rather than let them match (or miss) by accident.
                cursor = conn.execute(
                    "UPDATE importfailure SET folderuid = NULL"
                    " WHERE account = ? AND resolved IS NULL AND folderuid IS NOT NULL",
                    (account,),
                )
                return Reconciliation(
                    previous_uidvalidity=int(remembered), forgotten=cursor.rowcount
                )
            now = _now()
            resolved = 0
            for record_id, folder_uid in gone:
                # Unchanged since it was read: a new failure in between cleared or replaced
                # its Failed-folder UID (record_failures), an import resolved it.
                cursor = conn.execute(
                    "UPDATE importfailure SET resolved = ?, resolution = ?"
                    " WHERE id = ? AND account = ? AND resolved IS NULL AND folderuid = ?",
                    (now, RESOLVED_REMOVED, record_id, account, folder_uid),
                )
                resolved += cursor.rowcount
        return Reconciliation(resolved=resolved)

    # -- account state ------------------------------------------------------------------------

    def set_account_state(self, state: AccountState) -> None:
        with self._transaction(f"record the state of {state.account}", write=True) as conn:
            # ``imported`` is a delta. A missing last_import keeps the stored one: "no import
            # in this update" must not erase when the last import happened.
            conn.execute(
                "INSERT INTO accountstate (account, state, code, detail, since, lastimport,"
                " imported, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET state = excluded.state,"
                " code = excluded.code, detail = excluded.detail, since = excluded.since,"
                " lastimport = COALESCE(excluded.lastimport, accountstate.lastimport),"
                " imported = accountstate.imported + excluded.imported,"
                " updated = excluded.updated",
                (
                    state.account,
                    state.state,
                    state.code,
                    state.detail,
                    iso(state.since) if state.since is not None else None,
                    iso(state.last_import) if state.last_import is not None else None,
                    state.imported,
                    iso(state.updated) if state.updated is not None else _now(),
                ),
            )

    def account_states(self) -> list[AccountState]:
        sql = """
            WITH failed AS (
                SELECT account, COUNT(*) AS n FROM importfailure
                WHERE resolved IS NULL GROUP BY account
            )
            SELECT s.account, s.state, s.code, s.detail, s.since, s.lastimport, s.imported,
                   s.updated, COALESCE(failed.n, 0) AS failed, s.lastsweep, s.sweepsummary
            FROM accountstate AS s LEFT JOIN failed ON failed.account = s.account
            UNION ALL
            SELECT failed.account, 'unknown', NULL, '', NULL, NULL, 0, NULL, failed.n, NULL, ''
            FROM failed
            WHERE failed.account NOT IN (SELECT account FROM accountstate)
            ORDER BY 1
        """
        with self._transaction("read account states", write=False):
            rows = list(self._db.query(sql))
        return [
            AccountState(
                account=row["account"],
                state=row["state"],
                code=row["code"],
                detail=row["detail"] or "",
                since=parse_time(row["since"]),
                last_import=parse_time(row["lastimport"]),
                imported=int(row["imported"] or 0),
                failed=int(row["failed"] or 0),
                updated=parse_time(row["updated"]),
                last_sweep=parse_time(row["lastsweep"]),
                sweep_summary=row["sweepsummary"] or "",
            )
            for row in rows
        ]

    def record_sweep(self, account: str, finished: datetime, summary: str, imported: int) -> None:
        with self._transaction(f"record the recovery sweep of {account}", write=True) as conn:
            when = iso(finished)
            # Only the sweep's own columns and the import count: the state belongs to the live
            # loop, which runs beside the sweep. An account never seen before (a 'sync' before
            # the first 'run') gets a row in state 'stopped'.
            conn.execute(
                "INSERT INTO accountstate (account, state, detail, lastimport, imported, updated,"
                " lastsweep, sweepsummary) VALUES (?, 'stopped', '', ?, ?, ?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET"
                " lastimport = COALESCE(excluded.lastimport, accountstate.lastimport),"
                " imported = accountstate.imported + excluded.imported,"
                " lastsweep = excluded.lastsweep, sweepsummary = excluded.sweepsummary",
                (account, when if imported > 0 else None, imported, when, when, summary),
            )

    # -- reading conversations ----------------------------------------------------------------

    def mark_read(self, conversation_id: int) -> bool:
        with self._transaction(f"mark conversation {conversation_id} read", write=True) as conn:
            cursor = conn.execute(
                "UPDATE conversation SET earliestunread = NULL, updatedtime = ? WHERE id = ?",
                (_now(), conversation_id),
            )
        return cursor.rowcount > 0

    def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        clauses: list[str] = []
        params: list[Any] = []
        if account is not None:
            clauses.append("c.account = ?")
            params.append(account)
        if search:
            pattern = _like_pattern(search)
            clauses.append(
                "(c.subject LIKE ? ESCAPE '\\'"
                " OR EXISTS (SELECT 1 FROM conversationmessage AS m WHERE m.conversation = c.id"
                "  AND (m.subject LIKE ? ESCAPE '\\' OR m.plaintext LIKE ? ESCAPE '\\'"
                "       OR m.fromaddress LIKE ? ESCAPE '\\'))"
                " OR EXISTS (SELECT 1 FROM follower AS f WHERE f.conversation = c.id"
                "  AND (f.email LIKE ? ESCAPE '\\' OR f.name LIKE ? ESCAPE '\\')))"
            )
            params.extend([pattern] * 6)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SUMMARY_SELECT}{where} ORDER BY c.lastmessagedate DESC, c.id DESC LIMIT ?"
        params.append(max(limit, 0))
        with self._transaction("list conversations", write=False):
            rows = list(self._db.query(sql, params))
        return [_summary(row) for row in rows]

    def conversation(self, conversation_id: int) -> ConversationDetail | None:
        with self._transaction(f"read conversation {conversation_id}", write=False):
            head = list(self._db.query(f"{_SUMMARY_SELECT} WHERE c.id = ?", [conversation_id]))
            if not head:
                return None
            followers = tuple(
                (row["email"], row["name"], bool(row["active"]))
                for row in self._db.query(
                    "SELECT email, name, active FROM follower WHERE conversation = ? ORDER BY id",
                    [conversation_id],
                )
            )
            parents: list[tuple[str, int]] = []
            conversation_columns = _columns(self._conn, "conversation")
            for table in self._conversation_parents:
                if table in conversation_columns:
                    [link] = self._conn.execute(
                        f"SELECT {_q(table)} FROM conversation WHERE id = ?", (conversation_id,)
                    ).fetchone()
                    if link is not None:
                        parents.append((table, int(link)))
            follower_links: list[tuple[str, str, int]] = []
            follower_columns = _columns(self._conn, "follower")
            for table in self._follower_parents:
                if table in follower_columns:
                    follower_links.extend(
                        (email, table, int(link))
                        for email, link in self._conn.execute(
                            f"SELECT email, {_q(table)} FROM follower WHERE conversation = ?"
                            f" AND {_q(table)} IS NOT NULL ORDER BY id",
                            (conversation_id,),
                        )
                    )
            messages = list(
                self._db.query(
                    "SELECT id, messageid, uid, date, subject, fromaddress, fromname, plaintext,"
                    " message, threadedby, messagekey, defects FROM conversationmessage"
                    " WHERE conversation = ?"
                    " ORDER BY date, id",
                    [conversation_id],
                )
            )
            participants: dict[int, list[tuple[str, str]]] = {}
            for row in self._db.query(
                "SELECT mf.conversationmessage AS mid, f.email, mf.participationlevel AS level"
                " FROM messagefollower AS mf JOIN follower AS f ON f.id = mf.follower"
                " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                " WHERE m.conversation = ? ORDER BY mf.id",
                [conversation_id],
            ):
                participants.setdefault(row["mid"], []).append((row["email"], row["level"]))
            documents: dict[int, list[tuple[str, str, int]]] = {}
            for row in self._db.query(
                "SELECT d.conversationmessage AS mid, d.filename, d.contenttype, d.size"
                " FROM document AS d JOIN conversationmessage AS m ON m.id = d.conversationmessage"
                " WHERE m.conversation = ? ORDER BY d.id",
                [conversation_id],
            ):
                documents.setdefault(row["mid"], []).append(
                    (row["filename"], row["contenttype"], int(row["size"]))
                )
            embedded: dict[int, list[tuple[str, str, int]]] = {}
            for row in self._db.query(
                "SELECT e.conversationmessage AS mid, e.contentid, e.contenttype, e.size"
                " FROM embeddedfile AS e"
                " JOIN conversationmessage AS m ON m.id = e.conversationmessage"
                " WHERE m.conversation = ? ORDER BY e.id",
                [conversation_id],
            ):
                embedded.setdefault(row["mid"], []).append(
                    (row["contentid"] or "", row["contenttype"], int(row["size"]))
                )
        return ConversationDetail(
            summary=_summary(head[0]),
            followers=followers,
            messages=tuple(
                StoredMessage(
                    id=row["id"],
                    message_id=row["messageid"],
                    uid=row["uid"],
                    date=parse_time(row["date"]),
                    subject=row["subject"],
                    from_address=row["fromaddress"],
                    from_name=row["fromname"],
                    plain_text=row["plaintext"],
                    html=row["message"],
                    followers=tuple(participants.get(row["id"], ())),
                    documents=tuple(documents.get(row["id"], ())),
                    embedded_files=tuple(embedded.get(row["id"], ())),
                    threaded_by=row["threadedby"],
                    message_key=row["messagekey"],
                    defects=split_defects(row["defects"]),
                )
                for row in messages
            ),
            parents=tuple(parents),
            follower_parents=tuple(follower_links),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rollback()
        try:
            self._conn.close()
        except sqlite3.Error as exc:
            raise _store_error(exc, "close the database") from exc


_SUMMARY_SELECT: Final = (
    "SELECT c.id, c.uniqueid, c.account, c.subject, c.firstmessagedate, c.lastmessagedate,"
    " c.earliestunread,"
    " (SELECT COUNT(*) FROM conversationmessage AS m WHERE m.conversation = c.id) AS messages,"
    " (SELECT COUNT(*) FROM follower AS f WHERE f.conversation = c.id) AS followers"
    " FROM conversation AS c"
)


def _summary(row: dict[str, Any]) -> ConversationSummary:
    return ConversationSummary(
        id=row["id"],
        uniqueid=row["uniqueid"],
        account=row["account"] or "",
        subject=row["subject"] or "",
        first_message=parse_time(row["firstmessagedate"]),
        last_message=parse_time(row["lastmessagedate"]),
        messages=int(row["messages"]),
        followers=int(row["followers"]),
        earliest_unread=parse_time(row["earliestunread"]),
    )


def _failure_record(row: dict[str, Any]) -> FailureRecord:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return FailureRecord(
        id=row["id"],
        account=row["account"],
        uid=int(row["uid"] or 0),
        folder_uid=row["folderuid"],
        message_key=row["messagekey"],
        message_id=row["messageid"],
        subject=row["subject"] or "",
        from_address=row["fromaddress"] or "",
        date=parse_time(row["date"]),
        size=int(row["size"] or 0),
        code=row["code"],
        reason=row["reason"] or "",
        attempts=int(row["attempts"]),
        first_failed=parse_time(row["firstfailed"]) or epoch,
        last_failed=parse_time(row["lastfailed"]) or epoch,
        resolved=parse_time(row["resolved"]),
        resolution=row["resolution"],
    )


class AsyncRepository:
    """Any :class:`Repository` behind ``async`` methods, run on one dedicated writer thread.

    ``factory`` is called on that thread, so a connection that must stay on the thread that
    created it (sqlite3's ``check_same_thread``) is created there. Calls run one at a time in
    the order they were made. A cancelled call is not undone: the thread finishes it (an
    import then commits, and the retry sees its messages as duplicates).
    """

    def __init__(self, factory: Callable[[], Repository]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailbridge-db")
        # The first job on the (FIFO, single) worker, so it is done before any call runs.
        self._opened: Future[Repository] = self._executor.submit(factory)
        self._closed = False

    @classmethod
    def sqlite(
        cls, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> AsyncRepository:
        """An :class:`AsyncRepository` over a :class:`SqliteRepository` at ``path``."""
        return cls(lambda: SqliteRepository(path, busy_timeout=busy_timeout))

    def _call(self, fn: Callable[[Repository], T]) -> T:
        return fn(self._opened.result())

    async def _run(self, fn: Callable[[Repository], T]) -> T:
        if self._closed:
            raise StoreError("the repository is closed", code="database_error")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    async def migrate(self) -> None:
        await self._run(lambda repo: repo.migrate())

    async def prepare(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        fps, cps = tuple(follower_parents), tuple(conversation_parents)
        await self._run(lambda repo: repo.prepare(fps, cps))

    async def import_batch(
        self, context: ImportContext, items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        batch = tuple(items)  # the caller may reuse its list while the thread works
        return await self._run(lambda repo: repo.import_batch(context, batch))

    async def mark_read(self, conversation_id: int) -> bool:
        return await self._run(lambda repo: repo.mark_read(conversation_id))

    async def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        batch = tuple(failures)
        await self._run(lambda repo: repo.record_failures(account, batch))

    async def set_failure_folder_uids(self, account: str, folder_uids: dict[str, int]) -> None:
        uids = dict(folder_uids)
        await self._run(lambda repo: repo.set_failure_folder_uids(account, uids))

    async def failures(
        self, account: str | None = None, *, include_resolved: bool = False
    ) -> list[FailureRecord]:
        return await self._run(
            lambda repo: repo.failures(account, include_resolved=include_resolved)
        )

    async def reconcile_failures(
        self,
        account: str,
        uidvalidity: int,
        present: Collection[int],
        known: Sequence[FailureRecord],
    ) -> Reconciliation:
        listed, rows = frozenset(present), tuple(known)
        return await self._run(
            lambda repo: repo.reconcile_failures(account, uidvalidity, listed, rows)
        )

    async def set_account_state(self, state: AccountState) -> None:
        await self._run(lambda repo: repo.set_account_state(state))

    async def account_states(self) -> list[AccountState]:
        return await self._run(lambda repo: repo.account_states())

    async def record_sweep(
        self, account: str, finished: datetime, summary: str, imported: int
    ) -> None:
        await self._run(lambda repo: repo.record_sweep(account, finished, summary, imported))

    async def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        return await self._run(lambda repo: repo.conversations(account, search, limit))

    async def conversation(self, conversation_id: int) -> ConversationDetail | None:
        return await self._run(lambda repo: repo.conversation(conversation_id))

    async def aclose(self) -> None:
        """Close the repository on its thread and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_on_thread)
        finally:
            # The close job was the last one; the idle thread exits without waiting here.
            self._executor.shutdown(wait=False)

    def _close_on_thread(self) -> None:
        if self._opened.exception() is None:
            self._opened.result().close()


async def open_repository(
    path: str | os.PathLike[str], settings: Settings | None = None
) -> AsyncRepository:
    """Open (creating if needed) and migrate the SQLite database for the daemon; with
    ``settings``, also prepare (create or check) the configured parent tables, so a config that
    does not fit the database stops the start with a ConfigError."""
    repo = AsyncRepository.sqlite(path)
    try:
        await repo.migrate()
        if settings is not None:
            await repo.prepare(settings.follower_parents, settings.conversation_parents)
    except BaseException:
        await repo.aclose()
        raise
    return repo
