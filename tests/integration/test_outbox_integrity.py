"""What an integrator writes into the outbox is sent whole, or refused visibly.

* The README's outbox examples (a new conversation with attachments), taken from README.md
  itself so that the README cannot drift from what works, run as the shells run them — one
  statement at a time, each committed on its own unless inside BEGIN ... COMMIT — with a worker
  pass after every commit (the worst case: a daemon wakes within milliseconds of each commit).
  Against SQLite and a throwaway PostgreSQL, the mail reaches the SMTP sink (aiosmtpd) with
  both attachments. The naive pattern (two autocommitted INSERTs) is run through the same
  harness as a control: its row goes out without the attachment, which is why the README says
  "a row is sent as soon as it is committed".
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

from mailbridge.config import PostgresUrl, Settings, parse_config
from mailbridge.core.parse import parse_message
from mailbridge.store.base import ImportContext, ImportItem
from mailbridge.store.factory import connector
from mailbridge.store.outbox import OutgoingRequest
from mailbridge.testing.smtpsink import SmtpSink
from tests.conftest import PostgresDatabase
from tests.integration.test_outbox import offline_config, parsed, send_pass
from tests.integration.test_outbox import sink as sink  # the SMTP sink fixture, shared
from tests.integration.test_postgres_outbox import pg_config

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE_DIRECTORY = "/srv/crm/invoices/"  # the README's attachment directory


def readme_sql(label: str) -> list[str]:
    """The ```sql blocks of the README's "The outbox, for integrators" whose first line is a
    comment starting with ``-- {label}``."""
    text = README.read_text(encoding="utf-8")
    start = text.index("### The outbox, for integrators")
    section = text[start : text.index("\n### ", start + 1)]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)
    return [b for b in blocks if b.startswith(f"-- {label}")]


def statements(block: str) -> list[str]:
    """The statements of ``block``, split where SQLite's own tokenizer says one ends (quotes
    and comments respected)."""
    out: list[str] = []
    pending = ""
    for piece in block.split(";")[:-1]:  # the text after the last ';' ends no statement
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    pending += block.rsplit(";", 1)[-1]
    assert not pending.strip(" \n;"), f"an incomplete statement at the end: {pending!r}"
    return out


def invoices(tmp_path: Path) -> Path:
    directory = tmp_path / "invoices"
    directory.mkdir()
    (directory / "1042.pdf").write_bytes(b"%PDF-1.4 invoice 1042")
    (directory / "terms.pdf").write_bytes(b"%PDF-1.4 terms")
    return directory


def localised(block: str, directory: Path) -> str:
    """The block with the README's attachment directory replaced by the test's (nothing else)."""
    assert EXAMPLE_DIRECTORY in block
    return block.replace(EXAMPLE_DIRECTORY, f"{directory}/")


async def run_as_a_shell(
    settings: Settings,
    sql: str,
    execute: Callable[[str], None],
    idle: Callable[[], bool],
) -> int:
    """Run ``sql`` statement by statement; after each one that left no transaction open (it
    committed, or BEGIN ... COMMIT ended), one worker pass. The number of passes."""
    passes = 0
    for statement in statements(sql):
        execute(statement)
        if idle():
            await send_pass(settings)
            passes += 1
    return passes


def migrate(settings: Settings) -> None:
    repo = connector(settings.database, settings.database_password())()
    try:
        repo.migrate()
    finally:
        repo.close()


def assert_sent_with_attachments(sink: SmtpSink, names: list[str]) -> None:
    [received] = sink.received
    message = parsed(received.data)
    assert message["Subject"] == "Your invoice"
    assert received.recipients == ("jo@customer.example",)
    attached = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    expected = {"invoice.pdf": b"%PDF-1.4 invoice 1042", "terms.pdf": b"%PDF-1.4 terms"}
    assert attached == {name: expected[name] for name in names}


def sqlite_settings(tmp_path: Path, sink: SmtpSink, directory: Path) -> Settings:
    data = offline_config(tmp_path, sink)
    data["outbox"]["attachment_directories"] = [str(directory)]
    settings = parse_config(data)
    migrate(settings)
    return settings


async def run_in_sqlite(settings: Settings, sql: str) -> int:
    assert settings.sqlite_path is not None
    conn = sqlite3.connect(settings.sqlite_path, isolation_level=None)  # the shell's autocommit
    try:
        return await run_as_a_shell(
            settings, sql, lambda s: conn.execute(s).close(), lambda: not conn.in_transaction
        )
    finally:
        conn.close()


async def test_the_readmes_sqlite_example_sends_the_row_with_its_attachments(
    tmp_path: Path, sink: SmtpSink
) -> None:
    [block] = readme_sql("SQLite")
    directory = invoices(tmp_path)
    settings = sqlite_settings(tmp_path, sink, directory)
    assert await run_in_sqlite(settings, localised(block, directory)) == 1  # one commit
    assert_sent_with_attachments(sink, ["invoice.pdf", "terms.pdf"])
    assert settings.sqlite_path is not None
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        [(state, threaded_by)] = conn.execute(
            "SELECT o.state, m.threadedby FROM outbox AS o"
            " JOIN conversationmessage AS m ON m.id = o.conversationmessage"
        ).fetchall()
    finally:
        conn.close()
    # README: a sent row that starts a conversation is its first message, threadedby 'new'.
    assert (state, threaded_by) == ("sent", "new")


async def test_two_autocommitted_inserts_send_the_row_without_its_attachment(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The control: the pattern the README warns of, through the same harness, loses the
    attachment — so the harness does catch a row committed before its attachments."""
    directory = invoices(tmp_path)
    settings = sqlite_settings(tmp_path, sink, directory)
    naive = (
        "INSERT INTO outbox (account, toaddresses, subject, bodyhtml) VALUES ('support',"
        " 'Jo Doe <jo@customer.example>', 'Your invoice', '<p>Attached.</p>');\n"
        "INSERT INTO outboxattachment (outbox, filename, contenttype, path) VALUES"
        f" (last_insert_rowid(), 'invoice.pdf', 'application/pdf', '{directory}/1042.pdf');\n"
    )
    assert await run_in_sqlite(settings, naive) == 2
    assert_sent_with_attachments(sink, [])


@pytest.mark.postgres
@pytest.mark.parametrize("which", [0, 1], ids=["one-statement", "begin-commit"])
async def test_the_readmes_postgresql_examples_send_the_row_with_its_attachments(
    tmp_path: Path, sink: SmtpSink, postgres_database: PostgresDatabase, which: int
) -> None:
    blocks = readme_sql("PostgreSQL")
    assert len(blocks) == 2
    directory = invoices(tmp_path)
    data = pg_config(tmp_path, postgres_database, sink)
    data["outbox"]["attachment_directories"] = [str(directory)]
    settings = parse_config(data)
    migrate(settings)
    conninfo = make_conninfo("", **PostgresUrl.parse(postgres_database.url).connection_parameters())
    with psycopg.connect(conninfo, password=postgres_database.password, autocommit=True) as conn:
        passes = await run_as_a_shell(
            settings,
            localised(blocks[which], directory),
            lambda s: conn.execute(s.encode()).close(),
            lambda: conn.info.transaction_status == TransactionStatus.IDLE,
        )
        assert passes == 1  # one commit: the WITH statement, or COMMIT
        [(state,)] = conn.execute("SELECT state FROM outbox").fetchall()
    assert state == "sent"
    assert_sent_with_attachments(sink, ["invoice.pdf", "terms.pdf"])


async def test_a_row_inserted_cancelled_is_sent_with_its_attachment_once_queued(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The README's way for a client that cannot use one transaction: insert the row
    ``cancelled`` (never sent), add its attachment, then set it ``queued``; a worker pass after
    every commit sends it only then, whole."""
    directory = invoices(tmp_path)
    settings = sqlite_settings(tmp_path, sink, directory)
    steps = (
        "INSERT INTO outbox (account, toaddresses, subject, bodyhtml, state) VALUES ('support',"
        " 'Jo Doe <jo@customer.example>', 'Your invoice', '<p>Attached.</p>', 'cancelled');\n"
        "INSERT INTO outboxattachment (outbox, filename, contenttype, path) VALUES"
        f" (last_insert_rowid(), 'invoice.pdf', 'application/pdf', '{directory}/1042.pdf');\n"
    )
    assert await run_in_sqlite(settings, steps) == 2
    assert sink.received == []
    await run_in_sqlite(settings, "UPDATE outbox SET state = 'queued' WHERE id = 1;")
    assert_sent_with_attachments(sink, ["invoice.pdf"])


async def test_a_sent_reply_is_stored_threadedby_outbox(tmp_path: Path, sink: SmtpSink) -> None:
    """README: a reply is filed in the conversation it answers (``outbox``); a row that starts
    a conversation is its first message (``new``, the README example's test above)."""
    from mailbridge.store.outbox import OutgoingRequest
    from tests.integration.test_outbox import queue, seed_conversation

    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    queue(settings, OutgoingRequest("support", conversation_id=conversation, body_text="Hi"))
    await send_pass(settings)
    assert settings.sqlite_path is not None
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        found = conn.execute(
            "SELECT m.conversation, m.direction, m.threadedby FROM outbox AS o"
            " JOIN conversationmessage AS m ON m.id = o.conversationmessage"
        ).fetchall()
    finally:
        conn.close()
    assert found == [(conversation, "outgoing", "outbox")]


# -- rows of accounts not in the config --------------------------------------------------------


OLD = timedelta(minutes=11)  # past the grace period of rows of unknown accounts


def insert_rows(
    settings: Settings, accounts: list[str], age: timedelta = timedelta(0)
) -> list[int]:
    """Plain INSERTs of new conversations, as an integrator writes them, ``age`` ago."""
    assert settings.sqlite_path is not None
    created = (datetime.now(UTC) - age).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        ids = [
            int(
                conn.execute(
                    "INSERT INTO outbox (account, toaddresses, subject, bodytext, createdtime)"
                    " VALUES (?, 'jo@customer.example', 'Hi', 'Hello', ?) RETURNING id",
                    (account, created),
                ).fetchone()[0]
            )
            for account in accounts
        ]
        conn.commit()
    finally:
        conn.close()
    return ids


def outbox_rows(settings: Settings) -> dict[int, tuple[str, str | None, str | None]]:
    assert settings.sqlite_path is not None
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        return {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute("SELECT id, state, lasterrorcode, lasterror FROM outbox")
        }
    finally:
        conn.close()


def two_account_settings(tmp_path: Path, sink: SmtpSink) -> Settings:
    """``support`` sends; ``archive`` is configured without smtp (its rows wait, by design)."""
    data = offline_config(tmp_path, sink)
    archive = {k: v for k, v in data["accounts"][0].items() if k != "smtp"}
    archive.update(name="archive", address="archive@example.test")
    data["accounts"].append(archive)
    settings = parse_config(data)
    migrate(settings)
    return settings


async def test_sqlite_fails_rows_of_an_account_not_in_the_config_stored_then_logged(
    tmp_path: Path, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One daemon per SQLite database: its config is the truth, so a row naming an account it
    does not have (a typo, another case) can never be sent: it fails with the reason (before:
    queued forever, no attempt, nothing logged). The log line comes after the stored state."""
    from mailbridge.daemon import outbox as outbox_module

    settings = two_account_settings(tmp_path, sink)
    good, wrong_case, typo, waiting = insert_rows(
        settings, ["support", "Support", "suport", "archive"], age=OLD
    )
    seen: list[tuple[str, list[int], list[str]]] = []  # account, ids logged, their states
    real_log = outbox_module.log

    class Probe:
        def __getattr__(self, level: str) -> Any:
            method = getattr(real_log, level)

            def emit(event: str, **kw: Any) -> Any:
                if event == "outbox_unknown_account":
                    now = outbox_rows(settings)
                    seen.append((kw["account"], kw["outbox"], [now[i][0] for i in kw["outbox"]]))
                return method(event, **kw)

            return emit

    monkeypatch.setattr(outbox_module, "log", Probe())
    await send_pass(settings)  # run --once's worker
    rows = outbox_rows(settings)
    assert rows[good][0] == "sent"
    assert rows[waiting] == ("queued", None, None)  # configured, without smtp: waits
    for outbox_id, account in ((wrong_case, "Support"), (typo, "suport")):
        state, code, error = rows[outbox_id]
        assert (state, code) == ("failed", "outbox_invalid")
        assert error is not None
        assert f"account {account!r} is not in the config" in error
        assert error.endswith("configured: archive, support")
    assert "did you mean 'support'?" in (rows[wrong_case][2] or "")
    assert seen == [("Support", [wrong_case], ["failed"]), ("suport", [typo], ["failed"])]
    assert len(sink.received) == 1


async def test_the_running_daemon_fails_a_row_of_an_unknown_account_inserted_later(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """``run``: a row inserted while the worker sleeps, within a second of its last look, is
    still settled promptly (the look put off is made by a wake-up), not at the next 60 s."""
    from mailbridge.daemon.outbox import OutboxWorker
    from mailbridge.store.factory import open_repository
    from tests.integration.test_import_loop import eventually

    settings = two_account_settings(tmp_path, sink)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    task = asyncio.create_task(worker.run())
    try:
        [first] = insert_rows(settings, ["support"])
        await eventually(lambda: outbox_rows(settings)[first][0] == "sent", what="sent")
        [unknown] = insert_rows(settings, ["Support"], age=OLD)  # within a second of the look
        await eventually(
            lambda: outbox_rows(settings)[unknown][:2] == ("failed", "outbox_invalid"),
            within=15,
            what="the unknown account's row failed",
        )
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()


async def test_a_young_row_of_an_unknown_account_waits_and_run_once_beside_a_daemon_judges_none(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A row for an account not in the config may be for one being added (the config edited,
    the daemon not reloaded yet): it is warned of and waits out the grace period before it
    fails. `run --once` beside a daemon (which may have another config) fails none."""
    from mailbridge.daemon.outbox import wake_address

    settings = two_account_settings(tmp_path, sink)
    assert settings.sqlite_path is not None
    [young] = insert_rows(settings, ["sales"])
    [old] = insert_rows(settings, ["sales"], age=OLD)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(wake_address(settings.sqlite_path))  # a daemon serves the database
        await send_pass(settings)
    rows = outbox_rows(settings)
    assert (rows[young][0], rows[old][0]) == ("queued", "queued")
    await send_pass(settings)  # no daemon: this config is the truth
    rows = outbox_rows(settings)
    assert (rows[young][0], rows[old][:2]) == ("queued", ("failed", "outbox_invalid"))


async def test_a_worker_given_part_of_the_config_judges_no_account(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """``run --account support`` sees only that account of the config: ``archive`` (configured)
    would look unknown, so such a worker fails nobody's rows; ``run`` does it."""
    from mailbridge.daemon.outbox import OutboxWorker
    from mailbridge.daemon.supervisor import _only
    from mailbridge.store.factory import open_repository

    settings = two_account_settings(tmp_path, sink)
    archive, typo = insert_rows(settings, ["archive", "suport"], age=OLD)
    part = frozenset({"support"})
    repo = await open_repository(settings.database, settings)
    try:
        await OutboxWorker(_only(settings, part), repo, only=part).run_once()
    finally:
        await repo.aclose()
    rows = outbox_rows(settings)
    assert (rows[archive][0], rows[typo][0]) == ("queued", "queued")
    await send_pass(settings)
    rows = outbox_rows(settings)
    assert (rows[archive][0], rows[typo][0]) == ("queued", "failed")


@pytest.mark.postgres
async def test_postgresql_warns_of_an_unknown_account_once_and_status_shows_it(
    tmp_path: Path, sink: SmtpSink, postgres_database: PostgresDatabase, capsys: Any
) -> None:
    """Several daemons share a PostgreSQL database and another one's config may name the
    account (a fleet reloading host after host): the rows stay queued, one warning per account
    per run says so with the count and the remedy, and ``status`` shows them."""
    from structlog.testing import capture_logs

    from mailbridge.cli import main as cli_main
    from mailbridge.daemon.outbox import OutboxWorker
    from mailbridge.store.factory import open_repository

    data = pg_config(tmp_path, postgres_database, sink)
    settings = parse_config(data)
    migrate(settings)
    conninfo = make_conninfo("", **PostgresUrl.parse(postgres_database.url).connection_parameters())
    with psycopg.connect(conninfo, password=postgres_database.password, autocommit=True) as conn:
        for account in ("Support", "Support", "billing"):
            conn.execute(
                "INSERT INTO outbox (account, toaddresses, subject, bodytext)"
                " VALUES (%s, 'jo@customer.example', 'Hi', 'Hello')",
                (account,),
            )
    repo = await open_repository(settings.database, settings)
    try:
        worker = OutboxWorker(settings, repo)
        with capture_logs() as logs:
            await worker.run_once()
            assert worker._unknown is not None
            worker._unknown = (0.0, *worker._unknown[1:])  # the next look is due at once
            await worker.run_once()
    finally:
        await repo.aclose()
    warnings = [e for e in logs if e["event"] == "outbox_unknown_account"]
    assert [(w["account"], w["rows"], w["log_level"]) for w in warnings] == [
        ("Support", 2, "warning"),
        ("billing", 1, "warning"),
    ]
    assert "did you mean 'support'?" in warnings[0]["reason"]
    assert "outbox retry" in warnings[0]["remedy"]
    with psycopg.connect(conninfo, password=postgres_database.password, autocommit=True) as conn:
        assert conn.execute("SELECT DISTINCT state FROM outbox").fetchall() == [("queued",)]

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    capsys.readouterr()
    assert cli_main(["-c", str(config), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["outbox_unknown_accounts"] == {"Support": 2, "billing": 1}
    assert cli_main(["-c", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "outbox rows of accounts not in the config" in out
    assert "Support (2 queued), billing (1 queued)" in out


# -- reply --actions checked against the database when queued ---------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_reply_refuses_actions_naming_a_table_or_column_the_worker_would_refuse(
    tmp_path: Path, sink: SmtpSink, capsys: Any, request: pytest.FixtureRequest, backend: str
) -> None:
    """README: exit 64 for ``reply --actions`` the worker would refuse — an unknown column or
    a table the conversation has no parent record in, checked when queued against the database
    by the worker's own rule (before: queued with exit 0, the row failed later)."""
    from mailbridge.cli import main as cli_main
    from tests.integration.test_outbox import seed_conversation

    data = (
        pg_config(tmp_path, request.getfixturevalue("postgres_database"), sink)
        if backend == "postgresql"
        else offline_config(tmp_path, sink)
    )
    data["conversation_parents"] = [
        {"table": "ticket", "properties": [{"column": "status", "default": "new"}]}
    ]
    settings = parse_config(data)
    repo = connector(settings.database, settings.database_password())()
    try:
        repo.migrate()
        repo.prepare(settings.follower_parents, settings.conversation_parents)
    finally:
        repo.close()
    conversation = seed_conversation(settings)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    body = tmp_path / "body.txt"
    body.write_text("Hello", encoding="utf-8")
    reply = ["-c", str(config), "reply", str(conversation), "--body-file", str(body)]

    def queued() -> int:
        repo = connector(settings.database, settings.database_password())()
        try:
            return len(repo.outbox(states=None))
        finally:
            repo.close()

    capsys.readouterr()
    assert cli_main([*reply, "--actions", '{"ticket": {"nosuchcol": 1}}']) == 64
    assert "actions name ticket.nosuchcol, which is not a column" in capsys.readouterr().err
    assert cli_main([*reply, "--actions", '{"invoice": {"status": "paid"}}']) == 64
    err = capsys.readouterr().err
    assert "parent table 'invoice'" in err
    assert "its parents: ticket" in err
    assert queued() == 0
    assert cli_main([*reply, "--actions", '{"ticket": {"status": "waiting_customer"}}']) == 0
    assert queued() == 1
    await send_pass(settings)
    [received] = sink.received
    repo = connector(settings.database, settings.database_password())()
    try:
        [sent] = repo.outbox(states=["sent"])
    finally:
        repo.close()
    assert sent.conversation_id == conversation
    assert received.recipients


# -- recipients that cannot be sent to ----------------------------------------------------------


def queue_request(settings: Settings, request: OutgoingRequest) -> int:
    repo = connector(settings.database)()
    try:
        repo.migrate()
        return repo.queue_outgoing(request)
    finally:
        repo.close()


def queue_reply(settings: Settings, raw: bytes, body: str) -> int:
    """Import the customer's message ``raw`` as the live loop does; queue a reply to it."""
    repo = connector(settings.database)()
    try:
        repo.migrate()
        context = ImportContext.for_account(settings, settings.accounts[0])
        [result] = repo.import_batch(context, [ImportItem(uid=1, message=parse_message(raw))])
        assert result.conversation_id is not None
    finally:
        repo.close()
    request = OutgoingRequest(
        account="support", conversation_id=result.conversation_id, body_text=body
    )
    return queue_request(settings, request)


async def test_a_row_naming_a_recipient_that_cannot_be_sent_to_fails_whole_and_others_go_on(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """An entry that is not an address is never left out silently (the row went to the others,
    `sent`): the row fails as outbox_invalid naming it. A UTF-8 local part (SMTPUTF8, which
    mailbridge does not send) fails the same way instead of an `internal` error that held the
    account's other rows back; an internationalised domain goes out as its A-label."""
    settings = sqlite_settings(tmp_path, sink, invoices(tmp_path))
    assert settings.sqlite_path is not None
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        ids = [
            int(
                conn.execute(
                    "INSERT INTO outbox (account, toaddresses, subject, bodytext)"
                    " VALUES ('support', ?, ?, 'Hello') RETURNING id",
                    (to, subject),
                ).fetchone()[0]
            )
            for to, subject in [
                ("jo@customer.example, bob", "one left out"),
                ("Doe, Jo <jo@customer.example>", "unquoted comma"),
                ("Zoë <zoë@example.org>", "utf-8 local part"),
                ("ann@customer.example", "after them"),
                ("Jö <jo@exämple.com>", "idna domain"),
            ]
        ]
        conn.commit()
    finally:
        conn.close()
    await send_pass(settings)
    rows = outbox_rows(settings)
    left_out, comma, utf8, after, idna = (rows[i] for i in ids)
    for state, code, _error in (left_out, comma, utf8):
        assert (state, code) == ("failed", "outbox_invalid")
    assert "'bob': not an email address" in (left_out[2] or "")
    assert "must be quoted" in (comma[2] or "")
    assert "SMTPUTF8" in (utf8[2] or "")
    assert after[0] == idna[0] == "sent"
    envelopes = sorted(r.recipients for r in sink.received)
    assert envelopes == [("ann@customer.example",), ("jo@xn--exmple-cua.com",)]
    headers = [parsed(r.data)["To"] for r in sink.received]
    assert any("jo@xn--exmple-cua.com" in str(h) for h in headers)


async def test_a_reply_to_a_utf8_address_fails_alone_and_the_accounts_other_mail_goes_out(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A customer wrote from a UTF-8 address (RFC 6532 headers, delivered with SMTPUTF8): the
    reply's envelope cannot be carried without SMTPUTF8, which mailbridge does not send. It
    fails at once as outbox_invalid with that reason, on a connection that stays usable;
    before, an encoding error inside the SMTP client was an `internal` fault of the
    connection, the row was retried and the account's other rows waited for it."""
    settings = sqlite_settings(tmp_path, sink, invoices(tmp_path))
    raw = (
        "From: Zoë <zoë@example.org>\r\nTo: support@example.test\r\nSubject: Hej\r\n"
        "Message-ID: <utf8-1@example.org>\r\nDate: Tue, 01 Dec 2026 09:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHej!\r\n"
    ).encode()
    reply = queue_reply(settings, raw, "Tack!")
    other = queue_request(
        settings,
        OutgoingRequest(
            account="support", to="ann@customer.example", subject="Hi", body_text="Hello"
        ),
    )
    await send_pass(settings)
    rows = outbox_rows(settings)
    assert rows[reply][:2] == ("failed", "outbox_invalid")
    assert "SMTPUTF8" in (rows[reply][2] or "")
    assert rows[other][0] == "sent"
    assert [r.recipients for r in sink.received] == [("ann@customer.example",)]


async def test_a_personalised_reply_with_a_utf8_follower_fails_before_any_copy_goes_out(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Personalised mail sends one copy per recipient: a follower whose address SMTP cannot
    carry (a UTF-8 local part) fails the row before the first copy, not after some copies went
    out (the conversation would then never store the message, and a retry fail the same way).
    A follower on an internationalised domain is written as its A-label."""
    settings = parse_config(offline_config(tmp_path, sink, personalized_emails=True))
    migrate(settings)
    raw = (
        "From: Jo <jo@customer.example>\r\nTo: support@example.test\r\n"
        "Cc: Zoë <zoë@example.org>, Ann <ann@bücher.example>\r\nSubject: Order\r\n"
        "Message-ID: <pers-1@customer.example>\r\nDate: Tue, 01 Dec 2026 09:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
    ).encode()
    reply = queue_reply(settings, raw, "Thanks")
    await send_pass(settings)
    state, code, error = outbox_rows(settings)[reply]
    assert (state, code) == ("failed", "outbox_invalid")
    assert "zoë@example.org" in (error or "")
    assert sink.received == []  # no copy went out
