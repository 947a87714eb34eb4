"""What to do with a message that is automatic, a bounce, or from a listed bot. Pure.

:func:`decide` takes the detectors' answers (:mod:`mailbridge.core.automatic`,
:mod:`mailbridge.core.bounce`), whether the message continues a stored conversation, the
sender, and the account's effective policy (``automatic_emails`` and ``bots`` from the config,
the account's own values before the global ones) and answers import, discard (with the reason
that is logged as ``message_discarded``) or bounce (record delivery errors, create nothing).

The rules, in order:

1. A delivery report (a bounce, an ARF feedback report) is a **bounce**: it never creates a
   conversation and its sender never becomes a follower, whatever the lists say.
2. ``bots`` lists, the account's first, then the global ones; within one level ``deny`` beats
   ``allow``. ``deny``: discarded (``bots.deny: PATTERN``). ``allow``: imported like a person's
   mail (it may start a conversation), still recorded as automatic.
3. A person's mail is imported.
4. Automatic mail: ``import`` imports it; ``import_if_conversation_exists`` (the default, the
   reference's "import automatic emails even if conversation not found" = false) imports it only
   when it continues a stored conversation, else discards it; ``discard`` discards it always.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mailbridge.core.automatic import AutomaticVerdict, detect_automatic
from mailbridge.core.bounce import (
    Bounce,
    detect_bounce,
    detect_challenge,
    detect_feedback_report,
    feedback_as_bounce,
    might_be_report,
    parse_raw,
)
from mailbridge.core.model import ParsedMessage

__all__ = [
    "AutomaticEmails",
    "AutomaticPolicy",
    "BotLists",
    "Decision",
    "Disposition",
    "analyse",
    "decide",
    "matching_pattern",
]

AutomaticEmails = Literal["import", "import_if_conversation_exists", "discard"]


class Disposition(enum.StrEnum):
    IMPORT = "import"
    DISCARD = "discard"
    BOUNCE = "bounce"


@dataclass(frozen=True, slots=True)
class BotLists:
    """Address or domain patterns (lower-case), as ``bots.allow`` / ``bots.deny`` give them."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AutomaticPolicy:
    """An account's effective policy: ``bots`` holds the account's lists, then the global."""

    automatic_emails: AutomaticEmails = "import_if_conversation_exists"
    bots: tuple[BotLists, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """``reason``: why (for the log and the stored message); None for a plain person's mail."""

    disposition: Disposition
    reason: str | None = None

    @property
    def may_create_conversation(self) -> bool:
        return self.disposition is Disposition.IMPORT


def analyse(raw: bytes, message: ParsedMessage) -> tuple[AutomaticVerdict, Bounce | None]:
    """The automatic verdict and the delivery report (a bounce, or an ARF feedback report as a
    bounce of kind ``feedback``) of one message: what :func:`decide` needs. A challenge from a
    challenge-response filter is automatic whatever its headers say. Never raises."""
    verdict = detect_automatic(message)
    if not might_be_report(message):
        return verdict, None  # most mail: no second reading of the MIME tree
    try:
        view = parse_raw(raw)
    except Exception:  # the stdlib parser copes with nearly anything; stay safe
        return verdict, None
    report = detect_bounce(view)
    if report is None:
        feedback = detect_feedback_report(view)
        report = feedback_as_bounce(feedback) if feedback is not None else None
    if not verdict.automatic:
        challenge = detect_challenge(view)
        if challenge is not None:
            verdict = AutomaticVerdict(True, challenge)
        elif report is not None:
            verdict = AutomaticVerdict(True, f"delivery report ({report.kind})")
    return verdict, report


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    body = pattern.lower()
    if "@" in body.lstrip("@"):
        # An address, with * wildcards in either part.
        return re.compile(re.escape(body).replace(r"\*", ".*") + r"\Z")
    domain = body.lstrip("@")
    if domain.startswith("*."):
        rest = re.escape(domain[2:]).replace(r"\*", "[^@]*")
        return re.compile(r"[^@]*@(?:[^@]*\.)?" + rest + r"\Z")  # the domain and subdomains
    return re.compile(r"[^@]*@" + re.escape(domain).replace(r"\*", "[^@]*") + r"\Z")


def matching_pattern(email: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` that ``email`` matches: an address (``a@x.example``), a domain
    (``x.example`` or ``@x.example``: that domain only; ``*.x.example``: with its
    subdomains), ``*`` wildcards anywhere (``noreply*@*``). Case-insensitive."""
    address = email.strip().lower()
    for pattern in patterns:
        if _compile(pattern).match(address):
            return pattern
    return None


def decide(
    verdict: AutomaticVerdict,
    bounce: Bounce | None,
    *,
    conversation_found: bool,
    sender: str | None,
    policy: AutomaticPolicy,
) -> Decision:
    """The disposition of one message (rules in the module docstring)."""
    if bounce is not None:
        return Decision(Disposition.BOUNCE, f"bounce: {bounce.kind}")
    if sender:
        for lists in policy.bots:
            denied = matching_pattern(sender, lists.deny)
            if denied is not None:
                return Decision(Disposition.DISCARD, f"bots.deny: {denied}")
            allowed = matching_pattern(sender, lists.allow)
            if allowed is not None:
                return Decision(Disposition.IMPORT, f"bots.allow: {allowed}")
    if not verdict.automatic:
        return Decision(Disposition.IMPORT)
    reason = f"automatic: {verdict.reason}"
    mode = policy.automatic_emails
    if mode == "import" or (mode == "import_if_conversation_exists" and conversation_found):
        return Decision(Disposition.IMPORT, reason)
    return Decision(Disposition.DISCARD, reason)
