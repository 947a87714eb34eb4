"""What mailbridge makes of one message, without importing it (``mailbridge inspect``).

A pure function from raw bytes to a JSON-ready dict; integrators and tests rely on these keys:

``automatic`` (bool), ``automatic_reason`` (str | None), ``bounce`` (None | {``kind``,
``recipients``: [{``address``, ``permanent``, ``status``, ``diagnostic``}],
``original_message_id``, ``reporting_mta``}), plus ``message_key``, ``message_id``,
``subject``, ``date``, ``from``, ``reply_to``, ``to``, ``cc``, ``delivered_to``,
``threading`` ({``in_reply_to``, ``references``, ``candidates``, ``subject_key``,
``plus_keys``}), ``feedback_report``, ``challenge``, ``attachments``, ``inline_images``,
``size``, ``defects``, ``disposition`` ({``new``, ``reply``}: {``action``: import | discard |
bounce, ``reason``}).
"""

from __future__ import annotations

from typing import Any

from mailbridge.core.bounce import Bounce, detect_challenge, detect_feedback_report, parse_raw
from mailbridge.core.identify import plus_keys, subject_key, thread_candidates
from mailbridge.core.model import Address, ParsedMessage
from mailbridge.core.parse import parse_message
from mailbridge.core.policy import AutomaticPolicy, analyse, decide
from mailbridge.errors import MessageError

__all__ = ["bounce_json", "inspect_message", "not_a_message"]


def _address(address: Address) -> dict[str, str]:
    return {"address": address.email, "name": address.name}


def bounce_json(bounce: Bounce | None) -> dict[str, Any] | None:
    """The ``bounce`` value of ``inspect --json``."""
    if bounce is None:
        return None
    return {
        "kind": bounce.kind,
        "recipients": [
            {
                "address": r.address,
                "permanent": r.permanent,
                "status": r.status,
                "diagnostic": r.diagnostic,
            }
            for r in bounce.recipients
        ],
        "original_message_id": bounce.original_message_id,
        "reporting_mta": bounce.reporting_mta,
    }


# An OLE2 compound file: Outlook's .msg items (and old Office documents) start with it.
_COMPOUND_FILE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def not_a_message(raw: bytes) -> str | None:
    """Why ``raw`` is not a message a person would mean to inspect, or None.

    A message is header fields, then an optional body (RFC 5322 section 2.1); a file whose
    first line is not a header field (a PDF, an image, a text file, an Outlook ``.msg``) has
    none. The import still stores such a body-only message when a server hands it over
    (nothing is lost); ``inspect`` is given files, where it is almost surely the wrong one."""
    if raw.startswith(_COMPOUND_FILE):
        return (
            "an Outlook item (.msg, a compound file), not a MIME message: save it as .eml "
            "(or copy the message's source) and inspect that"
        )
    if not parse_raw(raw).keys():
        return (
            "no header fields: not an RFC 5322 message (a message starts with header fields "
            "such as From: and Date:, RFC 5322 section 2.1)"
        )
    return None


def inspect_message(
    raw: bytes,
    own_addresses: frozenset[str] = frozenset(),
    policy: AutomaticPolicy | None = None,
) -> tuple[ParsedMessage, dict[str, Any]]:
    """Parse ``raw`` and describe it as the import would see it (the same
    :func:`~mailbridge.core.policy.analyse`). ``own_addresses`` (an account's address and
    aliases) lets plus-address keys be read; ``policy`` (default: the default policy) gives
    ``disposition``: what the import would do if the message started a conversation
    (``new``) or answered a stored one (``reply``). Raises
    :class:`~mailbridge.errors.MessageError` when the message cannot be parsed at all, or
    when ``raw`` has no header field (:func:`not_a_message`)."""
    refusal = not_a_message(raw)
    if refusal is not None:
        raise MessageError(refusal, code="unparseable")
    message = parse_message(raw)
    verdict, report = analyse(raw, message)
    bounce = report if report is not None and report.kind != "feedback" else None
    stdlib_view = parse_raw(raw)
    feedback = detect_feedback_report(stdlib_view)
    sender = message.from_address.email if message.from_address else None
    disposition = {}
    for case, found in (("new", False), ("reply", True)):
        decision = decide(
            verdict,
            report,
            conversation_found=found,
            sender=sender,
            policy=policy or AutomaticPolicy(),
        )
        disposition[case] = {"action": str(decision.disposition), "reason": decision.reason}
    recipients = [a.email for a in (*message.to, *message.cc, *message.bcc)]
    recipients.extend(message.delivered_to)
    out: dict[str, Any] = {
        "automatic": verdict.automatic,
        "automatic_reason": verdict.reason,
        "bounce": bounce_json(bounce),
        "disposition": disposition,
        "feedback_report": None
        if feedback is None
        else {
            "feedback_type": feedback.feedback_type,
            "recipients": list(feedback.recipients),
            "original_message_id": feedback.original_message_id,
            "user_agent": feedback.user_agent,
        },
        "challenge": detect_challenge(stdlib_view),
        "message_key": message.message_key,
        "message_id": message.message_id,
        "subject": message.subject,
        "date": message.date.isoformat(),
        "from": _address(message.from_address) if message.from_address else None,
        "reply_to": [_address(a) for a in message.reply_to],
        "to": [_address(a) for a in message.to],
        "cc": [_address(a) for a in message.cc],
        "delivered_to": list(message.delivered_to),
        "threading": {
            "in_reply_to": list(message.in_reply_to),
            "references": list(message.references),
            "candidates": list(thread_candidates(message)),
            "subject_key": subject_key(message.subject),
            "plus_keys": list(plus_keys(recipients, own_addresses)) if own_addresses else [],
        },
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in message.attachments
        ],
        "inline_images": len(message.inline_images),
        "size": message.size,
        "defects": list(message.defects),
    }
    return message, out
