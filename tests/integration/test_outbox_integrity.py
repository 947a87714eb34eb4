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

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

from mailbridge.config import PostgresUrl, Settings, parse_config
from mailbridge.store.factory import connector
from mailbridge.testing.smtpsink import SmtpSink
from tests.conftest import PostgresDatabase
from tests.integration.test_outbox import offline_config, parsed, send_pass
from tests.integration.test_outbox import sink as sink  # the SMTP sink fixture, shared

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
    secret = tmp_path / "db.pw"
    secret.write_text(postgres_database.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    data: dict[str, Any] = offline_config(tmp_path, sink)
    data.update(database=postgres_database.url, database_password_file=str(secret))
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
