"""Threading basics: Message-ID normalisation, id lists, thread candidates, conversation keys.

Pure functions, shared by the parser (which normalises every id it reads) and the store (which
looks candidates up). Every id that enters the database passes :func:`normalize_message_id`, so
comparisons between a message's own id and the ids other messages cite are exact string matches.

The other two ways to recognise a reply carry the conversation key in the mail itself: in a
plus-address of one of the account's own addresses (``support+KEY@example.com``, see
:func:`plus_address` and :func:`plus_keys`) or in a subject tag (``Subject [ID-KEY]``, see
:func:`tag_subject` and :func:`subject_key`). Extracting a key proves nothing by itself: the
store only lets it join a conversation of the same account that exists.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from mailbridge.core.model import ParsedMessage

# Ids longer than this are junk (RFC 5322 caps a header line at 998 characters).
_MAX_ID_LENGTH: Final = 998
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_WHITESPACE = re.compile(r"\s+")


def normalize_message_id(value: str) -> str | None:
    """``<Abc@Example.COM>`` -> ``Abc@example.com``; ``None`` for an empty or unusable value.

    The local part keeps its case (generators use it for entropy); the domain part is
    lower-cased because some relays rewrite its case and domains are case-insensitive anyway.
    Folded whitespace inside the brackets is dropped, as mail clients do when they echo the id.
    """
    text = value.strip()
    match = _ANGLE_ID.search(text)
    if match is not None:
        text = match.group(1)
    text = _WHITESPACE.sub("", text).strip("<>")
    if not text or len(text) > _MAX_ID_LENGTH or not text.isprintable():
        return None
    local, at, domain = text.rpartition("@")
    if at and local and domain:
        return f"{local}@{domain.lower()}"
    return text


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments ``( ... )`` (nested) outside angle brackets and quotes."""
    out: list[str] = []
    depth = 0
    in_angle = False
    in_quote = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\" and (depth or in_quote):
            escaped = True
            continue
        if depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            continue
        if in_quote:
            in_quote = ch != '"'
        elif in_angle:
            in_angle = ch != ">"
        elif ch == "(":
            depth = 1
            continue
        elif ch == "<":
            in_angle = True
        elif ch == '"':
            in_quote = True
        out.append(ch)
    return "".join(out)


# One id-list item, left to right: a quoted phrase (skipped; never across '<' or '>', so a
# stray quote cannot hide the ids after it), a bracketed id, an id whose '>' is missing (up to
# the next space or '<'), or a bare word (an id when it holds an '@').
_ID_ITEM = re.compile(r'"(?:[^"\\<>]|\\.)*"|<([^<>]*)>|<([^<>\s]*)|([^\s<>,;"]+)')


def parse_id_list(value: str) -> tuple[str, ...]:
    """Every message id in an In-Reply-To or References value, in order, each once.

    RFC 5322 3.6.4 wants ``<id> <id>``; clients also send, and this reads: ids without angle
    brackets, alone or mixed with bracketed ones (``root@x <parent@y>``); commas or
    semicolons between ids; comments (nested) and quoted phrases; prose around the ids
    (``Your message of ... <id>``, RFC 5322 4.5.4 obs-in-reply-to); an id folded across lines
    (whitespace inside brackets is dropped) and an id whose closing ``>`` is missing. A bare
    word counts only when it holds an ``@``: other words are prose.
    """
    if "(" in value:
        value = _strip_comments(value)
    seen: set[str] = set()
    out: list[str] = []
    for match in _ID_ITEM.finditer(value):
        bracketed, unclosed, bare = match.groups()
        if bracketed is not None:
            candidate = bracketed
        elif unclosed is not None and "@" in unclosed:
            candidate = unclosed
        elif bare is not None and "@" in bare:
            candidate = bare.strip(".:[]")
        else:
            continue
        normalized = normalize_message_id(candidate)
        if normalized is not None and normalized not in seen:
            seen.add(normalized)
            out.append(normalized)
    return tuple(out)


def thread_candidates(message: ParsedMessage) -> tuple[str, ...]:
    """Ids of messages this one may continue, most specific first.

    In-Reply-To names the direct parent; References run oldest to newest, so they are read
    backwards to try the nearest ancestor first. The message's own id is left out (some
    clients list it, which would make a message its own parent).
    """
    own = message.message_id
    seen: set[str] = set() if own is None else {own}
    out: list[str] = []
    for candidate in (*message.in_reply_to, *reversed(message.references)):
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return tuple(out)


def new_conversation_key() -> str:
    """A fresh, unguessable conversation key: 16 lower-case base32 characters (80 bits).

    Lower-case letters and digits 2-7 only, so the key survives case-folding mail servers,
    plus-addressing (``support+KEY@``) and subject tags (``[#KEY]``) unchanged.
    """
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


# What new_conversation_key() produces; anything else in a tag or plus-address is not a key.
KEY_PATTERN: Final = r"[a-z2-7]{16}"
_KEY = re.compile(rf"^{KEY_PATTERN}$")
_SUBJECT_TAG = re.compile(rf"\[ID-({KEY_PATTERN})\]", re.IGNORECASE)
# The reference product cuts outgoing subjects to 128 characters so that servers which shorten
# long subjects cannot cut the tag off.
SUBJECT_LIMIT: Final = 128

# Reply and forward prefixes as mail clients write them in many languages: English Re/Fwd/Fw,
# German AW/WG, Nordic SV/VS/VB, Dutch Antw/Doorst, French Réf/TR, Italian R/RIF, Polish Odp/PD,
# Greek ΑΠ/ΣΧΕΤ/ΠΡΘ, Chinese 回复/转发 (and traditional 回覆/轉寄/轉發), with Outlook's counters
# (Re[2]:, Re(2):), any case, and the full-width colon East Asian clients use.
_PREFIX_WORDS: Final = (
    "re",
    "fwd",
    "fw",
    "aw",
    "wg",
    "sv",
    "vs",
    "vb",
    "antw",
    "doorst",
    "réf",
    "ref",
    "tr",
    "rif",
    "r",
    "odp",
    "pd",
    "απ",
    "σχετ",
    "πρθ",
    "回复",
    "回覆",
    "转发",
    "轉寄",
    "轉發",
)
_PREFIXES = re.compile(
    r"^(?:\s*(?:"
    + "|".join(sorted((re.escape(w) for w in _PREFIX_WORDS), key=len, reverse=True))
    + r")\s*(?:\[\d+\]|\(\d+\))?\s*[:：])+\s*",
    re.IGNORECASE,
)


def is_key(value: str) -> bool:
    """Whether ``value`` has the shape of a conversation key (it may still be unknown)."""
    return _KEY.fullmatch(value) is not None


def strip_reply_prefixes(subject: str) -> str:
    """``"Re: AW: Fwd[2]: Order"`` -> ``"Order"``: every leading reply/forward prefix removed."""
    return _PREFIXES.sub("", subject, count=1).strip()


def subject_key(subject: str) -> str | None:
    """The key of the last ``[ID-KEY]`` tag in ``subject``, lower-cased; None without one.

    The last tag wins: a client that quotes a forwarded subject puts the older tag first and our
    own tag is always appended at the end.
    """
    found = _SUBJECT_TAG.findall(subject)
    return found[-1].lower() if found else None


def tag_subject(subject: str, key: str, limit: int = SUBJECT_LIMIT) -> str:
    """``"<subject> [ID-<key>]"``, the subject cut so that the whole is at most ``limit`` chars.

    Tags already in the subject (ours from an earlier reply, or any other) are removed first so
    a long thread does not accumulate them.
    """
    if not is_key(key):
        raise ValueError(f"not a conversation key: {key!r}")
    tag = f"[ID-{key}]"
    if limit < len(tag):
        raise ValueError(f"limit {limit} is shorter than the tag {tag!r}")
    text = " ".join(_SUBJECT_TAG.sub(" ", subject).split())
    room = limit - len(tag) - 1  # one space between subject and tag
    text = text[: max(room, 0)].rstrip()
    return f"{text} {tag}" if text else tag


def _split(address: str) -> tuple[str, str]:
    local, _, domain = address.strip().lower().rpartition("@")
    return local, domain


def plus_address(address: str, key: str) -> str:
    """``support@example.com`` + key -> ``support+KEY@example.com`` (the outgoing Reply-To)."""
    if not is_key(key):
        raise ValueError(f"not a conversation key: {key!r}")
    local, domain = _split(address)
    if not local or not domain:
        raise ValueError(f"not an address: {address!r}")
    return f"{local}+{key}@{domain}"


def _plus_match(address: str, own: Iterable[str]) -> tuple[str, str] | None:
    """(own address, suffix) when ``address`` is ``local+suffix@domain`` of one of ``own``."""
    local, domain = _split(address)
    for mine in own:
        own_local, own_domain = _split(mine)
        if domain == own_domain and own_local and local.startswith(own_local + "+"):
            return mine.strip().lower(), local[len(own_local) + 1 :]
    return None


def is_own_address(address: str, own: frozenset[str]) -> bool:
    """Whether ``address`` is one of ``own`` (lower-case) or a plus-variant of one of them."""
    email = address.strip().lower()
    return email in own or _plus_match(email, own) is not None


def base_address(address: str, own: frozenset[str]) -> str:
    """The own address behind a plus-variant (``support+x@a`` -> ``support@a``), else as is."""
    email = address.strip().lower()
    match = None if email in own else _plus_match(email, own)
    return email if match is None else match[0]


def plus_keys(addresses: Iterable[str], own: frozenset[str]) -> tuple[str, ...]:
    """Conversation keys carried by plus-variants of the account's own addresses, in order.

    Only the account's own addresses count: ``someone+KEY@elsewhere`` is someone else's
    business, and a suffix that is not shaped like a key (``support+sales@``) is no key.
    """
    out: list[str] = []
    for address in addresses:
        match = _plus_match(address, own)
        if match is not None and is_key(match[1]) and match[1] not in out:
            out.append(match[1])
    return tuple(out)
