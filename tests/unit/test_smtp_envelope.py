"""The envelope pieces ``SmtpSender.send`` builds itself instead of aiosmtplib's ``sendmail``:
the RFC 1870 SIZE value and the check of an address placed on a command line as ``<address>``."""

from __future__ import annotations

import pytest
from aiosmtplib.email import _validate_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.mail.smtp import _unsafe_address, transmitted_size

# Line ends in every arrangement, among other bytes.
_RAW = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b" ", b"\xff"])).map(b"".join)
# Addresses with the characters that matter to the check.
_ADDRESS = st.text(alphabet='ab@.x" <>\\\r\n\t\x00\x7f', max_size=12)


@given(_RAW)
def test_the_size_is_that_of_the_message_as_data_sends_it(raw: bytes) -> None:
    assert transmitted_size(raw) == len(normalize_message_line_endings(raw))


@pytest.mark.parametrize(
    "raw", [b"", b"\r", b"\n", b"\r\n", b"a", b"a\r\r\n", b"a\n\rb", b"a\r\n.\r\n", b".\n"]
)
def test_the_size_of_edge_cases(raw: bytes) -> None:
    assert transmitted_size(raw) == len(normalize_message_line_endings(raw))


def _aiosmtplib_accepts(address: str) -> bool:
    """Whether aiosmtplib would put ``address`` (already bare) on a MAIL or RCPT line."""
    try:
        _validate_address(address)
    except ValueError:
        return False
    return COMMAND_INJECTION_REGEX.search(f"<{address}>".encode()) is None


@given(_ADDRESS)
def test_an_address_is_refused_exactly_when_aiosmtplib_would_refuse_it(address: str) -> None:
    assert _unsafe_address(address) is not _aiosmtplib_accepts(address)


@pytest.mark.parametrize(
    "address", ["jo@example.org", '"john doe"@example.org', '"a<b>"@example.org', '"a\\"b"@x', ""]
)
def test_addresses_sent_as_written(address: str) -> None:
    assert not _unsafe_address(address)


@pytest.mark.parametrize(
    "address",
    ["jo@example.org> NOTIFY=NEVER", "jo@x\r\nRSET", "jo@x\x00", "<jo@x>", '"a"b"@x', '"a\nb"@x'],
)
def test_addresses_refused(address: str) -> None:
    assert _unsafe_address(address)
