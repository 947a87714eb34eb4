"""Look-ups and writes for delivery errors (``conversationmessageerror``). No decisions:
what a report is, and that it is one, was settled in ``core`` (bounce.py, policy.py); how a
failed recipient is tied to the message it answers (the order of the look-ups, which of several
rows, the time window, the error type and the follower's mark) is decided by the functions at
the end of :mod:`mailbridge.core.bounce` (:func:`~mailbridge.core.bounce.match_steps`).

A recipient that matches nothing is still recorded (``matchedby = 'none'``), so an operator
sees it in ``mailbridge errors``. Re-importing the same report writes nothing twice
(``UNIQUE (account, reportkey, recipient)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from mailbridge.core import bounce
from mailbridge.core.bounce import Bounce, BounceRecipient, MatchStep
from mailbridge.core.model import ParsedMessage

if TYPE_CHECKING:
    from mailbridge.store.sql import Sql

_LEVELS: Final = ", ".join(f"'{level}'" for level in bounce.RECIPIENT_LEVELS)


@dataclass(frozen=True, slots=True)
class _Match:
    conversation: int
    message: int
    message_follower: int | None
    follower: int | None


def _follower_on(
    sql: Sql, message_row: int, conversation: int, recipient: str | None
) -> tuple[int | None, int | None]:
    """(messagefollower id, follower id) of ``recipient`` on a message (a recipient level
    before From); the conversation's follower alone when it is not on that message."""
    if not recipient:
        return None, None
    rows = sql.rows(
        "SELECT mf.id, f.id AS fid FROM messagefollower AS mf"
        " JOIN follower AS f ON f.id = mf.follower"
        " WHERE mf.conversationmessage = ? AND f.email = ?"
        f" ORDER BY mf.participationlevel NOT IN ({_LEVELS}), mf.id LIMIT 1",
        (message_row, recipient),
    )
    if rows:
        return int(rows[0]["id"]), int(rows[0]["fid"])
    rows = sql.rows(
        "SELECT id FROM follower WHERE conversation = ? AND email = ?", (conversation, recipient)
    )
    return None, (int(rows[0]["id"]) if rows else None)


def _by_copy_id(
    sql: Sql, account: str, original_id: str, recipient: str | None, window: tuple[str, str]
) -> _Match | None:
    rows = sql.rows(
        "SELECT mf.id, m.id AS mid, m.conversation, f.id AS fid, f.email"
        " FROM messagefollower AS mf"
        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
        " JOIN follower AS f ON f.id = mf.follower"
        " WHERE mf.messageid = ? AND m.account = ? ORDER BY mf.id",
        (original_id, account),
    )
    chosen = bounce.choose_copy([r["email"] for r in rows], recipient)
    if chosen is None:
        return None
    row = rows[chosen]
    return _Match(int(row["conversation"]), int(row["mid"]), int(row["id"]), int(row["fid"]))


def _by_message_id(
    sql: Sql, account: str, original_id: str, recipient: str | None, window: tuple[str, str]
) -> _Match | None:
    rows = sql.rows(
        "SELECT id, conversation, direction FROM conversationmessage"
        " WHERE account = ? AND messageid = ? ORDER BY id",
        (account, original_id),
    )
    chosen = bounce.choose_message([r["direction"] for r in rows])
    if chosen is None:
        return None
    row_id, conversation = int(rows[chosen]["id"]), int(rows[chosen]["conversation"])
    message_follower, follower = _follower_on(sql, row_id, conversation, recipient)
    return _Match(conversation, row_id, message_follower, follower)


def _by_recipient(
    sql: Sql, account: str, original_id: str, recipient: str | None, window: tuple[str, str]
) -> _Match | None:
    rows = sql.rows(
        "SELECT mf.id, m.id AS mid, m.conversation, f.id AS fid FROM follower AS f"
        " JOIN messagefollower AS mf ON mf.follower = f.id"
        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage"
        " WHERE f.email = ? AND m.account = ? AND m.direction = 'outgoing'"
        f" AND mf.participationlevel IN ({_LEVELS}) AND m.date BETWEEN ? AND ?"
        " ORDER BY m.date DESC, m.id DESC LIMIT 1",
        (recipient, account, *window),
    )
    if not rows:
        return None
    row = rows[0]
    return _Match(int(row["conversation"]), int(row["mid"]), int(row["id"]), int(row["fid"]))


_LOOKUPS: Final[dict[MatchStep, Callable[..., _Match | None]]] = {
    MatchStep.COPY_ID: _by_copy_id,
    MatchStep.MESSAGE_ID: _by_message_id,
    MatchStep.RECIPIENT: _by_recipient,
}


def _find_original(
    sql: Sql,
    account: str,
    original_id: str | None,
    recipient: str | None,
    window: tuple[str, str],
) -> tuple[_Match, str] | None:
    """The message the report answers for ``recipient`` and how it was found, or None."""
    for step in bounce.match_steps(original_id, recipient):
        found = _LOOKUPS[step](sql, account, original_id, recipient, window)
        if found is not None:
            return found, bounce.matched_by(step)
    return None


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
    earliest, latest = bounce.recipient_window(message.date)
    window = (iso(earliest), iso(latest))
    recipients: tuple[BounceRecipient | None, ...] = report.recipients or (None,)
    written = matched = 0
    sender = message.from_address.email if message.from_address is not None else ""
    for recipient in recipients:
        address = recipient.address if recipient is not None else None
        answer = _find_original(sql, account, report.original_message_id, address, window)
        found, how = answer if answer is not None else (None, "none")
        kind = bounce.error_type(report, recipient)
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
                how,
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
            rows = sql.rows("SELECT deliveryerror FROM follower WHERE id = ?", (found.follower,))
            current = rows[0]["deliveryerror"] if rows else None
            sql.execute(
                "UPDATE follower SET deliveryerror = ?, updatedtime = ? WHERE id = ?",
                (bounce.follower_mark(current, kind), now, found.follower),
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
        unresolved = sql.rows(
            "SELECT type FROM conversationmessageerror WHERE follower = ? AND resolved IS NULL",
            (follower,),
        )
        sql.execute(
            "UPDATE follower SET updatedtime = ?, deliveryerror = ? WHERE id = ?",
            (now, bounce.remaining_mark(r["type"] for r in unresolved), follower),
        )
    return True
