"""Delivery reports: bounces (DSNs and non-standard NDRs), ARF feedback reports, challenges.

Pure functions over the raw bytes of one message; no I/O. The failed recipients of a bounce come
from GNU Mailman's ``flufl.bounce`` (17 detectors: RFC 3464 DSNs, Exim, Postfix, qmail,
Exchange, GroupWise, Yahoo, AOL, ...). What it does not tell is added here:

- whether the message is a delivery report at all (``flufl.bounce`` finds "failed addresses" in
  a person's reply that quotes a mail header, so its detectors run only on a message that *looks*
  like a report: see :func:`_report_signals`);
- permanent vs temporary per recipient (RFC 3464 2.3.3 ``Action: delayed``, RFC 3463 status
  class 4 = persistent transient failure), the RFC 3463 status code and the diagnostic text
  (RFC 3464 2.3.6 ``Diagnostic-Code``, else the line of the text that names the address);
- Exim's ``X-Failed-Recipients`` header;
- the original message's Message-ID, from the returned message or headers (RFC 3462
  ``text/rfc822-headers``, ``message/rfc822``), from headers quoted in the text, or from the
  report's own ``In-Reply-To``/``References`` (Exchange Online and Gmail set them);
- ARF feedback reports (RFC 5965) and challenge-response mail (which are robots, not bounces).

Nothing here raises on hostile input: a detector that fails costs its own answer only.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, Parser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from typing import Final, Literal

from mailbridge.core.automatic import REPLY_PREFIX
from mailbridge.core.identify import normalize_message_id, parse_id_list
from mailbridge.core.model import ParsedMessage

__all__ = [
    "RECIPIENT_LEVELS",
    "RECIPIENT_WINDOW",
    "Bounce",
    "BounceRecipient",
    "FeedbackReport",
    "MatchStep",
    "choose_copy",
    "choose_message",
    "detect_bounce",
    "detect_challenge",
    "detect_feedback_report",
    "error_type",
    "feedback_as_bounce",
    "follower_mark",
    "is_valid_address",
    "match_steps",
    "matched_by",
    "might_be_report",
    "parse_raw",
    "recipient_window",
    "remaining_mark",
]

BounceKind = Literal["dsn", "non-standard", "feedback"]


@dataclass(frozen=True, slots=True)
class BounceRecipient:
    """One failed recipient. ``status`` is an RFC 3463 code ("5.1.1") or None when the report
    gives none; ``permanent`` is False for delays and 4.x.x failures."""

    address: str  # lower-cased
    permanent: bool
    status: str | None = None
    diagnostic: str | None = None


@dataclass(frozen=True, slots=True)
class Bounce:
    """A delivery status notification (RFC 3464) or an MTA's non-standard non-delivery report.

    ``recipients`` may be empty: a report whose failed address could not be read (or was
    anonymised into something that is not an address) is still a bounce, never a person's mail.
    """

    kind: BounceKind
    recipients: tuple[BounceRecipient, ...]
    original_message_id: str | None  # without angle brackets
    reporting_mta: str | None = None

    @property
    def permanent(self) -> bool:
        """True when any recipient failed for good (or none could be read: a hard report)."""
        return not self.recipients or any(r.permanent for r in self.recipients)


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    """An RFC 5965 Abuse Reporting Format report: a recipient marked our mail as spam/abuse."""

    feedback_type: str  # "abuse", "fraud", "not-spam", ... (RFC 5965 3.1)
    recipients: tuple[str, ...]  # Original-Rcpt-To, else the returned message's To
    original_message_id: str | None
    user_agent: str | None = None


_PARSER: Final = BytesParser(policy=compat32)
_TEXT_PARSER: Final = Parser(policy=compat32)
_ADDRESS: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_STATUS: Final = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_REPLY: Final = re.compile(r"\b([45])\d\d[ -]")

# Senders that are mail systems (RFC 5321 4.5.5 null path; RFC 2142 postmaster; MTA habits).
_DAEMON_LOCAL: Final = re.compile(
    r"^(?:mailer[-_.]?daemon|postmaster|mail[-_.]?daemon|mdaemon|mail[-_.]?delivery(?:[-_.]system)?"
    r"|mailadm|mail[-_.]?administrator|ndr|bounces?|nobody|mail[-_.]?router|smtp[-_.]?gateway"
    r"|microsoftexchange[0-9a-f]*|e500_smtp_mail_service|system[-_.]?administrator)$",
    re.IGNORECASE,
)
_DAEMON_NAME: Final = re.compile(
    r"mail delivery (?:system|subsystem|service)|mailer[- ]daemon|postmaster|"
    r"internet mail delivery|mail administrator|system administrator|microsoft outlook",
    re.IGNORECASE,
)
# Of those, the role mailboxes a person also writes from (RFC 2142): a report from one must show
# it in its subject or its content, not in its sender alone.
_ROLE_LOCAL: Final = re.compile(
    r"^(?:postmaster|hostmaster|mailadm|mail[-_.]?administrator|system[-_.]?administrator)$",
    re.IGNORECASE,
)
_ROLE_NAME: Final = re.compile(
    r"^\W*(?:postmaster|mail administrator|system administrator)\W*$", re.IGNORECASE
)
# Subjects of non-delivery reports in the languages of the MTAs that write them.
_BOUNCE_SUBJECT: Final = re.compile(
    r"undeliver(?:able|ed)|undelivered mail|non[- ]?deliver|not (?:be )?delivered|"
    r"delivery (?:status notification|failure|failed|has failed|problem|report|notification|"
    r"incomplete)|"
    r"mail delivery failed|delivery failure|failure notice|failed mail|returned mail|"
    r"return(?:ed)? to sender|mail error|delayed mail|message delayed|warning: message|"
    r"could not be delivered|unzustellbar|nicht zustellbar|non remis|non distribuable|"
    r"no entregado|imposible entregar|non recapitabile|onbestelbaar|kan ikke leveres|"
    r"kunde inte levereras|ej levererat|icke levererbart|epäonnistui|ei voida toimittaa|"
    r"niedostarcz|não entregue|n[ãa]o [ée] poss[íi]vel entregar|no se puede entregar|"
    r"[ée]chec de (?:la )?(?:remise|livraison)|zustellung fehlgeschlagen|配信不能|"
    r"配信できません|无法投递|無法傳遞|退信|"
    r"delivery warning|mail not delivered|processing error|permanent delivery failure|"
    r"mail system error",
    re.IGNORECASE,
)
_FORWARD_PREFIX: Final = re.compile(
    r"^\s*(?:fwd?|wg|tr|rv|enc|i|doorst|vl|trs|vs)\s*:", re.IGNORECASE
)
_DELAY_TEXT: Final = re.compile(
    r"\bdelayed\b|will (?:continue to )?(?:be )?retr(?:y|ied)|still (?:being )?retried|"
    r"not yet been delivered|temporary (?:failure|error|problem)|this is a temporary|"
    r"warning: message|has not been delivered yet|will try again",
    re.IGNORECASE,
)
_HARD_TEXT: Final = re.compile(r"permanent (?:error|failure|fatal)|i've given up", re.IGNORECASE)
_QUOTED_MESSAGE_ID: Final = re.compile(r"^\s*>?\s*message-id:\s*(<[^>\s]+>)", re.IGNORECASE | re.M)
# RFC 3834 5: a challenge is a response; these systems' markers (TMDA, Spam Arrest, Boxbe, ...).
_CHALLENGE_HEADERS: Final = {
    "x-delivery-agent": re.compile(r"\btmda\b", re.IGNORECASE),
    "x-challenge": re.compile(r"."),
    "x-challenge-response": re.compile(r"."),
    "x-spamarrest-noauth": re.compile(r"."),
    "x-boxbe-challenge": re.compile(r"."),
    "x-mailblocks": re.compile(r"."),
    "x-cr-hashedpuzzle": re.compile(r"^(?!$)"),
}
_CHALLENGE_DOMAINS: Final = ("spamarrest.com", "boxbe.com", "mailblocks.com", "sanebox.com")
_CHALLENGE_SUBJECT: Final = re.compile(
    r"please confirm your (?:message|e-?mail)|verify your (?:e-?mail )?address to deliver|"
    r"sender verification|spam arrest|challenge[- ]response|"
    r"confirm that you are (?:a )?(?:human|real)|authorization required to deliver",
    re.IGNORECASE,
)

log = logging.getLogger(__name__)


def parse_raw(raw: bytes) -> Message:
    """The stdlib view of ``raw`` (compat32, as ``flufl.bounce`` expects)."""
    return _PARSER.parsebytes(raw)


def is_valid_address(address: str) -> bool:
    """An RFC 5321 4.1.2 dot-atom mailbox with a DNS domain: rejects the anonymised
    ("david...@gmail.com") and the garbled ones that heuristics dig out of text."""
    return _ADDRESS.fullmatch(address) is not None


# ----------------------------------------------------------------------------------------------
# Is it a report at all?


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return re.sub(r"\s+", " ", str(value)).strip() if value is not None else ""


def _subject(msg: Message) -> str:
    """The Subject with RFC 2047 encoded words decoded (leniently)."""
    value = _header(msg, "subject")
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def _report_type(msg: Message) -> str | None:
    if msg.get_content_type() != "multipart/report":
        return None
    return str(msg.get_param("report-type", "") or "").lower()


def _top_parts(msg: Message) -> list[Message]:
    """The parts of this message, not descending into attached messages (a person forwarding
    a bounce as an attachment sends a message/rfc822 with a report inside)."""
    out: list[Message] = []
    pending = [msg]
    while pending:
        part = pending.pop()
        out.append(part)
        if part.get_content_maintype() == "message":
            continue
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                pending.extend(p for p in payload if isinstance(p, Message))
    return out


def _sender_kind(msg: Message) -> Literal["daemon", "role"] | None:
    """ "daemon" when a mail system sent ``msg`` (MAILER-DAEMON, "Mail Delivery System"),
    "role" when only a role mailbox a person may write from did (postmaster@), else None."""
    role = False
    for header in ("from", "sender", "return-path"):
        for name, addr in getaddresses([_header(msg, header)]):
            local = addr.rsplit("@", 1)[0].strip('"') if addr else ""
            if local and _DAEMON_LOCAL.match(local):
                if not _ROLE_LOCAL.match(local):
                    return "daemon"
                role = True
            if header == "from" and name and _DAEMON_NAME.search(name):
                if not _ROLE_NAME.match(name):
                    return "daemon"
                role = True
    return "role" if role else None


def _null_return_path(msg: Message) -> bool:
    value = _header(msg, "return-path")
    return value in {"<>", "<<>>"} or (bool(value) and value.strip("<> ") == "")


def _report_signals(msg: Message) -> tuple[bool, bool]:
    """(strong, weak): whether the message is structurally a delivery report, and whether it
    only says so in words. A forwarded or replied-to report ("Fwd: Undeliverable: ...") from a
    person is neither unless its structure says so."""
    if _report_type(msg) == "delivery-status":
        return True, True
    if msg.get("x-failed-recipients"):
        return True, True
    top_dsn = any(p.get_content_type() == "message/delivery-status" for p in _top_parts(msg))
    sender = _sender_kind(msg)
    subject = _subject(msg)
    bounce_words = bool(_BOUNCE_SUBJECT.search(subject))
    forwarded = bool(_FORWARD_PREFIX.match(subject))
    reply_to_bounce = bool(REPLY_PREFIX.match(subject)) and bool(
        _BOUNCE_SUBJECT.match(REPLY_PREFIX.sub("", subject, count=1).strip())
    )
    if top_dsn and not forwarded:
        return True, True
    if sender == "daemon":
        return True, True
    if forwarded or reply_to_bounce:
        return False, False
    if sender == "role":
        # postmaster@ with a report's subject is a report; else its failed addresses must be
        # read from its text (flufl.bounce), or it is a person writing from that mailbox.
        return bounce_words, True
    if bounce_words:
        return bounce_words and _null_return_path(msg), True
    return False, False


def might_be_report(message: ParsedMessage) -> bool:
    """A cheap test on the parsed headers: False when ``message`` can be neither a delivery
    report, a feedback report nor a challenge, so the MIME tree need not be read again (most
    mail is a person's). True for every message :func:`detect_bounce`,
    :func:`detect_feedback_report` or :func:`detect_challenge` could answer, except a
    ``multipart/mixed`` report from an ordinary-looking sender with an ordinary subject."""
    headers = message.auto_headers
    if (headers.get("content-type") or "").lower().lstrip().startswith("multipart/report"):
        return True
    if headers.get("x-failed-recipients") or headers.get("x-delivery-agent"):
        return True
    return_path = (headers.get("return-path") or "").strip()
    if return_path and (
        return_path.strip("<> ") == ""
        or _DAEMON_LOCAL.match(return_path.strip("<> ").rsplit("@", 1)[0].strip('"'))
    ):
        return True
    sender = message.from_address
    if sender is not None:
        if _DAEMON_LOCAL.match(sender.email.rsplit("@", 1)[0].strip('"')):
            return True
        if sender.name and _DAEMON_NAME.search(sender.name):
            return True
        domain = sender.email.rpartition("@")[2]
        if any(domain == d or domain.endswith("." + d) for d in _CHALLENGE_DOMAINS):
            return True
    return bool(_BOUNCE_SUBJECT.search(message.subject))


# ----------------------------------------------------------------------------------------------
# Bounces


def _flufl_failures(msg: Message) -> tuple[set[str], set[str]]:
    """``flufl.bounce``'s temporary and permanent failures; a detector that raises on odd input
    (some index the From header without checking it) costs this answer only."""
    from flufl.bounce import all_failures  # lazy: loads 17 detector modules

    flufl_log = logging.getLogger("flufl.bounce")
    disabled = flufl_log.disabled
    flufl_log.disabled = True  # it logs every detector at INFO and tracebacks at ERROR
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # any detector bug: treat as "nothing found"
        return set(), set()
    finally:
        flufl_log.disabled = disabled

    def decode(values: frozenset[bytes]) -> set[str]:
        return {v.decode("ascii", "replace").strip().strip("<>").lower() for v in values}

    return decode(temporary), decode(permanent)


def _field_address(value: str) -> str:
    """The address of a DSN recipient field ("rfc822; <a@b>", RFC 3464 2.3.2)."""
    _, _, addr = value.partition(";") if ";" in value else ("", "", value)
    return parseaddr(addr.strip())[1].strip().strip("<>").lower()


@dataclass(frozen=True, slots=True)
class _DsnField:
    address: str
    action: str
    status: str | None
    diagnostic: str | None


def _header_blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status (RFC 3464 2.1) or message/feedback-report
    (RFC 5965 3.1) part: the stdlib parses them into sub-messages, or leaves the text."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    text = str(payload or "")
    return [_TEXT_PARSER.parsestr(b) for b in re.split(r"\n\s*\n", text) if b.strip()]


def _dsn_fields(msg: Message) -> tuple[list[_DsnField], str | None]:
    """Per-recipient blocks of every top-level message/delivery-status part (RFC 3464 2.3),
    and the Reporting-MTA (2.2.2)."""
    out: list[_DsnField] = []
    mta: str | None = None
    for part in _top_parts(msg):
        if part.get_content_type() != "message/delivery-status":
            continue
        for block in _header_blocks(part):
            if block.get("reporting-mta") and mta is None:
                mta = _header(block, "reporting-mta").partition(";")[2].strip() or None
            # Original-Recipient (RFC 3464 2.3.1) is the address we sent to; Final-Recipient
            # (2.3.2) may be a rewritten internal one ("userx@sims-ms-daemon").
            candidates = [
                _field_address(_header(block, name))
                for name in ("original-recipient", "final-recipient", "x-actual-recipient")
                if block.get(name)
            ]
            valid = [c for c in candidates if is_valid_address(c)]
            if not candidates:
                continue
            recipient = valid[0] if valid else candidates[0]
            status_match = _STATUS.search(_header(block, "status"))
            diagnostic = _header(block, "diagnostic-code")
            if ";" in diagnostic:
                diagnostic = diagnostic.partition(";")[2].strip()
            out.append(
                _DsnField(
                    address=recipient,
                    action=_header(block, "action").lower(),
                    status=status_match.group(0) if status_match else None,
                    diagnostic=diagnostic[:500] or None,
                )
            )
    return out, mta


def _text_of(msg: Message, limit: int = 200_000) -> str:
    """The report's own text parts (not the returned message), decoded leniently."""
    texts: list[str] = []
    size = 0
    for part in _top_parts(msg):
        if part.is_multipart() or part.get_content_maintype() not in {"text"}:
            continue
        if part.get_content_type() == "text/rfc822-headers":
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = data.decode(charset, "replace")
        except LookupError:
            text = data.decode("latin-1")
        if part.get_content_type() == "text/html":
            text = re.sub(r"<[^>]*>", " ", text)
        texts.append(text)
        size += len(text)
        if size > limit:
            break
    return "\n".join(texts)[:limit]


def _near(text: str, address: str) -> tuple[str | None, str | None]:
    """The RFC 3463 status and the diagnostic line near ``address`` in the report's text."""
    lower = text.lower()
    index = lower.find(address)
    if index < 0:
        return None, None
    window = text[index : index + 400]
    status = _STATUS.search(window)
    line_end = text.find("\n", index)
    line = text[text.rfind("\n", 0, index) + 1 : line_end if line_end >= 0 else None].strip()
    following = window.split("\n")[1:4]
    diagnostic = " ".join([line, *[f.strip() for f in following if f.strip()]])
    diagnostic = re.sub(r"\s+", " ", diagnostic).strip()[:500]
    code = status.group(0) if status else None
    return (code if code and not code.startswith("2") else None), diagnostic or None


def _original_message_id(msg: Message) -> str | None:
    """The returned message's Message-ID (RFC 3464 2.1: the third part of a report)."""
    for part in _top_parts(msg):
        kind = part.get_content_type()
        if kind in {"message/rfc822", "message/global"}:
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message) and inner.get("message-id"):
                found = normalize_message_id(_header(inner, "message-id"))
                if found:
                    return found
        if kind in {"text/rfc822-headers", "message/rfc822-headers", "message/global-headers"}:
            data = part.get_payload(decode=True)
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else ""
            match = _QUOTED_MESSAGE_ID.search(text)
            if match:
                found = normalize_message_id(match.group(1))
                if found:
                    return found
    own_id = normalize_message_id(_header(msg, "message-id"))
    match = _QUOTED_MESSAGE_ID.search(_text_of(msg))
    if match:
        found = normalize_message_id(match.group(1))
        if found and found != own_id:
            return found
    # Exchange Online and Gmail NDRs answer the original: In-Reply-To / References.
    for header in ("in-reply-to", "references"):
        ids = parse_id_list(_header(msg, header))
        if ids:
            return ids[-1]
    return None


def detect_bounce(msg: Message | bytes) -> Bounce | None:
    """The delivery report in ``msg`` (raw bytes or a compat32 ``Message``), or None.

    Rules: RFC 3464 (``multipart/report; report-type=delivery-status``; ``Action: failed`` is
    permanent, ``delayed`` temporary, ``delivered``/``relayed``/``expanded`` are not failures);
    RFC 3463 status class 4 is temporary, 5 permanent; the non-standard reports as
    ``flufl.bounce`` reads them, only from a message that looks like a report (a mail-system
    sender, a report subject, a null return path) and not a person's forward of one. Never raises.
    """
    if isinstance(msg, bytes | bytearray):
        try:
            msg = parse_raw(bytes(msg))
        except Exception:  # the stdlib parser copes with nearly anything; be safe
            return None
    try:
        return _detect_bounce(msg)
    except Exception:  # hostile MIME: no answer rather than a failed import
        log.debug("bounce detection failed", exc_info=True)
        return None


_ADDR: Final = r"<?(?<![\w.+-])([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,63})>?"
# Report texts flufl.bounce does not read: Exchange 2007+ and Office 365 ("Delivery has failed
# to these recipients or groups:", "Your message to X couldn't be delivered."), Gmail ("Your
# message wasn't delivered to X"), and the generic "could not be delivered to X".
_TEXT_FAILURES: Final = (
    re.compile(
        r"delivery has failed to these recipients or groups:\s*(?:[^\n@]*\n)*?[^\n@<]*?" + _ADDR,
        re.IGNORECASE,
    ),
    re.compile(r"your message to " + _ADDR + r" couldn'?t be delivered", re.IGNORECASE),
    re.compile(r"message (?:wasn'?t|was not) delivered to " + _ADDR, re.IGNORECASE),
    re.compile(
        r"(?:could not|couldn'?t|cannot|can'?t) be delivered to(?: the following"
        r" (?:recipients?|address(?:es)?))?:?\s*" + _ADDR,
        re.IGNORECASE,
    ),
)


def _text_failures(text: str) -> set[str]:
    head = text[:20_000]
    return {m.group(1).lower() for pattern in _TEXT_FAILURES for m in pattern.finditer(head)}


_PERSON_NAME: Final = re.compile(r"^[^\W\d_][\w'.-]*(?:,?\s+[^\W\d_][\w'.-]*)+$")


def _person_sender(msg: Message) -> bool:
    """From names someone the way mail clients show people ("Ann Smith <ann@x>", "Smith, Ann"):
    MTAs sign reports with no name or with a system's; only a person's mail needs this to tell
    a quoted report from a real one when neither structure nor sender says which."""
    if _null_return_path(msg):
        return False
    name, addr = parseaddr(_header(msg, "from"))
    name = name.strip().strip('"').strip()
    if not name or not addr or _DAEMON_NAME.search(name):
        return False
    local = addr.rsplit("@", 1)[0]
    if name.replace(" ", "").lower() == local.replace(".", "").lower():
        return False  # "MAILER DAEMON", "Symantec AntiVirus" from the same local part
    return _PERSON_NAME.match(name) is not None


def _addressed_to(msg: Message) -> set[str]:
    values = [_header(msg, h) for h in ("to", "cc") if msg.get(h)]
    return {a.lower() for _, a in getaddresses(values) if a}


def _detect_bounce(msg: Message) -> Bounce | None:
    if _report_type(msg) == "feedback-report":
        return None
    strong, weak = _report_signals(msg)
    if not weak:
        return None
    fields, mta = _dsn_fields(msg)
    recipients: dict[str, BounceRecipient] = {}
    text = _text_of(msg)
    for field in fields:
        if not is_valid_address(field.address):
            continue
        if field.action.startswith("delayed"):
            permanent = False
        elif field.action.startswith(("fail", "error")):
            permanent = True  # RFC 3464 2.3.3: "failed" is final, even with a 4.x.x status
        else:
            continue  # delivered, relayed, expanded: RFC 3464 2.3.3, not a failure
        recipients[field.address] = BounceRecipient(
            field.address, permanent, field.status, field.diagnostic
        )
    if not fields:
        if not strong and _person_sender(msg):
            return None  # a person quoting a report, "Undeliverable mail from your system"
        temporary, permanent_set = _flufl_failures(msg)
        if not temporary and not permanent_set:
            permanent_set = _text_failures(text)
        for header_value in msg.get_all("x-failed-recipients") or []:
            for _, addr in getaddresses([str(header_value)]):
                permanent_set.add(addr.lower())
        # A report goes back to the sender, never to the address that failed: an address the
        # message is itself sent to is a quoted one (a person pasting what they got).
        addressed = _addressed_to(msg)
        temporary -= addressed
        permanent_set -= addressed
        delay_report = bool(_DELAY_TEXT.search(_subject(msg))) or (
            bool(_DELAY_TEXT.search(text[:3000])) and not _HARD_TEXT.search(text[:3000])
        )
        for address in sorted(temporary | permanent_set):
            if not is_valid_address(address) or address in recipients:
                continue
            status, diagnostic = _near(text, address)
            # A 4.x.x code in the text does not make it temporary: qmail and others give up
            # on transient errors after days ("I'm not going to try again").
            is_permanent = address not in temporary and not delay_report
            recipients[address] = BounceRecipient(address, is_permanent, status, diagnostic)
        if not recipients and not strong:
            return None
    kind: BounceKind = "dsn" if fields else "non-standard"
    return Bounce(
        kind=kind,
        recipients=tuple(recipients.values()),
        original_message_id=_original_message_id(msg),
        reporting_mta=mta,
    )


# ----------------------------------------------------------------------------------------------
# ARF and challenges


def detect_feedback_report(msg: Message | bytes) -> FeedbackReport | None:
    """An RFC 5965 feedback report (``multipart/report; report-type=feedback-report``), or None.

    The complaining recipient is ``Original-Rcpt-To`` (RFC 5965 3.2), else the To of the
    returned message; many providers redact it, so ``recipients`` may be empty.
    """
    if isinstance(msg, bytes | bytearray):
        msg = parse_raw(bytes(msg))
    if _report_type(msg) != "feedback-report":
        return None
    try:
        return _feedback_report(msg)
    except Exception:  # hostile MIME: no answer rather than a failed import
        log.debug("feedback report parsing failed", exc_info=True)
        return None


def _feedback_report(msg: Message) -> FeedbackReport:
    feedback_type = "abuse"
    user_agent: str | None = None
    recipients: list[str] = []
    returned_to: list[str] = []
    for part in _top_parts(msg):
        kind = part.get_content_type()
        if kind == "message/feedback-report":
            for block in _header_blocks(part):
                feedback_type = _header(block, "feedback-type").lower() or feedback_type
                user_agent = _header(block, "user-agent") or user_agent
                for value in block.get_all("original-rcpt-to") or []:
                    addr = parseaddr(str(value))[1].lower()
                    if is_valid_address(addr):
                        recipients.append(addr)
        elif kind in {"message/rfc822", "text/rfc822-headers"}:
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                returned_to = [a.lower() for _, a in getaddresses([_header(inner, "to")]) if a]
    return FeedbackReport(
        feedback_type=feedback_type,
        recipients=tuple(dict.fromkeys(recipients or returned_to)),
        original_message_id=_original_message_id(msg),
        user_agent=user_agent,
    )


def feedback_as_bounce(report: FeedbackReport) -> Bounce:
    """An ARF report as a delivery error of kind ``feedback``: the complaining recipients, each
    permanent (mail the recipient calls spam is not to be sent again), status None, the
    diagnostic naming the feedback type."""
    diagnostic = f"feedback report (RFC 5965): {report.feedback_type}"
    return Bounce(
        kind="feedback",
        recipients=tuple(BounceRecipient(r, True, None, diagnostic) for r in report.recipients),
        original_message_id=report.original_message_id,
    )


def detect_challenge(msg: Message | bytes) -> str | None:
    """A short reason when ``msg`` is a challenge from a challenge-response spam filter (TMDA,
    Spam Arrest, Boxbe, Mailblocks, ...), else None. Such a message asks the sender to prove
    being a person; it is a robot's mail and must never be answered automatically."""
    if isinstance(msg, bytes | bytearray):
        msg = parse_raw(bytes(msg))
    for name, pattern in _CHALLENGE_HEADERS.items():
        value = msg.get(name)
        if value is not None and pattern.search(str(value)):
            return f"challenge-response: {name}"
    for _, addr in getaddresses([_header(msg, "from"), _header(msg, "return-path")]):
        domain = addr.rpartition("@")[2].lower()
        if any(domain == d or domain.endswith("." + d) for d in _CHALLENGE_DOMAINS):
            return f"challenge-response: {domain}"
    # A subject alone could be a person's ("please confirm your email change"): only with an
    # RFC 3834 automatic marker or a null return path (RFC 5321 4.5.5).
    subject = _subject(msg)
    auto_submitted = _header(msg, "auto-submitted").lower()
    marked = (auto_submitted not in {"", "no"}) or _null_return_path(msg)
    if marked and _CHALLENGE_SUBJECT.search(subject) and not REPLY_PREFIX.match(subject):
        return "challenge-response: subject"
    return None


# -- tying a report to the mail it answers ---------------------------------------------------
# The rules of mailbridge.store.delivery_errors, which only looks up and writes: a report's
# failed recipient is tied to the message it answers in the order of match_steps().

# How far back a report without a usable Message-ID is matched to what we sent its recipient
# (delays are reported days later), and how far ahead (a report dated a little before the mail:
# clock skew between the hosts).
RECIPIENT_WINDOW: Final = timedelta(days=14)
CLOCK_SKEW: Final = timedelta(hours=1)
# The participation levels (``messagefollower.participationlevel``) of a message's recipients.
RECIPIENT_LEVELS: Final = ("to", "cc", "bcc")
# A follower's mark for each delivery error type, worst first.
_SEVERITY: Final = ("permanent", "complaint", "temporary")


class MatchStep(enum.StrEnum):
    """One way of finding the message a report answers, tried in :func:`match_steps` order."""

    # The returned Message-ID (RFC 3464 2.1, or the report's In-Reply-To) as the per-recipient
    # id of a personalised copy (``messagefollower.messageid``): that copy's follower.
    COPY_ID = "copy_id"
    # The returned Message-ID as a stored message's id (imported, sent, or an integrator's;
    # outgoing rows first: :func:`choose_message`), then the recipient's follower on it.
    MESSAGE_ID = "message_id"
    # No usable id: the latest outgoing message to the recipient within recipient_window().
    RECIPIENT = "recipient"


def match_steps(original_message_id: str | None, recipient: str | None) -> tuple[MatchStep, ...]:
    """The look-ups to try, in order, for one failed recipient of a report; the first that
    finds a message wins. Empty: the row is recorded unmatched (``matchedby = 'none'``)."""
    steps: list[MatchStep] = []
    if original_message_id:
        steps += (MatchStep.COPY_ID, MatchStep.MESSAGE_ID)
    if recipient:
        steps.append(MatchStep.RECIPIENT)
    return tuple(steps)


def matched_by(step: MatchStep) -> str:
    """``conversationmessageerror.matchedby`` for a match found by ``step``."""
    return "recipient" if step is MatchStep.RECIPIENT else "message_id"


def choose_copy(copy_recipients: Sequence[str], recipient: str | None) -> int | None:
    """Of the personalised copies carrying the returned Message-ID (their recipients, in
    row order), the index of the failed recipient's own copy, else the first; None for none."""
    if not copy_recipients:
        return None
    return next((i for i, email in enumerate(copy_recipients) if email == recipient), 0)


def choose_message(directions: Sequence[str]) -> int | None:
    """Of the stored messages with the returned Message-ID (their ``direction``, in row
    order), the index of the first outgoing one (we sent what bounced), else the first."""
    if not directions:
        return None
    return next((i for i, d in enumerate(directions) if d == "outgoing"), 0)


def recipient_window(report_date: datetime) -> tuple[datetime, datetime]:
    """The dates (inclusive) a message matched by recipient alone may have been sent."""
    return report_date - RECIPIENT_WINDOW, report_date + CLOCK_SKEW


def error_type(report: Bounce, recipient: BounceRecipient | None) -> str:
    """``conversationmessageerror.type``: complaint (an ARF report, RFC 5965), permanent (a
    hard failure, or a report naming no recipient), or temporary (a delay, RFC 3464 2.3.3)."""
    if report.kind == "feedback":
        return "complaint"
    if recipient is None or recipient.permanent:
        return "permanent"
    return "temporary"


def follower_mark(current: str | None, new: str) -> str:
    """The follower's ``deliveryerror`` after a new error of type ``new``: the new type,
    except that a delay never hides a permanent failure already known."""
    if current == "permanent" and new == "temporary":
        return current
    return new


def remaining_mark(unresolved: Iterable[str]) -> str | None:
    """The follower's ``deliveryerror`` once an error is resolved: the worst type among its
    errors still unresolved (permanent, then complaint, then temporary); None for none."""
    types = list(unresolved)
    if not types:
        return None
    return min(types, key=lambda t: _SEVERITY.index(t) if t in _SEVERITY else len(_SEVERITY))
