"""``SmtpSender.send`` against a real SMTP server (aiosmtpd, :class:`SmtpSink`): the mail
transaction of RFC 5321 section 3.3 sent command by command, its refusals mapped to
:class:`SendError`, and envelope addresses that could inject SMTP parameters or commands refused
before MAIL FROM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.protocol import normalize_message_line_endings

from mailbridge.config import AccountSettings, parse_config
from mailbridge.mail.smtp import SendError, SmtpSender
from mailbridge.testing.dovecot import free_port
from mailbridge.testing.smtpsink import SmtpSink
from tests.integration.test_outbox import sink as sink  # the SMTP sink fixture, shared

SUPPORT = "support@example.test"
RAW = (
    b"From: Support <support@example.test>\n"
    b"To: customer@example.org\n"
    b"Subject: Hello\n"
    b"\n"
    b"Line one\n"
    b".a line starting with a dot\n"
    b"Last line"
)


def account_for(sink: SmtpSink, tmp_path: Path) -> AccountSettings:
    settings = parse_config(
        {
            "database": str(tmp_path / "mailbridge.db"),
            "recovery": {"enabled": False},
            "accounts": [
                {
                    "name": "support",
                    "address": SUPPORT,
                    "imap": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
                    "smtp": sink.smtp_settings(),
                    "auth": {"username": "support", "password": "smtp-send-pw"},
                }
            ],
        }
    )
    return settings.accounts[0]


@pytest.fixture
def opened(tmp_path: Path) -> Callable[[SmtpSink], Any]:
    async def open_sender(server: SmtpSink) -> SmtpSender:
        return await SmtpSender.open(account_for(server, tmp_path))

    return open_sender


@pytest.fixture
async def sender(sink: SmtpSink, tmp_path: Path) -> AsyncIterator[SmtpSender]:
    opened = await SmtpSender.open(account_for(sink, tmp_path))
    try:
        yield opened
    finally:
        await opened.close()


def record_commands(sender: SmtpSender, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The verbs of the commands the sender's client sends from now on (DATA not included)."""
    client = sender._client
    sent: list[bytes] = []
    execute = client.execute_command

    async def spy(*args: bytes, **kwargs: Any) -> Any:
        sent.append(args[0])
        return await execute(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", spy)
    return sent


@pytest.mark.parametrize(
    ("envelope_sender", "recipient"),
    [
        (SUPPORT, "x@example.org> NOTIFY=NEVER"),
        (SUPPORT, "x@example.org\r\nRCPT TO:<other@example.org>"),
        (SUPPORT, "x@example.org\nRSET"),
        (SUPPORT, "x@example.org\x00"),
        (SUPPORT, "<x@example.org>"),
        (SUPPORT, "x @example.org"),
        (SUPPORT, "x@example.org\t"),
        (SUPPORT, 'x"@example.org'),
        (SUPPORT, '"x"@example.org> NOTIFY=NEVER'),
        (SUPPORT, '"x\r\nRSET"@example.org'),
        (SUPPORT, '"x\x00"@example.org'),
        ("support@example.test> SIZE=1", "x@example.org"),
        ("support@example.test\r\nRSET", "x@example.org"),
    ],
)
async def test_an_address_that_could_inject_smtp_is_refused_before_mail_from(
    sink: SmtpSink,
    sender: SmtpSender,
    monkeypatch: pytest.MonkeyPatch,
    envelope_sender: str,
    recipient: str,
) -> None:
    commands = record_commands(sender, monkeypatch)
    with pytest.raises(SendError) as refused:
        await sender.send(RAW, envelope_sender, ["fine@example.org", recipient])
    assert refused.value.code == "outbox_invalid"
    assert refused.value.permanent
    assert commands == []  # not even MAIL FROM
    assert sink.rcpt_replies == []
    # The connection carries the next message.
    assert sender.usable
    assert await sender.send(RAW, SUPPORT, ["next@example.org"]) == {}
    assert commands == [b"MAIL", b"RCPT"]
    [received] = sink.received
    assert received.sender == SUPPORT
    assert received.recipients == ("next@example.org",)


async def test_a_quoted_local_part_goes_out_as_written(sink: SmtpSink, sender: SmtpSender) -> None:
    assert await sender.send(RAW, SUPPORT, ['"john doe"@example.org', "jo@example.org"]) == {}
    [received] = sink.received
    assert received.recipients == ('"john doe"@example.org', "jo@example.org")


async def test_the_message_arrives_as_sendmail_sent_it(sink: SmtpSink, sender: SmtpSender) -> None:
    """Line endings as CRLF, a leading dot stuffed on the wire and removed by the server."""
    assert await sender.send(RAW, SUPPORT, ["customer@example.org"]) == {}
    [received] = sink.received
    assert received.data == normalize_message_line_endings(RAW)
    assert received.sender == SUPPORT


async def test_a_partly_refused_envelope_returns_the_refused_recipients(
    sink: SmtpSink, sender: SmtpSender
) -> None:
    sink.rcpt_replies.append("550 5.1.1 <gone@example.org>: no such user")
    refused = await sender.send(RAW, SUPPORT, ["gone@example.org", "here@example.org"])
    assert refused == {"gone@example.org": "550 5.1.1 <gone@example.org>: no such user"}
    [received] = sink.received
    assert received.recipients == ("here@example.org",)
    assert sender.usable


@pytest.mark.parametrize(
    ("replies", "permanent", "code"),
    [
        (["550 5.1.1 No such user", "553 5.1.3 Bad address"], True, "message_rejected"),
        (["550 5.1.1 No such user", "450 4.2.1 Mailbox busy"], False, "send_deferred"),
        (["451 4.3.0 Try again later"], False, "send_deferred"),
    ],
)
async def test_every_recipient_refused_is_a_send_error_permanent_only_if_all_5xx(
    sink: SmtpSink,
    sender: SmtpSender,
    monkeypatch: pytest.MonkeyPatch,
    replies: list[str],
    permanent: bool,
    code: str,
) -> None:
    commands = record_commands(sender, monkeypatch)
    recipients = [f"r{n}@example.org" for n in range(len(replies))]
    sink.rcpt_replies.extend(replies)
    with pytest.raises(SendError) as refused:
        await sender.send(RAW, SUPPORT, recipients)
    assert refused.value.permanent is permanent
    assert refused.value.code == code
    assert refused.value.reply == "; ".join(
        f"{r}: {reply}" for r, reply in zip(recipients, replies, strict=True)
    )
    # As aiosmtplib's sendmail: RSET ends the transaction; then the sender closes (QUIT).
    assert commands == [b"MAIL", *[b"RCPT"] * len(replies), b"RSET", b"QUIT"]
    assert not sender.usable
    assert sink.received == []


@pytest.mark.parametrize(
    ("reply", "permanent", "code"),
    [
        ("451 4.3.0 Try again later", False, "send_deferred"),
        ("554 5.7.1 Message rejected as spam", True, "message_rejected"),
    ],
)
async def test_a_refusal_of_data_is_mapped_as_before(
    sink: SmtpSink,
    sender: SmtpSender,
    monkeypatch: pytest.MonkeyPatch,
    reply: str,
    permanent: bool,
    code: str,
) -> None:
    commands = record_commands(sender, monkeypatch)
    sink.replies.append(reply)
    with pytest.raises(SendError) as refused:
        await sender.send(RAW, SUPPORT, ["customer@example.org"])
    assert refused.value.permanent is permanent
    assert refused.value.code == code
    assert refused.value.reply == reply
    assert commands == [b"MAIL", b"RCPT", b"RSET", b"QUIT"]  # DATA goes by SMTP.data
    assert not sender.usable


async def test_size_is_sent_when_the_server_announces_it(
    sink: SmtpSink, sender: SmtpSender
) -> None:
    assert sender._client.supports_extension("size")
    await sender.send(RAW, SUPPORT, ["customer@example.org"])
    [received] = sink.received
    assert received.mail_options == (f"SIZE={len(normalize_message_line_endings(RAW))}",)


async def test_no_size_when_the_server_does_not_announce_it(
    opened: Callable[[SmtpSink], Any],
) -> None:
    server = SmtpSink(data_size_limit=None).start()
    try:
        sender: SmtpSender = await opened(server)
        assert not sender._client.supports_extension("size")
        await sender.send(RAW, SUPPORT, ["customer@example.org"])
        await sender.close()
        [received] = server.received
        assert received.mail_options == ()
    finally:
        server.stop()


async def test_a_message_over_the_announced_size_is_refused_at_mail_from(
    opened: Callable[[SmtpSink], Any],
) -> None:
    server = SmtpSink(data_size_limit=len(RAW)).start()  # CRLF line endings make it larger
    try:
        sender: SmtpSender = await opened(server)
        with pytest.raises(SendError) as refused:
            await sender.send(RAW, SUPPORT, ["customer@example.org"])
        assert refused.value.permanent
        assert refused.value.code == "message_rejected"
        assert refused.value.reply.startswith("552 ")
        assert not sender.usable
        assert server.received == []
    finally:
        server.stop()
