"""The outbox's rules, as pure functions: when to retry, when to give up, what a row sends.

No clock, no network, no database: the worker (:mod:`mailbridge.daemon.outbox`) feeds these the
current time and what the store looked up, so every rule is unit-tested with plain values.

States of an ``outbox`` row (README "The outbox")::

    queued --(attempt starts, before MAIL FROM)--> sending --(250 after DATA)--> sent
       ^                                              |
       +---- temporary failure (4xx, connection) -----+--- 5xx, or too old ---> failed
    queued/failed --(cancel)--> cancelled        failed/cancelled --(retry)--> queued

Temporary failures (RFC 5321 section 4.2.1: a 4yz reply is transient, 5yz permanent; a lost
connection or a timeout says nothing about the message) are retried after
``first_retry_seconds``, doubling up to ``max_retry_seconds``, for up to ``max_age_hours`` after
the row was queued; a mail server's queue lifetime works the same way (Postfix:
``maximal_queue_lifetime``).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from email.utils import getaddresses
from typing import Final, Literal

import idna

from mailbridge.core.compose import Identification, compose_reply
from mailbridge.core.html import html_to_text
from mailbridge.core.identify import strip_reply_prefixes

State = Literal["queued", "sending", "sent", "failed", "cancelled"]
STATES: Final[tuple[State, ...]] = ("queued", "sending", "sent", "failed", "cancelled")


def retry_delay(attempts: int, *, first: float = 30.0, ceiling: float = 3600.0) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based): ``first``, doubling,
    at most ``ceiling``. 30 s, 60 s, 2 min, 4 min ... 1 h with the defaults."""
    if attempts < 1:
        return 0.0
    return min(ceiling, first * 2.0 ** min(attempts - 1, 30))


@dataclass(frozen=True, slots=True)
class AfterFailure:
    """What becomes of a row after a failed attempt."""

    state: State  # "queued" (try again at next_attempt) or "failed"
    next_attempt: datetime | None
    code: str  # the catalogue code to record (send_expired when the row ran out of time)


def after_failure(
    *,
    code: str,
    permanent: bool,
    attempts: int,
    created: datetime,
    now: datetime,
    max_age: timedelta,
    first_retry: float = 30.0,
    max_retry: float = 3600.0,
) -> AfterFailure:
    """The next state of a row whose ``attempts``-th attempt failed with ``code``.

    A permanent failure fails the row at once. A temporary one is retried after
    :func:`retry_delay`, unless that retry would start later than ``created + max_age``: then
    the row fails with ``send_expired`` (its last error keeps the server's words).
    """
    if permanent:
        return AfterFailure("failed", None, code)
    next_attempt = now + timedelta(
        seconds=retry_delay(attempts, first=first_retry, ceiling=max_retry)
    )
    if next_attempt - created > max_age:
        return AfterFailure("failed", None, "send_expired")
    return AfterFailure("queued", next_attempt, code)


def recovered_state(found_in_sent: bool | None) -> Literal["sent", "queued"]:
    """A row found in ``sending`` at start-up: the process died during its attempt, maybe
    between the end of DATA and the status update, so the server may have the message.

    ``found_in_sent`` is whether the account's Sent folder holds its Message-ID (None: no Sent
    folder configured). Found: it was sent. Otherwise it is sent again with the *same*
    Message-ID and bytes (at-least-once): receivers and threading see one message id, and a
    receiver that drops copies of an id it already has (Gmail does) shows one mail.
    """
    return "sent" if found_in_sent else "queued"


# RFC 5322 section 3.2.3: a display name holding one of these must be a quoted-string.
_SPECIALS: Final = frozenset('()<>[]:;@\\,."')


def address_entry(address: str, name: str = "") -> str:
    """``Name <addr>`` (or ``addr``) as one entry of an address list, the name a quoted-string
    (RFC 5322 section 3.2.4) when it holds a special such as the comma of ``Doe, Jane``:
    unquoted, the entry would read as two addresses and the row fail as "not an address".
    Non-ASCII names stay as they are (the reader takes them as they are); an internationalised
    domain becomes its A-label (:func:`a_label`), as SMTP and a header without SMTPUTF8 carry
    it, whether the address came from a column or from a stored conversation."""
    local, at, domain = address.rpartition("@")
    if at and not domain.isascii():
        with contextlib.suppress(idna.IDNAError, UnicodeError):
            address = f"{local}@{a_label(domain)}"
    if not name:
        return address
    if any(c in _SPECIALS for c in name):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{address}>'
    return f"{name} <{address}>"


def split_addresses(text: str | None) -> list[str]:
    """An address-list column (``"a@x, Name <b@y>"``, RFC 5322 section 3.4) as header
    addresses, each one :func:`address_entry`, an internationalised domain as its A-label
    (``jo@xn--exmple-cua.com``, RFC 5890: what SMTP and a header without SMTPUTF8 carry).

    Rows are checked by :func:`recipient_problem` before they are composed, so nothing is
    dropped here that was not refused there; entries without ``@`` are skipped (the addresses
    of a stored conversation are not checked again)."""
    if not text:
        return []
    out: list[str] = []
    for name, address in getaddresses([text]):
        address = address.strip()
        if "@" not in address:
            continue
        out.append(address_entry(address, name))
    return out


def address_problem(address: str) -> str | None:
    """Why ``address`` (an addr-spec) cannot be sent to, or None.

    One ``@`` between a non-empty local part and domain, no space (RFC 5322 section 3.4.1); a
    local part in ASCII, since a UTF-8 one needs SMTPUTF8 (RFC 6531), which mailbridge does not
    send; a non-ASCII domain only when it has an IDNA A-label (RFC 5890)."""
    if not address or address.count("@") != 1 or not all(address.split("@")) or " " in address:
        return "not an email address"
    local, domain = address.split("@")
    if not local.isascii():
        return "a non-ASCII local part needs SMTPUTF8 (RFC 6531), which mailbridge does not send"
    if not domain.isascii():
        try:
            a_label(domain)
        except (idna.IDNAError, UnicodeError):
            return "the domain is not a valid internationalised domain name (RFC 5890)"
    return None


def a_label(domain: str) -> str:
    """``domain`` as SMTP and headers without SMTPUTF8 carry it: IDNA 2008 A-labels (RFC 5891)
    after UTS 46 mapping, non-transitional, so ``straße.de`` is ``xn--strae-oqa.de`` and not
    ``strasse.de`` (another domain, as the stdlib's IDNA 2003 codec has it). Raises
    ``idna.IDNAError`` for a name that has none."""
    return str(idna.encode(domain, uts46=True, transitional=False).decode("ascii"))


# A server's words for "too many connections at once from you", in a 4xx reply: Exchange
# Online's "432 4.3.2 Concurrent connections limit exceeded" and "432 4.3.2
# STOREDRV.ClientSubmit; sender thread limit exceeded" (Microsoft's "Message storage and
# concurrent connection throttling for SMTP Authenticated Submission"), Postfix's "421 4.7.0
# Error: too many connections from ...". Not RFC 3463's X.3.2 alone: "421 4.3.2 Service not
# available" is a server going away, not a limit.
_CONNECTION_LIMIT = re.compile(
    r"concurrent connections? limit|too many (\w+ ){0,2}(connections|sessions)"
    r"|connections? limit|thread limit exceeded",
    re.IGNORECASE,
)


def connection_limit_reply(reply: str) -> bool:
    """Whether an SMTP reply (its code and words: ``"432 4.3.2 ..."``) refuses a connection
    for being over the server's limit of connections at once: a temporary (4xx, RFC 5321
    section 4.2.1) reply saying so (see _CONNECTION_LIMIT); a 5xx never is."""
    return (
        re.match(r"\s*4\d\d\b", reply) is not None and _CONNECTION_LIMIT.search(reply) is not None
    )


def recipient_problem(columns: Mapping[str, str | None]) -> str | None:
    """The first entry of the address-list ``columns`` (name -> text, e.g. ``toaddresses``)
    that cannot be sent to, said with its column, or None: a row naming one fails as a whole
    (``outbox_invalid``) instead of going out to the others with the entry left out. A comma
    inside an unquoted display name splits it: ``Doe, Jo <jo@x>`` is two entries."""
    for column, text in columns.items():
        if not text or not text.strip():
            continue
        found = getaddresses([text])
        if not found:
            return f"{column}: {text!r} is not an email address"
        for name, address in found:
            why = address_problem(address.strip())
            if why is not None:
                entry = f"{name} <{address}>" if name and address else (address or name or text)
                hint = (
                    ' (a display name with a comma must be quoted: "Doe, Jo" <jo@x.example>)'
                    if why == "not an email address" and "," in text
                    else ""
                )
                return f"{column}: {entry!r}: {why}{hint}"
    return None


def not_addresses(values: Sequence[str]) -> list[str]:
    """The values (each an address list, as ``--to``/``--cc``/``--bcc`` take it) holding an
    entry that cannot be sent to (:func:`address_problem`): refused when a row is queued, by
    the rule the worker applies to rows an integrator inserts (:func:`recipient_problem`)."""
    return [v for v in values if recipient_problem({"value": v}) is not None or not v.strip()]


def address_of(entry: str) -> str:
    """The bare, lower-cased address of a :func:`split_addresses` entry."""
    return getaddresses([entry])[0][1].strip().lower()


def reply_subject(subject: str) -> str:
    """``Re: <subject>`` without stacking prefixes (``Re: AW: x`` -> ``Re: x``)."""
    base = strip_reply_prefixes(subject)
    return f"Re: {base}" if base else "Re:"


def sender_display_name(account_name: str, coworker: str, *, personalized: bool) -> str:
    """From's display name: the account's, or ``"Firstname Lastname - Account name"`` when
    the account sends personalised mail and the row names its coworker."""
    coworker = " ".join(coworker.split())
    if personalized and coworker:
        return f"{coworker} - {account_name}" if account_name else coworker
    return account_name


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """An attachment to send (read by the worker from a path, or the row's bytes)."""

    filename: str
    content_type: str
    data: bytes


def build_message(
    *,
    address: str,
    display_name: str,
    identification: Identification,
    conversation_key: str,
    subject: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    own_addresses: Iterable[str] = (),
    text: str | None = None,
    html: str | None = None,
    parent_message_id: str | None = None,
    parent_references: Sequence[str] = (),
    parent_in_reply_to: Sequence[str] = (),
    files: Sequence[OutgoingFile] = (),
    automatic: bool = False,
    now: datetime | None = None,
) -> EmailMessage:
    """The message of one outbox row: :func:`~mailbridge.core.compose.compose_reply` plus the
    plain-text part generated from the HTML when only HTML is given, and attachments.

    Raises ValueError when there is no body, no recipient, or a malformed address or key.
    """
    if text is None and html is None:
        raise ValueError("the row has neither bodytext nor bodyhtml")
    plain = text if text is not None else html_to_text(html or "")
    message = compose_reply(
        address=address,
        display_name=display_name,
        identification=identification,
        conversation_key=conversation_key,
        subject=subject,
        parent_message_id=parent_message_id,
        parent_references=parent_references,
        parent_in_reply_to=parent_in_reply_to,
        to=to,
        cc=cc,
        own_addresses=own_addresses,
        text=plain,
        html=html,
        automatic=automatic,
        now=now,
    )
    for file in files:
        maintype, _, subtype = file.content_type.partition("/")
        if not subtype or not maintype:
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(
            file.data, maintype=maintype, subtype=subtype, filename=file.filename or "attachment"
        )
    return message


def envelope_recipients(message: Message, bcc: Sequence[str] = ()) -> list[str]:
    """RCPT TO addresses: To and Cc of the message, then ``bcc`` (never in a header), once
    each, lower-cased (RFC 5321 section 3.3)."""
    out: list[str] = []
    # The values as stored (raw_items): reading them as header objects would parse each one
    # into a header object first, for nothing (getaddresses reads the text).
    values = [str(v) for name, v in message.raw_items() if name.lower() in ("to", "cc")]
    for _name, address in getaddresses([*values, *bcc]):
        address = address.strip().lower()
        if "@" in address and address not in out:
            out.append(address)
    return out


# An action may set a column of the conversation's parent record; the column names what an
# integrator's schema calls it, so only plain identifiers are accepted (never SQL).
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class MessageAction:
    """Set ``column`` of the conversation's ``table`` parent record to ``value`` after the
    message is sent (``{"ticket": {"status": "waiting_customer"}}``)."""

    table: str
    column: str
    value: str | int | float | bool | None


def parse_actions(text: str | None) -> list[MessageAction]:
    """The ``outbox.actions`` column: a JSON object ``{table: {column: value, ...}, ...}``.

    Raises ValueError with the reason for anything else (not JSON, not objects, a name that is
    not a plain lower-case identifier, a value that is not a scalar).
    """
    if text is None or not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"actions is not JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(data, Mapping):
        raise ValueError('actions must be a JSON object such as {"ticket": {"status": "open"}}')
    out: list[MessageAction] = []
    for table, columns in data.items():
        if not isinstance(table, str) or not _COLUMN.fullmatch(table):
            raise ValueError(f"actions: {table!r} is not a table name")
        if not isinstance(columns, Mapping) or not columns:
            raise ValueError(f"actions.{table} must be an object of column: value")
        for column, value in columns.items():
            if not isinstance(column, str) or not _COLUMN.fullmatch(column) or column == "id":
                raise ValueError(f"actions.{table}: {column!r} is not a settable column")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ValueError(f"actions.{table}.{column}: the value must be text or a number")
            out.append(MessageAction(table, column, value))
    return out


def check_actions(
    actions: Sequence[MessageAction], parent_columns: Mapping[str, frozenset[str]]
) -> str | None:
    """Why ``actions`` cannot apply, or None. ``parent_columns`` maps each conversation parent
    table of the conversation (linked by ``conversation.<table>``) to its columns."""
    for action in actions:
        columns = parent_columns.get(action.table)
        if columns is None:
            known = ", ".join(sorted(parent_columns)) or "none"
            return (
                f"actions name the parent table {action.table!r}, which the conversation has no "
                f"record in (its parents: {known})"
            )
        if action.column not in columns:
            return f"actions name {action.table}.{action.column}, which is not a column"
    return None
