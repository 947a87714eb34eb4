"""The import planner: every rule that decides what importing one message writes.

Pure functions over plain values. A backend (``mailbridge.store``) looks things up, hands the
answers to these functions and writes what they return; it decides nothing. One message's way
through (``mailbridge.store.importer`` drives it, one savepoint per message, the batch in one
transaction, so a reply later in a batch sees its parent written by an earlier message):

1. **key** (:func:`decide_key`): duplicate of a stored message, or the key it is stored under
   (:func:`mailbridge.core.messagekey.decide_message_key`: fingerprints, reused Message-IDs).
2. **route** (:func:`conversation_keys`, :func:`join_by_key`, :func:`conversation_of_parents`,
   :func:`conversation_of_citing`, then :func:`route`): the conversation it joins and by which
   rule, a new one, or none (``ignored``).
3. **conversation row** (:func:`new_conversation_values` / :func:`fold_conversation`).
4. **message row** (:func:`message_values`) and the ids it cites (``messagereference``).
5. **followers** (:func:`participants`, :func:`followers_needing_dates`,
   :func:`plan_followers`), then **follower parents** (:func:`link_follower_parents`).
6. **files** (:func:`inline_image_links`, :func:`rewritten_html`).
7. **conversation parents** of a new conversation (:func:`property_lookup`,
   :func:`property_value`).

The rules (README "The database schema" gives the integrator's view):

* Whether a message is already stored, and under which ``messagekey``, is decided from its
  content fingerprint: the same message fetched again is a duplicate; a different one reusing a
  stored Message-ID is stored under a derived key and, since the id names another message,
  replies citing that id do not pull it in.
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

Dates are compared as ISO-8601 UTC text of one shape (:func:`timestamp_text`), so text order is
time order; the store keeps them so.

Adding a rule: a policy that keeps a message out of conversations is a branch of :func:`route`
returning a :class:`Routing` with its reason (automatic mail and bounces are, through
:func:`mailbridge.core.policy.decide`); a new column of the message row is a field of
:class:`MessageValues` set by :func:`message_values`; an outgoing message's followers are
:func:`participants` of the message as sent, planned by :func:`plan_followers` like any other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from mailbridge.core.automatic import AutomaticVerdict
from mailbridge.core.bounce import Bounce
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
from mailbridge.core.model import Attachment, ParsedMessage
from mailbridge.core.participants import is_outgoing, only_own_identity, reached_address
from mailbridge.core.policy import AutomaticPolicy, Disposition, decide

if TYPE_CHECKING:
    from mailbridge.config import (
        AccountSettings,
        ConversationParentSettings,
        FollowerParentSettings,
        Identification,
        ParentPropertySettings,
        Settings,
    )


def timestamp_text(value: datetime) -> str:
    """``value`` as ISO-8601 UTC text in the one shape the schema uses (naive means UTC):
    ``2024-03-01T09:00:00Z``, seconds precision, so that text order is time order."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # isoformat, not strftime: strftime does not zero-pad years before 1000 on glibc, and text
    # order must stay time order.
    return value.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


@dataclass(frozen=True, slots=True)
class ImportContext:
    """Everything about an account that importing its mail depends on, built from the config.

    ``own_addresses`` (the address and its aliases) are one identity: never a follower, never
    the start of a conversation. ``conversation_parents`` are those that apply to this account.
    """

    account: str
    address: str = ""
    own_addresses: frozenset[str] = frozenset()
    identification: Identification = "message_id"
    conversation_parents: tuple[ConversationParentSettings, ...] = ()
    follower_parents: tuple[FollowerParentSettings, ...] = ()
    automatic_policy: AutomaticPolicy = field(default_factory=AutomaticPolicy)
    # Several daemons on PostgreSQL: the lease this daemon serves the account under (holder,
    # fencing token). The import transaction commits only while the lease is still this one
    # (daemon/leases.py); None with SQLite and for the CLI, which hold no lease.
    lease_holder: str | None = None
    lease_token: int | None = None

    def __post_init__(self) -> None:
        # Config lower-cases addresses already; contexts built by hand (tests, tools) may not.
        own = frozenset(a.strip().lower() for a in (*self.own_addresses, self.address) if a)
        object.__setattr__(self, "own_addresses", own)

    @classmethod
    def for_account(cls, settings: Settings, account: AccountSettings) -> ImportContext:
        return cls(
            account=account.name,
            address=account.address,
            own_addresses=account.own_addresses(),
            identification=settings.identification,
            conversation_parents=tuple(
                p for p in settings.conversation_parents if p.applies_to(account.name)
            ),
            follower_parents=settings.follower_parents,
            automatic_policy=settings.automatic_policy(account),
        )


class Outcome(enum.StrEnum):
    """What importing one message came to (``ImportResult.outcome``)."""

    IMPORTED = "imported"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    IGNORED = "ignored"  # only the account's own identity, continuing nothing: not stored
    DISCARDED = "discarded"  # automatic mail the policy does not import (error_reason: why)
    BOUNCE = "bounce"  # a delivery report: delivery errors recorded, no message stored


# -- 1. key -----------------------------------------------------------------------------------


def identity_group(message: ParsedMessage) -> str:
    """The value stored messages are grouped by for :func:`decide_key`: the Message-ID, or the
    key of a message without one."""
    return message.message_id or message.message_key


def decide_key(message: ParsedMessage, stored: Sequence[StoredIdentity]) -> KeyDecision:
    """Duplicate or not, and the key: ``stored`` are the account's messages of the message's
    :func:`identity_group` (carrying its Message-ID or its key), oldest first, with the date and
    subject of imported rows (:func:`mailbridge.core.messagekey.decide_message_key`)."""
    summary = (timestamp_text(message.date), message.subject)
    return decide_message_key(
        message.message_key, message.message_id, message.fingerprint, stored, summary
    )


def settled_keys(message: ParsedMessage, decision: KeyDecision) -> tuple[str, str]:
    """The import-failure keys a stored (or for good dealt-with) message resolves: its stored
    key and its :func:`~mailbridge.core.messagekey.failure_key`."""
    return decision.key, failure_key(message.message_id, message.fingerprint)


# Outcomes after which an earlier import failure of the message is resolved for good: it is in
# the database (imported, or a duplicate of a stored message), or it was dealt with without
# being stored (own mail ignored, automatic mail discarded, a bounce's delivery errors
# recorded). Only a new failure leaves it open, for the recovery sweep.
SETTLING_OUTCOMES: Final = frozenset(
    {Outcome.IMPORTED, Outcome.DUPLICATE, Outcome.IGNORED, Outcome.DISCARDED, Outcome.BOUNCE}
)


def settles_failure(outcome: Outcome) -> bool:
    """Whether ``outcome`` resolves the message's earlier import failures
    (:func:`settled_keys` names them)."""
    return outcome in SETTLING_OUTCOMES


# -- 2. route ---------------------------------------------------------------------------------


class Route(enum.StrEnum):
    """What happens to a message that is not a duplicate (``threadedby`` for the first four)."""

    PLUS_ADDRESS = "plus_address"  # joins the conversation its plus-address key names
    SUBJECT = "subject"  # joins the conversation its subject tag names
    MESSAGE_ID = "message_id"  # joins by Message-ID threading (parent, child or sibling)
    OUTBOX = "outbox"  # sent mail joins the conversation it was composed for
    NEW = "new"  # starts a conversation
    IGNORED = "ignored"  # not stored (only the account's own identity, continuing nothing)
    DISCARDED = "discarded"  # not stored: automatic mail the policy keeps out (core/policy.py)
    BOUNCE = "bounce"  # not stored: a delivery report; its delivery errors are recorded


@dataclass(frozen=True, slots=True)
class Routing:
    """The outcome of :func:`route`: ``conversation_id`` is set for the joining routes;
    ``reason`` says why a message is not stored."""

    route: Route
    conversation_id: int | None = None
    reason: str | None = None
    new_key: str | None = None  # NEW only: the conversation key sent mail was composed with

    @property
    def stored(self) -> bool:
        return self.route not in (Route.IGNORED, Route.DISCARDED, Route.BOUNCE)

    @property
    def new(self) -> bool:
        return self.route is Route.NEW


IGNORED_OWN = "only the account's own addresses take part and it continues no conversation"


def conversation_keys(message: ParsedMessage, context: ImportContext) -> tuple[str, ...]:
    """The conversation keys the configured marker carries, in the order they are tried:
    plus-variants of an own address in Delivered-To, To, Cc, Bcc (``plus_address``), or the
    last ``[ID-KEY]`` subject tag (``subject``); () for ``message_id``."""
    if context.identification == "plus_address":
        addresses = (
            *message.delivered_to,
            *(a.email for a in (*message.to, *message.cc, *message.bcc)),
        )
        return plus_keys(addresses, context.own_addresses)
    if context.identification == "subject":
        key = subject_key(message.subject)
        return (key,) if key else ()
    return ()


def join_by_key(keys: Sequence[str], found: Mapping[str, int]) -> int | None:
    """The conversation of the first key that names one of the account's conversations.

    ``found`` maps conversation key (``uniqueid``) -> id for the account's conversations only:
    that check is what makes a forged or foreign key harmless.
    """
    return next((found[key] for key in keys if key in found), None)


def candidates_of(message: ParsedMessage) -> tuple[str, ...]:
    """The ids ``message`` may continue (:func:`mailbridge.core.identify.thread_candidates`),
    never its own; also what ``messagereference`` records for it."""
    return tuple(c for c in thread_candidates(message) if c and c != message.message_id)


@dataclass(frozen=True, slots=True)
class CitedRow:
    """A stored message of the account carrying a cited id: ``message_id`` (the id it carries)
    and the :class:`ParentCandidate` (its date, row, conversation)."""

    message_id: str
    candidate: ParentCandidate


def conversation_of_parents(
    candidates: Sequence[str],
    carriers: Sequence[CitedRow],
    copies: Sequence[tuple[str, int]],
    date: str,
) -> int | None:
    """The conversation of the first candidate that names a stored message.

    ``carriers``: the account's messages whose Message-ID is a candidate; several carry one id
    only when a sender reuses ids (:func:`choose_parent` picks by ``date``). ``copies``:
    (per-recipient Message-ID of a sent copy, its conversation) in row order; a carrier wins
    over a copy with the same id.
    """
    grouped: dict[str, list[ParentCandidate]] = {}
    for row in carriers:
        grouped.setdefault(row.message_id, []).append(row.candidate)
    parents: dict[str, int] = {}
    for mid, found in grouped.items():
        chosen = choose_parent(found, date)
        if chosen is not None:
            parents[mid] = chosen
    for mid, conversation_id in copies:
        parents.setdefault(mid, conversation_id)
    return next((parents[c] for c in candidates if c in parents), None)


def cited_ids(
    message: ParsedMessage, candidates: Sequence[str], *, reused: bool
) -> tuple[str, ...]:
    """Ids whose citing messages may hold this message's conversation: its own id first (a
    reply that arrived before it), then its candidates (a sibling citing the same ancestor).

    ``reused``: its id already names another stored message, so messages citing that id answer
    the other one and do not pull this one in.
    """
    own = (message.message_id,) if message.message_id and not reused else ()
    return (*own, *candidates)


def conversation_of_citing(cited: Sequence[str], citing: Sequence[tuple[str, int]]) -> int | None:
    """The conversation of a stored message citing the first id of ``cited`` that any cites.

    ``citing``: (cited id, conversation of the citing message), oldest citing message first.
    """
    first: dict[str, int] = {}
    for mid, conversation_id in citing:
        first.setdefault(mid, conversation_id)
    return next((first[mid] for mid in cited if mid in first), None)


PERSON: Final = AutomaticVerdict(automatic=False)


def route_sent(conversation_id: int | None, new_key: str | None) -> Routing:
    """Mail mailbridge sent (the outbox) goes where it was composed for, whatever threading
    would find: the conversation it answers, or the new one whose key it already carries
    (in its plus-address or subject tag). Never discarded, never ignored."""
    if conversation_id is not None:
        return Routing(Route.OUTBOX, conversation_id)
    return Routing(Route.NEW, new_key=new_key)


def route(
    message: ParsedMessage,
    context: ImportContext,
    *,
    by_key: int | None,
    by_message_id: int | None,
    automatic: AutomaticVerdict | None = None,
    report: Bounce | None = None,
) -> Routing:
    """Join, start, ignore, discard or record as a bounce: the outcome step of a message that
    is not a duplicate.

    ``by_key``: the conversation :func:`join_by_key` found; ``by_message_id``: the one
    Message-ID threading found (parent, then citing). The key wins. ``automatic`` and
    ``report`` (:func:`mailbridge.core.policy.analyse`; None: a person's mail) go through the
    account's policy first (:func:`mailbridge.core.policy.decide`): a delivery report is a
    bounce, automatic mail may be discarded (with the reason). A message that joins nothing
    starts a conversation, unless only the account's own identity takes part in it.
    """
    found = by_key if by_key is not None else by_message_id
    sender = message.from_address
    disposition = decide(
        automatic or PERSON,
        report,
        conversation_found=found is not None,
        sender=sender.email if sender is not None else None,
        policy=context.automatic_policy,
    )
    if disposition.disposition is Disposition.DISCARD:
        return Routing(Route.DISCARDED, reason=disposition.reason)
    if disposition.disposition is Disposition.BOUNCE and report is not None:
        return Routing(Route.BOUNCE, reason=disposition.reason)
    if by_key is not None:
        return Routing(Route(context.identification), by_key)
    if by_message_id is not None:
        return Routing(Route.MESSAGE_ID, by_message_id)
    own = context.own_addresses
    if is_outgoing(message, own) and only_own_identity(message, own):
        # Only the account's own identity takes part: a loop, or mail to itself.
        return Routing(Route.IGNORED, reason=IGNORED_OWN)
    return Routing(Route.NEW)


# -- 3. conversation row ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationValues:
    """The columns of a ``conversation`` row that importing sets (dates as ISO text)."""

    email: str | None
    subject: str
    threadid: str | None
    replytoid: str | None
    firstmessagedate: str | None
    lastmessagedate: str | None
    earliestunread: str | None
    uniqueid: str = ""  # only for a new row: its conversation key


def new_conversation_values(
    message: ParsedMessage, context: ImportContext, date: str, key: str | None = None
) -> ConversationValues:
    """The row of the conversation ``message`` starts: a fresh key (or ``key``, which sent mail
    carries already), the address it reached, its subject and id; unread from its date unless
    the account wrote it."""
    own = context.own_addresses
    return ConversationValues(
        uniqueid=key or new_conversation_key(),
        email=reached_address(message, own),
        subject=message.subject,
        threadid=message.message_id,
        replytoid=message.message_id,
        firstmessagedate=date,
        lastmessagedate=date,
        earliestunread=None if is_outgoing(message, own) else date,
    )


def fold_conversation(
    row: ConversationValues, message: ParsedMessage, context: ImportContext, date: str
) -> tuple[ConversationValues, bool]:
    """``row`` with ``message`` folded in, and whether it is the conversation's newest message.

    A message older than the first one (the real start of the thread arrived after a reply)
    names the conversation (subject, thread id); the newest one sets the id to reply to; an
    incoming message older than the earliest unread one moves that back. An empty ``email``
    takes the address this message reached.
    """
    own = context.own_addresses
    first, last, unread = row.firstmessagedate, row.lastmessagedate, row.earliestunread
    subject, threadid, replytoid = row.subject, row.threadid, row.replytoid
    latest = last is None or date >= last
    if first is None or date < first:
        first = date
        threadid = message.message_id or threadid
        subject = message.subject or subject
    if latest:
        last = date
        replytoid = message.message_id or replytoid
    if not is_outgoing(message, own) and (unread is None or date < unread):
        unread = date
    folded = ConversationValues(
        email=row.email or reached_address(message, own),
        subject=subject,
        threadid=threadid,
        replytoid=replytoid,
        firstmessagedate=first,
        lastmessagedate=last,
        earliestunread=unread,
        uniqueid=row.uniqueid,
    )
    return folded, latest


# -- 4. message row ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageValues:
    """The columns of the ``conversationmessage`` row (besides ids and times the store sets)."""

    key: str
    message_id: str | None
    direction: str  # incoming or outgoing
    subject: str
    from_address: str
    from_name: str
    date: str
    html: str  # before cid: rewriting (see :func:`rewritten_html`)
    plain_text: str
    in_reply_to: str | None
    references: str | None
    size: int
    threaded_by: str
    fingerprint: str | None
    defects: tuple[str, ...]
    automatic: bool = False  # automatic mail (core/automatic.py) the policy imported
    automatic_reason: str | None = None


def message_html(message: ParsedMessage) -> str:
    """The stored HTML: the message's (sanitised) HTML, or its text rendered as HTML."""
    return message.html or text_to_html(message.plain_text)


def message_values(
    message: ParsedMessage,
    context: ImportContext,
    key: str,
    date: str,
    routing: Routing,
    automatic: AutomaticVerdict | None = None,
) -> MessageValues:
    sender = message.from_address
    verdict = automatic or PERSON
    return MessageValues(
        key=key,
        message_id=message.message_id,
        direction="outgoing" if is_outgoing(message, context.own_addresses) else "incoming",
        subject=message.subject,
        from_address=sender.email.strip().lower() if sender is not None else "",
        from_name=sender.name if sender is not None else "",
        date=date,
        html=message_html(message),
        plain_text=message.plain_text,
        in_reply_to=" ".join(message.in_reply_to) or None,
        references=" ".join(message.references) or None,
        size=message.size,
        threaded_by=routing.route.value,
        fingerprint=message.fingerprint or None,
        defects=message.defects,
        automatic=verdict.automatic,
        automatic_reason=verdict.reason if verdict.automatic else None,
    )


@dataclass(frozen=True, slots=True)
class NotStoredValues:
    """The ``discardedmessage`` row of a message moved to Processed without being stored
    (routes IGNORED and DISCARDED): enough to find it in the Processed folder and to say why."""

    key: str
    message_id: str | None
    from_address: str
    subject: str
    date: str
    route: str  # Route.IGNORED or Route.DISCARDED
    reason: str


def not_stored_values(
    message: ParsedMessage, key: str, date: str, routing: Routing
) -> NotStoredValues | None:
    """The row recording why ``message`` is not stored, or None for a route that stores it or
    records it elsewhere (a bounce's delivery errors are its record)."""
    if routing.route not in (Route.IGNORED, Route.DISCARDED):
        return None
    sender = message.from_address
    return NotStoredValues(
        key=key,
        message_id=message.message_id,
        from_address=sender.email.strip().lower() if sender is not None else "",
        subject=message.subject,
        date=date,
        route=routing.route.value,
        reason=routing.reason or "",
    )


# -- 5. followers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FollowerRow:
    """A stored follower of the conversation: id, name, active, and its follower-parent links
    (table -> record id; a missing table is no link)."""

    id: int
    name: str
    active: bool
    links: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Participants:
    """A message's followers-to-be: ``names`` (email -> first non-empty display name, in order
    of appearance) and ``levels`` ((email, participation level) in the message's order)."""

    names: Mapping[str, str]
    levels: tuple[tuple[str, str], ...]


def participants(message: ParsedMessage, own: frozenset[str]) -> Participants:
    """Every participant but the account itself (its addresses and their plus-variants:
    ``support+KEY@`` is the account reached through a plus-address)."""
    names: dict[str, str] = {}
    levels: list[tuple[str, str]] = []
    for address, level in message.participants():
        email = address.email.strip().lower()
        if not email or is_own_address(email, own):
            continue
        if not names.get(email):
            names[email] = address.name.strip()
        levels.append((email, level.value))
    return Participants(names, tuple(levels))


def followers_needing_dates(
    existing: Mapping[str, FollowerRow], people: Participants, *, latest: bool
) -> list[int]:
    """Followers whose newest message date :func:`plan_followers` needs: only a late (older)
    message that brings a different name needs them; the newest message of a conversation is
    newer than all of them."""
    if latest:
        return []
    return [
        existing[email].id
        for email, name in people.names.items()
        if name and email in existing and existing[email].name not in ("", name)
    ]


@dataclass(frozen=True, slots=True)
class FollowerPlan:
    """What to write for a message's followers: ``inserts`` (email, name, active) of new
    followers; ``updates`` (id, name, active) of changed ones; ``existing`` email -> id of
    those already stored; ``levels`` the messagefollower rows as (email, level)."""

    inserts: tuple[tuple[str, str, bool], ...]
    updates: tuple[tuple[int, str, bool], ...]
    existing: Mapping[str, int]
    levels: tuple[tuple[str, str], ...]
    names: Mapping[str, str]  # email -> the follower's name after the writes


def plan_followers(
    existing: Mapping[str, FollowerRow],
    people: Participants,
    date: str,
    *,
    latest: bool,
    newest: Mapping[int, str],
) -> FollowerPlan:
    """Activation, deactivation and names of the conversation's followers after ``people``'s
    message (dated ``date``); see the module docstring.

    ``existing``: the conversation's followers by email (empty for a new conversation);
    ``latest``: the message is the conversation's newest; ``newest``: follower id -> date of
    their newest message, for those :func:`followers_needing_dates` named (a follower with no
    message, a row an integrator wrote, takes any name). An empty stored name takes any name.
    """
    inserts: list[tuple[str, str, bool]] = []
    updates: list[tuple[int, str, bool]] = []
    ids: dict[str, int] = {}
    names: dict[str, str] = {}
    for email, name in people.names.items():
        row = existing.get(email)
        if row is None:
            # Introduced by a message older than the newest one, which left them out.
            inserts.append((email, name, latest))
            names[email] = name
            continue
        ids[email] = row.id
        follower_newest = newest.get(row.id)
        newer = latest or follower_newest is None or date >= follower_newest
        new_name = name if name and (newer or not row.name) else row.name
        new_active = True if latest else row.active
        names[email] = new_name
        if new_name != row.name or new_active != row.active:
            updates.append((row.id, new_name, new_active))
    if latest:
        updates.extend(
            (row.id, row.name, False)
            for email, row in existing.items()
            if row.active and email not in people.names
        )
    return FollowerPlan(tuple(inserts), tuple(updates), ids, people.levels, names)


@dataclass(frozen=True, slots=True)
class ParentRecord:
    """A row of a follower parent table: its id, address and name ('' without a name column)."""

    id: int
    address: str
    name: str = ""


def _fold_ascii(text: str) -> str:
    # The databases match addresses with ASCII case folding (SQLite NOCASE).
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class FollowerLink:
    """A follower's new link to a follower parent record and its (possibly taken) name."""

    follower_id: int
    table: str
    link: int | None
    name: str


def link_follower_parents(
    follower_parents: Sequence[FollowerParentSettings],
    followers: Sequence[tuple[int, str, str, Mapping[str, int | None]]],
    records: Mapping[str, Sequence[ParentRecord]],
) -> list[FollowerLink]:
    """Point each follower at the record of every follower parent table with its address.

    ``followers``: (id, email, name after this message, current links); ``records``: table ->
    its records with one of those addresses (matched case-insensitively) or the id of a current
    link. The record with the lowest id matching the address wins; a link the integrator set
    by hand (to a record with another address) is kept when none matches. A follower without a
    display name takes the linked record's name (tables in config order). Returns the changes:
    one entry per (table, follower) whose link or name changes.
    """
    names = {follower_id: name for follower_id, _email, name, _links in followers}
    out: list[FollowerLink] = []
    for fp in follower_parents:
        by_address: dict[str, ParentRecord] = {}
        by_id: dict[int, ParentRecord] = {}
        for record in sorted(records.get(fp.table, ()), key=lambda r: r.id):
            by_address.setdefault(_fold_ascii(record.address), record)
            by_id[record.id] = record
        for follower_id, email, _name, links in followers:
            match = by_address.get(_fold_ascii(email))
            current = links.get(fp.table)
            link = match.id if match is not None else current
            name = names[follower_id]
            if not name and link is not None and fp.name_column is not None:
                linked = by_id.get(link)
                names[follower_id] = linked.name if linked is not None else ""
            if link != current or names[follower_id] != name:
                out.append(FollowerLink(follower_id, fp.table, link, names[follower_id]))
    return out


# -- 6. files ---------------------------------------------------------------------------------


def inline_image_links(images: Sequence[Attachment], row_ids: Sequence[int]) -> dict[str, str]:
    """content id -> ``embeddedfile:<row id>`` (the first image with each content id)."""
    mapping: dict[str, str] = {}
    for image, row_id in zip(images, row_ids, strict=True):
        if image.content_id:
            mapping.setdefault(image.content_id, f"embeddedfile:{row_id}")
    return mapping


def rewritten_html(message: ParsedMessage, html: str, links: Mapping[str, str]) -> str | None:
    """The stored HTML with ``cid:`` references pointing at the stored images, or None when
    nothing changes (a text-only message has no cid: references to rewrite)."""
    if not links or not message.html:
        return None
    rewritten = rewrite_inline_images(html, dict(links))
    return rewritten if rewritten != html else None


# -- 7. conversation parents ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PropertyLookup:
    """A record to look up for a parent property: the first row (lowest id) of ``table`` whose
    ``match_column`` equals ``value`` case-insensitively; the property takes its ``column``."""

    table: str
    match_column: str
    value: object
    column: str


def message_property(
    name: str, message: ParsedMessage, context: ImportContext, html: str, date: str
) -> object:
    """The value of one ``message_property`` of the config."""
    sender = message.from_address
    values: dict[str, object] = {
        "subject": message.subject,
        "plain_text": message.plain_text,
        "html": html,
        "from_address": sender.email.strip().lower() if sender is not None else "",
        "from_name": sender.name if sender is not None else "",
        "date": date,
        "account": context.account,
        "message_id": message.message_id,
        "to_addresses": ", ".join(a.email for a in message.to),
    }
    return values[name]


def property_lookup(
    prop: ParentPropertySettings,
    message: ParsedMessage,
    context: ImportContext,
    html: str,
    date: str,
) -> PropertyLookup | None:
    """The look-up a property's ``search_path`` needs, None when it needs none (or has no
    value to look up).

    With a ``message_property``: the id of the record whose column holds the message's value
    (``person.email`` -> the person's id). Without: a column of the sender's follower parent
    record (``person.company``), found by the table's address column.
    """
    table, column = prop.search_table, prop.search_column
    if table is None or column is None:
        return None
    if prop.message_property is not None:
        value = message_property(prop.message_property, message, context, html, date)
        if value in (None, ""):
            return None
        return PropertyLookup(table, column, value, "id")
    sender = message.from_address
    from_address = sender.email.strip().lower() if sender is not None else ""
    parent = next((fp for fp in context.follower_parents if fp.table == table), None)
    if not from_address or parent is None:
        return None
    return PropertyLookup(table, parent.address_column, from_address, column)


def property_value(
    prop: ParentPropertySettings,
    message: ParsedMessage,
    context: ImportContext,
    html: str,
    date: str,
    found: object,
) -> object:
    """The value of one parent property: the message's, the looked-up one (``found``: what
    :func:`property_lookup`'s look-up returned, None for no record or no look-up), or the
    default when that is None or ''."""
    value: object = None
    if prop.message_property is not None:
        value = message_property(prop.message_property, message, context, html, date)
    if prop.search_table is not None and prop.search_column is not None:
        value = found
    if value in (None, "") and prop.default is not None:
        return prop.default
    return value


def pending_lookups(
    parents: Sequence[ConversationParentSettings],
    message: ParsedMessage,
    context: ImportContext,
    html: str,
    date: str,
) -> list[PropertyLookup | None]:
    """:func:`property_lookup` of every property of ``parents``, in order."""
    return [
        property_lookup(prop, message, context, html, date)
        for cp in parents
        for prop in cp.properties
    ]


def parent_records(
    parents: Sequence[ConversationParentSettings],
    message: ParsedMessage,
    context: ImportContext,
    html: str,
    date: str,
    found: Sequence[object],
) -> list[tuple[str, tuple[str, ...], tuple[object, ...]]]:
    """(table, columns, values) of the record to create in each parent table; ``found`` is the
    answer to each of :func:`pending_lookups` in order (None where none was needed)."""
    answers = iter(found)
    out: list[tuple[str, tuple[str, ...], tuple[object, ...]]] = []
    for cp in parents:
        columns = tuple(prop.column for prop in cp.properties)
        values = tuple(
            property_value(prop, message, context, html, date, next(answers))
            for prop in cp.properties
        )
        out.append((cp.table, columns, values))
    return out
