"""The SQLite backend of :class:`~mailbridge.store.base.Repository`.

:class:`SqliteRepository` owns one ``sqlite3`` connection (wrapped by sqlite-utils) and is used
from one thread only. The daemon reaches it through
:class:`~mailbridge.store.asyncrepo.AsyncRepository`, which creates the repository on a
dedicated writer thread and runs every call there, so SQLite sees a single writer and the event
loop never blocks on disk. The methods outside the import path are shared with PostgreSQL
(:class:`~mailbridge.store.sql.SqlRepository`).

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
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlite_utils import Database

from mailbridge.core import planner
from mailbridge.core.messagekey import (
    StoredIdentity,
)
from mailbridge.errors import StoreError
from mailbridge.store.base import (
    AccountState,
    ImportContext,
    ImportItem,
    ImportResult,
)
from mailbridge.store.importer import import_items, import_one
from mailbridge.store.importsql import SqlImport
from mailbridge.store.importsql import marks as _marks
from mailbridge.store.outbox import (
    OutboxCopy,
    OutboxFile,
    OutboxFix,
    OutboxRow,
    OutgoingRequest,
    ReplyContext,
    SentRecord,
    Snippet,
    TemplateRecords,
)
from mailbridge.store.schema import (
    CONVERSATION_COLUMNS,
    FOLLOWER_COLUMNS,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from mailbridge.store.sql import (
    Sql,
    SqlRepository,
    iso,
    like_pattern,
    now_text,
    parse_time,
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
_MAX_REASON: Final = 1000
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


class SqliteRepository(SqlRepository):
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

    # -- outbox (see mailbridge.store.outbox) -------------------------------------------------

    def queue_outgoing(self, request: OutgoingRequest, files: Sequence[OutboxFile] = ()) -> int:
        with self._transaction(f"queue a message for {request.account}", write=True) as conn:
            cursor = conn.execute(
                "INSERT INTO outbox (account, conversation, toaddresses, ccaddresses, bccaddresses,"
                " subject, bodyhtml, bodytext, coworker, coworkeraddress, actions, automatic,"
                " createdtime, updatedtime) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.account,
                    request.conversation_id,
                    request.to,
                    request.cc,
                    request.bcc,
                    request.subject,
                    request.body_html,
                    request.body_text,
                    request.coworker,
                    request.coworker_address,
                    request.actions,
                    int(request.automatic),
                    _now(),
                    _now(),
                ),
            )
            outbox_id = int(cursor.lastrowid or 0)
            if files:
                conn.executemany(
                    "INSERT INTO outboxattachment (outbox, filename, contenttype, path, document)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(outbox_id, f.filename, f.content_type, f.path, f.data) for f in files],
                )
        return outbox_id

    def _outbox_rows(self, where: str, params: Sequence[object], *, raw: bool) -> list[OutboxRow]:
        columns = _OUTBOX_COLUMNS + (", raw" if raw else "")
        rows = self._db.query(f"SELECT {columns} FROM outbox {where}", list(params))
        return [_outbox_row(row) for row in rows]

    def outbox(
        self, *, states: Sequence[str] | None = None, account: str | None = None, limit: int = 100
    ) -> list[OutboxRow]:
        clauses: list[str] = []
        params: list[object] = []
        if states is not None:
            clauses.append(f"state IN ({_marks(len(states))})")
            params.extend(states)
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._transaction("list the outbox", write=False):
            return self._outbox_rows(
                f"{where} ORDER BY id DESC LIMIT ?", [*params, max(limit, 0)], raw=False
            )

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with self._transaction("count outbox rows", write=False) as conn:
            for account, state, count in conn.execute(
                "SELECT account, state, COUNT(*) FROM outbox"
                " WHERE state IN ('queued', 'sending', 'failed') GROUP BY account, state"
            ):
                counts.setdefault(account, {})[state] = int(count)
        return counts

    def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        with self._transaction(f"read outbox row {outbox_id}", write=False):
            found = self._outbox_rows("WHERE id = ?", [outbox_id], raw=True)
        return found[0] if found else None

    def outbox_due(self, accounts: Sequence[str], now: datetime, limit: int) -> list[OutboxRow]:
        if not accounts:
            return []
        with self._transaction("find due outbox rows", write=False):
            return self._outbox_rows(
                f"WHERE state = 'queued' AND account IN ({_marks(len(accounts))})"
                " AND (nextattempt IS NULL OR nextattempt <= ?) ORDER BY id LIMIT ?",
                [*accounts, iso(now), limit],
                raw=True,
            )

    def outbox_next_due(self, accounts: Sequence[str]) -> datetime | None:
        if not accounts:
            return None
        with self._transaction("find the next outbox attempt", write=False) as conn:
            row = conn.execute(
                "SELECT MIN(COALESCE(nextattempt, '')) FROM outbox WHERE state = 'queued'"
                f" AND account IN ({_marks(len(accounts))})",
                tuple(accounts),
            ).fetchone()
        if row is None or row[0] is None:
            return None
        return parse_time(row[0]) or datetime(1970, 1, 1, tzinfo=UTC)

    def outbox_in_flight(self, accounts: Sequence[str]) -> list[OutboxRow]:
        if not accounts:
            return []
        with self._transaction("find outbox rows left sending", write=False):
            return self._outbox_rows(
                f"WHERE state = 'sending' AND account IN ({_marks(len(accounts))}) ORDER BY id",
                list(accounts),
                raw=True,
            )

    def outbox_files(self, outbox_id: int) -> list[OutboxFile]:
        with self._transaction(f"read the attachments of outbox row {outbox_id}", write=False):
            rows = self._conn.execute(
                "SELECT filename, contenttype, path, document FROM outboxattachment"
                " WHERE outbox = ? ORDER BY id",
                (outbox_id,),
            ).fetchall()
        return [
            OutboxFile(r[0] or "", r[1] or "application/octet-stream", r[2], r[3]) for r in rows
        ]

    def reply_context(self, conversation_id: int) -> ReplyContext | None:
        with self._transaction(
            f"read conversation {conversation_id} to reply", write=False
        ) as conn:
            head = conn.execute(
                "SELECT account, uniqueid, subject, email FROM conversation WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            if head is None:
                return None
            account, key, subject, own_email = head
            # The message answered: the newest incoming one (the newest of any when the
            # conversation holds only what we sent).
            parent = conn.execute(
                'SELECT messageid, "references", inreplyto, fromaddress, fromname, id'
                " FROM conversationmessage WHERE conversation = ?"
                " ORDER BY direction = 'incoming' DESC, date DESC, id DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            followers = conn.execute(
                "SELECT email, name FROM follower WHERE conversation = ? AND active = 1"
                " ORDER BY id",
                (conversation_id,),
            ).fetchall()
            parent_columns: dict[str, frozenset[str]] = {}
            conversation_columns = _columns(conn, "conversation")
            for table in sorted(conversation_columns - CONVERSATION_COLUMNS):
                [link] = conn.execute(
                    f"SELECT {_q(table)} FROM conversation WHERE id = ?", (conversation_id,)
                ).fetchone()
                columns = _columns(conn, table)
                if link is not None and columns:
                    parent_columns[table] = frozenset(columns - {"id"})
        reply_to: tuple[str, ...] = ()
        if parent is not None and parent[3]:
            address, name = parent[3], parent[4] or ""
            reply_to = (f"{name} <{address}>" if name else address,)
        answered = {parent[3].lower()} if parent is not None and parent[3] else set()
        return ReplyContext(
            conversation_id=conversation_id,
            account=account or "",
            key=key,
            subject=subject or "",
            own_email=own_email,
            parent_message_id=parent[0] if parent is not None else None,
            parent_references=tuple((parent[1] or "").split()) if parent is not None else (),
            parent_in_reply_to=tuple((parent[2] or "").split()) if parent is not None else (),
            reply_to=reply_to,
            followers=tuple((e, n) for e, n in followers if e.lower() not in answered),
            parent_columns=parent_columns,
        )

    def outbox_copies(self, outbox_id: int) -> list[OutboxCopy]:
        with self._transaction(f"read the copies of outbox row {outbox_id}", write=False):
            rows = self._conn.execute(
                "SELECT recipient, messageid, raw, senttime FROM outboxcopy WHERE outbox = ?"
                " ORDER BY id",
                (outbox_id,),
            ).fetchall()
        return [OutboxCopy(r[0], r[1], r[2], parse_time(r[3])) for r in rows]

    def outbox_copy_sent(self, outbox_id: int, recipient: str, now: datetime) -> None:
        with self._transaction(f"record a sent copy of outbox row {outbox_id}", write=True):
            self._conn.execute(
                "UPDATE outboxcopy SET senttime = ? WHERE outbox = ? AND recipient = ?",
                (iso(now), outbox_id, recipient),
            )

    def outbox_begin(self, rows: Sequence[tuple[int, OutboxFix | None]], now: datetime) -> set[int]:
        began: set[int] = set()
        with self._transaction(f"start sending {len(rows)} outbox row(s)", write=True) as conn:
            for outbox_id, fix in rows:
                if fix is not None:
                    cursor = conn.execute(
                        "UPDATE outbox SET messageid = ?, conversationkey = ?, raw = ?"
                        " WHERE id = ? AND raw IS NULL",
                        (fix.message_id, fix.conversation_key, fix.raw, outbox_id),
                    )
                    if cursor.rowcount == 0:
                        continue
                    if fix.copies:
                        conn.executemany(
                            "INSERT INTO outboxcopy (outbox, recipient, messageid, raw)"
                            " VALUES (?, ?, ?, ?)",
                            [(outbox_id, c.recipient, c.message_id, c.raw) for c in fix.copies],
                        )
                cursor = conn.execute(
                    "UPDATE outbox SET state = 'sending', attempts = attempts + 1,"
                    " attemptstarted = ?, updatedtime = ? WHERE id = ? AND state = 'queued'",
                    (iso(now), iso(now), outbox_id),
                )
                if cursor.rowcount:
                    began.add(outbox_id)
        return began

    def outbox_failed_attempt(
        self,
        outbox_id: int,
        *,
        state: str,
        next_attempt: datetime | None,
        code: str,
        error: str,
        now: datetime,
    ) -> None:
        with self._transaction(f"record a failed attempt of outbox row {outbox_id}", write=True):
            self._conn.execute(
                "UPDATE outbox SET state = ?, nextattempt = ?, lasterrorcode = ?, lasterror = ?,"
                " updatedtime = ? WHERE id = ? AND state IN ('queued', 'sending')",
                (
                    state,
                    iso(next_attempt) if next_attempt is not None else None,
                    code,
                    error[:_MAX_REASON],
                    iso(now),
                    outbox_id,
                ),
            )

    def outbox_sent(self, context: ImportContext, records: Sequence[SentRecord]) -> list[int]:
        ids: list[int] = []
        with self._transaction(f"record {len(records)} outbox row(s) as sent", write=True) as conn:
            self._prepare(_SqliteSql(conn), context.follower_parents, context.conversation_parents)
            for record in records:
                ids.append(self._record_sent(conn, context, record))
        return ids

    def _record_sent(
        self, conn: sqlite3.Connection, context: ImportContext, record: SentRecord
    ) -> int:
        outbox_id, message = record.outbox_id, record.message
        row = conn.execute(
            "SELECT conversation, conversationkey, coworker, coworkeraddress FROM outbox"
            " WHERE id = ?",
            (outbox_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"outbox row {outbox_id} is gone", code="database_error")
        conversation, key, coworker, coworker_address = row
        stamp = iso(record.sent)
        db = SqlImport(_SqliteSql(conn))
        same_id = db.stored_identities(
            context.account,
            [message.message_id] if message.message_id else [],
            [message.message_key],
        ).get(planner.identity_group(message), [])
        # Stored rows without their summary: sent mail is matched by key and fingerprint only.
        decision = planner.decide_key(
            message, [StoredIdentity(r.key, r.fingerprint) for r in same_id]
        )
        if decision.duplicate:  # sent again after a crash: stored already
            known = next(r for r in same_id if r.key == decision.key)
            conversation, row_id = known.conversation_id, known.row_id
        else:
            written = import_one(
                db,
                context,
                ImportItem(uid=0, message=message),
                stamp,
                decision,
                sent=planner.route_sent(conversation, None if conversation is not None else key),
            )
            # A named conversation is always written (sent mail is never discarded).
            assert isinstance(written, tuple)
            conversation, row_id, _new = written
            if coworker_address:
                self._add_coworker(conn, conversation, row_id, coworker_address, coworker, stamp)
            # Personalised copies: a reply cites its recipient's own Message-ID.
            conn.execute(
                "UPDATE messagefollower SET messageid = (SELECT c.messageid FROM outboxcopy"
                " AS c JOIN follower AS f ON f.email = c.recipient WHERE c.outbox = ?"
                " AND f.id = messagefollower.follower) WHERE conversationmessage = ?"
                " AND participationlevel != 'from'",
                (outbox_id, row_id),
            )
        for table, column, value in record.actions:
            conn.execute(
                f"UPDATE {_q(table)} SET {_q(column)} = ?"
                f" WHERE id = (SELECT {_q(table)} FROM conversation WHERE id = ?)",
                (value, conversation),
            )
        conn.execute(
            "UPDATE outbox SET state = 'sent', senttime = ?, conversation = ?,"
            " conversationmessage = ?, nextattempt = NULL, updatedtime = ? WHERE id = ?",
            (stamp, conversation, row_id, stamp, outbox_id),
        )
        return row_id

    @staticmethod
    def _add_coworker(
        conn: sqlite3.Connection, conversation: int, row_id: int, email: str, name: str, now: str
    ) -> None:
        """The sending coworker follows the conversation and is the message's 'from'."""
        email = email.strip().lower()
        conn.execute(
            "INSERT INTO follower (conversation, email, name, active, subscribed, createdtime,"
            " updatedtime) VALUES (?, ?, ?, 1, 1, ?, ?) ON CONFLICT (conversation, email)"
            " DO UPDATE SET active = 1, name = CASE WHEN excluded.name != '' THEN excluded.name"
            " ELSE follower.name END, updatedtime = excluded.updatedtime",
            (conversation, email, name, now, now),
        )
        conn.execute(
            "INSERT OR IGNORE INTO messagefollower (conversationmessage, follower,"
            " participationlevel) SELECT ?, id, 'from' FROM follower"
            " WHERE conversation = ? AND email = ?",
            (row_id, conversation, email),
        )

    def outbox_retry(self, outbox_id: int) -> bool:
        with self._transaction(f"retry outbox row {outbox_id}", write=True) as conn:
            cursor = conn.execute(
                "UPDATE outbox SET state = 'queued', nextattempt = NULL, updatedtime = ?,"
                # A fresh age: max_age_hours counts from the operator's retry.
                " createdtime = ? WHERE id = ? AND state IN ('failed', 'cancelled')",
                (_now(), _now(), outbox_id),
            )
        return cursor.rowcount > 0

    def outbox_cancel(self, outbox_id: int) -> bool:
        with self._transaction(f"cancel outbox row {outbox_id}", write=True) as conn:
            cursor = conn.execute(
                "UPDATE outbox SET state = 'cancelled', nextattempt = NULL, updatedtime = ?"
                " WHERE id = ? AND state IN ('queued', 'failed')",
                (_now(), outbox_id),
            )
        return cursor.rowcount > 0

    def table_columns(self, tables: Sequence[str]) -> dict[str, frozenset[str]]:
        found: dict[str, frozenset[str]] = {}
        with self._transaction("read table columns", write=False) as conn:
            for table in tables:
                columns = _columns(conn, table)
                if columns:
                    found[table] = frozenset(columns - {"id"})
        return found

    def template_records(
        self, conversation_id: int, recipient: str, history_limit: int = 20
    ) -> TemplateRecords:
        with self._transaction(f"read conversation {conversation_id} for a template", write=False):
            conn = self._conn
            history = tuple(
                (parse_time(date), name or "", address or "", text or "")
                for date, name, address, text in conn.execute(
                    "SELECT date, fromname, fromaddress, plaintext FROM conversationmessage"
                    " WHERE conversation = ? ORDER BY date DESC, id DESC LIMIT ?",
                    (conversation_id, history_limit),
                )
            )
            followers = tuple(
                (email, name or "")
                for email, name in conn.execute(
                    "SELECT email, name FROM follower WHERE conversation = ? AND active = 1"
                    " ORDER BY id",
                    (conversation_id,),
                )
            )
            records: dict[str, dict[str, object]] = {}
            parents = sorted(_columns(conn, "conversation") - CONVERSATION_COLUMNS)
            for table in parents:
                [link] = conn.execute(
                    f"SELECT {_q(table)} FROM conversation WHERE id = ?", (conversation_id,)
                ).fetchone()
                record = self._record(table, link, hops=1)
                if record is not None:
                    records[table] = record
            follower_tables = sorted(_columns(conn, "follower") - FOLLOWER_COLUMNS)
            for table in follower_tables:
                row = conn.execute(
                    f"SELECT {_q(table)} FROM follower WHERE conversation = ? AND email = ?",
                    (conversation_id, recipient.strip().lower()),
                ).fetchone()
                record = self._record(table, row[0] if row else None, hops=1)
                if record is not None:
                    records[table] = record
        return TemplateRecords(history, followers, records)

    def _record(self, table: str, record_id: object, *, hops: int) -> dict[str, object] | None:
        """Row ``record_id`` of ``table`` as a dict; a column named after a table with an
        ``id`` holds that table's row instead of its id, ``hops`` levels deep."""
        if record_id is None or not _columns(self._conn, table):
            return None
        rows = list(self._db.query(f"SELECT * FROM {_q(table)} WHERE id = ?", [record_id]))
        if not rows:
            return None
        record: dict[str, object] = dict(rows[0])
        if hops > 0:
            for column, value in list(record.items()):
                if column != "id" and value is not None and "id" in _columns(self._conn, column):
                    linked = self._record(column, value, hops=hops - 1)
                    if linked is not None:
                        record[column] = linked
        return record

    def automatic_replies_since(self, account: str, address: str, since: datetime) -> int:
        with self._transaction("count automatic replies", write=False) as conn:
            [count] = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE account = ? AND automatic = 1"
                " AND createdtime >= ? AND state != 'cancelled' AND LOWER(toaddresses) = ?",
                (account, iso(since), address.strip().lower()),
            ).fetchone()
        return int(count)

    def snippets(self, search: str | None = None) -> list[Snippet]:
        where = "WHERE status = 'active'"
        params: list[object] = []
        if search:
            where += (
                " AND (name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\'"
                " OR text LIKE ? ESCAPE '\\')"
            )
            params.extend([like_pattern(search)] * 3)
        with self._transaction("list snippets", write=False):
            rows = list(
                self._db.query(
                    f"SELECT * FROM textsnippet {where} ORDER BY pinned DESC, name, id", params
                )
            )
        return [_snippet(row) for row in rows]

    def use_snippet(self, name: str, now: datetime) -> Snippet | None:
        with self._transaction(f"use snippet {name}", write=True) as conn:
            cursor = conn.execute(
                "UPDATE textsnippet SET count = count + 1, lastused = ?"
                " WHERE name = ? AND status = 'active'",
                (iso(now), name),
            )
            if cursor.rowcount == 0:
                return None
            rows = list(self._db.query("SELECT * FROM textsnippet WHERE name = ?", [name]))
        return _snippet(rows[0])

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
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise _store_error(exc, what) from exc
        try:
            with self._sql(what, write=True) as sql:
                for state in states:
                    write_account_state(sql, state)
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


_OUTBOX_COLUMNS: Final = (
    "id, account, conversation, toaddresses, ccaddresses, bccaddresses, subject, bodyhtml,"
    " bodytext, coworker, coworkeraddress, actions, automatic, state, attempts, nextattempt,"
    " attemptstarted, lasterrorcode, lasterror, messageid, conversationkey, createdtime, senttime,"
    " (SELECT COUNT(*) FROM outboxattachment AS a WHERE a.outbox = outbox.id) AS files,"
    " (SELECT COUNT(*) FROM outboxcopy AS c WHERE c.outbox = outbox.id) AS copies"
)


def _outbox_row(row: dict[str, Any]) -> OutboxRow:
    return OutboxRow(
        id=row["id"],
        account=row["account"],
        conversation_id=row["conversation"],
        to=row["toaddresses"] or "",
        cc=row["ccaddresses"] or "",
        bcc=row["bccaddresses"] or "",
        subject=row["subject"],
        body_html=row["bodyhtml"],
        body_text=row["bodytext"],
        coworker=row["coworker"] or "",
        coworker_address=row["coworkeraddress"],
        actions=row["actions"],
        automatic=bool(row["automatic"]),
        state=row["state"],
        attempts=int(row["attempts"] or 0),
        next_attempt=parse_time(row["nextattempt"]),
        attempt_started=parse_time(row["attemptstarted"]),
        last_error_code=row["lasterrorcode"],
        last_error=row["lasterror"],
        message_id=row["messageid"],
        conversation_key=row["conversationkey"],
        created=parse_time(row["createdtime"]) or datetime(1970, 1, 1, tzinfo=UTC),
        sent=parse_time(row["senttime"]),
        raw=row.get("raw"),
        files=int(row.get("files") or 0),
        copies=int(row.get("copies") or 0),
    )


def _snippet(row: dict[str, Any]) -> Snippet:
    return Snippet(
        id=row["id"],
        name=row["name"],
        text=row["text"] or "",
        description=row["description"] or "",
        type=row["type"],
        status=row["status"],
        language=row["language"],
        pinned=bool(row["pinned"]),
        count=int(row["count"] or 0),
        last_used=parse_time(row["lastused"]),
    )
