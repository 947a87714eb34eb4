"""The outbox's pure rules (core/outbox.py) and its repository methods (store/outboxsql.py),
the latter on every backend (SQLite, and PostgreSQL on the session's throwaway cluster)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.identify import new_conversation_key
from mailbridge.core.outbox import (
    MessageAction,
    OutgoingFile,
    address_entry,
    address_of,
    address_problem,
    after_failure,
    build_message,
    check_actions,
    envelope_recipients,
    not_addresses,
    parse_actions,
    recipient_problem,
    recovered_state,
    reply_subject,
    retry_delay,
    sender_display_name,
    split_addresses,
)
from mailbridge.store.outbox import OutboxFile, OutboxFix, OutgoingRequest
from mailbridge.store.postgres import PostgresRepository
from mailbridge.store.sqlite import SqliteRepository
from tests.conftest import PostgresDatabase

Store = SqliteRepository | PostgresRepository
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_retry_delay_starts_at_30_seconds_and_grows_to_hourly() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1920, 3600]
    assert retry_delay(1000) == 3600


@given(st.integers(min_value=1, max_value=10_000))
def test_retry_delay_never_shrinks_and_stays_within_bounds(attempts: int) -> None:
    assert 30 <= retry_delay(attempts) <= 3600
    assert retry_delay(attempts + 1) >= retry_delay(attempts)


def test_a_permanent_failure_fails_at_once() -> None:
    decision = after_failure(
        code="message_rejected", permanent=True, attempts=1, created=NOW, now=NOW,
        max_age=timedelta(hours=72),
    )  # fmt: skip
    assert (decision.state, decision.next_attempt, decision.code) == (
        "failed",
        None,
        "message_rejected",
    )


def test_a_temporary_failure_is_retried_until_the_row_is_too_old() -> None:
    young = after_failure(
        code="send_deferred", permanent=False, attempts=1, created=NOW, now=NOW,
        max_age=timedelta(hours=72),
    )  # fmt: skip
    assert young.state == "queued"
    assert young.next_attempt == NOW + timedelta(seconds=30)
    old = after_failure(
        code="unreachable", permanent=False, attempts=80, created=NOW,
        now=NOW + timedelta(hours=71, minutes=30), max_age=timedelta(hours=72),
    )  # fmt: skip
    assert (old.state, old.code) == ("failed", "send_expired")


def test_recovery_resends_unless_found_in_sent() -> None:
    assert recovered_state(True) == "sent"
    assert recovered_state(False) == "queued"
    assert recovered_state(None) == "queued"


def test_address_columns_and_envelope() -> None:
    assert split_addresses("a@x.example, Jane Doe <JANE@y.example>, not-an-address") == [
        "a@x.example",
        "Jane Doe <JANE@y.example>",
    ]
    assert split_addresses(None) == []
    message = build_message(
        address="support@example.test",
        display_name="Support",
        identification="message_id",
        conversation_key=new_conversation_key(),
        subject="Hi",
        to=["Jane <jane@y.example>"],
        cc=["a@x.example", "support@example.test"],  # own address: dropped
        text="hello",
    )
    assert envelope_recipients(message, ["Boss <boss@z.example>", "jane@y.example"]) == [
        "jane@y.example",
        "a@x.example",
        "boss@z.example",
    ]
    assert "boss" not in message.as_string()  # Bcc never in a header


def test_reply_subject_and_sender_name() -> None:
    assert reply_subject("Order 1042") == "Re: Order 1042"
    assert reply_subject("AW: Re: Order 1042") == "Re: Order 1042"
    assert sender_display_name("Support", "Jane Doe", personalized=True) == "Jane Doe - Support"
    assert sender_display_name("Support", "Jane Doe", personalized=False) == "Support"
    assert sender_display_name("Support", "", personalized=True) == "Support"


def test_html_only_gets_a_text_part_and_attachments_are_attached() -> None:
    message = build_message(
        address="support@example.test",
        display_name="",
        identification="message_id",
        conversation_key=new_conversation_key(),
        subject="Invoice",
        to=["jane@y.example"],
        html="<p>Your <b>invoice</b> is attached.</p>",
        files=[OutgoingFile("invoice.pdf", "application/pdf", b"%PDF-1.4")],
    )
    plain = message.get_body(("plain",))
    assert plain is not None
    assert "invoice" in plain.get_content()
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "invoice.pdf"
    assert attachment.get_content() == b"%PDF-1.4"
    with pytest.raises(ValueError, match="neither"):
        build_message(
            address="support@example.test", display_name="", identification="message_id",
            conversation_key=new_conversation_key(), subject="x", to=["a@b.example"],
        )  # fmt: skip


def test_message_actions_parse_and_check() -> None:
    actions = parse_actions('{"ticket": {"status": "waiting_customer", "priority": 2}}')
    assert actions == [
        MessageAction("ticket", "status", "waiting_customer"),
        MessageAction("ticket", "priority", 2),
    ]
    assert check_actions(actions, {"ticket": frozenset({"status", "priority"})}) is None
    assert "not a column" in (check_actions(actions, {"ticket": frozenset({"status"})}) or "")
    assert "no record" in (check_actions(actions, {}) or "")
    assert parse_actions(None) == []
    for bad, words in (
        ("{", "not JSON"),
        ("[1]", "JSON object"),
        ('{"ticket": {"id": 1}}', "not a settable column"),
        ('{"Ticket; DROP": {"a": 1}}', "not a table name"),
        ('{"ticket": {"status": [1]}}', "text or a number"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_actions(bad)


# -- the repository ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated repository on each backend."""
    store: Store
    if request.param == "postgres":
        database: PostgresDatabase = request.getfixturevalue("postgres_database")
        store = PostgresRepository(database.url, password=database.password)
    else:
        store = SqliteRepository(tmp_path / "m.db")
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def test_prepare_fixes_the_message_once(repo: Store) -> None:
    outbox_id = repo.queue_outgoing(
        OutgoingRequest(account="a", to="x@y.example", subject="s", body_text="b"),
        [OutboxFile("f.txt", "text/plain", None, b"data")],
    )
    assert repo.outbox_begin([(outbox_id, OutboxFix("id-1@x", "k" * 16, b"first"))], NOW) == {
        outbox_id
    }
    repo.outbox_failed_attempt(
        outbox_id, state="queued", next_attempt=None, code="timeout", error="t", now=NOW
    )
    assert not repo.outbox_begin([(outbox_id, OutboxFix("id-2@x", "k" * 16, b"second"))], NOW)
    row = repo.outbox_row(outbox_id)
    assert row is not None
    assert (row.message_id, row.raw, row.state, row.files) == ("id-1@x", b"first", "queued", 1)
    assert repo.outbox_files(outbox_id) == [OutboxFile("f.txt", "text/plain", None, b"data")]


def test_state_transitions(repo: Store) -> None:
    outbox_id = repo.queue_outgoing(OutgoingRequest(account="a", to="x@y.example", body_text="b"))
    assert [r.id for r in repo.outbox_due(["a"], NOW + timedelta(days=1), 10)] == [outbox_id]
    assert repo.outbox_due(["other"], NOW + timedelta(days=1), 10) == []
    assert repo.outbox_begin([(outbox_id, None)], NOW) == {outbox_id}
    assert repo.outbox_begin([(outbox_id, None)], NOW) == set()  # only from queued
    assert [r.id for r in repo.outbox_in_flight(["a"])] == [outbox_id]
    assert not repo.outbox_cancel(outbox_id)  # not while sending
    repo.outbox_failed_attempt(
        outbox_id, state="queued", next_attempt=NOW + timedelta(seconds=30),
        code="send_deferred", error="451 later", now=NOW,
    )  # fmt: skip
    row = repo.outbox_row(outbox_id)
    assert row is not None
    assert (row.state, row.attempts, row.last_error) == ("queued", 1, "451 later")
    assert repo.outbox_due(["a"], NOW, 10) == []  # not due before next_attempt
    assert repo.outbox_next_due(["a"]) == NOW + timedelta(seconds=30)
    assert not repo.outbox_retry(outbox_id)  # only failed or cancelled rows
    assert repo.outbox_cancel(outbox_id)
    assert repo.outbox_retry(outbox_id)
    assert [r.state for r in repo.outbox(states=["queued"])] == ["queued"]


def test_released_rows_are_queued_again_without_the_attempt_counted(repo: Store) -> None:
    """Rows marked sending that were not attempted after all (the daemon stopping, a lease
    lost, a connection over the server's limit) go back to queued, due at once, their
    attempt not counted, with the reason; rows in another state are left alone."""
    ids = [
        repo.queue_outgoing(OutgoingRequest(account="a", to="x@y.example", body_text="b"))
        for _ in range(3)
    ]
    assert repo.outbox_begin([(i, None) for i in ids[:2]], NOW) == set(ids[:2])
    repo.outbox_release(
        [ids[0], ids[2]], code="connection_limit", error="not attempted: 432", now=NOW
    )
    released, sending, queued = (repo.outbox_row(i) for i in ids)
    assert released is not None
    assert (released.state, released.attempts, released.next_attempt) == ("queued", 0, None)
    assert (released.last_error_code, released.last_error) == (
        "connection_limit",
        "not attempted: 432",
    )
    assert sending is not None
    assert (sending.state, sending.attempts) == ("sending", 1)
    assert queued is not None
    assert (queued.state, queued.attempts, queued.last_error_code) == ("queued", 0, None)
    repo.outbox_release([], code="x", error="x", now=NOW)  # nothing to do


def test_due_rows_are_bounded_by_the_bytes_of_their_stored_messages(repo: Store) -> None:
    """Retried rows carry their stored message: a batch takes rows in id order while the
    bytes of the rows before each stay under the budget (the first row always; rows without
    a stored message weigh nothing)."""
    sizes = [0, 400, 0, 300, 500, 0]  # 0: a first attempt (no stored message yet)
    ids = [
        repo.queue_outgoing(OutgoingRequest(account="a", to="x@y.example", body_text="b"))
        for _ in sizes
    ]
    fixes = [
        (i, OutboxFix(f"m{i}@x.example", new_conversation_key(), b"x" * size))
        for i, size in zip(ids, sizes, strict=True)
        if size
    ]
    assert repo.outbox_begin(fixes, NOW) == {i for i, _f in fixes}
    for outbox_id, _fix in fixes:
        repo.outbox_failed_attempt(
            outbox_id, state="queued", next_attempt=None, code="x", error="x", now=NOW
        )
    later = NOW + timedelta(days=1)
    assert [r.id for r in repo.outbox_due(["a"], later, 10)] == ids
    # Before each row: 0, 0, 400, 400, 700, 1200 bytes.
    assert [r.id for r in repo.outbox_due(["a"], later, 10, 700)] == ids[:4]
    assert [r.id for r in repo.outbox_due(["a"], later, 10, 701)] == ids[:5]
    assert [r.id for r in repo.outbox_due(["a"], later, 3, 10_000)] == ids[:3]  # the limit too
    # A message larger than the budget still goes, with the rows before it weighing nothing.
    big = repo.outbox_due(["a"], later, 10, 1)
    assert [len(r.raw or b"") for r in big] == [0, 400]


def test_snippets_list_pinned_first_and_count_uses(repo: Store) -> None:
    with repo._sql("seed snippets", write=True) as sql:
        sql.executemany(
            "INSERT INTO textsnippet (name, text, description, pinned, status)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                ("apology", "Sorry for the wait.", "delay", 0, "active"),
                ("thanks", "Thank you!", "closing", 1, "active"),
                ("old", "Obsolete", "retired", 1, "inactive"),
            ],
        )
    assert [s.name for s in repo.snippets()] == ["thanks", "apology"]
    assert [s.name for s in repo.snippets("WAIT")] == ["apology"]  # case-insensitive
    assert [s.name for s in repo.snippets("100%")] == []  # % is a character, not a wildcard
    used = repo.use_snippet("apology", NOW)
    assert used is not None
    assert (used.count, used.last_used) == (1, NOW)
    assert repo.use_snippet("old", NOW) is None  # inactive


@given(st.integers(min_value=0, max_value=200))
def test_pipeline_chunks_start_with_one_row_and_grow_to_the_limit(count: int) -> None:
    from types import SimpleNamespace

    from mailbridge.daemon.outbox import PIPELINE_CHUNK, pipeline_chunks

    rows: list[Any] = [SimpleNamespace(id=n, files=0) for n in range(count)]
    chunks = pipeline_chunks(rows)
    assert [r for chunk in chunks for r in chunk] == rows  # every row once, in order
    sizes = [len(c) for c in chunks]
    assert sizes[:1] == ([1] if count else [])
    assert all(size <= PIPELINE_CHUNK for size in sizes)
    pairs = list(itertools.pairwise(sizes))
    assert all(b == min(2 * a, PIPELINE_CHUNK) for a, b in pairs[:-1])  # the last may be short
    assert all(b <= min(2 * a, PIPELINE_CHUNK) for a, b in pairs[-1:])


@given(st.lists(st.booleans(), max_size=80))
def test_a_row_with_attachments_is_a_chunk_of_its_own(with_files: list[bool]) -> None:
    from types import SimpleNamespace

    from mailbridge.daemon.outbox import PIPELINE_CHUNK, pipeline_chunks

    rows: list[Any] = [SimpleNamespace(id=n, files=int(f)) for n, f in enumerate(with_files)]
    chunks = pipeline_chunks(rows)
    assert [r for chunk in chunks for r in chunk] == rows  # every row once, in order
    assert all(chunk for chunk in chunks)
    assert all(len(chunk) <= PIPELINE_CHUNK for chunk in chunks)
    assert all(len(chunk) == 1 for chunk in chunks if any(r.files for r in chunk))
    assert len(chunks[0]) == 1 if rows else chunks == []


def test_values_that_are_not_addresses_are_named() -> None:
    good = ["ann@x.example", "Ann Lee <ann@x.example>", "a@x.example, B <b@y.example>"]
    assert not_addresses(good) == []
    bad = ["not an address", "bob@", "@x.example", "a@b@c.example", "", "ann@x.example, nobody"]
    assert not_addresses([*good, *bad]) == bad


def test_an_internationalised_domain_is_sent_as_its_a_label() -> None:
    # RFC 5890: SMTP without SMTPUTF8, and a header, carry the A-label.
    assert split_addresses("Jö <jo@exämple.com>, ann@bücher.example") == [
        "Jö <jo@xn--exmple-cua.com>",
        "ann@xn--bcher-kva.example",
    ]
    # IDNA 2008 (UTS 46, non-transitional): ß and final sigma are kept, not mapped to another
    # domain as the stdlib's IDNA 2003 codec does (strasse.de belongs to someone else).
    assert split_addresses("jo@straße.de, ann@ςx.example") == [
        "jo@xn--strae-oqa.de",
        "ann@xn--x-xmb.example",
    ]
    assert recipient_problem({"toaddresses": "jo@straße.de"}) is None


@pytest.mark.parametrize(
    ("columns", "said"),
    [
        ({"toaddresses": "jo@customer.example, bob"}, "toaddresses: 'bob': not an email address"),
        ({"toaddresses": "Doe, Jo <jo@customer.example>"}, "must be quoted"),
        ({"toaddresses": "not an address"}, "not an email address"),
        ({"toaddresses": "bob@@x.example"}, "not an email address"),
        ({"ccaddresses": "zoë@example.org"}, "ccaddresses: 'zoë@example.org': a non-ASCII local"),
        ({"toaddresses": "a@x.example", "bccaddresses": "b@"}, "bccaddresses: 'b@'"),
    ],
)
def test_a_row_with_an_entry_that_cannot_be_sent_to_is_refused_naming_it(
    columns: dict[str, str | None], said: str
) -> None:
    problem = recipient_problem(columns)
    assert problem is not None
    assert said in problem


@pytest.mark.parametrize(
    "columns",
    [
        {"toaddresses": "a@x.example, Jane Doe <JANE@y.example>", "ccaddresses": None},
        {"toaddresses": '"Doe, Jo" <jo@customer.example>', "ccaddresses": ""},
        {"toaddresses": "jo@exämple.com", "bccaddresses": "  "},  # an IDNA domain
        {"toaddresses": None, "ccaddresses": None, "bccaddresses": None},  # a reply
    ],
)
def test_rows_that_can_be_sent_pass(columns: dict[str, str | None]) -> None:
    assert recipient_problem(columns) is None


@given(st.emails())
def test_every_valid_email_address_can_be_sent_to(address: str) -> None:
    assert address_problem(address) is None
    assert recipient_problem({"toaddresses": address}) is None
    assert split_addresses(address) == [address]


def test_names_with_specials_stay_one_address() -> None:
    """RFC 5322 section 3.2.4: "Doe, Jane" is one quoted display name, not two entries."""
    assert address_entry("jane@x.example", "Doe, Jane") == '"Doe, Jane" <jane@x.example>'
    assert address_entry("a@x.example", 'Ann "A." Bee\\') == '"Ann \\"A.\\" Bee\\\\" <a@x.example>'
    assert address_entry("a@x.example", "Ann Bee") == "Ann Bee <a@x.example>"
    assert address_entry("a@x.example") == "a@x.example"
    column = '"Doe, Jane" <jane@x.example>, "Bäcker, Jörg" <JB@y.example>, bob@z.example'
    entries = split_addresses(column)
    assert entries == [
        '"Doe, Jane" <jane@x.example>',
        '"Bäcker, Jörg" <JB@y.example>',
        "bob@z.example",
    ]
    assert [address_of(e) for e in entries] == ["jane@x.example", "jb@y.example", "bob@z.example"]
    for name in ("Doe, Jane", 'Ann "A." Bee\\', "a (b) <c> [d]: e; f@g", "Bäcker, Jörg"):
        assert getaddresses([address_entry("a@x.example", name)]) == [(name, "a@x.example")]


@given(
    st.lists(st.one_of(st.none(), st.integers(min_value=1, max_value=6)), max_size=60),
    st.integers(min_value=1, max_value=5),
)
def test_lane_rows_keep_a_conversation_in_one_lane_in_order(
    conversations: list[int | None], lanes: int
) -> None:
    from types import SimpleNamespace

    from mailbridge.daemon.outbox import lane_rows

    rows: list[Any] = [
        SimpleNamespace(id=n, conversation_id=c) for n, c in enumerate(conversations)
    ]
    shares = lane_rows(rows, lanes)
    assert len(shares) <= lanes
    assert all(shares)  # no lane without rows
    assert sorted(r.id for share in shares for r in share) == list(range(len(rows)))  # each once
    for share in shares:
        assert [r.id for r in share] == sorted(r.id for r in share)  # in the order queued
    lane_of = {r.id: n for n, share in enumerate(shares) for r in share}
    for conversation in {c for c in conversations if c is not None}:
        assert len({lane_of[r.id] for r in rows if r.conversation_id == conversation}) == 1
    if all(c is None for c in conversations):  # rows of new conversations: shared evenly
        sizes = [len(share) for share in shares]
        assert not sizes or max(sizes) - min(sizes) <= 1
        assert len(shares) == min(lanes, len(rows))


@pytest.mark.parametrize(
    ("reply", "limit"),
    [
        ("432 4.3.2 Concurrent connections limit exceeded", True),  # Exchange Online
        ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", True),
        ("421 4.7.0 Error: too many connections from 192.0.2.1", True),  # Postfix
        ("421 Too many concurrent SMTP connections; please try again later.", True),
        ("451 4.3.0 Temporary local problem, try again later", False),
        ("421 4.3.2 Service not available, closing transmission channel", False),
        ("452 4.3.1 Insufficient system storage", False),
        ("550 5.3.2 too many connections", False),  # permanent: never a lane's limit
        ("535 5.7.8 Authentication credentials invalid", False),
        ("", False),
    ],
)
def test_a_reply_over_the_limit_of_connections_is_told(reply: str, limit: bool) -> None:
    from mailbridge.core.outbox import connection_limit_reply

    assert connection_limit_reply(reply) is limit
