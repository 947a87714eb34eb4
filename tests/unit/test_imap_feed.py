"""The IMAP reader's fast paths (issue 10, import speed): a FETCH response fed in any pieces
gives the same messages, literals are taken in one step, and the FETCH command's incremental
completeness test answers as aioimaplib's own scan does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aioimaplib
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.mail.imap import _FetchCommand, _Protocol, parse_fetch_response


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)


def _message(n: int) -> bytes:
    body = b"".join(b"line %d of message %d (with parentheses\r\n" % (i, n) for i in range(n % 7))
    return (
        b"From: a@example.net\r\nSubject: (" + str(n).encode() + b"\r\n\r\n" + body + b"\r\n"
    ) * (1 + n % 3)


def _response(messages: list[bytes]) -> bytes:
    out = b""
    for n, raw in enumerate(messages, start=1):
        out += (
            b'* %d FETCH (UID %d FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 09:00:00 +0100" '
            b"BODY[] {%d}\r\n" % (n, 100 + n, len(raw))
        )
        out += raw + b")\r\n"
    return out + b"A1 OK Fetch completed.\r\n"


async def _fetch_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[Any], list[int]]:
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop, lambda exc: None)
    protocol.connection_made(_Transport())
    protocol.state = aioimaplib.SELECTED
    protocol.tagpre = "A"
    protocol.tagnum = 0
    fed: list[int] = []
    original = protocol._feed

    def feed(piece: bytes) -> None:
        fed.append(len(piece))
        original(piece)

    protocol._feed = feed  # type: ignore[method-assign,assignment]
    command = _FetchCommand("A1", "101:199", "(UID BODY.PEEK[])", prefix="UID", loop=loop)
    pending = asyncio.ensure_future(protocol.execute(command))
    await asyncio.sleep(0)
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            protocol.data_received(data[start:cut])
            start = cut
    response = await asyncio.wait_for(pending, 10)
    assert response.result == "OK"
    return parse_fetch_response(response.lines), fed


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12),
    st.lists(st.integers(min_value=0, max_value=20_000), max_size=8),
)
def test_a_fetch_response_read_in_any_pieces_gives_the_same_messages(
    sizes: list[int], cuts: list[int]
) -> None:
    messages = [_message(n) for n in sizes]
    data = _response(messages)
    fetched, _ = asyncio.run(_fetch_in_pieces(data, [c % (len(data) + 1) for c in cuts]))
    assert [m.raw for m in fetched] == messages
    assert [m.uid for m in fetched] == [100 + n for n in range(1, len(messages) + 1)]


def test_a_large_literal_is_fed_in_one_piece_not_in_kilobytes() -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 200 + (b"y" * 70 + b"\r\n") * 3000
    data = _response([big])
    # The server's first read ends just inside the literal, the next holds all the rest.
    head = data.index(b"{") + 40
    fetched, fed = asyncio.run(_fetch_in_pieces(data, [head]))
    assert [m.raw for m in fetched] == [big]
    assert len(fed) <= 3  # not ~220 slices of 1 KiB
    assert max(fed) >= len(big) - 100


@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"1 FETCH (UID 5 BODY[] {3}", b"2 FETCH (FLAGS (\\Seen)", b")"]),
            st.binary(max_size=12).map(bytearray),  # a literal: never counted
            st.text("() ab", max_size=8).map(str.encode),
        ),
        max_size=12,
    ),
    st.integers(min_value=0, max_value=12),
)
def test_fetch_completeness_answers_as_aioimaplib_does(lines: list[Any], split: int) -> None:
    ours = _FetchCommand("A1", "1", "(BODY[])", loop=asyncio.new_event_loop())
    theirs = aioimaplib.FetchCommand("A1", "1", "(BODY[])", loop=ours._loop)
    try:
        for part in (lines[:split], lines[split:]):  # asked midway and at the end
            ours._resp_lines.extend(part)
            theirs._resp_lines.extend(part)
            assert ours.wait_data() == theirs.wait_data()
    finally:
        ours._loop.close()


async def _greet(greeting: bytes) -> tuple[_Protocol, _Transport]:
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop, lambda exc: None)
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(greeting + b"\r\n")
    await asyncio.sleep(0)
    return protocol, transport


def test_capabilities_in_the_greeting_spare_a_capability_command() -> None:
    async def check() -> None:
        protocol, transport = await _greet(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID IDLE AUTH=PLAIN] ready."
        )
        await asyncio.wait_for(protocol.greeted, 5)
        assert transport.sent == []  # RFC 3501 7.1: the response code lists them already
        assert protocol.welcome_error is None
        assert protocol.state == aioimaplib.NONAUTH
        assert {"IMAP4rev1", "IDLE", "AUTH=PLAIN"} <= protocol.capabilities
        assert protocol.imap_version == "IMAP4REV1"

    asyncio.run(check())


def test_a_greeting_without_capabilities_still_asks() -> None:
    async def check() -> None:
        protocol, transport = await _greet(b"* OK IMAP4rev1 server ready")
        assert transport.sent
        assert transport.sent[0].split()[1:] == [b"CAPABILITY"]
        tag = transport.sent[0].split()[0]
        protocol.data_received(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
        await asyncio.wait_for(protocol.greeted, 5)
        assert protocol.welcome_error is None
        assert "IDLE" in protocol.capabilities

    asyncio.run(check())


def test_a_bye_greeting_is_an_error_whatever_it_lists() -> None:
    async def check() -> None:
        protocol, transport = await _greet(b"* BYE [CAPABILITY IMAP4rev1] too many connections")
        await asyncio.wait_for(protocol.greeted, 5)
        assert protocol.welcome_error is not None
        assert transport.sent == []

    asyncio.run(check())


def _tls_account(name: str, ca_file: Path | None) -> Any:
    from mailbridge.config import parse_config

    imap: dict[str, Any] = {"host": "imap.example.com", "tls": "implicit"}
    if ca_file is not None:
        imap["ca_file"] = str(ca_file)
    account = {"name": name, "address": f"{name}@example.com", "imap": imap}
    account["auth"] = {"username": name, "password": "pw"}
    return parse_config({"accounts": [account]}).accounts[0]


def test_one_tls_context_serves_every_connection_until_its_ca_file_changes(
    tmp_path: Path,
) -> None:
    from mailbridge.mail.imap import _ssl_context

    # The system store: built once for a fleet, not per connect.
    assert _ssl_context(_tls_account("a", None)) is _ssl_context(_tls_account("b", None))
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    first = _ssl_context(_tls_account("a", ca))
    assert _ssl_context(_tls_account("b", ca)) is first
    trustme.CA().cert_pem.write_to_path(str(ca))  # replaced (a renewed CA): read again
    assert _ssl_context(_tls_account("a", ca)) is not first
