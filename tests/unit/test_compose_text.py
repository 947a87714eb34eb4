"""compose.set_text writes what the stdlib's ``set_content(text)`` writes, byte for byte."""

from __future__ import annotations

from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.core.compose import POLICY, _Wire, set_text

# Lines short and long (the 78-character limit decides 7bit/8bit against quoted-printable or
# base64), ASCII and not, with every kind of line break the stdlib splits on.
_PIECES = st.sampled_from(
    ["Thank you. ", "x" * 77, "y" * 79, "ü", "Grüße ", "日本語", "\r\n", "\n", "\r", "=", " ",
     "\t", ".", "From ", "\x00", "😀", "a" * 300]
)  # fmt: skip
TEXTS = st.one_of(st.text(max_size=400), st.lists(_PIECES, max_size=60).map("".join))


def _stdlib(text: str, html: str | None) -> bytes:
    message = EmailMessage(policy=POLICY)
    message["Subject"] = _Wire("s")
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message.as_bytes()


def _ours(text: str, html: str | None) -> bytes:
    message = EmailMessage(policy=POLICY)
    message["Subject"] = _Wire("s")
    set_text(message, text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message.as_bytes()


@settings(max_examples=400)
@given(TEXTS)
def test_set_text_is_set_content(text: str) -> None:
    assert _ours(text, None) == _stdlib(text, None)


@given(TEXTS, st.one_of(st.none(), st.text(max_size=200)))
def test_set_text_then_an_html_alternative_is_as_the_stdlibs(text: str, html: str | None) -> None:
    ours, theirs = _ours(text, html), _stdlib(text, html)

    # The multipart boundary is random: compare with each message's own replaced.
    def same(raw: bytes) -> bytes:
        marker = b'boundary="'
        if marker not in raw:
            return raw
        boundary = raw.split(marker, 1)[1].split(b'"', 1)[0]
        return raw.replace(boundary, b"BOUNDARY")

    assert same(ours) == same(theirs)


def test_each_transfer_encoding_is_chosen_as_the_stdlib_does() -> None:
    cases = {
        "7bit": "Hello\nthere",
        "8bit": "Grüße",
        "quoted-printable": "Thank you for your message. " * 30,
        "base64": "日本語のテキスト" * 40,
    }
    for cte, text in cases.items():
        raw = _ours(text, None)
        assert raw == _stdlib(text, None)
        assert f"Content-Transfer-Encoding: {cte}\r\n".encode() in raw
