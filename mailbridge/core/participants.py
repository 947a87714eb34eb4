"""Who takes part in a message, as the account sees it: own mail, outgoing mail, reply addresses.

Pure decisions on a :class:`~mailbridge.core.model.ParsedMessage` and the account's own
addresses (its address and aliases, lower-case; plus-variants of them count as them, see
:func:`~mailbridge.core.identify.is_own_address`).

``Reply-To`` (RFC 5322 section 3.6.2) names where the author wants answers: a web form that
sends From = To = the mailbox with the customer in Reply-To is the *customer's* message, and an
answer goes to the customer. So Reply-To addresses are participants (participation level
``replyto``), they count when deciding whether only the account itself takes part, a message
from an own address to the account alone with an outside Reply-To is incoming mail written on
that person's behalf, and a reply goes to them.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailbridge.core.identify import base_address, is_own_address
from mailbridge.core.model import Address, ParsedMessage


def _outside(addresses: Iterable[Address], own: frozenset[str]) -> list[Address]:
    return [a for a in addresses if a.email and not is_own_address(a.email, own)]


def is_outgoing(message: ParsedMessage, own: frozenset[str]) -> bool:
    """Whether the account itself wrote ``message`` (``conversationmessage.direction``).

    True when From is one of the account's addresses (a copy of mail sent by another client,
    Bcc to self). Except a message that only the account receives (To, Cc and Bcc are its
    addresses) while Reply-To names someone outside: that is a web form or a system writing to
    the mailbox on that person's behalf, i.e. incoming mail. Mail the account sends to someone
    stays outgoing whatever its Reply-To (an agent may direct answers elsewhere).
    """
    sender = message.from_address
    if sender is None or not is_own_address(sender.email, own):
        return False
    to_others = _outside((*message.to, *message.cc, *message.bcc), own)
    return bool(to_others) or not _outside(message.reply_to, own)


def only_own_identity(message: ParsedMessage, own: frozenset[str]) -> bool:
    """Whether nobody but the account takes part: From, To, Cc, Bcc *and Reply-To* are all its
    addresses (or there are none). Such a message never starts a conversation; that is how mail
    loops between an account and itself begin."""
    return not _outside((a for a, _level in message.participants()), own)


def reached_address(message: ParsedMessage, own: frozenset[str]) -> str | None:
    """Which of the account's addresses the message reached (``conversation.email``): the first
    own address in Delivered-To, To, Cc, Bcc, then From, as its base address (a plus-variant
    counts as the address it extends). None when the message names none."""
    seen: Iterable[str] = (
        *message.delivered_to,
        *(a.email for a in (*message.to, *message.cc, *message.bcc)),
        *((message.from_address.email,) if message.from_address is not None else ()),
    )
    for address in seen:
        if is_own_address(address, own):
            return base_address(address, own)
    return None


def reply_addresses(
    from_address: Address | None, reply_to: Iterable[Address], own: frozenset[str] = frozenset()
) -> tuple[Address, ...]:
    """Where an answer to a message goes (RFC 5322 section 3.6.2): its Reply-To addresses when
    it has any, else its From; the account's own addresses left out, each address once.

    A Reply-To that names only the account itself (a misconfigured form) would send the answer
    to ourselves, so then From is used; () when neither names anyone else.
    """
    chosen = _outside(reply_to, own)
    if not chosen and from_address is not None:
        chosen = _outside((from_address,), own)
    seen: set[str] = set()
    out: list[Address] = []
    for address in chosen:
        email = address.email.strip().lower()
        if email not in seen:
            seen.add(email)
            out.append(address)
    return tuple(out)
