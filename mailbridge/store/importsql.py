"""The import primitives (:class:`mailbridge.store.base.ImportPrimitives`) in SQL that SQLite
and PostgreSQL both accept, over a small cursor a backend provides (:class:`Cursor`).

Look-ups and writes only: what to write is the planner's (:mod:`mailbridge.core.planner`).
Statements use ``?`` placeholders (a PostgreSQL cursor turns them into ``%s``); ``INSERT ...
RETURNING id`` gives new ids (SQLite 3.35+); ``ON CONFLICT DO NOTHING`` skips a row that exists.
The one dialect difference met here is case-insensitive matching (:meth:`Cursor.nocase`).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from mailbridge.core.bounce import Bounce
from mailbridge.core.messagekey import ParentCandidate
from mailbridge.core.model import Attachment, ParsedMessage
from mailbridge.core.planner import (
    CitedRow,
    ConversationValues,
    FollowerLink,
    FollowerPlan,
    FollowerRow,
    MessageValues,
    NotStoredValues,
    ParentRecord,
    PropertyLookup,
)
from mailbridge.store import delivery_errors
from mailbridge.store.base import RESOLVED_IMPORTED, StoredRow
from mailbridge.store.sql import Sql, iso, join_defects, q

if TYPE_CHECKING:
    from mailbridge.config import FollowerParentSettings

T = TypeVar("T")

# SQLite allows 32766 host parameters since 3.32; stay far below for older system libraries.
CHUNK: Final = 500


class Cursor(Sql, Protocol):
    """One open write transaction of a backend, as the import primitives use it: the shared
    :class:`~mailbridge.store.sql.Sql` cursor, which also says which errors fail the batch."""

    def is_batch_error(self, exc: BaseException) -> bool:
        """True when ``exc`` concerns the database rather than one message's data."""

    def is_refusal(self, exc: BaseException) -> bool:
        """True when ``exc`` is the database refusing one message's rows."""


def chunks(values: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def marks(count: int) -> str:
    return ", ".join("?" * count)


def message_uniqueid() -> str:
    """``conversationmessage.uniqueid``: 160 random bits, lower-case base32 like the
    conversation keys."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()


class SqlImport:
    """:class:`~mailbridge.store.base.ImportPrimitives` over a :class:`Cursor`."""

    def __init__(self, cursor: Cursor) -> None:
        self.sql = cursor

    # -- the message's savepoint ---------------------------------------------------------------

    def savepoint(self) -> None:
        self.sql.execute("SAVEPOINT message")

    def release(self) -> None:
        self.sql.execute("RELEASE SAVEPOINT message")

    def rollback(self) -> None:
        self.sql.execute("ROLLBACK TO SAVEPOINT message")
        self.sql.execute("RELEASE SAVEPOINT message")

    def is_batch_error(self, exc: BaseException) -> bool:
        return self.sql.is_batch_error(exc)

    def is_refusal(self, exc: BaseException) -> bool:
        return self.sql.is_refusal(exc)

    # -- look-ups ------------------------------------------------------------------------------

    def stored_identities(
        self, account: str, message_ids: Sequence[str], keys: Sequence[str]
    ) -> dict[str, list[StoredRow]]:
        found: dict[str, dict[int, StoredRow]] = {}
        for column, values in (("messageid", message_ids), ("messagekey", keys)):
            for chunk in chunks(values):
                rows = self.sql.rows(
                    f"SELECT {column} AS grp, messagekey, fingerprint, conversation, id, date,"
                    " subject, uid"
                    f" FROM conversationmessage WHERE account = ? AND {column} IN"
                    f" ({marks(len(chunk))})",
                    (account, *chunk),
                )
                for row in rows:
                    # Only imported rows (uid set) hold what the parser read: an integrator's
                    # or a sent row's date and subject need not match the copy coming back.
                    summary = (
                        (row["date"] or "", row["subject"] or "")
                        if row["uid"] is not None
                        else None
                    )
                    found.setdefault(row["grp"], {})[row["id"]] = StoredRow(
                        row["messagekey"],
                        row["fingerprint"],
                        row["conversation"],
                        row["id"],
                        summary,
                    )
        return {group: [rows[i] for i in sorted(rows)] for group, rows in found.items()}

    def conversations_by_key(self, account: str, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in chunks(keys):
            for row in self.sql.rows(
                f"SELECT uniqueid, id FROM conversation WHERE account = ? AND uniqueid IN"
                f" ({marks(len(chunk))})",
                (account, *chunk),
            ):
                found[row["uniqueid"]] = int(row["id"])
        return found

    def carriers(
        self, account: str, message_ids: Sequence[str]
    ) -> tuple[list[CitedRow], list[tuple[str, int]]]:
        carrying: list[CitedRow] = []
        copies: list[tuple[str, int]] = []
        for chunk in chunks(message_ids):
            for row in self.sql.rows(
                "SELECT messageid, date, id, conversation FROM conversationmessage"
                f" WHERE account = ? AND messageid IN ({marks(len(chunk))})",
                (account, *chunk),
            ):
                carrying.append(
                    CitedRow(
                        row["messageid"],
                        ParentCandidate(row["date"], row["id"], row["conversation"]),
                    )
                )
            # Personalised sending gives each recipient a copy with its own Message-ID, kept on
            # the messagefollower row; a reply cites that one.
            copies.extend(
                (row["messageid"], row["conversation"])
                for row in self.sql.rows(
                    "SELECT mf.messageid, m.conversation FROM messagefollower AS mf"
                    " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                    f" WHERE mf.messageid IN ({marks(len(chunk))}) AND m.account = ?"
                    " ORDER BY mf.id",
                    (*chunk, account),
                )
            )
        return carrying, copies

    def citing(self, account: str, message_ids: Sequence[str]) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        for chunk in chunks(message_ids):
            found.extend(
                (row["messageid"], row["conversation"])
                for row in self.sql.rows(
                    "SELECT r.messageid, m.conversation FROM messagereference AS r"
                    " JOIN conversationmessage AS m ON m.id = r.conversationmessage"
                    f" WHERE r.messageid IN ({marks(len(chunk))}) AND m.account = ?"
                    " ORDER BY m.date, m.id",
                    (*chunk, account),
                )
            )
        return found

    def conversation_row(self, conversation_id: int) -> ConversationValues:
        [row] = self.sql.rows(
            "SELECT uniqueid, email, firstmessagedate, lastmessagedate, earliestunread, subject,"
            " threadid, replytoid FROM conversation WHERE id = ?",
            (conversation_id,),
        )
        return ConversationValues(
            uniqueid=row["uniqueid"],
            email=row["email"],
            subject=row["subject"],
            threadid=row["threadid"],
            replytoid=row["replytoid"],
            firstmessagedate=row["firstmessagedate"],
            lastmessagedate=row["lastmessagedate"],
            earliestunread=row["earliestunread"],
        )

    def followers(self, conversation_id: int, link_tables: Sequence[str]) -> dict[str, FollowerRow]:
        links = "".join(f", {q(table)}" for table in link_tables)
        return {
            row["email"]: FollowerRow(
                row["id"],
                row["name"],
                bool(row["active"]),
                {table: row[table] for table in link_tables},
            )
            for row in self.sql.rows(
                f"SELECT id, email, name, active{links} FROM follower WHERE conversation = ?",
                (conversation_id,),
            )
        }

    def newest_dates(self, follower_ids: Sequence[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for chunk in chunks(follower_ids):
            for row in self.sql.rows(
                "SELECT mf.follower, MAX(m.date) AS newest FROM messagefollower AS mf"
                " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                f" WHERE mf.follower IN ({marks(len(chunk))}) GROUP BY mf.follower",
                tuple(chunk),
            ):
                found[row["follower"]] = row["newest"]
        return found

    def parent_records(
        self, parent: FollowerParentSettings, addresses: Sequence[str], ids: Sequence[int]
    ) -> list[ParentRecord]:
        table, address = q(parent.table), q(parent.address_column)
        name = q(parent.name_column) if parent.name_column is not None else "''"
        found: dict[int, ParentRecord] = {}
        for chunk in chunks([*addresses, *ids]):
            texts = [value for value in chunk if isinstance(value, str)]
            numbers = [value for value in chunk if not isinstance(value, str)]
            clauses = []
            if texts:
                nocase = self.sql.nocase("?")
                clauses.append(
                    f"{self.sql.nocase(address)} IN ({', '.join([nocase] * len(texts))})"
                )
            if numbers:
                clauses.append(f"id IN ({marks(len(numbers))})")
            for row in self.sql.rows(
                f"SELECT id, {address} AS address, {name} AS name FROM {table}"
                f" WHERE {' OR '.join(clauses)}",
                (*texts, *numbers),
            ):
                found[int(row["id"])] = ParentRecord(
                    int(row["id"]), str(row["address"] or ""), str(row["name"] or "")
                )
        return list(found.values())

    def look_up(self, lookup: PropertyLookup) -> object:
        rows = self.sql.rows(
            f"SELECT {q(lookup.column)} AS value FROM {q(lookup.table)}"
            f" WHERE {self.sql.nocase(q(lookup.match_column))} = {self.sql.nocase('?')}"
            " ORDER BY id LIMIT 1",
            (lookup.value,),
        )
        return rows[0]["value"] if rows else None

    # -- writes --------------------------------------------------------------------------------

    def insert_conversation(self, account: str, values: ConversationValues, now: str) -> int:
        [row] = self.sql.rows(
            "INSERT INTO conversation (uniqueid, account, email, subject, threadid, replytoid,"
            " earliestunread, firstmessagedate, lastmessagedate, createdtime, updatedtime)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                values.uniqueid,
                account,
                values.email,
                values.subject,
                values.threadid,
                values.replytoid,
                values.earliestunread,
                values.firstmessagedate,
                values.lastmessagedate,
                now,
                now,
            ),
        )
        return int(row["id"])

    def update_conversation(
        self, conversation_id: int, values: ConversationValues, now: str
    ) -> None:
        self.sql.execute(
            "UPDATE conversation SET email = ?, firstmessagedate = ?, lastmessagedate = ?,"
            " earliestunread = ?, subject = ?, threadid = ?, replytoid = ?, updatedtime = ?"
            " WHERE id = ?",
            (
                values.email,
                values.firstmessagedate,
                values.lastmessagedate,
                values.earliestunread,
                values.subject,
                values.threadid,
                values.replytoid,
                now,
                conversation_id,
            ),
        )

    def insert_message(
        self, conversation_id: int, account: str, uid: int, values: MessageValues, now: str
    ) -> int:
        [row] = self.sql.rows(
            "INSERT INTO conversationmessage (conversation, account, uid, messageid, messagekey,"
            " uniqueid, direction, subject, fromaddress, fromname, date, message, plaintext,"
            ' inreplyto, "references", size, createdtime, threadedby, fingerprint, defects,'
            " automatic, automaticreason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " RETURNING id",
            (
                conversation_id,
                account,
                uid or None,  # 0: sent by mailbridge, never in the Inbox
                values.message_id,
                values.key,
                message_uniqueid(),
                values.direction,
                values.subject,
                values.from_address,
                values.from_name,
                values.date,
                values.html,
                values.plain_text,
                values.in_reply_to,
                values.references,
                values.size,
                now,
                values.threaded_by,
                values.fingerprint,
                join_defects(values.defects),
                1 if values.automatic else 0,
                values.automatic_reason,
            ),
        )
        return int(row["id"])

    def insert_references(self, row_id: int, message_ids: Sequence[str]) -> None:
        if message_ids:
            self.sql.executemany(
                "INSERT INTO messagereference (messageid, conversationmessage) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                [(message_id, row_id) for message_id in message_ids],
            )

    def write_followers(
        self, conversation_id: int, row_id: int, plan: FollowerPlan, now: str
    ) -> dict[str, int]:
        ids = dict(plan.existing)
        for email, name, active in plan.inserts:
            [row] = self.sql.rows(
                "INSERT INTO follower (conversation, email, name, active, subscribed,"
                " createdtime, updatedtime) VALUES (?, ?, ?, ?, 1, ?, ?) RETURNING id",
                (conversation_id, email, name, 1 if active else 0, now, now),
            )
            ids[email] = int(row["id"])
        if plan.updates:
            self.sql.executemany(
                "UPDATE follower SET name = ?, active = ?, updatedtime = ? WHERE id = ?",
                [(name, 1 if active else 0, now, fid) for fid, name, active in plan.updates],
            )
        if plan.levels:
            self.sql.executemany(
                "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(row_id, ids[email], level) for email, level in plan.levels],
            )
        return ids

    def link_followers(self, links: Sequence[FollowerLink]) -> None:
        by_table: dict[str, list[tuple[int | None, str, int]]] = {}
        for link in links:
            by_table.setdefault(link.table, []).append((link.link, link.name, link.follower_id))
        for table, rows in by_table.items():
            self.sql.executemany(f"UPDATE follower SET {q(table)} = ?, name = ? WHERE id = ?", rows)

    def insert_files(
        self,
        row_id: int,
        attachments: Sequence[Attachment],
        images: Sequence[Attachment],
        now: str,
    ) -> list[int]:
        if attachments:
            self.sql.executemany(
                "INSERT INTO document (conversationmessage, filename, contenttype, size, document,"
                " createdtime) VALUES (?, ?, ?, ?, ?, ?)",
                [(row_id, a.filename, a.content_type, a.size, a.data, now) for a in attachments],
            )
        ids: list[int] = []
        for image in images:
            [row] = self.sql.rows(
                "INSERT INTO embeddedfile (conversationmessage, contentid, filename, contenttype,"
                " size, document, createdtime) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
            ids.append(int(row["id"]))
        return ids

    def set_message_html(self, row_id: int, html: str) -> None:
        self.sql.execute("UPDATE conversationmessage SET message = ? WHERE id = ?", (html, row_id))

    def insert_parent(
        self,
        conversation_id: int,
        table: str,
        columns: Sequence[str],
        values: Sequence[object],
    ) -> int:
        if columns:
            [row] = self.sql.rows(
                f"INSERT INTO {q(table)} ({', '.join(q(c) for c in columns)})"
                f" VALUES ({marks(len(values))}) RETURNING id",
                tuple(values),
            )
        else:
            [row] = self.sql.rows(f"INSERT INTO {q(table)} DEFAULT VALUES RETURNING id")
        record_id = int(row["id"])
        self.sql.execute(
            f"UPDATE conversation SET {q(table)} = ? WHERE id = ?", (record_id, conversation_id)
        )
        return record_id

    def record_delivery_errors(
        self, account: str, message: ParsedMessage, report: Bounce, now: str
    ) -> tuple[int, int]:
        return delivery_errors.record_delivery_errors(self.sql, account, message, report, now, iso)

    def record_not_stored(self, account: str, values: NotStoredValues, now: str) -> None:
        self.sql.execute(
            "INSERT INTO discardedmessage (account, messagekey, messageid, fromaddress, subject,"
            " date, route, reason, createdtime) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (account, messagekey) DO NOTHING",
            (
                account,
                values.key,
                values.message_id,
                values.from_address,
                values.subject,
                values.date,
                values.route,
                values.reason,
                now,
            ),
        )

    def resolve_failures(self, account: str, keys: Sequence[str], now: str) -> None:
        for chunk in chunks(keys):
            self.sql.execute(
                "UPDATE importfailure SET resolved = ?, resolution = ?"
                f" WHERE account = ? AND resolved IS NULL AND messagekey IN ({marks(len(chunk))})",
                (now, RESOLVED_IMPORTED, account, *chunk),
            )
