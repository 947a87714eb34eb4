"""Threading basics: Message-ID normalisation, id lists, thread candidates, conversation keys.

Pure functions, shared by the parser (which normalises every id it reads) and the store (which
looks candidates up). Every id that enters the database passes :func:`normalize_message_id`, so
comparisons between a message's own id and the ids other messages cite are exact string matches.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from mailbridge.core.model import ParsedMessage

# Ids longer than this are junk (RFC 5322 caps a header line at 998 characters).
_MAX_ID_LENGTH: Final = 998
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_SEPARATORS = re.compile(r"[\s,;]+")
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


def parse_id_list(value: str) -> tuple[str, ...]:
    """Every message id in an In-Reply-To or References value, in order, each once.

    Tolerates what real clients send: comments, commas, folded lines, prose around the id
    ("Your message of ... <id>"), and ids without angle brackets.
    """
    if "(" in value:
        value = _strip_comments(value)
    if "<" in value:
        candidates: list[str] = _ANGLE_ID.findall(value)
    else:
        # Without brackets only tokens shaped like ids count; bare words are prose.
        candidates = [token for token in _SEPARATORS.split(value) if "@" in token]
    seen: set[str] = set()
    out: list[str] = []
    for candidate in candidates:
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
