"""Look-ups and writes for delivery errors (``conversationmessageerror``). No decisions:
what a report is, and that it is one, was settled in ``core`` (bounce.py, policy.py).

A report's failed recipient is tied to the message it answers, in this order:

1. the returned Message-ID (RFC 3464 2.1, or the report's In-Reply-To) as the per-recipient id
   of a personalised copy (``messagefollower.messageid``): that copy's follower;
2. the returned Message-ID as a stored message's id (imported, sent, or inserted by an
   integrator; outgoing rows first), then the recipient's message follower on it;
3. without a usable id: the latest outgoing message to that recipient sent up to
   :data:`RECIPIENT_WINDOW` before the report (delays come days later).

A recipient that matches nothing is still recorded (``matchedby = 'none'``), so an operator
sees it in ``mailbridge errors``. Re-importing the same report writes nothing twice
(``UNIQUE (account, reportkey, recipient)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from mailbridge.core.bounce import Bounce, BounceRecipient
from mailbridge.core.model import ParsedMessage

if TYPE_CHECKING:
    from mailbridge.store.sql import Sql

RECIPIENT_WINDOW: Final = timedelta(days=14)
_SKEW: Final = timedelta(hours=1)  # a report dated a little before the mail (clock skew)


@dataclass(frozen=True, slots=True)
class _Match:
    conversation: int
    message: int
    message_follower: int | None
    follower: int | None
    matched_by: str


def _first(sql: Sql, statement: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The first row of a query as a tuple, or None."""
    rows = sql.rows(statement, params)
    return tuple(rows[0].values()) if rows else None


def _follower_on(
    sql: Sql, message_row: int, conversation: int, recipient: str | None
) -> tuple[int | None, int | None]:
    """(messagefollower id, follower id) of ``recipient`` on a message (a recipient level
    before From); the conversation's follower alone when it is not on that message."""
    if not recipient:
        return None, None
    row = _first(
        sql,
        "SELECT mf.id, f.id AS fid FROM messagefollower AS mf"
        " JOIN follower AS f ON f.id = mf.follower"
        " WHERE mf.conversationmessage = ? AND f.email = ?"
        " ORDER BY mf.participationlevel NOT IN ('to', 'cc', 'bcc'), mf.id LIMIT 1",
        (message_row, recipient),
    )
    if row is not None:
        return int(row[0]), int(row[1])
    row = _first(
        sql,
        "SELECT id FROM follower WHERE conversation = ? AND email = ?",
        (conversation, recipient),
    )
    return None, (int(row[0]) if row is not None else None)


def _find_original(
    sql: Sql,
    account: str,
    original_id: str | None,
    recipient: str | None,
    window: tuple[str, str],
) -> _Match | None:
    if original_id:
        rows = [
            tuple(found.values())
            for found in sql.rows(
                "SELECT mf.id, m.id AS mid, m.conversation, f.id AS fid, f.email"
                " FROM messagefollower AS mf"
                " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
                " JOIN follower AS f ON f.id = mf.follower"
                " WHERE mf.messageid = ? AND m.account = ? ORDER BY mf.id",
                (original_id, account),
            )
        ]
        if rows:
            chosen = next((r for r in rows if r[4] == recipient), rows[0])
            return _Match(int(chosen[2]), int(chosen[1]), int(chosen[0]), int(chosen[3]),
                          "message_id")  # fmt: skip
        row = _first(
            sql,
            "SELECT id, conversation FROM conversationmessage WHERE account = ? AND messageid = ?"
            " ORDER BY direction = 'outgoing' DESC, id LIMIT 1",
            (account, original_id),
        )
        if row is not None:
            message_follower, follower = _follower_on(sql, int(row[0]), int(row[1]), recipient)
            return _Match(int(row[1]), int(row[0]), message_follower, follower, "message_id")
    if not recipient:
        return None
    row = _first(
        sql,
        "SELECT mf.id, m.id AS mid, m.conversation, f.id AS fid FROM follower AS f"
        " JOIN messagefollower AS mf ON mf.follower = f.id"
        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
        " WHERE f.email = ? AND m.account = ? AND m.direction = 'outgoing'"
        " AND mf.participationlevel IN ('to', 'cc', 'bcc') AND m.date BETWEEN ? AND ?"
        " ORDER BY m.date DESC, m.id DESC LIMIT 1",
        (recipient, account, *window),
    )
    if row is None:
        return None
    return _Match(int(row[2]), int(row[1]), int(row[0]), int(row[3]), "recipient")


def record_delivery_errors(
    sql: Sql,
    account: str,
    message: ParsedMessage,
    report: Bounce,
    now: str,
    iso: Callable[[datetime], str],
) -> tuple[int, int]:
    """Write one row per failed recipient of ``report`` (one row without a recipient when the
    report names none) and mark each matched follower; (rows written, rows matched).
    ``iso`` writes a time in the schema's one timestamp shape."""
    window = (iso(message.date - RECIPIENT_WINDOW), iso(message.date + _SKEW))
    recipients: tuple[BounceRecipient | None, ...] = report.recipients or (None,)
    written = matched = 0
    sender = message.from_address.email if message.from_address is not None else ""
    for recipient in recipients:
        address = recipient.address if recipient is not None else None
        found = _find_original(sql, account, report.original_message_id, address, window)
        if report.kind == "feedback":
            kind = "complaint"
        elif recipient is None or recipient.permanent:
            kind = "permanent"
        else:
            kind = "temporary"
        inserted = sql.execute(
            "INSERT INTO conversationmessageerror (account, conversation,"
            " conversationmessage, messagefollower, follower, recipient, type, status,"
            " diagnostic, originalmessageid, matchedby, reportkind, reportmessageid, reportkey,"
            " reportsubject, reportfrom, date, createdtime)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (
                account,
                found.conversation if found else None,
                found.message if found else None,
                found.message_follower if found else None,
                found.follower if found else None,
                address or "",
                kind,
                recipient.status if recipient is not None else None,
                (recipient.diagnostic or "") if recipient is not None else "",
                report.original_message_id,
                found.matched_by if found else "none",
                report.kind,
                message.message_id,
                message.message_key,
                message.subject,
                sender,
                iso(message.date),
                now,
            ),
        )
        if inserted <= 0:
            continue  # the same report imported before
        written += 1
        if found is not None:
            matched += 1
        if found is not None and found.follower is not None:
            # A delay never hides a permanent failure already known.
            sql.execute(
                "UPDATE follower SET deliveryerror = CASE WHEN deliveryerror = 'permanent'"
                " AND ? = 'temporary' THEN deliveryerror ELSE ? END, updatedtime = ?"
                " WHERE id = ?",
                (kind, kind, now, found.follower),
            )
    return written, matched


def list_delivery_errors(
    sql: Sql, *, unresolved: bool, conversation: int | None
) -> list[dict[str, Any]]:
    """The rows, newest first, as column -> value (either backend)."""
    clauses: list[str] = []
    params: list[Any] = []
    if unresolved:
        clauses.append("resolved IS NULL")
    if conversation is not None:
        clauses.append("conversation = ?")
        params.append(conversation)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return sql.rows(
        f"SELECT * FROM conversationmessageerror{where} ORDER BY date DESC, id DESC", params
    )


def resolve_delivery_error(sql: Sql, error_id: int, now: str) -> bool:
    """Mark one error resolved (either backend); False when it is unknown or resolved."""
    rows = sql.rows(
        "SELECT follower FROM conversationmessageerror WHERE id = ? AND resolved IS NULL",
        (error_id,),
    )
    if not rows:
        return False
    sql.execute("UPDATE conversationmessageerror SET resolved = ? WHERE id = ?", (now, error_id))
    follower = rows[0]["follower"]
    if follower is not None:
        # The follower keeps the mark of its worst remaining unresolved error, or none.
        sql.execute(
            "UPDATE follower SET updatedtime = ?, deliveryerror = ("
            " SELECT type FROM conversationmessageerror WHERE follower = ? AND resolved IS NULL"
            " ORDER BY CASE type WHEN 'permanent' THEN 0 WHEN 'complaint' THEN 1 ELSE 2 END,"
            " date DESC LIMIT 1) WHERE id = ?",
            (now, follower, follower),
        )
    return True
