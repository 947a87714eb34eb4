"""The outbox (:class:`~mailbridge.store.outbox.OutboxRepository`) written once in SQL that
SQLite and PostgreSQL both accept, on top of a backend's :class:`~mailbridge.store.sql.Sql`
transactions (``?`` placeholders; the PostgreSQL adapter turns them into ``%s``).

:class:`SqlOutbox` is mixed into both repositories. The dialect differences it meets are
named by the cursor (``Sql.like``) or by a hook the backend overrides: :meth:`SqlOutbox.
_lock_account` (PostgreSQL serialises writes into one account's conversations with an
advisory lock, as its import does) and :meth:`SqlOutbox.outbox_watchers` (PostgreSQL can
count the daemons LISTENing for outbox news; SQLite cannot tell).

Several daemons on one database: :meth:`SqlOutbox.outbox_begin` claims a row with one
``UPDATE ... WHERE state = 'queued'`` per row. Under PostgreSQL's READ COMMITTED a second
daemon's UPDATE of the same row waits for the first one's commit and then re-checks the
``WHERE`` against the committed row (``sending``): it changes nothing, so exactly one daemon
begins an attempt. The message is fixed the same way (``WHERE raw IS NULL``). SQLite has one
writer at a time (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

from mailbridge.core import planner
from mailbridge.core.messagekey import StoredIdentity
from mailbridge.core.outbox import address_entry
from mailbridge.errors import StoreError
from mailbridge.store.base import ImportContext, ImportItem
from mailbridge.store.importer import import_one
from mailbridge.store.importsql import Cursor, SqlImport, marks
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
from mailbridge.store.schema import CONVERSATION_COLUMNS, FOLLOWER_COLUMNS
from mailbridge.store.sql import Sql, iso, like_pattern, now_text, parse_time, q

if TYPE_CHECKING:
    from mailbridge.config import ConversationParentSettings, FollowerParentSettings

_MAX_REASON: Final = 1000

OUTBOX_COLUMNS: Final = (
    "id, account, conversation, toaddresses, ccaddresses, bccaddresses, subject, bodyhtml,"
    " bodytext, coworker, coworkeraddress, actions, automatic, state, attempts, nextattempt,"
    " attemptstarted, lasterrorcode, lasterror, messageid, conversationkey, createdtime, senttime,"
    " (SELECT COUNT(*) FROM outboxattachment AS a WHERE a.outbox = outbox.id) AS files,"
    " (SELECT COUNT(*) FROM outboxcopy AS c WHERE c.outbox = outbox.id) AS copies"
)


def _blob(value: object) -> bytes | None:
    """A BLOB/BYTEA column as bytes (psycopg may hand out a memoryview)."""
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None


def outbox_row(row: dict[str, Any]) -> OutboxRow:
    return OutboxRow(
        id=int(row["id"]),
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
        raw=_blob(row.get("raw")),
        files=int(row.get("files") or 0),
        copies=int(row.get("copies") or 0),
    )


def snippet(row: dict[str, Any]) -> Snippet:
    return Snippet(
        id=int(row["id"]),
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


def add_coworker(sql: Sql, conversation: int, row_id: int, email: str, name: str, now: str) -> None:
    """The sending coworker follows the conversation and is the message's 'from'."""
    email = email.strip().lower()
    sql.execute(
        "INSERT INTO follower (conversation, email, name, active, subscribed, createdtime,"
        " updatedtime) VALUES (?, ?, ?, 1, 1, ?, ?) ON CONFLICT (conversation, email)"
        " DO UPDATE SET active = 1, name = CASE WHEN excluded.name != '' THEN excluded.name"
        " ELSE follower.name END, updatedtime = excluded.updatedtime",
        (conversation, email, name, now, now),
    )
    sql.execute(
        "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
        " SELECT ?, id, 'from' FROM follower WHERE conversation = ? AND email = ?"
        " ON CONFLICT (conversationmessage, follower, participationlevel) DO NOTHING",
        (row_id, conversation, email),
    )


class SqlOutbox:
    """:class:`~mailbridge.store.outbox.OutboxRepository` for any :class:`Sql` backend."""

    def _sql(self, action: str, *, write: bool) -> contextlib.AbstractContextManager[Sql]:
        raise NotImplementedError  # each backend opens its own transactions

    def _unsynced_sql(self, action: str) -> contextlib.AbstractContextManager[Sql]:
        """A write transaction whose commit need not wait for the disk where losing it is
        only losing it with the process (SQLite ``synchronous=NORMAL`` in WAL mode: it survives
        the process being killed, not a power cut); PostgreSQL's is an ordinary one."""
        raise NotImplementedError

    def _prepare(
        self,
        sql: Sql,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
        *,
        create: bool = True,
    ) -> None:
        raise NotImplementedError  # SqlRepository's

    def _lock_account(self, sql: Sql, account: str) -> None:
        """Serialise writes into ``account``'s conversations until the transaction ends
        (nothing to do with one writer at a time, as in SQLite)."""

    def outbox_watchers(self) -> int | None:
        """How many daemons wait for outbox news on this database (PostgreSQL: sessions
        LISTENing); None when the database cannot tell (SQLite: ask the wake socket,
        :func:`mailbridge.daemon.outbox.notify_daemon`)."""
        return None

    def queue_outgoing(self, request: OutgoingRequest, files: Sequence[OutboxFile] = ()) -> int:
        with self._sql(f"queue a message for {request.account}", write=True) as sql:
            now = now_text()
            [found] = sql.rows(
                "INSERT INTO outbox (account, conversation, toaddresses, ccaddresses, bccaddresses,"
                " subject, bodyhtml, bodytext, coworker, coworkeraddress, actions, automatic,"
                " createdtime, updatedtime) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING id",
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
                    now,
                    now,
                ),
            )
            outbox_id = int(found["id"])
            if files:
                sql.executemany(
                    "INSERT INTO outboxattachment (outbox, filename, contenttype, path, document)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(outbox_id, f.filename, f.content_type, f.path, f.data) for f in files],
                )
        return outbox_id

    @staticmethod
    def _outbox_rows(
        sql: Sql, where: str, params: Sequence[object], *, raw: bool
    ) -> list[OutboxRow]:
        columns = OUTBOX_COLUMNS + (", raw" if raw else "")
        return [
            outbox_row(row) for row in sql.rows(f"SELECT {columns} FROM outbox {where}", params)
        ]

    def outbox(
        self, *, states: Sequence[str] | None = None, account: str | None = None, limit: int = 100
    ) -> list[OutboxRow]:
        clauses: list[str] = []
        params: list[object] = []
        if states is not None:
            clauses.append(f"state IN ({marks(len(states))})")
            params.extend(states)
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._sql("list the outbox", write=False) as sql:
            return self._outbox_rows(
                sql, f"{where} ORDER BY id DESC LIMIT ?", [*params, max(limit, 0)], raw=False
            )

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with self._sql("count outbox rows", write=False) as sql:
            for row in sql.rows(
                "SELECT account, state, COUNT(*) AS n FROM outbox"
                " WHERE state IN ('queued', 'sending', 'failed') GROUP BY account, state"
            ):
                counts.setdefault(row["account"], {})[row["state"]] = int(row["n"])
        return counts

    def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        with self._sql(f"read outbox row {outbox_id}", write=False) as sql:
            found = self._outbox_rows(sql, "WHERE id = ?", [outbox_id], raw=True)
        return found[0] if found else None

    def outbox_due(
        self, accounts: Sequence[str], now: datetime, limit: int, max_bytes: int | None = None
    ) -> list[OutboxRow]:
        if not accounts:
            return []
        due = (
            f"WHERE state = 'queued' AND account IN ({marks(len(accounts))})"
            " AND (nextattempt IS NULL OR nextattempt <= ?)"
        )
        params: list[object] = [*accounts, iso(now), limit]
        where = f"{due} ORDER BY id LIMIT ?"
        if max_bytes is not None:
            # The stored messages (retries) of the rows before each, summed in id order; only
            # the rows chosen have their bytes read (LENGTH of a BLOB reads its size only).
            size = "COALESCE(LENGTH(raw), 0)"
            where = (
                "WHERE id IN (SELECT id FROM (SELECT id,"
                f" SUM({size}) OVER (ORDER BY id) - {size} AS before FROM outbox {due}"
                " ORDER BY id LIMIT ?) AS due WHERE before < ?) ORDER BY id"
            )
            params.append(max_bytes)
        with self._sql("find due outbox rows", write=False) as sql:
            return self._outbox_rows(sql, where, params, raw=True)

    def outbox_next_due(self, accounts: Sequence[str]) -> datetime | None:
        if not accounts:
            return None
        with self._sql("find the next outbox attempt", write=False) as sql:
            [row] = sql.rows(
                "SELECT MIN(COALESCE(nextattempt, '')) AS due FROM outbox WHERE state = 'queued'"
                f" AND account IN ({marks(len(accounts))})",
                list(accounts),
            )
        if row["due"] is None:
            return None
        return parse_time(row["due"]) or datetime(1970, 1, 1, tzinfo=UTC)

    def outbox_in_flight(self, accounts: Sequence[str]) -> list[OutboxRow]:
        if not accounts:
            return []
        with self._sql("find outbox rows left sending", write=False) as sql:
            return self._outbox_rows(
                sql,
                f"WHERE state = 'sending' AND account IN ({marks(len(accounts))}) ORDER BY id",
                list(accounts),
                raw=True,
            )

    def outbox_files(self, outbox_id: int) -> list[OutboxFile]:
        with self._sql(f"read the attachments of outbox row {outbox_id}", write=False) as sql:
            rows = sql.rows(
                "SELECT filename, contenttype, path, document FROM outboxattachment"
                " WHERE outbox = ? ORDER BY id",
                (outbox_id,),
            )
        return [
            OutboxFile(
                r["filename"] or "",
                r["contenttype"] or "application/octet-stream",
                r["path"],
                _blob(r["document"]),
            )
            for r in rows
        ]

    def reply_context(self, conversation_id: int) -> ReplyContext | None:
        with self._sql(f"read conversation {conversation_id} to reply", write=False) as sql:
            heads = sql.rows(
                "SELECT account, uniqueid, subject, email FROM conversation WHERE id = ?",
                (conversation_id,),
            )
            if not heads:
                return None
            head = heads[0]
            # The message answered: the newest incoming one (the newest of any when the
            # conversation holds only what we sent).
            parents = sql.rows(
                'SELECT messageid, "references", inreplyto, fromaddress, fromname, id'
                " FROM conversationmessage WHERE conversation = ?"
                " ORDER BY direction = 'incoming' DESC, date DESC, id DESC LIMIT 1",
                (conversation_id,),
            )
            followers = sql.rows(
                "SELECT email, name FROM follower WHERE conversation = ? AND active = 1"
                " ORDER BY id",
                (conversation_id,),
            )
            parent_columns: dict[str, frozenset[str]] = {}
            for table in sorted(sql.columns("conversation") - CONVERSATION_COLUMNS):
                [link] = sql.rows(
                    f"SELECT {q(table)} AS link FROM conversation WHERE id = ?", (conversation_id,)
                )
                columns = sql.columns(table)
                if link["link"] is not None and columns:
                    parent_columns[table] = frozenset(columns - {"id"})
        parent = parents[0] if parents else None
        reply_to: tuple[str, ...] = ()
        answered: set[str] = set()
        if parent is not None and parent["fromaddress"]:
            address, name = parent["fromaddress"], parent["fromname"] or ""
            reply_to = (address_entry(address, name),)
            answered = {address.lower()}
        return ReplyContext(
            conversation_id=conversation_id,
            account=head["account"] or "",
            key=head["uniqueid"],
            subject=head["subject"] or "",
            own_email=head["email"],
            parent_message_id=parent["messageid"] if parent is not None else None,
            parent_references=tuple((parent["references"] or "").split()) if parent else (),
            parent_in_reply_to=tuple((parent["inreplyto"] or "").split()) if parent else (),
            reply_to=reply_to,
            followers=tuple(
                (f["email"], f["name"]) for f in followers if f["email"].lower() not in answered
            ),
            parent_columns=parent_columns,
        )

    def outbox_copies(self, outbox_id: int) -> list[OutboxCopy]:
        with self._sql(f"read the copies of outbox row {outbox_id}", write=False) as sql:
            rows = sql.rows(
                "SELECT recipient, messageid, raw, senttime FROM outboxcopy WHERE outbox = ?"
                " ORDER BY id",
                (outbox_id,),
            )
        return [
            OutboxCopy(
                r["recipient"], r["messageid"], _blob(r["raw"]) or b"", parse_time(r["senttime"])
            )
            for r in rows
        ]

    def outbox_copy_sent(self, outbox_id: int, recipient: str, now: datetime) -> None:
        with self._sql(f"record a sent copy of outbox row {outbox_id}", write=True) as sql:
            sql.execute(
                "UPDATE outboxcopy SET senttime = ? WHERE outbox = ? AND recipient = ?",
                (iso(now), outbox_id, recipient),
            )

    def outbox_begin(self, rows: Sequence[tuple[int, OutboxFix | None]], now: datetime) -> set[int]:
        began: set[int] = set()
        with self._sql(f"start sending {len(rows)} outbox row(s)", write=True) as sql:
            for outbox_id, fix in rows:
                if fix is not None:
                    # Fixed once: a second daemon (or a retry) finds raw set and leaves it.
                    fixed = sql.execute(
                        "UPDATE outbox SET messageid = ?, conversationkey = ?, raw = ?"
                        " WHERE id = ? AND raw IS NULL",
                        (fix.message_id, fix.conversation_key, fix.raw, outbox_id),
                    )
                    if fixed == 0:
                        continue
                    if fix.copies:
                        sql.executemany(
                            "INSERT INTO outboxcopy (outbox, recipient, messageid, raw)"
                            " VALUES (?, ?, ?, ?)",
                            [(outbox_id, c.recipient, c.message_id, c.raw) for c in fix.copies],
                        )
                # The claim: only from queued (see the module docstring for several daemons).
                claimed = sql.rows(
                    "UPDATE outbox SET state = 'sending', attempts = attempts + 1,"
                    " attemptstarted = ?, updatedtime = ? WHERE id = ? AND state = 'queued'"
                    " RETURNING id",
                    (iso(now), iso(now), outbox_id),
                )
                if claimed:
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
        with self._sql(f"record a failed attempt of outbox row {outbox_id}", write=True) as sql:
            sql.execute(
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

    def outbox_release(
        self, outbox_ids: Sequence[int], *, code: str, error: str, now: datetime
    ) -> None:
        if not outbox_ids:
            return
        with self._sql(f"put {len(outbox_ids)} outbox row(s) back to queued", write=True) as sql:
            sql.execute(
                "UPDATE outbox SET state = 'queued', nextattempt = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,"
                " lasterrorcode = ?, lasterror = ?, updatedtime = ?"
                f" WHERE id IN ({marks(len(outbox_ids))}) AND state = 'sending'",
                (code, error[:_MAX_REASON], iso(now), *outbox_ids),
            )

    def outbox_sent(self, context: ImportContext, records: Sequence[SentRecord]) -> list[int]:
        # SQLite: not synced to the disk: a process killed after this commit keeps it (the
        # record is in the WAL), a power cut may lose it — and the process: then the row is
        # `sending` again, resolved at start-up like any attempt in flight (at-least-once,
        # same Message-ID). So the worker can record each accepted row at once (a kill -9
        # leaves at most the row in hand unrecorded) without an fsync per message.
        with self._unsynced_sql(f"record {len(records)} outbox row(s) as sent") as sql:
            self._lock_account(sql, context.account)
            self._prepare(sql, context.follower_parents, context.conversation_parents)
            # Every backend's write transaction is an import cursor (the import runs in one).
            cursor = cast(Cursor, sql)
            return [self._record_sent(cursor, context, record) for record in records]

    @staticmethod
    def _record_sent(sql: Cursor, context: ImportContext, record: SentRecord) -> int:
        outbox_id, message = record.outbox_id, record.message
        found = sql.rows(
            "SELECT conversation, conversationkey, coworker, coworkeraddress FROM outbox"
            " WHERE id = ?",
            (outbox_id,),
        )
        if not found:
            raise StoreError(f"outbox row {outbox_id} is gone", code="database_error")
        row = found[0]
        conversation, key = row["conversation"], row["conversationkey"]
        stamp = iso(record.sent)
        db = SqlImport(sql)
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
            if row["coworkeraddress"]:
                add_coworker(
                    sql, conversation, row_id, row["coworkeraddress"], row["coworker"] or "", stamp
                )
            # Personalised copies: a reply cites its recipient's own Message-ID.
            sql.execute(
                "UPDATE messagefollower SET messageid = (SELECT c.messageid FROM outboxcopy"
                " AS c JOIN follower AS f ON f.email = c.recipient WHERE c.outbox = ?"
                " AND f.id = messagefollower.follower) WHERE conversationmessage = ?"
                " AND participationlevel != 'from'",
                (outbox_id, row_id),
            )
        for table, column, value in record.actions:
            sql.execute(
                f"UPDATE {q(table)} SET {q(column)} = ?"
                f" WHERE id = (SELECT {q(table)} FROM conversation WHERE id = ?)",
                (value, conversation),
            )
        sql.execute(
            "UPDATE outbox SET state = 'sent', senttime = ?, conversation = ?,"
            " conversationmessage = ?, nextattempt = NULL, updatedtime = ? WHERE id = ?",
            (stamp, conversation, row_id, stamp, outbox_id),
        )
        return int(row_id)

    def outbox_retry(self, outbox_id: int) -> bool:
        with self._sql(f"retry outbox row {outbox_id}", write=True) as sql:
            now = now_text()
            changed = sql.execute(
                "UPDATE outbox SET state = 'queued', nextattempt = NULL, updatedtime = ?,"
                # A fresh age: max_age_hours counts from the operator's retry.
                " createdtime = ? WHERE id = ? AND state IN ('failed', 'cancelled')",
                (now, now, outbox_id),
            )
        return changed > 0

    def outbox_cancel(self, outbox_id: int) -> bool:
        with self._sql(f"cancel outbox row {outbox_id}", write=True) as sql:
            changed = sql.execute(
                "UPDATE outbox SET state = 'cancelled', nextattempt = NULL, updatedtime = ?"
                " WHERE id = ? AND state IN ('queued', 'failed')",
                (now_text(), outbox_id),
            )
        return changed > 0

    def outbox_queued_accounts(self) -> dict[str, int]:
        with self._sql("count queued outbox rows per account", write=False) as sql:
            return {
                str(row["account"]): int(row["n"])
                for row in sql.rows(
                    "SELECT account, COUNT(*) AS n FROM outbox WHERE state = 'queued'"
                    " GROUP BY account"
                )
            }

    def outbox_fail_account(
        self,
        account: str,
        *,
        code: str,
        error: str,
        now: datetime,
        created_before: datetime | None = None,
    ) -> list[int]:
        with self._sql(f"fail the queued outbox rows of {account!r}", write=True) as sql:
            stamp = iso(now)
            before = iso(created_before or now)
            return sorted(
                int(row["id"])
                for row in sql.rows(
                    "UPDATE outbox SET state = 'failed', lasterrorcode = ?, lasterror = ?,"
                    " nextattempt = NULL, updatedtime = ? WHERE state = 'queued' AND account = ?"
                    " AND createdtime <= ? RETURNING id",
                    (code, error[:_MAX_REASON], stamp, account, before),
                )
            )

    def table_columns(self, tables: Sequence[str]) -> dict[str, frozenset[str]]:
        found: dict[str, frozenset[str]] = {}
        with self._sql("read table columns", write=False) as sql:
            for table in tables:
                columns = sql.columns(table)
                if columns:
                    found[table] = frozenset(columns - {"id"})
        return found

    def template_records(
        self, conversation_id: int, recipient: str, history_limit: int = 20
    ) -> TemplateRecords:
        action = f"read conversation {conversation_id} for a template"
        with self._sql(action, write=False) as sql:
            history = tuple(
                (
                    parse_time(r["date"]),
                    r["fromname"] or "",
                    r["fromaddress"] or "",
                    r["plaintext"] or "",
                )
                for r in sql.rows(
                    "SELECT date, fromname, fromaddress, plaintext FROM conversationmessage"
                    " WHERE conversation = ? ORDER BY date DESC, id DESC LIMIT ?",
                    (conversation_id, history_limit),
                )
            )
            followers = tuple(
                (r["email"], r["name"] or "")
                for r in sql.rows(
                    "SELECT email, name FROM follower WHERE conversation = ? AND active = 1"
                    " ORDER BY id",
                    (conversation_id,),
                )
            )
            records: dict[str, dict[str, object]] = {}
            for table in sorted(sql.columns("conversation") - CONVERSATION_COLUMNS):
                links = sql.rows(
                    f"SELECT {q(table)} AS link FROM conversation WHERE id = ?", (conversation_id,)
                )
                record = _record(sql, table, links[0]["link"] if links else None, hops=1)
                if record is not None:
                    records[table] = record
            for table in sorted(sql.columns("follower") - FOLLOWER_COLUMNS):
                links = sql.rows(
                    f"SELECT {q(table)} AS link FROM follower WHERE conversation = ? AND email = ?",
                    (conversation_id, recipient.strip().lower()),
                )
                record = _record(sql, table, links[0]["link"] if links else None, hops=1)
                if record is not None:
                    records[table] = record
        return TemplateRecords(history, followers, records)

    def automatic_replies_since(self, account: str, address: str, since: datetime) -> int:
        with self._sql("count automatic replies", write=False) as sql:
            [row] = sql.rows(
                "SELECT COUNT(*) AS n FROM outbox WHERE account = ? AND automatic = 1"
                " AND createdtime >= ? AND state != 'cancelled' AND LOWER(toaddresses) = ?",
                (account, iso(since), address.strip().lower()),
            )
        return int(row["n"])

    def snippets(self, search: str | None = None) -> list[Snippet]:
        where = "WHERE status = 'active'"
        params: list[object] = []
        if search:
            where += (
                " AND (name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\'"
                " OR text LIKE ? ESCAPE '\\')"
            )
            params.extend([like_pattern(search)] * 3)
        with self._sql("list snippets", write=False) as sql:
            query = f"SELECT * FROM textsnippet {where} ORDER BY pinned DESC, name, id"
            rows = sql.rows(query.replace(" LIKE ", f" {sql.like} "), params)
        return [snippet(row) for row in rows]

    def use_snippet(self, name: str, now: datetime) -> Snippet | None:
        with self._sql(f"use snippet {name}", write=True) as sql:
            rows = sql.rows(
                "UPDATE textsnippet SET count = count + 1, lastused = ?"
                " WHERE name = ? AND status = 'active' RETURNING *",
                (iso(now), name),
            )
        return snippet(rows[0]) if rows else None


def _record(sql: Sql, table: str, record_id: object, *, hops: int) -> dict[str, object] | None:
    """Row ``record_id`` of ``table`` as a dict; a column named after a table with an ``id``
    holds that table's row instead of its id, ``hops`` levels deep."""
    if record_id is None or not sql.columns(table):
        return None
    rows = sql.rows(f"SELECT * FROM {q(table)} WHERE id = ?", [record_id])
    if not rows:
        return None
    record: dict[str, object] = dict(rows[0])
    if hops > 0:
        for column, value in list(record.items()):
            if column != "id" and value is not None and "id" in sql.columns(column):
                linked = _record(sql, column, value, hops=hops - 1)
                if linked is not None:
                    record[column] = linked
    return record
