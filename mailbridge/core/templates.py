"""Outgoing mail templates and merge codes, rendered by Jinja2's sandbox.

An account's HTML template (``accounts[].template_file``) wraps every message it sends:
``{{ body }}`` is the message written by the coworker, CRM or automatic reply, ``{{ signature }}``
the account's signature, and the reference product's 13 merge codes (:data:`MERGE_CODES`) are
filled from the conversation. ``{{ table.column }}`` codes read the conversation's parent
records (``{{ ticket.number }}``) and, through a column named after another table, the record it
points to (``{{ ticket.company.name }}``); follower-parent tables give the recipient's record
(``{{ person.name }}``). Merge codes in the body itself (a snippet's ``{{ recipient_name }}``)
are filled the same way.

Safety: :class:`jinja2.sandbox.SandboxedEnvironment` (no attribute access to Python internals,
no imports) with HTML autoescaping, so a customer's name such as ``<script>`` is text; and
:class:`jinja2.StrictUndefined`, so a misspelt code is an error, never a blank in a customer's
inbox. :func:`unknown_codes` checks a template's names at start-up (``check-config`` exits 78
naming the template and the code); a missing column of an existing record fails the row with
the reason when it is rendered.

Fixed texts (reply_info, the history's "On DATE, NAME wrote:") come in the account's
``language`` (en, de, sv, fr, es); dates in the history in the account's ``time_zone``.
Pure: no I/O; the worker reads the template file (once per account, again after a reload)
and looks up the records. Compiled templates are kept (:func:`compiled`), so a template is
compiled once, not per message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

if TYPE_CHECKING:  # imported where used: the daemon starts without Jinja2 unless it sends
    from jinja2 import Template
    from jinja2.sandbox import SandboxedEnvironment

# The reference product's merge codes (configuration.txt, "Templates").
MERGE_CODES: Final = frozenset(
    {
        "conversation_update_info",
        "other_followers_info",
        "reply_info",
        "conversation_messages",
        "followers",
        "follower_addresses",
        "follower_addresses_mailto",
        "follower_names",
        "num_followers",
        "recipient_address",
        "recipient_name",
        "sender_address",
        "sender_name",
    }
)
# Names every template may use besides the merge codes.
BUILTIN_NAMES: Final = frozenset({"body", "signature", "subject"})
LANGUAGES: Final = ("en", "de", "sv", "fr", "es")

_TEXTS: Final[dict[str, dict[str, str]]] = {
    "en": {
        "reply_info": "To add to this conversation, reply to this email.",
        "update": "New message in the conversation “{subject}”.",
        "others": "Also sent to: {names}.",
        "wrote": "On {date}, {sender} wrote:",
    },
    "de": {
        "reply_info": "Um dieser Unterhaltung etwas hinzuzufügen, antworten Sie auf diese E-Mail.",
        "update": "Neue Nachricht in der Unterhaltung „{subject}“.",
        "others": "Auch gesendet an: {names}.",
        "wrote": "Am {date} schrieb {sender}:",
    },
    "sv": {
        "reply_info": "Svara på det här mejlet för att lägga till något i konversationen.",
        "update": "Nytt meddelande i konversationen ”{subject}”.",
        "others": "Skickat även till: {names}.",
        "wrote": "{date} skrev {sender}:",
    },
    "fr": {
        "reply_info": "Pour compléter cette conversation, répondez à cet e-mail.",
        "update": "Nouveau message dans la conversation « {subject} ».",
        "others": "Également envoyé à : {names}.",
        "wrote": "Le {date}, {sender} a écrit :",
    },
    "es": {
        "reply_info": "Para añadir algo a esta conversación, responda a este correo.",
        "update": "Nuevo mensaje en la conversación «{subject}».",
        "others": "También enviado a: {names}.",
        "wrote": "El {date}, {sender} escribió:",
    },
}


@functools.cache
def environment(*, autoescape: bool = True) -> SandboxedEnvironment:
    """The one Jinja2 environment: sandboxed, HTML autoescaped (``autoescape=False`` for
    plain text), undefined names are errors. Made once per process for each ``autoescape``
    (its settings never change, and rendering does not change it)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True
    )


# Compiled templates kept: an account's template and the bodies with merge codes that recur
# (an automatic reply's, a snippet's). Compiling (Jinja2 parses the source and generates Python
# code) costs far more than rendering; a changed source is a new key, compiled on its first use.
TEMPLATE_CACHE_SIZE: Final = 256


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def compiled(source: str, *, autoescape: bool = True) -> Template:
    """``source`` compiled in :func:`environment` (kept, see TEMPLATE_CACHE_SIZE).

    Raises :class:`jinja2.TemplateError` when it does not parse.
    """
    return environment(autoescape=autoescape).from_string(source)


def unknown_codes(source: str, known: Iterable[str]) -> list[str]:
    """The top-level names ``source`` uses that are neither merge codes, built-in names, nor
    ``known`` (the configured parent and follower-parent tables), sorted.

    Raises ValueError with Jinja2's words (and line) when the template does not parse.
    """
    from jinja2 import TemplateError, meta

    try:
        tree = environment().parse(source)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        raise ValueError(f"{exc}" + (f" (line {line})" if line else "")) from exc
    allowed = MERGE_CODES | BUILTIN_NAMES | frozenset(known)
    return sorted(set(meta.find_undeclared_variables(tree)) - allowed)


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """One earlier message of the conversation, for ``conversation_messages``."""

    date: datetime | None
    sender_name: str
    sender_address: str
    text: str


@dataclass(frozen=True, slots=True)
class MergeData:
    """Everything the merge codes are filled from (looked up by the worker)."""

    subject: str
    sender_name: str  # From's display name
    sender_address: str
    recipient_name: str
    recipient_address: str
    followers: Sequence[tuple[str, str]]  # active followers (email, name), recipient included
    history: Sequence[HistoryMessage] = ()  # newest first
    records: Mapping[str, Mapping[str, Any]] | None = None  # table -> record (nested links)
    signature: str = ""  # HTML
    language: str = "en"
    time_zone: str = "UTC"


def _names(followers: Sequence[tuple[str, str]]) -> list[str]:
    return [name or email for email, name in followers]


def merge_values(data: MergeData) -> dict[str, Any]:
    """The merge codes' values: text (escaped when rendered) or :class:`Markup` (HTML)."""
    from markupsafe import Markup

    texts = _TEXTS.get(data.language, _TEXTS["en"])
    zone = ZoneInfo(data.time_zone)
    others = [(e, n) for e, n in data.followers if e != data.recipient_address.lower()]
    history = Markup("").join(
        Markup('<div class="mb-history"><p>{}</p><blockquote>{}</blockquote></div>').format(
            texts["wrote"].format(
                date=m.date.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") if m.date else "",
                sender=f"{m.sender_name} <{m.sender_address}>"
                if m.sender_name
                else m.sender_address,
            ),
            Markup("<br>").join(m.text.strip().splitlines()),
        )
        for m in data.history
    )
    mailto = Markup(", ").join(
        Markup('<a href="mailto:{}">{}</a>').format(e, e) for e, _n in data.followers
    )
    return {
        "subject": data.subject,
        "reply_info": texts["reply_info"],
        "conversation_update_info": texts["update"].format(subject=data.subject),
        "other_followers_info": texts["others"].format(names=", ".join(_names(others)))
        if others
        else "",
        "conversation_messages": history,
        "followers": ", ".join(f"{n} <{e}>" if n else e for e, n in data.followers),
        "follower_addresses": ", ".join(e for e, _n in data.followers),
        "follower_addresses_mailto": mailto,
        "follower_names": ", ".join(_names(data.followers)),
        "num_followers": len(data.followers),
        "recipient_address": data.recipient_address,
        "recipient_name": data.recipient_name or data.recipient_address,
        "sender_address": data.sender_address,
        "sender_name": data.sender_name or data.sender_address,
        # The operator's own HTML from the config, meant as markup.
        "signature": Markup(data.signature),  # noqa: S704
    }


def render(source: str, body_html: str, data: MergeData) -> str:
    """``source`` (a template, HTML) rendered with ``body_html`` as ``{{ body }}``.

    ``body_html`` may itself hold merge codes (a snippet's); they are filled first. Raises
    ValueError naming the undefined code or the error and its line.
    """
    from jinja2 import TemplateError
    from markupsafe import Markup

    values = merge_values(data)
    values.update(data.records or {})
    try:
        body = compiled(body_html).render(values) if "{" in body_html else body_html
        # The row's HTML body (the integrator's or coworker's), meant as markup.
        values["body"] = Markup(body)  # noqa: S704
        return compiled(source).render(values)
    except TemplateError as exc:
        raise ValueError(_explain(exc)) from exc


def render_text(text: str, data: MergeData) -> str:
    """A plain-text body with its merge codes filled (no HTML escaping: the result is text).

    Raises ValueError naming the undefined code or the error and its line.
    """
    from jinja2 import TemplateError

    values = merge_values(data)
    values.update(data.records or {})
    try:
        return compiled(text, autoescape=False).render(values)
    except TemplateError as exc:
        raise ValueError(_explain(exc)) from exc


def _explain(exc: Exception) -> str:
    """The reason a row fails to render. Unknown names are refused when the config is checked,
    so a name undefined here is a relation with no record for this message: the conversation
    (or the recipient's follower) has no row of that table linked, which the integrator fixes
    in the data, not in the template."""
    from jinja2 import UndefinedError

    line = getattr(exc, "lineno", None)
    where = f" (line {line})" if line else ""
    missing = re.fullmatch(r"'(\w+)' is undefined", str(exc))
    if isinstance(exc, UndefinedError) and missing is not None:
        table = missing.group(1)
        return (
            f"template: no {table} record is linked to this conversation or its recipient "
            f"(conversation.{table} / follower.{table} is NULL), so the {table}.* merge codes "
            f"cannot be filled{where}: link the record, then retry the row"
        )
    return f"template: {exc}{where}"


def has_codes(text: str | None) -> bool:
    """Whether ``text`` holds Jinja2 syntax (a merge code, a tag or a comment)."""
    return text is not None and any(mark in text for mark in ("{{", "{%", "{#"))
