"""HTML handling for mail bodies: sanitising, HTML -> plain text, text -> HTML, cid: rewriting.

The sanitiser is an allow-list (nh3, i.e. Rust's ammonia) tuned for mail: it keeps the
formatting people see in their mail client (tables, fonts, colours, lists) and removes anything
that runs code, submits data, or loads remote content when the HTML is displayed — remote
images are tracking pixels, so only ``cid:`` and ``data:image/`` sources survive.
"""

from __future__ import annotations

import html as html_lib
import re
from html.parser import HTMLParser
from typing import Final
from urllib.parse import unquote

import nh3

_TAGS: Final = frozenset(
    (nh3.ALLOWED_TAGS - {"area", "map"})  # image maps link out without visible text
    | {"font", "big", "tfoot", "center", "address", "section", "article"}
)

# Layout attributes common in mail HTML; ``style`` is filtered property by property below.
_GLOBAL_ATTRIBUTES: Final = frozenset(
    {"style", "align", "valign", "width", "height", "bgcolor", "dir", "lang", "title"}
)
_TAG_ATTRIBUTES: Final[dict[str, frozenset[str]]] = {
    "a": frozenset({"href"}),
    "img": frozenset({"src", "alt", "border", "hspace", "vspace"}),
    "font": frozenset({"color", "face", "size"}),
    "table": frozenset({"border", "cellpadding", "cellspacing", "summary", "frame", "rules"}),
    "td": frozenset({"colspan", "rowspan", "nowrap", "headers", "scope"}),
    "th": frozenset({"colspan", "rowspan", "nowrap", "headers", "scope"}),
    "col": frozenset({"span"}),
    "colgroup": frozenset({"span"}),
    "ol": frozenset({"start", "type", "reversed"}),
    "ul": frozenset({"type"}),
    "li": frozenset({"value", "type"}),
    "hr": frozenset({"size", "noshade", "color"}),
    "bdo": frozenset({"dir"}),
    "time": frozenset({"datetime"}),
    "data": frozenset({"value"}),
}
_ATTRIBUTES: Final[dict[str, set[str]]] = {
    "*": set(_GLOBAL_ATTRIBUTES),
    **{tag: set(attrs) for tag, attrs in _TAG_ATTRIBUTES.items()},
}

# CSS properties that only format; nothing that positions over other content or loads URLs
# on its own (``background`` may carry url(), which the attribute filter drops).
_STYLE_PROPERTIES: Final = frozenset(
    {
        "color",
        "background",
        "background-color",
        "font",
        "font-family",
        "font-size",
        "font-style",
        "font-variant",
        "font-weight",
        "text-align",
        "text-decoration",
        "text-indent",
        "text-transform",
        "line-height",
        "letter-spacing",
        "word-spacing",
        "white-space",
        "word-break",
        "word-wrap",
        "overflow-wrap",
        "vertical-align",
        "direction",
        "display",
        "float",
        "clear",
        "width",
        "height",
        "min-width",
        "max-width",
        "min-height",
        "max-height",
        "margin",
        "margin-top",
        "margin-right",
        "margin-bottom",
        "margin-left",
        "padding",
        "padding-top",
        "padding-right",
        "padding-bottom",
        "padding-left",
        "border",
        "border-top",
        "border-right",
        "border-bottom",
        "border-left",
        "border-color",
        "border-style",
        "border-width",
        "border-radius",
        "border-collapse",
        "border-spacing",
        "table-layout",
        "list-style-type",
        "text-shadow",
    }
)
_CLEAN_CONTENT_TAGS: Final = frozenset(
    {"script", "style", "title", "head", "noscript", "template", "object", "embed", "applet"}
    | {"iframe", "frame", "frameset", "svg", "math", "select", "textarea", "button", "xmp"}
)
_URL_SCHEMES: Final = frozenset({"http", "https", "mailto", "cid", "data"})
_LINK_SCHEMES: Final = ("http:", "https:", "mailto:")
_IMAGE_SCHEMES: Final = ("cid:",)
# SVG can carry script; raster data: images are inert.
_DATA_IMAGE = re.compile(r"data:image/(?:png|jpe?g|gif|webp|bmp|x-icon|vnd\.microsoft\.icon)[;,]")
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
# Any of these in a declaration loads something or executes: drop that declaration.
_CSS_DANGER = re.compile(
    r"url\s*\(|image-set\s*\(|image\s*\(|expression\s*\(|javascript:|vbscript:|behavio(u)?r|"
    r"-moz-binding|@import|\\",
    re.IGNORECASE,
)


def _style_filter(value: str) -> str | None:
    text = _CSS_COMMENT.sub("", value)
    if not _CSS_DANGER.search(text):
        return text
    kept = [decl for decl in text.split(";") if decl.strip() and not _CSS_DANGER.search(decl)]
    return ";".join(kept) or None


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "style":
        return _style_filter(value)
    if attribute == "href":
        return value if value.strip().lower().startswith(_LINK_SCHEMES) else None
    if attribute == "src":
        lowered = value.strip().lower()
        if lowered.startswith(_IMAGE_SCHEMES) or _DATA_IMAGE.match(lowered):
            return value
        return None
    return value


def sanitize_html(html: str) -> str:
    """Return ``html`` with only formatting left: no scripts, handlers, forms, frames, styles
    sheets, remote images or ``javascript:`` links. ``cid:`` images are kept for rewriting."""
    if not html:
        return ""
    return nh3.clean(
        html,
        tags=set(_TAGS),
        clean_content_tags=set(_CLEAN_CONTENT_TAGS),
        attributes=_ATTRIBUTES,
        attribute_filter=_attribute_filter,
        url_schemes=set(_URL_SCHEMES),
        filter_style_properties=set(_STYLE_PROPERTIES),
        link_rel="noopener noreferrer",
        strip_comments=True,
        # Relative links point nowhere once the mail left its sender.
        url_relative="deny",
    )


_BLOCK_TAGS: Final = frozenset(
    {
        "p",
        "div",
        "table",
        "tr",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "address",
        "article",
        "aside",
        "section",
        "header",
        "footer",
        "nav",
        "figure",
        "figcaption",
        "center",
        "form",
        "fieldset",
        "caption",
        "details",
        "summary",
        "main",
        "body",
        "html",
    }
)
_SKIP_TAGS: Final = frozenset({"script", "style", "title", "noscript", "template", "svg", "math"})
_CELL_TAGS: Final = frozenset({"td", "th"})
_SPACES = re.compile(r"[ \t\r\n\f\v\u00a0\u200b]+")


class _TextExtractor(HTMLParser):
    """Collects visible text; lines are built here so block structure becomes line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._line: list[str] = []
        self._skip = 0
        self._pre = 0
        self._quote = 0
        self._cell_open = False

    def _flush(self) -> None:
        text = "".join(self._line)
        self._line = []
        if self._pre == 0:
            text = text.strip(" ")
        prefix = "> " * self._quote
        self.lines.append((prefix + text).rstrip() if prefix else text.rstrip())

    def _break(self) -> None:
        if self._line:
            self._flush()

    def _paragraph(self) -> None:
        self._break()
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif self._skip:
            return
        elif tag == "br":
            self._flush()
        elif tag == "li":
            self._break()
            self._line.append("- ")
        elif tag == "blockquote":
            self._paragraph()
            self._quote += 1
        elif tag == "hr":
            self._break()
            self.lines.append("-" * 20)
        elif tag in _CELL_TAGS:
            if self._cell_open and self._line:
                self._line.append("\t")
            self._cell_open = True
        elif tag in _BLOCK_TAGS:
            if tag == "pre":
                self._pre += 1
            if tag in {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"}:
                self._paragraph()
            else:
                self._break()
            if tag == "tr":
                self._cell_open = False

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif self._skip:
            return
        elif tag == "blockquote":
            self._paragraph()
            self._quote = max(0, self._quote - 1)
        elif tag in _BLOCK_TAGS or tag == "li":
            if tag in {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"}:
                self._paragraph()
            else:
                self._break()
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre:
            first, *rest = data.split("\n")
            self._line.append(first)
            for line in rest:
                self._flush()
                self._line.append(line)
            return
        text = _SPACES.sub(" ", data)
        if text == " " and (not self._line or self._line[-1].endswith((" ", "\t"))):
            return
        if self._line and self._line[-1].endswith((" ", "\t", "- ")) and text.startswith(" "):
            text = text[1:]
        self._line.append(text)

    def text(self) -> str:
        self._break()
        out: list[str] = []
        for line in self.lines:
            if line == "" and (not out or out[-1] == ""):
                continue  # at most one blank line in a row, none at the start
            out.append(line)
        return "\n".join(out).strip("\n")


def html_to_text(html: str) -> str:
    """Readable plain text from HTML: blocks and ``<br>`` become line breaks, list items
    ``- ``, table cells tabs, quotes ``> ``; scripts and styles vanish, entities are decoded."""
    if not html:
        return ""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


def text_to_html(text: str) -> str:
    """Escaped HTML for plain text, line breaks kept."""
    escaped = html_lib.escape(text.replace("\r\n", "\n"), quote=True)
    return escaped.replace("\n", "<br>\n")


# A src="cid:..." reference; browsers ignore white space around a URL (WHATWG URL parsing), and
# an empty "cid:" names nothing (it is dangling).
_CID_SRC = re.compile(
    r"""(?P<attr>\bsrc\s*=\s*)(?P<q>["']?)\s*cid:\s*(?P<lt><)?(?P<cid>[^"'\s<>]*)(?(lt)>)(?:\s+(?=["']))?(?P=q)""",
    re.IGNORECASE,
)
_CID_SPACE = re.compile(r"\s+")


def rewrite_inline_images(html: str, mapping: dict[str, str]) -> str:
    """Replace ``src="cid:X"`` (any case, with or without ``<>``) by ``mapping[X]``.

    Keys are Content-IDs without angle brackets, matched case-insensitively; unknown cids
    are left as they are.
    """
    if not mapping or "cid:" not in html.lower():
        return html
    lookup = {key.strip().strip("<>").lower(): value for key, value in mapping.items()}

    def replace(match: re.Match[str]) -> str:
        target = lookup.get(match.group("cid").lower())
        if target is None:
            return match.group(0)
        return f'{match.group("attr")}"{html_lib.escape(target, quote=True)}"'

    return _CID_SRC.sub(replace, html)


def resolve_cid_sources(html: str, known: dict[str, str]) -> tuple[str, set[str], bool]:
    """Match every ``src="cid:X"`` in sanitised ``html`` against the message's Content-IDs.

    ``known`` maps lower-case Content-IDs (without ``<>``) to the part's own Content-ID. A
    reference is compared as RFC 2392 spells it (percent-encoded, any case, ``<>`` optional):
    a match is written as ``src="cid:<the part's Content-ID>"``, the form
    :func:`rewrite_inline_images` maps to the stored file; a reference to no part loses its
    ``src`` (no dangling link in the stored HTML). Returns the new HTML, the lower-case
    Content-IDs cited, and whether a dangling reference was removed.
    """
    cited: set[str] = set()
    if "cid:" not in html.lower():
        return html, cited, False
    dangling = False

    def replace(match: re.Match[str]) -> str:
        nonlocal dangling
        # White space is dropped as from the Content-ID itself (folding, RFC 5322 3.2.2).
        cid = unquote(html_lib.unescape(match.group("cid")))
        key = _CID_SPACE.sub("", cid).strip("<>").lower()
        target = known.get(key)
        if target is None:
            dangling = True
            return ""
        cited.add(key)
        return f'{match.group("attr")}"cid:{html_lib.escape(target, quote=True)}"'

    return _CID_SRC.sub(replace, html), cited, dangling
