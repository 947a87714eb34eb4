"""What the outbox worker and the sending commands ask of the database, and the records.

:class:`OutboxRepository` is part of :class:`~mailbridge.store.base.Repository`; both
backends share its implementation (:mod:`mailbridge.store.outboxsql`). Decisions (when to
retry, what to send) are made in :mod:`mailbridge.core.outbox`; these methods only look up
and write.

Guarantees every backend must give:

* :meth:`OutboxRepository.outbox_begin` moves a row from ``queued`` to ``sending`` (attempts + 1)
  and is committed before the first SMTP command of the attempt; of several daemons claiming
  one row at once exactly one begins. On the first attempt it also
  fixes the row's Message-ID and bytes, once: a retry sends the very same message.
* :meth:`OutboxRepository.outbox_sent` marks rows ``sent`` and stores their messages in their
  conversations (followers updated as for incoming mail, the parent's message actions applied)
  in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mailbridge.core.model import ParsedMessage

if TYPE_CHECKING:
    from mailbridge.store.base import ImportContext


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A new outbox row, as ``mailbridge reply`` / ``send`` (or the automatic reply) queue it."""

    account: str
    conversation_id: int | None = None
    to: str = ""  # address lists as in the columns: "a@x, Name <b@y>"
    cc: str = ""
    bcc: str = ""
    subject: str | None = None
    body_html: str | None = None
    body_text: str | None = None
    coworker: str = ""
    coworker_address: str | None = None
    actions: str | None = None  # JSON, see core.outbox.parse_actions
    automatic: bool = False


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row of the ``outbox`` table (``raw`` only where the worker asked for it)."""

    id: int
    account: str
    conversation_id: int | None
    to: str
    cc: str
    bcc: str
    subject: str | None
    body_html: str | None
    body_text: str | None
    coworker: str
    coworker_address: str | None
    actions: str | None
    automatic: bool
    state: str
    attempts: int
    next_attempt: datetime | None
    attempt_started: datetime | None
    last_error_code: str | None
    last_error: str | None
    message_id: str | None
    conversation_key: str | None
    created: datetime
    sent: datetime | None
    raw: bytes | None = None
    files: int = 0  # outboxattachment rows
    copies: int = 0  # outboxcopy rows (personalised sending)


@dataclass(frozen=True, slots=True)
class OutboxFile:
    """An ``outboxattachment`` row: ``path`` (read by the worker) or ``data``."""

    filename: str
    content_type: str
    path: str | None
    data: bytes | None


@dataclass(frozen=True, slots=True)
class OutboxCopy:
    """An ``outboxcopy`` row: the copy of a personalised message for one recipient."""

    recipient: str
    message_id: str
    raw: bytes
    sent: datetime | None = None


@dataclass(frozen=True, slots=True)
class OutboxFix:
    """A row's message as fixed before its first attempt: kept for every retry."""

    message_id: str
    conversation_key: str
    raw: bytes
    copies: tuple[OutboxCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class SentRecord:
    """One row the server accepted, to record as sent."""

    outbox_id: int
    message: ParsedMessage
    sent: datetime
    actions: tuple[tuple[str, str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """What answering a conversation needs: its key, subject, the message answered, who gets
    the answer, and the columns of its parent records (for message actions)."""

    conversation_id: int
    account: str
    key: str
    subject: str
    own_email: str | None  # the own address (or alias) the conversation reached
    parent_message_id: str | None
    parent_references: tuple[str, ...]
    parent_in_reply_to: tuple[str, ...]
    reply_to: tuple[str, ...]  # the sender of the message answered ("Name <addr>")
    followers: tuple[tuple[str, str], ...]  # the other active followers (email, name)
    parent_columns: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TemplateRecords:
    """What a template's merge codes read from the database for one conversation."""

    # Earlier messages, newest first: (date, sender name, sender address, plain text).
    history: tuple[tuple[datetime | None, str, str, str], ...] = ()
    followers: tuple[tuple[str, str], ...] = ()  # active followers (email, name)
    # {table: record} for the conversation's parent records and the recipient's follower
    # parent records; a column named after a table holds that table's record (one hop).
    records: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snippet:
    """A ``textsnippet`` row."""

    id: int
    name: str
    text: str
    description: str
    type: str  # text | html
    status: str  # active | inactive
    language: str | None
    pinned: bool
    count: int
    last_used: datetime | None


@runtime_checkable
class OutboxRepository(Protocol):
    """The outbox part of the repository. Every write is committed when the call returns."""

    def queue_outgoing(self, request: OutgoingRequest, files: Sequence[OutboxFile] = ()) -> int:
        """Insert a ``queued`` row (and its attachments); returns its id."""

    def outbox(
        self, *, states: Sequence[str] | None = None, account: str | None = None, limit: int = 100
    ) -> list[OutboxRow]:
        """Rows newest first, without ``raw``; ``states`` filters (None: every state)."""

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        """account -> state -> rows, for the states queued, sending and failed."""

    def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        """One row, with ``raw``."""

    def outbox_due(
        self, accounts: Sequence[str], now: datetime, limit: int, max_bytes: int | None = None
    ) -> list[OutboxRow]:
        """Queued rows of ``accounts`` whose next attempt is not after ``now``, oldest first,
        with ``raw``: at most ``limit``, and with ``max_bytes`` only as many as begin within
        that many bytes of ``raw`` (the rows' before it, summed; the first row always)."""

    def outbox_next_due(self, accounts: Sequence[str]) -> datetime | None:
        """The earliest ``nextattempt`` of a queued row (epoch for one without)."""

    def outbox_in_flight(self, accounts: Sequence[str]) -> list[OutboxRow]:
        """Rows left in ``sending`` (by a process that died during an attempt), with ``raw``."""

    def outbox_files(self, outbox_id: int) -> list[OutboxFile]:
        """The row's attachments, in insertion order."""

    def reply_context(self, conversation_id: int) -> ReplyContext | None:
        """What answering the conversation needs, or None when there is no such row."""

    def outbox_copies(self, outbox_id: int) -> list[OutboxCopy]:
        """The row's personalised copies, in recipient order (empty: one message for all)."""

    def outbox_copy_sent(self, outbox_id: int, recipient: str, now: datetime) -> None:
        """Record that the server accepted ``recipient``'s copy."""

    def outbox_begin(self, rows: Sequence[tuple[int, OutboxFix | None]], now: datetime) -> set[int]:
        """For each ``(id, fix)``: ``queued`` -> ``sending``, attempts + 1, attemptstarted =
        now, and on the first attempt fix the row's message. One transaction for all; returns
        the ids that began (not those cancelled meanwhile or whose message was fixed already:
        re-read them)."""

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
        """Record a failed attempt: the new state (queued or failed), next attempt and error."""

    def outbox_release(
        self, outbox_ids: Sequence[int], *, code: str, error: str, now: datetime
    ) -> None:
        """Rows marked ``sending`` and not attempted after all back to ``queued``, due at once,
        their attempt not counted (``attempts`` back by one), the reason recorded."""

    def outbox_sent(self, context: ImportContext, records: Sequence[SentRecord]) -> list[int]:
        """Mark each row ``sent`` and store its message as an outgoing message of its
        conversation (created with the row's conversation key for a new one), with the
        row's coworker as a message follower and each personalised copy's Message-ID on its
        recipient's message follower row, and set the ``(table, column, value)`` actions on
        the conversation's parent records. One transaction for all (a group commit of the
        messages accepted meanwhile); returns the message row ids."""

    def outbox_retry(self, outbox_id: int) -> bool:
        """A failed or cancelled row back to ``queued``, due now. False for other states."""

    def outbox_cancel(self, outbox_id: int) -> bool:
        """A queued or failed row to ``cancelled``. False for other states (sending, sent)."""

    def table_columns(self, tables: Sequence[str]) -> dict[str, frozenset[str]]:
        """The columns (without ``id``) of each of ``tables`` that exists."""

    def template_records(
        self, conversation_id: int, recipient: str, history_limit: int = 20
    ) -> TemplateRecords:
        """The conversation's history, followers and records for merge codes."""

    def automatic_replies_since(self, account: str, address: str, since: datetime) -> int:
        """How many automatic replies of ``account`` to ``address`` were queued since."""

    def snippets(self, search: str | None = None) -> list[Snippet]:
        """Active snippets, pinned first, then by name; ``search`` matches name, description
        and text."""

    def use_snippet(self, name: str, now: datetime) -> Snippet | None:
        """The active snippet named ``name``, its count + 1 and last used = now; or None."""

    def outbox_watchers(self) -> int | None:
        """How many daemons wait for outbox news on this database (PostgreSQL: the sessions
        LISTENing, on any host); None when the database cannot tell (SQLite: the daemon's
        wake socket says, :func:`mailbridge.daemon.outbox.notify_daemon`)."""

    def outbox_queued_accounts(self) -> dict[str, int]:
        """account -> its ``queued`` rows, for every account name found in the table
        (configured or not: the worker compares with the config)."""

    def outbox_fail_account(
        self,
        account: str,
        *,
        code: str,
        error: str,
        now: datetime,
        created_before: datetime | None = None,
    ) -> list[int]:
        """Every ``queued`` row of ``account`` (created at or before ``created_before``, by
        default ``now``) to ``failed`` with ``code`` and ``error``, in one transaction;
        returns their ids."""
