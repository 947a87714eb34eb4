"""Tests for mailbridge.log: JSON lines off a TTY, console text on one, and redaction of secrets."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import pytest
import structlog
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.typing import EventDict, Processor, WrappedLogger

from mailbridge import log as mblog
from mailbridge.log import (
    bind_contextvars,
    bound_contextvars,
    configure_logging,
    get_logger,
    register_secret,
    reset_logging,
    unregister_secret,
)

REGISTERED = "Tr0ub4dor&3-registered"
KEYED = "value-under-a-password-key"


class FakeTTY(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    yield
    reset_logging()
    unregister_secret(REGISTERED)


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line must be one JSON object


def test_json_when_not_a_tty_carries_bound_context() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)
    logger = get_logger("mailbridge.test")
    with bound_contextvars(account="support"):
        logger.bind(uid=42).info("imported", folder="INBOX")
    logger.info("after")

    first, second = _json_lines(out.getvalue())
    assert first["event"] == "imported"
    assert first["account"] == "support"
    assert first["uid"] == 42
    assert first["folder"] == "INBOX"
    assert first["level"] == "info"
    assert first["logger"] == "mailbridge.test"
    stamp = str(first["timestamp"])
    assert stamp.endswith("Z")  # UTC
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).utcoffset() is not None
    # context bound for a block ends with the block
    assert second["event"] == "after"
    assert "account" not in second


def test_stdlib_records_are_rendered_as_json_too() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    bind_contextvars(account="sales")
    logging.getLogger("aioimaplib.test").debug("sent %s", "CAPABILITY")

    (line,) = _json_lines(out.getvalue())
    assert line["event"] == "sent CAPABILITY"
    assert line["logger"] == "aioimaplib.test"
    assert line["level"] == "debug"
    assert line["account"] == "sales"


def _log_everything_secret() -> None:
    register_secret(REGISTERED)
    logger = get_logger("mailbridge.test")
    logger.info("login", username="support", password=KEYED)
    logger.info("token refreshed", access_token=KEYED, refresh_token=KEYED, client_secret=KEYED)
    logger.info("headers", Authorization=f"Bearer {KEYED}", auth={"token": KEYED, "user": "u"})
    logger.info(f"LOGIN support {REGISTERED}", detail=f'A1 LOGIN "support" "{REGISTERED}"')
    logger.info("bytes", line=b"A1 LOGIN support " + REGISTERED.encode())
    logger.info("nested", trace=[{"sent": REGISTERED}])
    logging.getLogger("aioimaplib").debug("C: LOGIN support %s", REGISTERED)
    try:
        raise RuntimeError(f"server quoted {REGISTERED}")
    except RuntimeError:
        logger.exception("login failed")
    try:
        raise RuntimeError(f"stdlib saw {REGISTERED}")
    except RuntimeError:
        logging.getLogger("aioimaplib").exception("boom")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_never_reach_the_output(fmt: str) -> None:
    out = io.StringIO()
    configure_logging("debug", fmt, stream=out)
    _log_everything_secret()
    text = out.getvalue()

    assert REGISTERED not in text
    assert KEYED not in text
    assert mblog.MASK in text
    # what is not secret survives, so the lines stay useful
    assert "support" in text
    assert "login failed" in text
    assert "RuntimeError" in text


def test_json_masks_by_key_and_by_value() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    register_secret(REGISTERED)
    logger = get_logger("t")
    logger.info("x", password=KEYED, password_file="/etc/mailbridge/support.pw")
    logger.info("y", detail=f"before {REGISTERED} after")

    first, second = _json_lines(out.getvalue())
    assert first["password"] == "***"
    # keys that describe where a secret lives are what an operator needs; they stay readable
    assert first["password_file"] == "/etc/mailbridge/support.pw"
    assert second["detail"] == "before *** after"


def test_short_values_are_not_registered() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    register_secret("abc")
    get_logger("t").info("abc and more abc")
    (line,) = _json_lines(out.getvalue())
    assert line["event"] == "abc and more abc"


def test_console_mode_renders_readable_text_without_colours_off_a_tty() -> None:
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    with bound_contextvars(account="support"):
        get_logger("mailbridge.test").info("imported", uid=7)
    text = out.getvalue()
    assert "imported" in text
    assert "account=support" in text
    assert "uid=7" in text
    assert "\x1b[" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_on_a_tty_is_coloured_console() -> None:
    out = FakeTTY()
    configure_logging("info", "auto", stream=out)
    get_logger("mailbridge.test").info("hello", uid=1)
    text = out.getvalue()
    assert "hello" in text
    assert "\x1b[" in text  # ANSI colours on a terminal


def test_reconfigure_replaces_handler_and_level() -> None:
    first = io.StringIO()
    configure_logging("warning", "json", stream=first)
    logger = get_logger("mailbridge.test")  # created before the reload, like a module logger
    logger.info("dropped")
    handlers_before = len(logging.getLogger().handlers)

    second = io.StringIO()
    configure_logging("debug", "json", stream=second)
    logger.debug("kept")

    assert first.getvalue() == ""
    assert [line["event"] for line in _json_lines(second.getvalue())] == ["kept"]
    assert len(logging.getLogger().handlers) == handlers_before  # replaced, not stacked


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml", stream=io.StringIO())


def _many_secrets(count: int) -> list[str]:
    # Distinct, of 12 different lengths, none containing another (the prefix makes them unique).
    return [f"s{i:05d}-" + "k" * (i % 12) + "Z" for i in range(count)]


def test_registering_many_secrets_compiles_a_bounded_number_of_patterns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 accounts register 10,000 passwords, with log lines in between. Recompiling one
    # pattern of all secrets at every registration made that quadratic (5.4 s for 1,000 on the
    # event loop): compilations must not grow with the number of secrets.
    compiled = 0
    real = mblog._compile_secrets

    def counting(values: set[str]) -> object:
        nonlocal compiled
        compiled += 1
        return real(values)

    monkeypatch.setattr(mblog, "_compile_secrets", counting)
    values = _many_secrets(2_000)
    try:
        for value in values:
            register_secret(value)
            mblog._mask("a log line between two registrations")
        assert compiled <= mblog._PATTERN_MAX
        for value in (values[0], values[999], values[-1]):
            assert mblog._mask(f"x{value}y") == "x***y"
        assert mblog._mask({"detail": [f"{values[5]} and {values[6]}"]}) == {
            "detail": ["*** and ***"]
        }
    finally:
        for value in values:
            unregister_secret(value)
    assert mblog._mask(f"x{values[0]}y") == f"x{values[0]}y"


@pytest.mark.parametrize("count", [3, 200])  # the compiled pattern, and the length table
def test_a_secret_containing_another_is_masked_whole(count: int) -> None:
    values = [*_many_secrets(count), "inner-Secret", "outer-inner-Secret-tail"]
    try:
        for value in values:
            register_secret(value)
        assert mblog._mask("a outer-inner-Secret-tail b") == "a *** b"
        assert mblog._mask("inner-Secretinner-Secret") == "******"
        assert mblog._mask("no secret here") == "no secret here"
    finally:
        for value in values:
            unregister_secret(value)


def test_records_skip_the_caller_frame_thread_and_process_and_reset_restores() -> None:
    """A line renders the event's keys only, so stdlib logging does not collect the caller's
    frame (a quarter of a line's CPU), thread or process for it; reset_logging puts them back."""
    defaults = (logging._srcfile, logging.logThreads, logging.logProcesses)
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    assert logging._srcfile is None
    assert not logging.logThreads
    assert not logging.logProcesses
    assert not logging.logMultiprocessing
    get_logger("mailbridge.test").info("imap_connected", host="127.0.0.1", port=143)
    logging.getLogger("aioimaplib.aioimaplib").warning("foreign %s", "line")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert set(lines[0]) == {"host", "port", "event", "logger", "level", "timestamp"}
    assert lines[1]["event"] == "foreign line"
    reset_logging()
    assert (logging._srcfile, logging.logThreads, logging.logProcesses) == defaults


# What redact did before its keys were cached and its plain values skipped: the reference the
# faster one must agree with, on every event.
def _reference_mask(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return mblog._mask_text(value)
    if depth >= 4:
        return value
    if isinstance(value, Mapping):
        return {
            k: mblog.MASK
            if isinstance(k, str) and mblog._SECRET_KEY.fullmatch(k) and v is not None
            else _reference_mask(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_reference_mask(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return _reference_mask(bytes(value).decode("utf-8", "backslashreplace"), depth + 1)
    return value


def _reference_redact(event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event_dict.items()):
        if key.startswith("_"):
            continue
        if mblog._SECRET_KEY.fullmatch(key) and value is not None:
            event_dict[key] = mblog.MASK
        else:
            event_dict[key] = _reference_mask(value)
    return event_dict


class _Text(str):
    """A str subclass (an enum's value, a library's string type) is masked like a str."""


_KEYS = st.sampled_from(
    ["event", "account", "uid", "password", "_password", "_record", "access_token", "auth",
     "password_file", "X-Authorization", "detail", "trace"]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from(["", "plain", f"x {REGISTERED} y", REGISTERED, "Tr0ub"]),
    st.builds(_Text, st.sampled_from(["plain", f"in {REGISTERED}"])),
    st.sampled_from([b"A1 LOGIN " + REGISTERED.encode(), bytearray(b"plain")]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_KEYS, inner, max_size=3),
    ),
    max_leaves=8,
)


@pytest.mark.parametrize("secrets", [1, 100])  # the compiled pattern, and the length table
@settings(max_examples=150, deadline=None)
@given(event=st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_redact_agrees_with_the_reference_on_any_event(secrets: int, event: dict[str, Any]) -> None:
    values = [REGISTERED, *_many_secrets(secrets - 1)]
    try:
        for value in values:
            register_secret(value)
        # Twice: the first call fills the key caches, the second reads them.
        for _ in range(2):
            expected = _reference_redact(dict(event))
            got = mblog.redact(None, "info", dict(event))
            assert got == expected
            assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]
            assert list(got) == list(event)  # same keys, same order
    finally:
        for value in values:
            unregister_secret(value)


def test_redact_key_caches_keep_top_level_bookkeeping_apart_from_nested_keys() -> None:
    register_secret(REGISTERED)
    record = object()
    # "_password" nested in a mapping is a secret key; at the top it is bookkeeping, left alone
    # whichever was seen first.
    for _ in range(2):
        event = {"_password": REGISTERED, "_record": record, "n": {"_password": "x"}}
        assert mblog.redact(None, "info", event) == {
            "_password": REGISTERED,
            "_record": record,
            "n": {"_password": mblog.MASK},
        }


def test_redact_leaves_values_without_secrets_as_they_are() -> None:
    register_secret(REGISTERED)
    text = "no secret in here"
    number = 10**30
    event = {"event": text, "big": number, "ok": True, "none": None, "f": 0.5}
    assert all(a is b for a, b in zip(mblog.redact(None, "info", dict(event)).values(),
                                      event.values(), strict=True))  # fmt: skip


def test_a_logger_bound_before_a_reconfigure_follows_its_stream_format_and_level() -> None:
    """A worker binds its logger once (``log.bind(account=...)``) and keeps it across reloads."""
    first = io.StringIO()
    configure_logging("warning", "json", stream=first)
    bound = get_logger("mailbridge.account").bind(account="support")
    bound.info("dropped")
    bound.warning("kept_json")

    second = io.StringIO()
    configure_logging("debug", "console", stream=second)
    bound.debug("kept_console", uid=3)

    (line,) = _json_lines(first.getvalue())
    assert line["event"] == "kept_json"
    assert line["account"] == "support"
    text = second.getvalue()
    assert "kept_console" in text
    assert "account=support" in text
    assert "uid=3" in text
    assert "kept_json" not in text


def test_the_default_stream_is_sys_stderr_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailbridge.daemon import outbox  # its module-level logger exists before the call

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    configure_logging("info", "json")
    outbox.log.info("message_sent", outbox=1)
    (line,) = _json_lines(err.getvalue())
    assert line["event"] == "message_sent"
    assert line["logger"] == "mailbridge.outbox"


def test_a_logger_without_a_name_is_named_after_its_module() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger().info("anonymous")
    (line,) = _json_lines(out.getvalue())
    assert line["logger"] == __name__


def test_json_lines_are_what_structlogs_json_renderer_writes() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    class Structured:
        def __structlog__(self) -> dict[str, int]:
            return {"n": 1}

    event = {
        "event": 'é ✓ "quoted"\n',
        "n": 1,
        "f": float("nan"),
        "none": None,
        "nested": {"a": [1, (2, 3)]},
        "opaque": Opaque(),
        "structured": Structured(),
    }
    reference = structlog.processors.JSONRenderer(sort_keys=False)
    assert mblog._render_json(None, "info", event) == reference(None, "info", event)


def _on_every_line(calls: list[str]) -> Processor:
    def spy(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        calls.append(event_dict["event"])
        return event_dict

    return spy


def test_below_level_events_run_no_processor() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    calls: list[str] = []
    spy = _on_every_line(calls)
    mblog._processors.insert(0, spy)
    try:
        logger = get_logger("mailbridge.test")
        logger.debug("below")
        logger.bind(account="a").debug("below, bound")
        logger.log(logging.DEBUG, "below, by number")
        logger.info("at")
    finally:
        mblog._processors.remove(spy)
    assert calls == ["at"]


def test_capture_logs_sees_every_level_while_logging_is_configured() -> None:
    # A CLI test leaves logging configured at "warning"; a later test's capture_logs replaces
    # the chain and must see its info events (it did when the filter was a processor).
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    logger = get_logger("mailbridge.test")
    bound = logger.bind(account="a")
    with structlog.testing.capture_logs() as logs:
        logger.info("captured")
        bound.debug("captured too")
    logger.info("dropped again")
    logger.warning("written")
    assert [entry["event"] for entry in logs] == ["captured", "captured too"]
    assert [line["event"] for line in _json_lines(out.getvalue())] == ["written"]


class _OneWriterAtATime(io.StringIO):
    """A stream that notices two threads writing at once (a line could then be torn)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = 0
        self.overlaps = 0

    def write(self, text: str) -> int:
        self.writing += 1
        if self.writing > 1:
            self.overlaps += 1
        for char in text:  # slowly, so that another thread would get in between
            super().write(char)
            if char == ",":
                time.sleep(0)
        self.writing -= 1
        return len(text)


def test_lines_of_several_threads_never_interleave() -> None:
    out = _OneWriterAtATime()
    configure_logging("info", "json", stream=out)
    logger = get_logger("mailbridge.test")
    foreign = logging.getLogger("aioimaplib.test")
    start = threading.Barrier(4)

    def work(worker: int) -> None:
        start.wait()
        for i in range(50):
            logger.info("event", worker=worker, i=i, text="a,b,c,d,e,f")
            foreign.info("record %s %s a,b,c", worker, i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = _json_lines(out.getvalue())
    assert len(lines) == 400
    assert out.overlaps == 0


def test_a_broken_stream_does_not_raise_into_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    out.close()
    get_logger("mailbridge.test").info("lost")  # no exception: logging reports it, as stdlib does
    assert "--- Logging error ---" in capsys.readouterr().err


def test_events_go_through_stdlib_logging_while_the_handler_is_detached() -> None:
    """What tests/conftest.py does after a CLI test: the handler's stream is gone; structlog
    events must not be written to it but reach stdlib logging (redacted), like records do."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    register_secret(REGISTERED)
    handler = mblog._handler
    assert handler is not None
    logging.getLogger().removeHandler(handler)
    mblog._handler = None
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        get_logger("mailbridge.test").warning("detached", detail=REGISTERED)
    finally:
        logging.getLogger().removeHandler(collect)
    assert out.getvalue() == ""
    (record,) = seen
    assert record.name == "mailbridge.test"
    assert record.levelno == logging.WARNING
    line = json.loads(record.getMessage())
    assert line["event"] == "detached"
    assert line["detail"] == mblog.MASK
