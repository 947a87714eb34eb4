"""mailbridge.core.charset: labels, supersets, ISO-2022-JP (CP50221), guessing, defects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.charset import codec_for, decode_text

ESC_KANJI = b"\x1b$B"
ESC_ASCII = b"\x1b(B"


def sjis_pair_to_jis(pair: bytes) -> bytes:
    """The ISO-2022-JP (JIS row/cell) bytes of one double-byte CP932 character."""
    lead, trail = pair
    if lead >= 0xE0:
        lead -= 0x40
    row = (lead - 0x70) * 2
    if trail >= 0x9F:
        return bytes((row, trail - 0x7E))
    return bytes((row - 1, trail - 0x1F - (1 if trail >= 0x80 else 0)))


def jis(text: str) -> bytes:
    """``text`` as CP50221 writes it: each double-byte character in ESC $ B ... ESC ( B."""
    out = bytearray()
    for char in text:
        if char.isascii():
            out += char.encode("ascii")
        else:
            out += ESC_KANJI + sjis_pair_to_jis(char.encode("cp932")) + ESC_ASCII
    return bytes(out)


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("UTF-8", "utf-8"),
        ("utf8", "utf-8"),
        ("UTF_8", "utf-8"),
        ('"utf-8"', "utf-8"),
        ("utf-8;", "utf-8"),
        ("Windows1252", "cp1252"),
        ("win-1251", "cp1251"),
        ("cp-1250", "cp1250"),
        ("ISO_8859-2", "iso8859-2"),
        ("iso8859_15", "iso8859-15"),
        ("latin1", "iso8859-1"),
        ("gb2312", "gb18030"),
        ("GBK", "gb18030"),
        ("big5", "big5hkscs"),
        ("ks_c_5601-1987", "cp949"),
        ("euc-kr", "cp949"),
        ("Shift_JIS", "cp932"),
        ("MS932", "cp932"),
        ("iso-8859-8-i", "iso8859-8"),
        ("tis-620", "cp874"),
        ("iso-2022-jp", "iso2022-jp"),
        ("CP50221", "iso2022-jp"),
        # A later tester's labels (issue 9 follow-up); these were unknown.
        ("x-euc-jp", "euc-jp"),
        ("x-windows-874", "cp874"),
        ("utf8mb4", "utf-8"),
        ("unicode", "utf-16"),
        ("windows 1252", "cp1252"),
        ("ISO 8859-2", "iso8859-2"),
        ("utf-8 (text)", "utf-8"),
        ("x-mac-roman", "mac-roman"),
        ("ISO_8859-2:1987", "iso8859-2"),
        ("", None),
        ("x-unknown", None),
        ("unknown-8bit", None),
        ("bogus-charset", None),
        ("base64", None),
        ("idna", None),
    ],
)
def test_codec_for_labels(label: str, codec: str | None) -> None:
    assert codec_for(label) == codec


def test_iso_2022_jp_plain() -> None:
    data = "こんにちは世界".encode("iso2022_jp")
    assert decode_text(data, "ISO-2022-JP") == ("こんにちは世界", None)


@pytest.mark.parametrize(
    "text",
    [
        "項目①と項目②",  # NEC row 13: circled digits
        "Ⅰ、Ⅱ、Ⅲ",  # NEC row 13: Roman numerals
        "№１ ㈱ ㍻",  # NEC row 13: numero, parenthesised ideograph, era name
        "髙橋さん",  # NEC-selected IBM extension (row 89-92)
        "﨑のお客様",  # NEC-selected IBM extension
    ],
)
def test_iso_2022_jp_windows_superset(text: str) -> None:
    data = jis(text)
    with pytest.raises(UnicodeDecodeError):
        data.decode("iso2022_jp")  # the plain codec cannot
    assert decode_text(data, "iso-2022-jp") == (text, None)


@pytest.mark.parametrize("label", [None, "us-ascii", "ascii", "", "x-unknown"])
def test_7bit_jis_escapes_win_over_ascii_label(label: str | None) -> None:
    data = "見積もりのお願い\r\n佐藤".encode("iso2022_jp")
    text, defect = decode_text(data, label)
    assert text == "見積もりのお願い\r\n佐藤"
    assert "\x1b" not in text
    assert defect == "charset-mislabelled"


def test_jis_half_width_kana_and_missing_reset_before_line_end() -> None:
    kana = b"\x1b(I\x31\x32\x33\x1b(B"
    assert decode_text(kana, "iso-2022-jp") == ("ｱｲｳ", None)
    # A sender that stays in kanji mode across CRLF: the line break is kept.
    data = ESC_KANJI + "日本".encode("iso2022_jp")[3:7] + b"\r\n" + b"\x467|" + ESC_ASCII
    text, _ = decode_text(data, "iso-2022-jp")
    assert text.startswith("日本\r\n")


# Text as the sender's client wrote it (writer) under the label it declared: every mail
# client reads these as the Windows/extended superset of the label.
MISLABELLED_SUPERSETS = [
    ("Smart “quotes” – and 5 €", "cp1252", "iso-8859-1"),
    ("Zażółć – „gęślą” jaźń Śląsk", "cp1250", "iso-8859-2"),
    ("Привет – «мир» №5", "cp1251", "iso-8859-5"),
    ("Καλημέρα – Ά", "cp1253", "iso-8859-7"),
    ("İstanbul – ‘Şişli’", "cp1254", "iso-8859-9"),
    ("שלום – ”עולם“", "cp1255", "iso-8859-8-i"),
    ("你好 𠀀 鿿 ｡", "gb18030", "gb2312"),
    ("香港 𨋢", "big5hkscs", "big5"),
    ("똠방각하 펲", "cp949", "ks_c_5601-1987"),
    ("똠방각하 견적서", "cp949", "euc-kr"),
    ("①②Ⅲ 髙", "cp932", "shift_jis"),
    ("สวัสดี ครับ", "cp874", "tis-620"),
]


@pytest.mark.parametrize(("text", "writer", "label"), MISLABELLED_SUPERSETS)
def test_mislabelled_windows_supersets_read_as_mail_clients_do(
    text: str, writer: str, label: str
) -> None:
    assert decode_text(text.encode(writer), label) == (text, None)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Zażółć Śląsk", "iso-8859-2"),
        ("Привет мир", "iso-8859-5"),
        ("Prix: 5 € œ", "iso-8859-15"),
        ("Grüße, café", "iso-8859-1"),
    ],
)
def test_genuine_iso_8859_text_unchanged(text: str, label: str) -> None:
    assert decode_text(text.encode(label.replace("-i", "")), label) == (text, None)


@pytest.mark.parametrize(
    ("data", "label", "expected", "defect"),
    [
        ("été".encode(), "", "été", None),  # an empty label with UTF-8: fine
        ("été".encode(), None, "été", None),
        ("été".encode(), "x-bogus", "été", "charset-unknown"),
        ("été".encode("cp1252"), "x-bogus", "été", "charset-unknown"),
        ("été".encode("cp1252"), None, "été", "charset-missing"),
        ("été".encode(), "us-ascii", "été", "charset-mislabelled"),
        ("été".encode(), "iso-8859-1", "été", "charset-mislabelled"),
        ("été".encode("cp1252"), "utf-8", "été", "charset-mislabelled"),
        # UTF-8 with a legacy footer pasted in: both parts readable.
        (
            "ok été ".encode() + "Grüße".encode("cp1252"),
            "utf-8",
            "ok été Grüße",
            "charset-mislabelled",
        ),
    ],
)
def test_unknown_and_wrong_labels(
    data: bytes, label: str | None, expected: str, defect: str | None
) -> None:
    text, note = decode_text(data, label)
    assert text == expected
    assert "Ã" not in text
    assert note == defect


@pytest.mark.parametrize("writer", ["cp932", "euc-jp"])
def test_8bit_japanese_labelled_iso_2022_jp(writer: str) -> None:
    text = "お見積りの件、①と髙橋の分です。" if writer == "cp932" else "お見積りの件です。"
    assert decode_text(text.encode(writer), "iso-2022-jp") == (text, "charset-mislabelled")


def test_long_legacy_text_labelled_wrong_is_detected() -> None:
    text = (
        "Здравствуйте! Спасибо за ваш заказ номер 4512. Мы отправим посылку завтра утром, "
        "а номер для отслеживания пришлём отдельным письмом. С уважением, служба поддержки."
    )
    decoded, defect = decode_text(text.encode("cp1251"), "utf-8")
    assert decoded == text
    assert defect == "charset-mislabelled"


def test_really_broken_bytes_are_replaced_and_noted() -> None:
    text, defect = decode_text("日本語".encode("shift_jis") + b"\x82", "shift_jis")
    assert text.startswith("日本語")
    assert defect == "charset-invalid-bytes"


@given(st.text())
def test_utf8_round_trips_under_any_legacy_label(text: str) -> None:
    data = text.encode()
    for label in ("utf-8", None, "", "x-unknown"):
        assert decode_text(data, label)[0] == text


@given(st.binary(max_size=300), st.sampled_from(["utf-8", "iso-2022-jp", "gb2312", None, "x"]))
def test_decode_text_never_raises(data: bytes, label: str | None) -> None:
    text, defect = decode_text(data, label)
    assert isinstance(text, str)
    assert defect is None or defect.startswith("charset-")


_MISLABELLED = "charset-mislabelled"


@pytest.mark.parametrize(
    ("label", "defect"),
    [(None, None), ("utf-8", None), ("us-ascii", _MISLABELLED), ("iso-8859-1", _MISLABELLED)],
)
def test_utf8_byte_order_mark_is_no_text(label: str | None, defect: str | None) -> None:
    """Was wrong: a UTF-8 BOM stayed in the text as U+FEFF; it means UTF-8 whatever the
    label (WHATWG Encoding, BOM sniffing) and mail clients show nothing for it."""
    assert decode_text(b"\xef\xbb\xbfH\xc3\xa9llo", label) == ("Héllo", defect)
    assert decode_text(b"\xef\xbb\xbfHello", label)[0] == "Hello"
