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

Threading rules (see "The database schema" in README.md for the integrator's view):

* Whether a message is already stored, and under which ``messagekey``, is decided by
  :func:`mailbridge.core.messagekey.decide_message_key` from its content fingerprint: the same
  message fetched again is a duplicate; a different one reusing a stored Message-ID is stored
  under a derived key and, since the id names another message, replies citing that id do not
  pull it in.
* When the id a reply cites names several stored messages (a reused id), the reply joins the
  conversation of the newest one dated no later than the reply
  (:func:`mailbridge.core.messagekey.choose_parent`).
* A message joins the conversation of the first of its thread candidates (In-Reply-To, then
  References newest first) stored for the same account; failing that, the conversation of a
  stored message that cites it (its reply arrived first); failing that, of a stored message
  citing one of the same ancestors (a sibling). Otherwise it starts a new conversation.
* Before that, with ``identification: plus_address`` or ``subject``, a conversation key found in
  the message (a plus-variant of an own address in To/Cc/Bcc/Delivered-To, or an ``[ID-KEY]``
  subject tag) joins that conversation, but only if it exists and belongs to the same account.
  Message-IDs cited are matched against every stored Message-ID, including the per-recipient
  ids of sent copies (``messagefollower.messageid``).
* A message in which only the account's own identity takes part (From, every recipient and every
  Reply-To address one of its addresses or aliases) and that continues nothing is not stored
  (``ignored``): that is how loops start. Mail from the account to an outside person may start a
  conversation. A message from an own address is ``outgoing`` unless its Reply-To names someone
  else (a web form writing for a customer): see :mod:`mailbridge.core.participants`.
* A new conversation gets one new record in each configured conversation parent table, with
  the configured properties; followers link to the follower parent rows with their address.
* Followers: every participant (From, To, Cc, Bcc and Reply-To, the last at participation
  level ``replyto``) other than the account's own addresses (and their plus-variants).
  After the newest message of a conversation, the active followers are exactly that message's
  participants: someone it leaves out becomes inactive, someone it names is active again. Bcc
  counts as present, because the person received the message. A message older than the newest
  one already stored (it arrived late) adds followers but deactivates no one, and a follower it
  introduces starts inactive, since the newer message did not name them; so the result does
  not depend on the order messages arrive in. For the same reason a follower's display name is
  the non-empty name of a message at least as new as every other message they took part in;
  an older message only names a follower who has no name yet.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import secrets
import sqlite3
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlite_utils import Database

from mailbridge.core.automatic import AutomaticVerdict
from mailbridge.core.html import rewrite_inline_images, text_to_html
from mailbridge.core.identify import (
    is_own_address,
    new_conversation_key,
    plus_keys,
    subject_key,
    thread_candidates,
)
from mailbridge.core.messagekey import (
    KeyDecision,
    ParentCandidate,
    StoredIdentity,
    choose_parent,
    decide_message_key,
    failure_key,
)
from mailbridge.core.model import ParsedMessage
from mailbridge.core.participants import is_outgoing, only_own_identity, reached_address
from mailbridge.core.policy import Disposition, decide
from mailbridge.errors import StoreError
from mailbridge.store import delivery_errors as _delivery_errors
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import (
    RESOLVED_IMPORTED,
    AccountState,
    ImportContext,
    ImportItem,
    ImportResult,
    Outcome,
)
from mailbridge.store.factory import open_repository
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
    join_defects,
    like_pattern,
    now_text,
    parse_time,
    q,
    write_account_state,
)

# Re-exported while branches written before the move still import them from here.
__all__ = ["AsyncRepository", "SqliteRepository", "iso", "open_repository", "parse_time"]

if TYPE_CHECKING:
    from mailbridge.config import (
        ConversationParentSettings,
        FollowerParentSettings,
        ParentPropertySettings,
    )

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _NotStored:
    """What _import_one answers for a message the policy keeps out of the conversations."""

    outcome: Outcome  # DISCARDED or BOUNCE
    reason: str | None
    delivery_errors: int = 0
    delivery_errors_matched: int = 0


_PERSON: Final = AutomaticVerdict(automatic=False)

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


def _message_uniqueid() -> str:
    # 160 random bits, lower-case base32 like the conversation keys.
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()


def _chunks(values: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


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


@dataclass(frozen=True, slots=True)
class _StoredRow:
    """A stored message a batch's message may be: key, fingerprint, conversation, row."""

    key: str
    fingerprint: str | None
    conversation_id: int
    row_id: int
    summary: tuple[str, str] | None = None  # (date, subject) of an imported row


@dataclass(slots=True)
class _FollowerRow:
    id: int
    name: str
    active: int


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
        account = context.account
        results: list[ImportResult | None] = [None] * len(items)
        if not items:
            return []
        with self._transaction(f"import {len(items)} message(s) for {account}", write=True) as conn:
            self._prepare(_SqliteSql(conn), context.follower_parents, context.conversation_parents)
            now = _now()
            stored = self._stored_identities(conn, account, [item.message for item in items])
            settled: list[str] = []  # keys now in the database: their failures are resolved
            # UID order, so that a reply in the same batch finds its parent already stored.
            for index in sorted(range(len(items)), key=lambda i: items[i].uid):
                item = items[index]
                message = item.message
                same_id = stored.setdefault(message.message_id or message.message_key, [])
                # The rule (same message or a reused Message-ID) is core's.
                decision = decide_message_key(
                    message.message_key,
                    message.message_id,
                    message.fingerprint,
                    [StoredIdentity(row.key, row.fingerprint, row.summary) for row in same_id],
                    (iso(message.date), message.subject),
                )
                if decision.duplicate:
                    known = next(row for row in same_id if row.key == decision.key)
                    results[index] = ImportResult(
                        uid=item.uid,
                        message_key=decision.key,
                        outcome=Outcome.DUPLICATE,
                        conversation_id=known.conversation_id,
                        message_row_id=known.row_id,
                    )
                    settled += (decision.key, failure_key(message.message_id, message.fingerprint))
                    continue
                result, written = self._import_in_savepoint(conn, context, item, now, decision)
                results[index] = result
                if written is not None:
                    # A second copy later in the same batch is a duplicate of this one.
                    same_id.append(_StoredRow(decision.key, message.fingerprint or None, *written))
                    settled += (decision.key, failure_key(message.message_id, message.fingerprint))
                elif result.outcome in {Outcome.DISCARDED, Outcome.BOUNCE}:
                    # Dealt with for good: a failure of it is resolved.
                    settled += (decision.key, failure_key(message.message_id, message.fingerprint))
            self._resolve_failures(conn, account, settled, now)
        return [result for result in results if result is not None]

    def _import_in_savepoint(
        self,
        conn: sqlite3.Connection,
        context: ImportContext,
        item: ImportItem,
        now: str,
        decision: KeyDecision,
    ) -> tuple[ImportResult, tuple[int, int] | None]:
        """Import one message all-or-nothing under ``decision.key``; the result, and
        (conversation, row) if written."""
        conn.execute("SAVEPOINT message")
        try:
            written = self._import_one(conn, context, item, now, decision)
        except Exception as exc:
            if _is_batch_error(exc) or not conn.in_transaction:
                # The database itself failed (or SQLite already rolled everything back): the
                # batch fails as a whole and the caller retries it.
                raise
            conn.execute("ROLLBACK TO SAVEPOINT message")
            conn.execute("RELEASE SAVEPOINT message")
            # The database refusing this one message (a constraint, a value it cannot store) is
            # import_failed; any other exception is a bug in mailbridge: internal, with its
            # traceback for the log.
            refused = isinstance(exc, _REFUSALS)
            reason = (
                f"{type(exc).__name__}: {exc}"
                if refused
                else f"unexpected {type(exc).__name__} while importing: {exc}"
            )[:_MAX_REASON]
            failed = ImportResult(
                uid=item.uid,
                message_key=decision.key,
                outcome=Outcome.FAILED,
                error_code="import_failed" if refused else "internal",
                error_reason=reason,
                traceback=None if refused else traceback.format_exc(),
            )
            return failed, None
        conn.execute("RELEASE SAVEPOINT message")
        if isinstance(written, _NotStored):
            skipped = ImportResult(
                uid=item.uid,
                message_key=decision.key,
                outcome=written.outcome,
                error_reason=written.reason,
                delivery_errors=written.delivery_errors,
                delivery_errors_matched=written.delivery_errors_matched,
            )
            return skipped, None
        if written is None:
            ignored = ImportResult(
                uid=item.uid,
                message_key=decision.key,
                outcome=Outcome.IGNORED,
                error_reason="only the account's own addresses take part and it continues no"
                " conversation",
            )
            return ignored, None
        conversation_id, row_id, new = written
        imported = ImportResult(
            uid=item.uid,
            message_key=decision.key,
            outcome=Outcome.IMPORTED,
            conversation_id=conversation_id,
            message_row_id=row_id,
            new_conversation=new,
            reused_key=decision.reused,
        )
        return imported, (conversation_id, row_id)

    @staticmethod
    def _stored_identities(
        conn: sqlite3.Connection, account: str, messages: Sequence[ParsedMessage]
    ) -> dict[str, list[_StoredRow]]:
        """The stored messages the batch's messages may be, oldest first, grouped by the
        Message-ID (or, without one, the key) they share with a message of the batch."""
        ids = list(dict.fromkeys(m.message_id for m in messages if m.message_id))
        keys = list(dict.fromkeys(m.message_key for m in messages))
        found: dict[str, dict[int, _StoredRow]] = {}
        for column, values in (("messageid", ids), ("messagekey", keys)):
            for chunk in _chunks(values):
                rows = conn.execute(
                    f"SELECT {column}, messagekey, fingerprint, conversation, id, date, subject,"
                    " uid"
                    f" FROM conversationmessage WHERE account = ? AND {column} IN"
                    f" ({_marks(len(chunk))})",
                    (account, *chunk),
                )
                for group, key, fingerprint, conversation_id, row_id, date, subject, uid in rows:
                    # Only imported rows (uid set) hold what the parser read: an integrator's
                    # or a sent row's date and subject need not match the copy coming back.
                    summary = (date or "", subject or "") if uid is not None else None
                    found.setdefault(group, {})[row_id] = _StoredRow(
                        key, fingerprint, conversation_id, row_id, summary
                    )
        return {group: [rows[i] for i in sorted(rows)] for group, rows in found.items()}

    @staticmethod
    def _resolve_failures(
        conn: sqlite3.Connection, account: str, keys: Sequence[str], now: str
    ) -> None:
        for chunk in _chunks(keys):
            conn.execute(
                "UPDATE importfailure SET resolved = ?, resolution = ?"
                f" WHERE account = ? AND resolved IS NULL AND messagekey IN ({_marks(len(chunk))})",
                (now, RESOLVED_IMPORTED, account, *chunk),
            )

    @staticmethod
    def _find_by_key(
        conn: sqlite3.Connection, context: ImportContext, message: ParsedMessage
    ) -> int | None:
        """The conversation named by the configured marker (plus-address or subject tag)."""
        if context.identification == "plus_address":
            addresses = (
                *message.delivered_to,
                *(a.email for a in (*message.to, *message.cc, *message.bcc)),
            )
            keys: tuple[str, ...] = plus_keys(addresses, context.own_addresses)
        elif context.identification == "subject":
            key = subject_key(message.subject)
            keys = (key,) if key else ()
        else:
            return None
        for key in keys:
            # The account check is what makes a forged or foreign key harmless: a key only
            # ever reaches a conversation this account already holds.
            row = conn.execute(
                "SELECT id FROM conversation WHERE uniqueid = ? AND account = ?",
                (key, context.account),
            ).fetchone()
            if row is not None:
                return int(row[0])
        return None

    @staticmethod
    def _find_conversation(
        conn: sqlite3.Connection,
        account: str,
        message_id: str | None,
        candidates: Sequence[str],
        date: str,
        *,
        reused: bool = False,
    ) -> int | None:
        """The conversation ``message`` continues, by the rules in the module docstring.

        ``reused``: the message's id already names another stored message, so messages citing
        that id answer the other one and do not pull this one in.
        """
        if candidates:
            parents: dict[str, int] = {}
            carrying: dict[str, list[ParentCandidate]] = {}
            for chunk in _chunks(candidates):
                rows = conn.execute(
                    "SELECT messageid, date, id, conversation FROM conversationmessage"
                    f" WHERE account = ? AND messageid IN ({_marks(len(chunk))})",
                    (account, *chunk),
                )
                for mid, stored_date, row_id, conversation_id in rows:
                    carrying.setdefault(mid, []).append(
                        ParentCandidate(stored_date, row_id, conversation_id)
                    )
                for mid, found in carrying.items():
                    # Several only when a sender reuses its Message-IDs (core decides).
                    chosen = choose_parent(found, date)
                    if chosen is not None:
                        parents.setdefault(mid, chosen)
                # Personalised sending gives each recipient a copy with its own Message-ID,
                # kept on the messagefollower row; a reply cites that one.
                rows = conn.execute(
                    "SELECT mf.messageid, m.conversation FROM messagefollower AS mf"
                    " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                    f" WHERE mf.messageid IN ({_marks(len(chunk))}) AND m.account = ?"
                    " ORDER BY mf.id",
                    (*chunk, account),
                )
                for mid, conversation_id in rows:
                    parents.setdefault(mid, conversation_id)
            for candidate in candidates:
                if candidate in parents:
                    return parents[candidate]
        # Messages citing this one (its reply came first) or citing one of its ancestors.
        cited = ([message_id] if message_id and not reused else []) + list(candidates)
        citing: dict[str, int] = {}
        for chunk in _chunks(cited):
            rows = conn.execute(
                "SELECT r.messageid, m.conversation FROM messagereference AS r"
                " JOIN conversationmessage AS m ON m.id = r.conversationmessage"
                f" WHERE r.messageid IN ({_marks(len(chunk))}) AND m.account = ?"
                " ORDER BY m.date, m.id",
                (*chunk, account),
            )
            for mid, conversation_id in rows:
                citing.setdefault(mid, conversation_id)
        for mid in cited:  # own id first (a child), then the nearest shared ancestor
            if mid in citing:
                return citing[mid]
        return None

    def _import_one(
        self,
        conn: sqlite3.Connection,
        context: ImportContext,
        item: ImportItem,
        now: str,
        decision: KeyDecision,
        *,
        conversation: int | None = None,
        new_key: str | None = None,
    ) -> tuple[int, int, bool] | _NotStored | None:
        """Write one message under ``decision.key``; (conversation id, message row id, new
        conversation), or None when the message is the account's own and continues nothing
        (not written), or _NotStored when core/policy.py keeps it out (discarded; a bounce:
        errors written).

        Sent mail (the outbox) names its ``conversation``, or the ``new_key`` of the one it
        starts: what it was composed for, whatever the threading rules would find."""
        account = context.account
        own = context.own_addresses
        message = item.message
        date = iso(message.date)
        sender = message.from_address
        # Mail from the account's own address (sent by another client, Bcc to self) is ours,
        # unless its Reply-To names someone else (a web form writing for a customer).
        outgoing = is_outgoing(message, own)
        candidates = tuple(c for c in thread_candidates(message) if c and c != message.message_id)
        own_email = reached_address(message, own)

        threaded_by: str = context.identification
        if conversation is not None or new_key is not None:
            threaded_by, conversation_id = "outbox", conversation
        else:
            conversation_id = self._find_by_key(conn, context, message)
        if conversation_id is None and new_key is None:
            threaded_by = "message_id"
            conversation_id = self._find_conversation(
                conn,
                account,
                message.message_id,
                candidates,
                date,
                reused=decision.reused is not None,
            )
        verdict = item.automatic or _PERSON
        disposition = decide(
            verdict,
            item.report,
            conversation_found=conversation_id is not None,
            sender=sender.email if sender is not None else None,
            policy=context.automatic_policy,
        )
        if disposition.disposition is Disposition.DISCARD:
            return _NotStored(Outcome.DISCARDED, disposition.reason)
        if disposition.disposition is Disposition.BOUNCE and item.report is not None:
            written, matched = _delivery_errors.record_delivery_errors(
                conn, account, message, item.report, now, iso
            )
            return _NotStored(Outcome.BOUNCE, disposition.reason, written, matched)
        new = conversation_id is None
        if conversation_id is None:
            if new_key is None and outgoing and only_own_identity(message, own):
                # Only the account's own identity takes part: a loop, or mail to itself.
                return None
            threaded_by = "new"
            conversation_id = self._new_conversation(
                conn, account, own_email, message, date, outgoing=outgoing, now=now, key=new_key
            )
            latest = True
        else:
            latest = self._update_conversation(
                conn, conversation_id, own_email, message, date, outgoing=outgoing, now=now
            )

        html = message.html or text_to_html(message.plain_text)
        cursor = conn.execute(
            "INSERT INTO conversationmessage (conversation, account, uid, messageid, messagekey,"
            " uniqueid, direction, subject, fromaddress, fromname, date, message, plaintext,"
            ' inreplyto, "references", size, createdtime, threadedby, fingerprint, defects)'
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                account,
                item.uid or None,  # 0: sent by mailbridge, never in the Inbox
                message.message_id,
                decision.key,
                _message_uniqueid(),
                "outgoing" if outgoing else "incoming",
                message.subject,
                sender.email.strip().lower() if sender is not None else "",
                sender.name if sender is not None else "",
                date,
                html,
                message.plain_text,
                " ".join(message.in_reply_to) or None,
                " ".join(message.references) or None,
                message.size,
                now,
                threaded_by,
                message.fingerprint or None,
                join_defects(message.defects),
            ),
        )
        row_id = int(cursor.lastrowid or 0)
        if verdict.automatic:
            conn.execute(
                "UPDATE conversationmessage SET automatic = 1, automaticreason = ? WHERE id = ?",
                (verdict.reason, row_id),
            )
        if candidates:
            conn.executemany(
                "INSERT OR IGNORE INTO messagereference (messageid, conversationmessage)"
                " VALUES (?, ?)",
                [(candidate, row_id) for candidate in candidates],
            )
        follower_ids = self._write_followers(
            conn, conversation_id, row_id, message, own, date, latest=latest, new=new, now=now
        )
        self._link_follower_parents(conn, context.follower_parents, follower_ids)
        self._write_files(conn, row_id, message, html, now)
        if new:
            self._create_parents(conn, context, conversation_id, message, html, date)
        return conversation_id, row_id, new

    @staticmethod
    def _link_follower_parents(
        conn: sqlite3.Connection,
        follower_parents: Sequence[FollowerParentSettings],
        follower_ids: Sequence[int],
    ) -> None:
        """Point each follower at the row of every follower parent table with its address.

        A link the integrator set by hand (to a row with another address) is kept when no row
        matches; a follower without a display name takes the parent's name.
        """
        if not follower_parents or not follower_ids:
            return
        for chunk in _chunks(follower_ids):
            marks = _marks(len(chunk))
            for fp in follower_parents:
                table, address = _q(fp.table), _q(fp.address_column)
                match = (
                    f"SELECT p.id FROM {table} AS p WHERE p.{address} = follower.email"
                    " COLLATE NOCASE ORDER BY p.id LIMIT 1"
                )
                conn.execute(
                    f"UPDATE follower SET {table} = COALESCE(({match}), {table})"
                    f" WHERE id IN ({marks})",
                    tuple(chunk),
                )
                if fp.name_column is not None:
                    name = _q(fp.name_column)
                    conn.execute(
                        f"UPDATE follower SET name = COALESCE((SELECT p.{name} FROM {table} AS p"
                        f" WHERE p.id = follower.{table}), '')"
                        f" WHERE id IN ({marks}) AND name = '' AND {table} IS NOT NULL",
                        tuple(chunk),
                    )

    def _create_parents(
        self,
        conn: sqlite3.Connection,
        context: ImportContext,
        conversation_id: int,
        message: ParsedMessage,
        html: str,
        date: str,
    ) -> None:
        """One new record per conversation parent table; conversation.<table> points to it."""
        for cp in context.conversation_parents:
            columns: list[str] = []
            values: list[object] = []
            for prop in cp.properties:
                columns.append(_q(prop.column))
                values.append(self._property_value(conn, context, prop, message, html, date))
            if columns:
                cursor = conn.execute(
                    f"INSERT INTO {_q(cp.table)} ({', '.join(columns)})"
                    f" VALUES ({_marks(len(values))})",
                    values,
                )
            else:
                cursor = conn.execute(f"INSERT INTO {_q(cp.table)} DEFAULT VALUES")
            conn.execute(
                f"UPDATE conversation SET {_q(cp.table)} = ? WHERE id = ?",
                (cursor.lastrowid, conversation_id),
            )

    @staticmethod
    def _property_value(
        conn: sqlite3.Connection,
        context: ImportContext,
        prop: ParentPropertySettings,
        message: ParsedMessage,
        html: str,
        date: str,
    ) -> object:
        """The value of one parent property: the message's, looked up, or the default."""
        sender = message.from_address
        from_address = sender.email.strip().lower() if sender is not None else ""
        value: object = None
        if prop.message_property is not None:
            value = {
                "subject": message.subject,
                "plain_text": message.plain_text,
                "html": html,
                "from_address": from_address,
                "from_name": sender.name if sender is not None else "",
                "date": date,
                "account": context.account,
                "message_id": message.message_id,
                "to_addresses": ", ".join(a.email for a in message.to),
            }[prop.message_property]
        table, column = prop.search_table, prop.search_column
        if table is not None and column is not None:
            if prop.message_property is not None:
                # The record whose column holds the message's value: person.email -> person id.
                row = (
                    conn.execute(
                        f"SELECT id FROM {_q(table)} WHERE {_q(column)} = ? COLLATE NOCASE"
                        " ORDER BY id LIMIT 1",
                        (value,),
                    ).fetchone()
                    if value not in (None, "")
                    else None
                )
            else:
                # A column of the sender's follower parent record: person.company.
                parent = next((fp for fp in context.follower_parents if fp.table == table), None)
                row = (
                    conn.execute(
                        f"SELECT {_q(column)} FROM {_q(table)}"
                        f" WHERE {_q(parent.address_column)} = ? COLLATE NOCASE"
                        " ORDER BY id LIMIT 1",
                        (from_address,),
                    ).fetchone()
                    if from_address and parent is not None
                    else None
                )
            value = row[0] if row is not None else None
        if value in (None, "") and prop.default is not None:
            return prop.default
        return value

    @staticmethod
    def _new_conversation(
        conn: sqlite3.Connection,
        account: str,
        own_email: str | None,
        message: ParsedMessage,
        date: str,
        *,
        outgoing: bool,
        now: str,
        key: str | None = None,
    ) -> int:
        cursor = conn.execute(
            "INSERT INTO conversation (uniqueid, account, email, subject, threadid, replytoid,"
            " earliestunread, firstmessagedate, lastmessagedate, createdtime, updatedtime)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key or new_conversation_key(),
                account,
                own_email,
                message.subject,
                message.message_id,
                message.message_id,
                None if outgoing else date,
                date,
                date,
                now,
                now,
            ),
        )
        return int(cursor.lastrowid or 0)

    @staticmethod
    def _update_conversation(
        conn: sqlite3.Connection,
        conversation_id: int,
        own_email: str | None,
        message: ParsedMessage,
        date: str,
        *,
        outgoing: bool,
        now: str,
    ) -> bool:
        """Fold the message into the conversation row; True when it is the newest message."""
        row = conn.execute(
            "SELECT email, firstmessagedate, lastmessagedate, earliestunread, subject, threadid,"
            " replytoid FROM conversation WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        email, first, last, unread, subject, threadid, replytoid = row
        latest = last is None or date >= last
        earliest = first is None or date < first
        if earliest:
            # The real start of the thread arrived after a reply: it names the conversation.
            first = date
            threadid = message.message_id or threadid
            subject = message.subject or subject
        if latest:
            last = date
            replytoid = message.message_id or replytoid
        if not outgoing and (unread is None or date < unread):
            unread = date
        conn.execute(
            "UPDATE conversation SET email = ?, firstmessagedate = ?, lastmessagedate = ?,"
            " earliestunread = ?, subject = ?, threadid = ?, replytoid = ?, updatedtime = ?"
            " WHERE id = ?",
            (
                email or own_email,
                first,
                last,
                unread,
                subject,
                threadid,
                replytoid,
                now,
                conversation_id,
            ),
        )
        return latest

    @staticmethod
    def _write_followers(
        conn: sqlite3.Connection,
        conversation_id: int,
        row_id: int,
        message: ParsedMessage,
        own: frozenset[str],
        date: str,
        *,
        latest: bool,
        new: bool,
        now: str,
    ) -> list[int]:
        """Write the message's followers; returns the ids of its participants.

        A name the message gives replaces the stored one only when the message is at least as
        new as the newest message the follower took part in: a late-arriving older message
        must not undo a newer name. (Per-message names are not stored for To/Cc, so "newest"
        is judged by the follower's newest message, named or not.)
        """
        names: dict[str, str] = {}  # email -> first non-empty name, in order of appearance
        levels: list[tuple[str, str]] = []
        for address, level in message.participants():
            email = address.email.strip().lower()
            # support+KEY@ is the account itself, reached through a plus-address.
            if not email or is_own_address(email, own):
                continue
            if not names.get(email):
                names[email] = address.name.strip()
            levels.append((email, level.value))
        existing: dict[str, _FollowerRow] = {}
        if not new:
            for fid, email, name, active in conn.execute(
                "SELECT id, email, name, active FROM follower WHERE conversation = ?",
                (conversation_id,),
            ):
                existing[email] = _FollowerRow(fid, name, active)
        # Only a late (older) message that brings a different name needs the followers'
        # newest dates; the newest message of the conversation is newer than all of them.
        renamed = [
            existing[email].id
            for email, name in names.items()
            if name and email in existing and existing[email].name not in ("", name)
        ]
        newest: dict[int, str] = {}
        if renamed and not latest:
            for chunk in _chunks(renamed):
                newest.update(
                    conn.execute(
                        "SELECT mf.follower, MAX(m.date) FROM messagefollower AS mf"
                        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                        f" WHERE mf.follower IN ({_marks(len(chunk))}) GROUP BY mf.follower",
                        tuple(chunk),
                    ).fetchall()
                )
        ids: dict[str, int] = {}
        updates: list[tuple[str, int, str, int]] = []
        for email, name in names.items():
            row = existing.get(email)
            if row is None:
                # Introduced by a message older than the newest one, which left them out.
                cursor = conn.execute(
                    "INSERT INTO follower (conversation, email, name, active, subscribed,"
                    " createdtime, updatedtime) VALUES (?, ?, ?, ?, 1, ?, ?)",
                    (conversation_id, email, name, 1 if latest else 0, now, now),
                )
                ids[email] = int(cursor.lastrowid or 0)
                continue
            ids[email] = row.id
            # A follower's dates come from their messages; one with none (a row an integrator
            # wrote) takes any name. An empty stored name takes any name too.
            follower_newest = newest.get(row.id)
            newer = latest or follower_newest is None or date >= follower_newest
            new_name = name if name and (newer or not row.name) else row.name
            new_active = 1 if latest else row.active
            if new_name != row.name or new_active != row.active:
                updates.append((new_name, new_active, now, row.id))
        if latest:
            updates.extend(
                (row.name, 0, now, row.id)
                for email, row in existing.items()
                if row.active and email not in names
            )
        if updates:
            conn.executemany(
                "UPDATE follower SET name = ?, active = ?, updatedtime = ? WHERE id = ?", updates
            )
        if levels:
            conn.executemany(
                "INSERT OR IGNORE INTO messagefollower (conversationmessage, follower,"
                " participationlevel) VALUES (?, ?, ?)",
                [(row_id, ids[email], level) for email, level in levels],
            )
        return list(ids.values())

    @staticmethod
    def _write_files(
        conn: sqlite3.Connection, row_id: int, message: ParsedMessage, html: str, now: str
    ) -> None:
        if message.attachments:
            conn.executemany(
                "INSERT INTO document (conversationmessage, filename, contenttype, size, document,"
                " createdtime) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (row_id, a.filename, a.content_type, a.size, a.data, now)
                    for a in message.attachments
                ],
            )
        mapping: dict[str, str] = {}
        for image in message.inline_images:
            cursor = conn.execute(
                "INSERT INTO embeddedfile (conversationmessage, contentid, filename, contenttype,"
                " size, document, createdtime) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row_id,
                    image.content_id,
                    image.filename,
                    image.content_type,
                    image.size,
                    image.data,
                    now,
                ),
            )
            if image.content_id:
                mapping.setdefault(image.content_id, f"embeddedfile:{cursor.lastrowid}")
        if mapping and message.html:
            rewritten = rewrite_inline_images(html, mapping)
            if rewritten != html:
                conn.execute(
                    "UPDATE conversationmessage SET message = ? WHERE id = ?", (rewritten, row_id)
                )

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
        same_id = self._stored_identities(conn, context.account, [message]).get(
            message.message_id or message.message_key, []
        )
        decision = decide_message_key(
            message.message_key,
            message.message_id,
            message.fingerprint,
            [StoredIdentity(r.key, r.fingerprint) for r in same_id],
        )
        if decision.duplicate:  # sent again after a crash: stored already
            known = next(r for r in same_id if r.key == decision.key)
            conversation, row_id = known.conversation_id, known.row_id
        else:
            written = self._import_one(
                conn,
                context,
                ImportItem(uid=0, message=message),
                stamp,
                decision,
                conversation=conversation,
                new_key=None if conversation is not None else key,
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
