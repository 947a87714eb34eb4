"""The Repository protocol: everything mailbridge asks of its database, and the records it returns.

The repository is the only code that speaks SQL. The daemon and the CLI talk to this protocol,
so another backend (PostgreSQL, for several daemons sharing one database) can pass the same
contract tests (``tests/unit/test_store_contract.py``). Methods are synchronous; the daemon runs
them on one writer thread through :class:`mailbridge.store.asyncrepo.AsyncRepository`.

Guarantees every backend must give:

* ``import_batch`` writes the whole batch in one transaction and each message all-or-nothing
  (a savepoint per message): a message whose rows fail is reported ``failed`` and leaves no row.
* A message is stored at most once per account: a second delivery (same content fingerprint,
  whatever its transport headers) is reported ``duplicate`` and writes nothing. A *different*
  message that reuses a stored Message-ID is stored too, under a derived key, with
  ``ImportResult.reused_key`` naming the stored one (``mailbridge.core.messagekey``).
* When the call returns, the transaction is committed (durable): only then may the caller move
  the messages out of the Inbox.
* A message in which only the account's own identity takes part (From, every recipient and
  every Reply-To address are its addresses or aliases) and that continues no conversation is
  reported ``ignored`` and writes nothing: the account alone never starts a conversation (that
  is how mail loops between an account and itself begin).
* A conversation key (plus-address or subject tag) only joins a conversation of the same
  account that exists; any other key is ignored and Message-ID threading decides.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from mailbridge.core.automatic import AutomaticVerdict
from mailbridge.core.bounce import Bounce
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

if TYPE_CHECKING:
    from mailbridge.config import (
        ConversationParentSettings,
        FollowerParentSettings,
    )

from mailbridge.core.planner import ImportContext as ImportContext  # moved to the planner
from mailbridge.core.planner import Outcome as Outcome  # moved to the planner
from mailbridge.store.outbox import OutboxRepository


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One parsed message to import, with the IMAP UID it had in the Inbox.

    ``automatic`` and ``report`` are :func:`mailbridge.core.policy.analyse`'s answers; None
    (not analysed) imports the message as a person's.
    """

    uid: int
    message: ParsedMessage
    automatic: AutomaticVerdict | None = None
    report: Bounce | None = None


@dataclass(frozen=True, slots=True)
class ImportResult:
    uid: int
    message_key: str
    outcome: Outcome
    conversation_id: int | None = None
    message_row_id: int | None = None
    new_conversation: bool = False
    error_code: str | None = None  # set when outcome is FAILED (a catalogue code)
    # IMPORTED only: the key of the stored, different message whose Message-ID this one reuses
    # (``message_key`` is then the derived ``<message-id>#<fingerprint prefix>``).
    reused_key: str | None = None
    error_reason: str | None = None  # FAILED, IGNORED, DISCARDED: why; BOUNCE: what was matched
    delivery_errors: int = 0  # BOUNCE: rows written to conversationmessageerror
    delivery_errors_matched: int = 0  # BOUNCE: of those, rows tied to a stored message
    traceback: str | None = None  # with error_code "internal": where the bug is, for the log


@dataclass(frozen=True, slots=True)
class FailureInfo:
    """What is known of a message that could not be imported (it goes to the Failed folder)."""

    uid: int
    message_key: str
    code: str  # a catalogue code: too_large, unparseable, import_failed ...
    reason: str
    message_id: str | None = None
    subject: str = ""
    from_address: str = ""
    date: datetime | None = None
    size: int = 0
    traceback: str | None = None  # code "internal" only: logged, not stored


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A row of the import-failure table."""

    id: int
    account: str
    uid: int  # the UID the message had in the Inbox when it failed
    folder_uid: int | None  # its UID in the Failed folder, when the server told us (UIDPLUS)
    message_key: str
    message_id: str | None
    subject: str
    from_address: str
    date: datetime | None
    size: int
    code: str
    reason: str
    attempts: int
    first_failed: datetime
    last_failed: datetime
    resolved: datetime | None
    resolution: str | None = None  # how it was resolved: RESOLVED_IMPORTED, RESOLVED_REMOVED


# ``importfailure.resolution``: the message was imported (or found already imported) ...
RESOLVED_IMPORTED = "imported"
# ... or the recovery sweep no longer found it in the Failed folder: an operator deleted it or
# moved it elsewhere (back to the Inbox, say) by hand.
RESOLVED_REMOVED = "no longer in the Failed folder (removed by hand)"


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What :meth:`Repository.reconcile_failures` did for one account."""

    resolved: int = 0  # unresolved failures whose message is gone from the Failed folder
    # Set when the Failed folder's UIDVALIDITY differs from the one remembered: nothing was
    # resolved, and ``forgotten`` stale Failed-folder UIDs were cleared.
    previous_uidvalidity: int | None = None
    forgotten: int = 0

    @property
    def uidvalidity_changed(self) -> bool:
        return self.previous_uidvalidity is not None


@dataclass(frozen=True, slots=True)
class AccountState:
    """What ``mailbridge status`` shows for one account (written by the daemon)."""

    account: str
    state: str  # starting, connecting, idle, polling, importing, backoff, error, stopped
    code: str | None = None  # catalogue code of the current problem, if any
    detail: str = ""
    since: datetime | None = None
    last_import: datetime | None = None
    imported: int = 0  # messages imported, all time
    failed: int = 0  # unresolved entries in the import-failure table (read side only)
    updated: datetime | None = None
    last_sweep: datetime | None = None  # when the recovery sweep last finished (read side only)
    sweep_summary: str = ""  # what it did, one line (read side only)


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: int
    uniqueid: str
    account: str
    subject: str
    first_message: datetime | None
    last_message: datetime | None
    messages: int
    followers: int
    earliest_unread: datetime | None = None  # oldest unread incoming message; None: all read


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    message_id: str | None
    uid: int | None
    date: datetime | None
    subject: str
    from_address: str
    from_name: str
    plain_text: str
    html: str
    followers: tuple[tuple[str, str], ...]  # (email, participation level)
    documents: tuple[tuple[str, str, int], ...]  # (filename, content type, size)
    embedded_files: tuple[tuple[str, str, int], ...]  # (content id, content type, size)
    threaded_by: str | None = None  # new, message_id, plus_address or subject
    message_key: str = ""  # conversationmessage.messagekey
    defects: tuple[str, ...] = ()  # what the parser repaired or could not read


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    summary: ConversationSummary
    followers: tuple[tuple[str, str, bool], ...]  # (email, name, active)
    messages: tuple[StoredMessage, ...] = field(default_factory=tuple)
    parents: tuple[tuple[str, int], ...] = ()  # (parent table, record id) of the prepared tables
    follower_parents: tuple[tuple[str, str, int], ...] = ()  # (follower email, table, record id)


@dataclass(frozen=True, slots=True)
class DeliveryErrorRecord:
    """A row of ``conversationmessageerror``: one failed recipient of one delivery report."""

    id: int
    account: str
    conversation: int | None  # None: the report matched no stored message
    conversation_message: int | None
    message_follower: int | None
    recipient: str
    type: str  # permanent, temporary, complaint
    status: str | None  # RFC 3463 code
    diagnostic: str
    original_message_id: str | None
    matched_by: str  # message_id, recipient, none
    report_kind: str  # dsn, non-standard, feedback
    report_message_id: str | None
    report_subject: str
    report_from: str
    date: datetime | None
    resolved: datetime | None


@dataclass(frozen=True, slots=True)
class NotStoredRecord:
    """A row of ``discardedmessage``: a message moved to Processed without being stored."""

    id: int
    account: str
    message_key: str
    message_id: str | None
    from_address: str
    subject: str
    date: datetime | None
    route: str  # discarded (automatic mail the policy keeps out) or ignored (own mail)
    reason: str
    at: datetime  # when it was moved


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """An unexpired lease (PostgreSQL, several daemons): ``holder`` serves ``account``."""

    account: str
    holder: str  # host:pid:random of the daemon
    token: int  # the fencing token: grows each time the account changes hands
    remaining: float  # seconds until it expires unless renewed (the database's clock)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A stored message a batch's message may be: key, fingerprint, conversation, row."""

    key: str
    fingerprint: str | None
    conversation_id: int
    row_id: int
    summary: tuple[str, str] | None = None  # (date, subject) of an imported row


class ImportPrimitives(Protocol):
    """The look-ups and writes one import transaction offers the import driver
    (:mod:`mailbridge.store.importer`), which asks the planner (:mod:`mailbridge.core.planner`)
    what to write. A backend implements this set and nothing that decides; each call is one
    round trip (or one per chunk of a long list). Timestamps are ISO text (``now``, dates).
    """

    # -- the message's savepoint ---------------------------------------------------------------

    def savepoint(self) -> None:
        """Open the savepoint of one message."""

    def release(self) -> None:
        """Keep the message's writes (release its savepoint)."""

    def rollback(self) -> None:
        """Undo the message's writes (roll back to its savepoint and release it)."""

    def is_batch_error(self, exc: BaseException) -> bool:
        """True when ``exc`` concerns the database (locked, full, corrupt, the transaction
        lost) rather than one message's data: the batch then fails as a whole."""

    def is_refusal(self, exc: BaseException) -> bool:
        """True when ``exc`` is the database refusing one message's rows (a constraint, a value
        it cannot store): ``import_failed``; any other exception is a bug (``internal``)."""

    # -- look-ups ------------------------------------------------------------------------------

    def stored_identities(
        self, account: str, message_ids: Sequence[str], keys: Sequence[str]
    ) -> dict[str, list[StoredRow]]:
        """The account's messages carrying one of ``message_ids`` or keyed by one of ``keys``,
        oldest first, grouped by that id or key."""

    def conversations_by_key(self, account: str, keys: Sequence[str]) -> dict[str, int]:
        """Conversation key (``uniqueid``) -> id, for the account's conversations only."""

    def carriers(
        self, account: str, message_ids: Sequence[str]
    ) -> tuple[list[CitedRow], list[tuple[str, int]]]:
        """The account's messages whose Message-ID is one of ``message_ids``
        (:class:`~mailbridge.core.planner.CitedRow`), and the sent copies with such a
        per-recipient id: (id, conversation) in row order."""

    def citing(self, account: str, message_ids: Sequence[str]) -> list[tuple[str, int]]:
        """(cited id, conversation) of the account's messages citing one of ``message_ids``,
        oldest citing message first."""

    def conversation_row(self, conversation_id: int) -> ConversationValues:
        """The conversation row as the planner folds it."""

    def followers(self, conversation_id: int, link_tables: Sequence[str]) -> dict[str, FollowerRow]:
        """The conversation's followers by email, with their links to ``link_tables``."""

    def newest_dates(self, follower_ids: Sequence[int]) -> dict[int, str]:
        """Follower id -> the date of the newest message they took part in (none: absent)."""

    def parent_records(
        self, parent: FollowerParentSettings, addresses: Sequence[str], ids: Sequence[int]
    ) -> list[ParentRecord]:
        """Records of a follower parent table with one of ``addresses`` (case-insensitively)
        or one of ``ids``."""

    def look_up(self, lookup: PropertyLookup) -> object:
        """The ``lookup.column`` of the first record (lowest id) that matches, or None."""

    # -- writes --------------------------------------------------------------------------------

    def insert_conversation(self, account: str, values: ConversationValues, now: str) -> int:
        """A new conversation row; its id."""

    def update_conversation(
        self, conversation_id: int, values: ConversationValues, now: str
    ) -> None:
        """Set the row's planner-owned columns (``uniqueid`` stays)."""

    def insert_message(
        self, conversation_id: int, account: str, uid: int, values: MessageValues, now: str
    ) -> int:
        """The ``conversationmessage`` row; its id."""

    def insert_references(self, row_id: int, message_ids: Sequence[str]) -> None:
        """The ``messagereference`` rows: the ids the message cites."""

    def write_followers(
        self, conversation_id: int, row_id: int, plan: FollowerPlan, now: str
    ) -> dict[str, int]:
        """Insert and update followers and the message's followers; email -> follower id."""

    def link_followers(self, links: Sequence[FollowerLink]) -> None:
        """Set followers' follower-parent links and names."""

    def insert_files(
        self,
        row_id: int,
        attachments: Sequence[Attachment],
        images: Sequence[Attachment],
        now: str,
    ) -> list[int]:
        """The ``document`` and ``embeddedfile`` rows; the ids of the images, in order."""

    def set_message_html(self, row_id: int, html: str) -> None:
        """Replace the stored HTML (its cid: references rewritten)."""

    def insert_parent(
        self,
        conversation_id: int,
        table: str,
        columns: Sequence[str],
        values: Sequence[object],
    ) -> int:
        """A record of a conversation parent table, linked from the conversation; its id."""

    def record_delivery_errors(
        self, account: str, message: ParsedMessage, report: Bounce, now: str
    ) -> tuple[int, int]:
        """The ``conversationmessageerror`` rows of a delivery report, tied to the messages it
        answers (:mod:`mailbridge.store.delivery_errors`); (rows written, rows matched)."""

    def resolve_failures(self, account: str, keys: Sequence[str], now: str) -> None:
        """Resolve the account's import failures of messages now stored (by message key)."""

    def record_not_stored(self, account: str, values: NotStoredValues, now: str) -> None:
        """The ``discardedmessage`` row of a message moved to Processed without being stored;
        a second import of the same message (a crash before the move) writes nothing."""


class Repository(OutboxRepository, Protocol):
    """The database as mailbridge sees it. See the module docstring for the guarantees.
    Sending's methods are :class:`mailbridge.store.outbox.OutboxRepository`."""

    def migrate(self) -> None:
        """Create or upgrade the schema. Idempotent."""

    def prepare(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        """Create the configured parent tables and link columns that are missing, and check
        those that exist; raises ConfigError naming the key path. Idempotent."""

    def import_batch(
        self, context: ImportContext, items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        """Import items in UID order in one committed transaction; one result per item.

        Prepares ``context``'s parent tables first when :meth:`prepare` has not.
        """

    def mark_read(self, conversation_id: int) -> bool:
        """Clear the conversation's ``earliestunread``; False when there is no such row."""

    def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        """Insert or update (attempts + 1, new reason) import-failure rows, committed."""

    def set_failure_folder_uids(self, account: str, folder_uids: dict[str, int]) -> None:
        """Remember the Failed-folder UID of each failed message (by message key)."""

    def failures(
        self, account: str | None = None, *, include_resolved: bool = False
    ) -> list[FailureRecord]:
        """Import failures, newest first."""

    def reconcile_failures(
        self,
        account: str,
        uidvalidity: int,
        present: Collection[int],
        known: Sequence[FailureRecord],
    ) -> Reconciliation:
        """Resolve ``account``'s failures whose message is no longer in its Failed folder.

        ``present`` is every UID in the Failed folder (``UID SEARCH ALL``), whose UIDVALIDITY
        is ``uidvalidity``; ``known`` is what :meth:`failures` returned *before* that listing.
        Each unresolved failure of ``known`` whose Failed-folder UID is not in ``present``, and
        whose row still has that UID, is resolved now with resolution :data:`RESOLVED_REMOVED`.
        Only rows read before the listing are considered: a message moved to the Failed folder
        after it (by the live loop, beside the sweep) has a UID the listing cannot show.

        A failure without a Failed-folder UID (a server without UIDPLUS) cannot be matched and
        is left alone. The folder's UIDVALIDITY is remembered per account, and the first call
        trusts the UIDs it finds. When it differs from the remembered one, the folder's UIDs
        name other messages now (RFC 3501 section 2.3.1.1): nothing is resolved, and the stale
        Failed-folder UIDs of the account's unresolved failures are cleared (a later failure of
        the message records its new UID). Committed.
        """

    def set_account_state(self, state: AccountState) -> None:
        """Replace the stored state of ``state.account`` (``imported`` is added, not set)."""

    def set_account_states(self, states: Sequence[AccountState]) -> None:
        """Store several accounts' states in one transaction (SQLite: without its own fsync;
        the rows are advisory)."""

    def account_states(self) -> list[AccountState]:
        """Every account's stored state, with ``failed`` counted from unresolved failures."""

    def record_sweep(self, account: str, finished: datetime, summary: str, imported: int) -> None:
        """Remember a recovery sweep of ``account``: when it finished and what it did (one
        line); ``imported`` is added to the account's count (and sets its last import when
        positive). Leaves the account's state as the import loop wrote it."""

    def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        """Conversations, most recent first; ``search`` matches subject, text and addresses."""

    def conversation(self, conversation_id: int) -> ConversationDetail | None:
        """One conversation with its followers and messages, or None."""

    def delivery_errors(
        self, *, unresolved: bool = False, conversation: int | None = None
    ) -> list[DeliveryErrorRecord]:
        """Delivery errors (bounces, complaints), newest first."""

    def not_stored(self, account: str | None = None, *, limit: int = 50) -> list[NotStoredRecord]:
        """Messages moved to Processed without being stored (discarded, ignored), newest first,
        at most ``limit``."""

    def resolve_delivery_error(self, error_id: int) -> bool:
        """Mark one resolved now (its follower's mark cleared when no other unresolved error
        remains for it); False when there is no such unresolved row. Committed."""

    def use_parents(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        """Know the configured parent tables by name for reading conversations back, without
        creating or checking anything (read-only commands)."""

    def lease_holders(self) -> dict[str, str]:
        """account -> the daemon holding its lease now (several daemons on PostgreSQL); empty
        with SQLite, whose one daemon needs no leases."""

    def close(self) -> None:
        """Release the connection."""
