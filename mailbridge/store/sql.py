"""What the SQL backends share: timestamps as text, row mapping, and every Repository method
outside the import path, written once in SQL both SQLite and PostgreSQL accept.

:class:`SqlRepository` implements the configured parent tables (``prepare``, and the read-only
check ``use_parents``), failures, reconciliation, account states, sweeps, marking read and
reading conversations on top of two things a backend provides: ``_sql(action,
write=...)``, a transaction (a read-only one for reads) that yields a :class:`Sql` cursor, and
the parent tables it knows (``_follower_parents``, ``_conversation_parents``, filled by
``prepare`` or :meth:`SqlRepository.use_parents`). Statements use ``?`` placeholders; the
PostgreSQL adapter turns them into ``%s``. The dialect differences the methods here meet are
named by the cursor: case-insensitive matching (``Sql.like``: SQLite's LIKE is, PostgreSQL's
ILIKE is; ``Sql.nocase`` for an index) and the column types of created tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from mailbridge.core.planner import timestamp_text
from mailbridge.errors import ConfigError
from mailbridge.store.base import (
    RESOLVED_REMOVED,
    AccountState,
    ConversationDetail,
    ConversationSummary,
    DeliveryErrorRecord,
    FailureInfo,
    FailureRecord,
    NotStoredRecord,
    Reconciliation,
    StoredMessage,
)
from mailbridge.store.delivery_errors import list_delivery_errors, resolve_delivery_error

if TYPE_CHECKING:
    from mailbridge.config import ConversationParentSettings, FollowerParentSettings


# ``value`` as ISO-8601 UTC text in the one shape the schema uses (naive means UTC): the
# planner's rule, since it compares dates as that text.
iso = timestamp_text


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


def now_text() -> str:
    """The application's clock as timestamp text (PostgreSQL leases use the database's)."""
    return iso(datetime.now(UTC))


def q(identifier: str) -> str:
    """An identifier quoted for SQL. Config admits only ``[a-z_][a-z0-9_]*`` non-keywords, so
    the quotes are belt and braces, never an escape."""
    return '"' + identifier.replace('"', '""') + '"'


def like_pattern(search: str) -> str:
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


SUMMARY_SELECT: Final = (
    "SELECT c.id, c.uniqueid, c.account, c.subject, c.firstmessagedate, c.lastmessagedate,"
    " c.earliestunread,"
    " (SELECT COUNT(*) FROM conversationmessage AS m WHERE m.conversation = c.id) AS messages,"
    " (SELECT COUNT(*) FROM follower AS f WHERE f.conversation = c.id) AS followers"
    " FROM conversation AS c"
)


def summary(row: dict[str, Any]) -> ConversationSummary:
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


def failure_record(row: dict[str, Any]) -> FailureRecord:
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


def join_defects(defects: Sequence[str]) -> str | None:
    """``conversationmessage.defects``: one defect per line (each made one line); None for none."""
    lines = [" ".join(d.split()) for d in defects]
    return "\n".join(line for line in lines if line) or None


def split_defects(value: object) -> tuple[str, ...]:
    """The defects column back as a tuple (an integrator may have written NULL or '')."""
    return tuple(line for line in value.splitlines() if line) if isinstance(value, str) else ()


class Sql(Protocol):
    """One open transaction of a backend, as the shared methods use it."""

    like: str  # the case-insensitive LIKE: "LIKE" (SQLite) or "ILIKE" (PostgreSQL)
    id_column: str  # the definition of a created table's integer primary key ``id``
    link_type: str  # the type of a column holding another table's id
    untyped: str  # the type of a parent property column ("" in SQLite: any value goes)

    def nocase(self, column: str) -> str:
        """An index expression matching ``column`` case-insensitively."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each parameter row."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query; its rows as column name -> value."""

    def columns(self, table: str) -> set[str]:
        """The column names of ``table`` (empty when it does not exist)."""


class SqlRepository:
    """The Repository methods outside the import path, for any :class:`Sql` backend."""

    # Parent specs already prepared on this connection, and the tables known by name for
    # reading conversations back (``conversation()`` shows their links).
    _ready: set[object]
    _follower_parents: dict[str, FollowerParentSettings]
    _conversation_parents: dict[str, ConversationParentSettings]

    def _sql(self, action: str, *, write: bool) -> contextlib.AbstractContextManager[Sql]:
        raise NotImplementedError  # each backend opens its own transactions

    def prepare(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        with self._sql("prepare the configured parent tables", write=True) as sql:
            self._prepare(sql, follower_parents, conversation_parents)

    def _prepare(
        self,
        sql: Sql,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
        *,
        create: bool = True,
    ) -> None:
        """Create what is missing, check what exists (ConfigError naming the key path); with
        ``create`` false, only check what exists (a read-only command's transaction)."""
        if all(spec in self._ready for spec in (*follower_parents, *conversation_parents)):
            return

        def ddl(statement: str) -> None:
            if create:
                sql.execute(statement)

        def link(owner: str, table: str) -> None:
            """The indexed column ``owner.<table>`` holding the id of a row of ``table``."""
            ddl(f"ALTER TABLE {owner} ADD COLUMN {q(table)} {sql.link_type}")
            ddl(f"CREATE INDEX IF NOT EXISTS {q(owner + '_' + table)} ON {owner} ({q(table)})")

        # Columns that search paths read from a follower parent table (``person.company``):
        # a table mailbridge creates gets them, an existing one must have them.
        wanted: dict[str, set[str]] = {}
        for cp in conversation_parents:
            for prop in cp.properties:
                if prop.search_table and prop.search_column:
                    wanted.setdefault(prop.search_table, set()).add(prop.search_column)
        follower_columns = sql.columns("follower")
        for i, fp in enumerate(follower_parents):
            path = f"follower_parents[{i}]"
            extra = sorted(wanted.get(fp.table, set()) - {"id", fp.address_column, fp.name_column})
            existing = sql.columns(fp.table)
            if not existing:
                definitions = [
                    sql.id_column,
                    f"{q(fp.address_column)} TEXT NOT NULL DEFAULT ''",
                ]
                if fp.name_column is not None:
                    definitions.append(f"{q(fp.name_column)} TEXT NOT NULL DEFAULT ''")
                definitions.extend(q(column) + sql.untyped for column in extra)
                ddl(f"CREATE TABLE {q(fp.table)} ({', '.join(definitions)})")
                # Followers are matched by address, case-insensitively.
                ddl(
                    f"CREATE INDEX {q(fp.table + '_' + fp.address_column)}"
                    f" ON {q(fp.table)} ({sql.nocase(q(fp.address_column))})"
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
                link("follower", fp.table)
            self._follower_parents[fp.table] = fp
        conversation_columns = sql.columns("conversation")
        for i, cp in enumerate(conversation_parents):
            path = f"conversation_parents[{i}]"
            existing = sql.columns(cp.table)
            if not existing:
                definitions = [sql.id_column]
                # No declared type: a property may hold text (subject) or an id (person).
                definitions.extend(q(prop.column) + sql.untyped for prop in cp.properties)
                ddl(f"CREATE TABLE {q(cp.table)} ({', '.join(definitions)})")
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
                    found = sql.columns(prop.search_table)
                    if not found and not create and prop.search_table in self._follower_parents:
                        continue  # a follower parent table the daemon will create
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
                link("conversation", cp.table)
            self._conversation_parents[cp.table] = cp
        if create:
            self._ready.update((*follower_parents, *conversation_parents))

    def lease_holders(self) -> dict[str, str]:
        """No leases by default (SQLite: one daemon); PostgreSQL overrides it."""
        return {}

    def use_parents(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        """Check the configured parent tables that exist against the config (ConfigError
        naming the key path) and know them for reading conversations back, in a read-only
        transaction: nothing is created (read-only commands; :meth:`prepare` writes)."""
        with self._sql("check the configured parent tables", write=False) as sql:
            self._prepare(sql, follower_parents, conversation_parents, create=False)

    # -- failures -----------------------------------------------------------------------------

    def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        if not failures:
            return
        with self._sql(f"record import failures for {account}", write=True) as sql:
            now = now_text()
            # A new failure of a known message: one more attempt, the latest reason, unresolved
            # again; its old Failed-folder UID is stale once it is moved there anew.
            sql.executemany(
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
        with self._sql(f"record Failed-folder UIDs for {account}", write=True) as sql:
            sql.executemany(
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
        with self._sql("read import failures", write=False) as sql:
            rows = list(
                sql.rows(
                    f"SELECT * FROM importfailure{where} ORDER BY lastfailed DESC, id DESC", params
                )
            )
        return [failure_record(row) for row in rows]

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
        with self._sql(f"reconcile the Failed folder of {account}", write=True) as sql:
            found = sql.rows(
                "SELECT faileduidvalidity FROM accountstate WHERE account = ?", (account,)
            )
            remembered = found[0]["faileduidvalidity"] if found else None
            if remembered != uidvalidity:
                # Remembered in the account's row; an account never seen before (a 'sync'
                # before the first 'run') gets one in state 'stopped', as record_sweep does.
                sql.execute(
                    "INSERT INTO accountstate (account, state, detail, updated, faileduidvalidity)"
                    " VALUES (?, 'stopped', '', ?, ?) ON CONFLICT (account) DO UPDATE SET"
                    " faileduidvalidity = excluded.faileduidvalidity",
                    (account, now_text(), uidvalidity),
                )
            if remembered is not None and remembered != uidvalidity:
                # The folder was recreated (or its UIDs reset): every stored Failed-folder UID
                # names a message of its previous incarnation, or another message now. Resolve
                # nothing; forget those UIDs rather than let them match (or miss) by accident.
                forgotten = sql.execute(
                    "UPDATE importfailure SET folderuid = NULL"
                    " WHERE account = ? AND resolved IS NULL AND folderuid IS NOT NULL",
                    (account,),
                )
                return Reconciliation(previous_uidvalidity=int(remembered), forgotten=forgotten)
            now = now_text()
            resolved = 0
            for record_id, folder_uid in gone:
                # Unchanged since it was read: a new failure in between cleared or replaced
                # its Failed-folder UID (record_failures), an import resolved it.
                resolved += sql.execute(
                    "UPDATE importfailure SET resolved = ?, resolution = ?"
                    " WHERE id = ? AND account = ? AND resolved IS NULL AND folderuid = ?",
                    (now, RESOLVED_REMOVED, record_id, account, folder_uid),
                )
        return Reconciliation(resolved=resolved)

    # -- account state ------------------------------------------------------------------------

    def set_account_state(self, state: AccountState) -> None:
        self.set_account_states([state])

    def set_account_states(self, states: Sequence[AccountState]) -> None:
        """Store several accounts' states in one transaction (the daemon coalesces the state
        changes made while one write is under way: ``AsyncRepository.set_account_state``)."""
        if not states:
            return
        with self._sql(f"record the state of {len(states)} account(s)", write=True) as sql:
            for state in states:
                write_account_state(sql, state)

    def account_states(self) -> list[AccountState]:
        query = """
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
        with self._sql("read account states", write=False) as sql:
            rows = sql.rows(query)
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
        with self._sql(f"record the recovery sweep of {account}", write=True) as sql:
            when = iso(finished)
            # Only the sweep's own columns and the import count: the state belongs to the live
            # loop, which runs beside the sweep. An account never seen before (a 'sync' before
            # the first 'run') gets a row in state 'stopped'.
            sql.execute(
                "INSERT INTO accountstate (account, state, detail, lastimport, imported, updated,"
                " lastsweep, sweepsummary) VALUES (?, 'stopped', '', ?, ?, ?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET"
                " lastimport = COALESCE(excluded.lastimport, accountstate.lastimport),"
                " imported = accountstate.imported + excluded.imported,"
                " lastsweep = excluded.lastsweep, sweepsummary = excluded.sweepsummary",
                (account, when if imported > 0 else None, imported, when, when, summary),
            )

    # -- reading conversations ----------------------------------------------------------------

    def delivery_errors(
        self, *, unresolved: bool = False, conversation: int | None = None
    ) -> list[DeliveryErrorRecord]:
        with self._sql("read delivery errors", write=False) as sql:
            rows = list_delivery_errors(sql, unresolved=unresolved, conversation=conversation)
        return [_delivery_error_record(row) for row in rows]

    def not_stored(self, account: str | None = None, *, limit: int = 50) -> list[NotStoredRecord]:
        where, params = ("WHERE account = ?", [account]) if account is not None else ("", [])
        with self._sql("read discarded messages", write=False) as sql:
            rows = sql.rows(
                f"SELECT * FROM discardedmessage {where} ORDER BY createdtime DESC, id DESC"
                " LIMIT ?",
                [*params, limit],
            )
        return [
            NotStoredRecord(
                id=int(row["id"]),
                account=row["account"],
                message_key=row["messagekey"],
                message_id=row["messageid"],
                from_address=row["fromaddress"],
                subject=row["subject"],
                date=parse_time(row["date"]),
                route=row["route"],
                reason=row["reason"],
                at=parse_time(row["createdtime"]) or datetime(1970, 1, 1, tzinfo=UTC),
            )
            for row in rows
        ]

    def resolve_delivery_error(self, error_id: int) -> bool:
        with self._sql(f"resolve delivery error {error_id}", write=True) as sql:
            return resolve_delivery_error(sql, error_id, now_text())

    def mark_read(self, conversation_id: int) -> bool:
        with self._sql(f"mark conversation {conversation_id} read", write=True) as sql:
            changed = sql.execute(
                "UPDATE conversation SET earliestunread = NULL, updatedtime = ? WHERE id = ?",
                (now_text(), conversation_id),
            )
        return changed > 0

    def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        clauses: list[str] = []
        params: list[Any] = []
        if account is not None:
            clauses.append("c.account = ?")
            params.append(account)
        if search:
            pattern = like_pattern(search)
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
        query = f"{SUMMARY_SELECT}{where} ORDER BY c.lastmessagedate DESC, c.id DESC LIMIT ?"
        params.append(max(limit, 0))
        with self._sql("list conversations", write=False) as sql:
            rows = sql.rows(query.replace(" LIKE ", f" {sql.like} "), params)
        return [summary(row) for row in rows]

    def conversation(self, conversation_id: int) -> ConversationDetail | None:
        with self._sql(f"read conversation {conversation_id}", write=False) as sql:
            head = sql.rows(f"{SUMMARY_SELECT} WHERE c.id = ?", [conversation_id])
            if not head:
                return None
            followers = tuple(
                (row["email"], row["name"], bool(row["active"]))
                for row in sql.rows(
                    "SELECT email, name, active FROM follower WHERE conversation = ? ORDER BY id",
                    [conversation_id],
                )
            )
            parents: list[tuple[str, int]] = []
            conversation_columns = sql.columns("conversation")
            for table in self._conversation_parents:
                if table in conversation_columns:
                    [link] = sql.rows(
                        f"SELECT {q(table)} AS link FROM conversation WHERE id = ?",
                        (conversation_id,),
                    )
                    if link["link"] is not None:
                        parents.append((table, int(link["link"])))
            follower_links: list[tuple[str, str, int]] = []
            follower_columns = sql.columns("follower")
            for table in self._follower_parents:
                if table in follower_columns:
                    follower_links.extend(
                        (row["email"], table, int(row["link"]))
                        for row in sql.rows(
                            f"SELECT email, {q(table)} AS link FROM follower"
                            f" WHERE conversation = ? AND {q(table)} IS NOT NULL ORDER BY id",
                            (conversation_id,),
                        )
                    )
            messages = list(
                sql.rows(
                    "SELECT id, messageid, uid, date, subject, fromaddress, fromname, plaintext,"
                    " message, threadedby, messagekey, defects FROM conversationmessage"
                    " WHERE conversation = ?"
                    " ORDER BY date, id",
                    [conversation_id],
                )
            )
            participants: dict[int, list[tuple[str, str]]] = {}
            for row in sql.rows(
                "SELECT mf.conversationmessage AS mid, f.email, mf.participationlevel AS level"
                " FROM messagefollower AS mf JOIN follower AS f ON f.id = mf.follower"
                " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                " WHERE m.conversation = ? ORDER BY mf.id",
                [conversation_id],
            ):
                participants.setdefault(row["mid"], []).append((row["email"], row["level"]))
            documents: dict[int, list[tuple[str, str, int]]] = {}
            for row in sql.rows(
                "SELECT d.conversationmessage AS mid, d.filename, d.contenttype, d.size"
                " FROM document AS d JOIN conversationmessage AS m ON m.id = d.conversationmessage"
                " WHERE m.conversation = ? ORDER BY d.id",
                [conversation_id],
            ):
                documents.setdefault(row["mid"], []).append(
                    (row["filename"], row["contenttype"], int(row["size"]))
                )
            embedded: dict[int, list[tuple[str, str, int]]] = {}
            for row in sql.rows(
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
            summary=summary(head[0]),
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


def _delivery_error_record(row: dict[str, Any]) -> DeliveryErrorRecord:
    return DeliveryErrorRecord(
        id=int(row["id"]),
        account=row["account"],
        conversation=row["conversation"],
        conversation_message=row["conversationmessage"],
        message_follower=row["messagefollower"],
        recipient=row["recipient"] or "",
        type=row["type"],
        status=row["status"],
        diagnostic=row["diagnostic"] or "",
        original_message_id=row["originalmessageid"],
        matched_by=row["matchedby"],
        report_kind=row["reportkind"],
        report_message_id=row["reportmessageid"],
        report_subject=row["reportsubject"] or "",
        report_from=row["reportfrom"] or "",
        date=parse_time(row["date"]),
        resolved=parse_time(row["resolved"]),
    )


def write_account_state(sql: Sql, state: AccountState) -> None:
    """Upsert one ``accountstate`` row. ``imported`` is a delta; a missing last_import keeps
    the stored one ("no import in this update" must not erase when the last import happened).
    """
    sql.execute(
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
            iso(state.updated) if state.updated is not None else now_text(),
        ),
    )
