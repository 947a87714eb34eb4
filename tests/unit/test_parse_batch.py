"""The daemon's parse step (``_parse_batch``, the parser plus the classifier that turns a bad
message into a failure for the Failed folder), on any bytes, on a thread and on the pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbridge.daemon import parsing
from mailbridge.daemon.account import _parse_batch
from mailbridge.errors import CATALOGUE
from mailbridge.mail.imap import FetchedMessage

HEADERISH = st.lists(
    st.sampled_from(
        [
            b"From: ",
            b"Subject: ",
            b"Message-ID: <",
            b">",
            b"Content-Type: multipart/mixed; ",
            b'boundary="b"',
            b"\r\n",
            b"\r\n\r\n",
            b"--b",
            b"=?utf-8?B?",
            b"?=",
            b"\xff\xfe",
            b"\x00",
        ]
    )
    | st.binary(max_size=30),
    max_size=40,
).map(b"".join)


def fetched(raw: bytes, uid: int = 1) -> FetchedMessage:
    return FetchedMessage(uid=uid, raw=raw, internaldate=None, flags=frozenset())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000) | HEADERISH)
def test_any_bytes_become_a_model_or_a_typed_failure(raw: bytes) -> None:
    items, failures = _parse_batch([fetched(raw)], 10_000_000)
    assert len(items) + len(failures) == 1
    if failures:
        failure = failures[0]
        assert failure.code in CATALOGUE  # a catalogue code: the message goes to Failed
        assert failure.uid == 1
        assert failure.message_key
        assert failure.size == len(raw)
    else:
        assert items[0].uid == 1
        assert items[0].message.message_key


@pytest.fixture
def pool() -> Iterator[None]:
    if parsing.pool_workers() == 0:
        pytest.skip("a single CPU: the daemon never starts a parse pool here")
    yield
    parsing.shutdown_pool()


async def test_pool_gives_the_thread_results_in_order(pool: None) -> None:
    raws = [
        b"From: a@example.com\r\nMessage-ID: <m%d@example.com>\r\nSubject: %d\r\n\r\nbody\r\n"
        % (n, n)
        for n in range(40)
    ]
    raws[7] = b""  # unparseable
    raws[21] = b"\x00\xff garbage"
    batch = [fetched(raw, uid=n + 1) for n, raw in enumerate(raws)]
    assert len(batch) >= parsing.POOL_MIN_BATCH

    items, failures = await parsing.parse_off_loop(_parse_batch, batch, 10_000_000)
    expected_items, expected_failures = _parse_batch(batch, 10_000_000)

    assert parsing._pool is not None, "a batch this big goes to the pool"
    assert [i.uid for i in items] == [i.uid for i in expected_items]
    assert [i.message.message_key for i in items] == [i.message.message_key for i in expected_items]
    assert [(f.uid, f.code) for f in failures] == [(f.uid, f.code) for f in expected_failures]


async def test_parse_workers_import_the_parser_not_the_daemon(pool: None) -> None:
    # A worker that imported mailbridge.daemon.account (pydantic config, SQLite, the IMAP
    # client, rich) took ~0.9 s to start on a busy machine before parsing the first message.
    from mailbridge.daemon.parse_step import portable

    raws = [b"From: a@example.com\r\nSubject: %d\r\n\r\nbody\r\n" % n for n in range(20)]
    batch = portable(fetched(raw, uid=n + 1) for n, raw in enumerate(raws))
    parsing.warm_up_pool()
    items, failures = await parsing.parse_off_loop(_parse_batch, batch, 10_000_000)
    assert (len(items), failures) == (20, [])
    assert parsing._pool is not None
    loaded = parsing._pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=60)
    assert "mailbridge.core.parse" in loaded
    heavy = {"mailbridge.daemon.account", "mailbridge.mail.imap", "mailbridge.config"}
    assert heavy.isdisjoint(loaded)
    assert not {"pydantic", "sqlite_utils", "aioimaplib", "rich"} & {
        name.split(".")[0] for name in loaded
    }


def test_a_bug_in_the_automatic_and_bounce_analysis_fails_that_message_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """core/policy.analyse (automatic and bounce detection) runs in the parse step too: a bug in
    it must fail that one message (code internal, to Failed with its traceback), not raise out
    of the batch - which stopped the account's loop on every pass, the message never moved."""
    from mailbridge.daemon import parse_step

    real = parse_step.analyse

    def analyse(raw: bytes, message: object) -> object:
        if b"trigger" in raw:
            raise IndexError("a detector's bug")
        return real(raw, message)  # type: ignore[arg-type]

    monkeypatch.setattr(parse_step, "analyse", analyse)
    good = b"From: a@example.com\r\nMessage-ID: <good@example.com>\r\nSubject: ok\r\n\r\nhi\r\n"
    bad = b"From: b@example.com\r\nMessage-ID: <bad@example.com>\r\nSubject: trigger\r\n\r\nx\r\n"
    items, failures = _parse_batch([fetched(good, uid=1), fetched(bad, uid=2)], 10_000_000)
    assert [item.uid for item in items] == [1]
    assert [(f.uid, f.code, f.message_id) for f in failures] == [(2, "internal", "bad@example.com")]
    assert failures[0].traceback is not None
    assert "IndexError" in failures[0].traceback
