"""The Repository protocol: everything mailbridge asks of its database, and the records it returns.

The repository is the only code that speaks SQL. The daemon and the CLI talk to this protocol,
so another backend (PostgreSQL, for several daemons sharing one database) can pass the same
contract tests (``tests/unit/test_store_contract.py``). Methods are synchronous; the daemon runs
them on one writer thread through :class:`mailbridge.store.sqlite.AsyncRepository`.

Guarantees every backend must give:

* ``import_batch`` writes the whole batch in one transaction and each message all-or-nothing
  (a savepoint per message): a message whose rows fail is reported ``failed`` and leaves no row.
* A message is stored at most once per account, keyed by ``ParsedMessage.message_key``; a second
  delivery is reported ``duplicate`` and writes nothing.
* When the call returns, the transaction is committed (durable): only then may the caller move
  the messages out of the Inbox.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mailbridge.core.model import ParsedMessage


class Outcome(enum.StrEnum):
    IMPORTED = "imported"
    DUPLICATE = "duplicate"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One parsed message to import, with the IMAP UID it had in the Inbox."""

    uid: int
    message: ParsedMessage


@dataclass(frozen=True, slots=True)
class ImportResult:
    uid: int
    message_key: str
    outcome: Outcome
    conversation_id: int | None = None
    message_row_id: int | None = None
    new_conversation: bool = False
    error_code: str | None = None  # set when outcome is FAILED (a catalogue code)
    error_reason: str | None = None


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


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    summary: ConversationSummary
    followers: tuple[tuple[str, str, bool], ...]  # (email, name, active)
    messages: tuple[StoredMessage, ...] = field(default_factory=tuple)


class Repository(Protocol):
    """The database as mailbridge sees it. See the module docstring for the guarantees."""

    def migrate(self) -> None:
        """Create or upgrade the schema. Idempotent."""

    def import_batch(
        self, account: str, own_addresses: frozenset[str], items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        """Import items in UID order in one committed transaction; one result per item."""

    def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        """Insert or update (attempts + 1, new reason) import-failure rows, committed."""

    def set_failure_folder_uids(self, account: str, folder_uids: dict[str, int]) -> None:
        """Remember the Failed-folder UID of each failed message (by message key)."""

    def failures(
        self, account: str | None = None, *, include_resolved: bool = False
    ) -> list[FailureRecord]:
        """Import failures, newest first."""

    def set_account_state(self, state: AccountState) -> None:
        """Replace the stored state of ``state.account`` (``imported`` is added, not set)."""

    def account_states(self) -> list[AccountState]:
        """Every account's stored state, with ``failed`` counted from unresolved failures."""

    def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        """Conversations, most recent first; ``search`` matches subject, text and addresses."""

    def conversation(self, conversation_id: int) -> ConversationDetail | None:
        """One conversation with its followers and messages, or None."""

    def close(self) -> None:
        """Release the connection."""
