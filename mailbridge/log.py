"""Structured logging for mailbridge: JSON lines under systemd, readable text on a terminal.

``configure_logging()`` sends structlog events *and* the standard library's ``logging`` records
(aioimaplib, aiosmtplib, asyncio) to one handler on the root logger, so every line has the same
shape and passes the same redaction. Records reach it through ``logging``; structlog events are
rendered by their own processor chain and written to the handler's stream, under the handler's
lock, without a LogRecord (see ``_LineWriter``). Under systemd stderr is not a TTY and each event
becomes one JSON object per line (journald stores one entry per line)::

    {"account": "support", "uid": 42, "event": "imported", "logger": "mailbridge.daemon",
     "level": "info", "timestamp": "2024-05-01T09:00:00.123456Z"}

Context that should ride along with every event of a task (``account``, ``uid``) is bound with
:func:`bound_contextvars` / :func:`bind_contextvars`; asyncio copies the context into each task, so
one account's task never leaks its context into another's.

Secrets: the :func:`redact` processor runs just before rendering, on structlog events and foreign
stdlib records alike. It masks values of keys that name a secret (``password``, ``token`` ...) and
any string containing a value passed to :func:`register_secret` - the daemon registers every
password and token it reads, so a secret echoed by a library's debug log (aioimaplib logs the
LOGIN command line at debug level) or quoted in an exception message is masked as well.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.contextvars import (
    bind_contextvars,
    bound_contextvars,
    clear_contextvars,
    unbind_contextvars,
)
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "MASK",
    "bind_contextvars",
    "bound_contextvars",
    "clear_contextvars",
    "configure_logging",
    "get_logger",
    "redact",
    "register_secret",
    "reset_logging",
    "unbind_contextvars",
    "unregister_secret",
]

MASK: Final = "***"

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Secrets shorter than this are not registered: masking every "a" or "123" in every log line would
# make logs useless, and such a value offers no protection worth having anyway.
MIN_SECRET_LENGTH: Final = 4

# A key is secret when its last word (after '_', '-' or '.') or all of it names a secret:
# "password", "imap_password", "access_token", "X-Authorization". Keys that merely *describe* a
# secret ("password_file", "password_env", "token_expires_at") stay readable: they are what an
# operator needs to find the problem.
_SECRET_KEY: Final = re.compile(
    r"(?:.*[_.-])?(?:password|passwd|passphrase|pw|pwd|secret|client_secret|token|access_token|"
    r"refresh_token|id_token|authorization|credential|credentials|api_key|apikey|auth_string)",
    re.IGNORECASE,
)

# Registered secrets. Registering is O(1) however many there are (a daemon with 10,000
# accounts registers 10,000 passwords at start-up, on the event loop): a value joins a set and
# its length a table. Masking then looks for them in one of two ways:
#
# * up to _PATTERN_MAX secrets, one compiled alternation, rebuilt lazily by the first masking
#   after a change (so at most _PATTERN_MAX compilations, each of a bounded pattern, ever):
#   C speed even on a long protocol trace;
# * beyond that, each substring of a registered length is looked up in the set: O(text length
#   x distinct secret lengths) per string, independent of the number of secrets. (A regex
#   alternation of 10,000 values cost 53 s to register 1,000 with a log line between each,
#   and ~1.5 ms per log line; see scripts/bench and the README's performance section.)
_PATTERN_MAX: Final = 64
_secrets: set[str] = set()
_lengths: dict[int, int] = {}  # length -> how many registered secrets have it
_lengths_desc: tuple[int, ...] = ()  # the keys of _lengths, longest first (masking order)
_secrets_lock = threading.Lock()  # register_secret may run in a worker thread (MSAL refresh)
_secret_pattern: re.Pattern[str] | None = None
_pattern_stale = False  # the set changed since _secret_pattern was compiled

# The one handler configure_logging installs on the root logger; kept so a reconfigure (SIGHUP)
# replaces it instead of stacking a second one, and other handlers (pytest's) stay untouched.
_handler: logging.StreamHandler[TextIO] | None = None


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it appears in a logged string. Short values are ignored.

    O(1): nothing is compiled here (see the comment on ``_PATTERN_MAX``).
    """
    global _lengths_desc, _pattern_stale
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        count = _lengths.get(len(value), 0)
        _lengths[len(value)] = count + 1
        if count == 0:
            _lengths_desc = tuple(sorted(_lengths, reverse=True))
        _pattern_stale = True


def unregister_secret(value: str) -> None:
    """Stop masking ``value`` (a token that was replaced). Unknown values are ignored."""
    global _lengths_desc, _pattern_stale
    with _secrets_lock:
        if value not in _secrets:
            return
        _secrets.discard(value)
        count = _lengths[len(value)] - 1
        if count:
            _lengths[len(value)] = count
        else:
            del _lengths[len(value)]
            _lengths_desc = tuple(sorted(_lengths, reverse=True))
        _pattern_stale = True


def _compile_secrets(values: set[str]) -> re.Pattern[str]:
    # Longest first so a secret containing another is masked whole, not leaving a tail behind.
    ordered = sorted(values, key=len, reverse=True)
    return re.compile("|".join(re.escape(v) for v in ordered))


def _current_pattern() -> re.Pattern[str] | None:
    """The alternation of every secret while there are few, compiled at most once per change."""
    global _secret_pattern, _pattern_stale
    if not _pattern_stale:
        return _secret_pattern
    with _secrets_lock:
        if _pattern_stale:
            few = 0 < len(_secrets) <= _PATTERN_MAX
            _secret_pattern = _compile_secrets(_secrets) if few else None
            _pattern_stale = False
        return _secret_pattern


def _mask_text(text: str) -> str:
    """``text`` with every registered secret in it replaced by MASK (leftmost, longest)."""
    lengths = _lengths_desc
    if not lengths or len(text) < lengths[-1]:
        return text
    pattern = _current_pattern()
    if pattern is not None:
        return pattern.sub(MASK, text)
    known = _secrets
    size = len(text)
    starts: dict[int, int] = {}  # position -> length of the longest secret starting there
    for length in lengths:  # longest first, so a position keeps its longest secret
        if length > size:
            continue
        hits = [s for s in range(size - length + 1) if text[s : s + length] in known]
        for start in hits:
            starts.setdefault(start, length)
    if not starts:
        return text
    out: list[str] = []
    position = 0
    for start in sorted(starts):
        if start < position:
            continue  # inside a secret masked already
        out.append(text[position:start])
        out.append(MASK)
        position = start + starts[start]
    out.append(text[position:])
    return "".join(out)


# Whether a key names a secret, by key: the keys of log lines are few (the code's own keyword
# arguments), so each is matched against _SECRET_KEY once instead of at every line. Bounded, for
# keys that come from data (a foreign record's ``extra``, a logged mapping).
_KEY_CACHE_MAX: Final = 4096
_secret_keys: dict[str, bool] = {}


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    known = _secret_keys.get(key)
    if known is None:
        known = _SECRET_KEY.fullmatch(key) is not None
        if len(_secret_keys) < _KEY_CACHE_MAX:
            _secret_keys[key] = known
    return known


# Values that cannot hold a secret's text and that _mask returns unchanged (checked by exact type:
# a subclass of int or str may render otherwise).
_PLAIN: Final = frozenset({int, bool, float, type(None)})


def _mask(value: Any, depth: int = 0) -> Any:
    """Mask registered secrets inside ``value``; recurses into containers a few levels deep."""
    if isinstance(value, str):
        return _mask_text(value)
    if type(value) in _PLAIN or depth >= 4:  # deeper structures are not logged on purpose
        return value
    if isinstance(value, Mapping):
        return {
            k: MASK if _is_secret_key(k) and v is not None else _mask(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        # Protocol traces are bytes; decode so a registered secret inside them is found.
        return _mask(bytes(value).decode("utf-8", "backslashreplace"), depth + 1)
    return value


# What redact does with an event's key, by key (cached like _secret_keys): skip it (structlog's
# own bookkeeping, ``_record``), mask its value whatever it is, or mask secrets inside the value.
_SKIP: Final = 0
_HIDE: Final = 1
_SCAN: Final = 2
_key_actions: dict[str, int] = {}


def _key_action(key: str) -> int:
    if key.startswith("_"):
        action = _SKIP
    elif _is_secret_key(key):
        action = _HIDE
    else:
        action = _SCAN
    if len(_key_actions) < _KEY_CACHE_MAX:
        _key_actions[key] = action
    return action


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-named keys and registered secret values.

    Runs after ``format_exc_info`` so tracebacks (which quote exception messages) are covered too.
    Values of other types (ints, objects) are left for the renderer; an object's ``repr`` that
    contains a secret is the caller's bug, and the SecretStr type used in the config guards it.
    """
    # Values are replaced in place while iterating: the keys stay the same, so no copy is needed.
    # The registry is read once per event, not once per string (what _mask_text does).
    lengths = _lengths_desc
    shortest = lengths[-1] if lengths else 0
    pattern = _current_pattern() if lengths else None
    actions = _key_actions
    plain = _PLAIN
    for key, value in event_dict.items():
        action = actions.get(key)
        if action is None:
            action = _key_action(key)
        if action == _SKIP:
            continue
        if action == _HIDE:
            if value is not None:
                event_dict[key] = MASK
        elif type(value) is str:
            if lengths and len(value) >= shortest:
                masked = pattern.sub(MASK, value) if pattern is not None else _mask_text(value)
                if masked is not value:
                    event_dict[key] = masked
        elif type(value) not in plain:
            event_dict[key] = _mask(value)
    return event_dict


def _use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    if fmt != "auto":
        raise ValueError(f"log format must be auto, json or console, not {fmt!r}")
    # journald (and any pipe or file) gets JSON; a person at a terminal gets text.
    return not _isatty(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream is not a terminal
        return False


def _json_default(value: Any) -> Any:
    """What JSON cannot encode natively: the object's ``__structlog__()`` or its ``repr``
    (structlog's JSONRenderer does the same)."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# One encoder for every line: json.dumps(..., default=...) builds a new JSONEncoder per call.
# Same output as JSONRenderer(sort_keys=False): ensure_ascii, ", " and ": " separators.
_encode_json: Final = json.JSONEncoder(default=_json_default).encode


def _render_json(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    return _encode_json(event_dict)


# The renderer of the current configuration (JSON or console). structlog events reach it through
# _render, the last processor of a chain that never changes (see configure_logging), foreign
# records through the ProcessorFormatter of the handler.
_renderer: Processor = _render_json


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    return _renderer(logger, method_name, event_dict)  # type: ignore[return-value]


# The method names of structlog.stdlib.BoundLogger.log, by level.
_LEVEL_NAMES: Final[Mapping[int, str]] = {number: name for name, number in LEVELS.items()}


class _LineWriter:
    """What a structlog logger wraps: writes each rendered line through the handler.

    A structlog event does not go through stdlib ``logging`` (no LogRecord, no second copy of
    it in ProcessorFormatter, no walk up the logger hierarchy: that was over half of a line's
    CPU): the line is written to the handler's stream under the handler's lock, the lock its
    foreign records are written under, so lines of several threads never interleave. The
    handler is looked up at each line, so a logger created before a reconfigure follows it.
    Anything else (``name``, ``setLevel``, ``handlers`` ...) is the stdlib logger's of the same
    name, so structlog's stdlib BoundLogger keeps working on top of this.
    """

    def __init__(self, stdlib: logging.Logger) -> None:
        self._stdlib = stdlib
        self.name = stdlib.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stdlib, name)

    def _write(self, levelno: int, line: str) -> None:
        handler = _handler
        if handler is None:  # not configured, or detached (tests): stdlib logging as it is
            self._stdlib.log(levelno, line)
            return
        with handler.lock:  # type: ignore[union-attr]  # createLock() made it
            try:
                stream = handler.stream
                stream.write(line + handler.terminator)
                stream.flush()
            except RecursionError:  # what logging.StreamHandler.emit does
                raise
            except Exception:  # a closed or broken stream: report it as logging does
                record = logging.LogRecord(self.name, levelno, "", 0, line, None, None)
                handler.handleError(record)

    def debug(self, line: str) -> None:
        self._write(logging.DEBUG, line)

    def info(self, line: str) -> None:
        self._write(logging.INFO, line)

    def warning(self, line: str) -> None:
        self._write(logging.WARNING, line)

    warn = warning

    def error(self, line: str) -> None:
        self._write(logging.ERROR, line)

    exception = error

    def critical(self, line: str) -> None:
        self._write(logging.CRITICAL, line)

    fatal = critical


# Without a name, the stdlib factory names the logger after the module that asked for it: the
# first frame outside structlog and this module.
_stdlib_factory: Final = structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__])
_writers: dict[str, _LineWriter] = {}


def _writer_factory(*args: Any) -> _LineWriter:
    """structlog's logger factory: one writer per logger name (a lazy proxy asks at each line)."""
    name = args[0] if args and isinstance(args[0], str) else None
    writer = _writers.get(name) if name is not None else None
    if writer is None:
        # The stdlib factory also names a logger created without a name after its module.
        writer = _LineWriter(_stdlib_factory(*args))
        if name is not None:
            writer = _writers.setdefault(name, writer)
    return writer


class _BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib BoundLogger that drops a below-level event before any work is done (no
    event dict, no processor, no DropEvent), as ``structlog.stdlib.filter_by_level`` would."""

    def _drops(self, level: int) -> bool:
        """Below the level of the stdlib logger of the same name, read live (so a reload's new
        level applies to loggers created earlier), and the chain is configure_logging's: a
        test's ``capture_logs``, which replaces the chain, still sees every event, as it did
        when filter_by_level was the chain's first processor."""
        if self._processors is not _processors or not _processors or _processors[-1] is not _render:
            return False
        writer = self._logger
        if not isinstance(writer, _LineWriter):
            return False
        stdlib = writer._stdlib
        # Not isEnabledFor(): on Python 3.14 it is False while a record is in flight (see
        # filter_by_level), and this is what filter_by_level reads.
        return stdlib.disabled or level < stdlib.getEffectiveLevel()

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.DEBUG):
            return None
        return self._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.INFO):
            return None
        return self._proxy_to_logger("info", event, *args, **kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.WARNING):
            return None
        return self._proxy_to_logger("warning", event, *args, **kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.ERROR):
            return None
        return self._proxy_to_logger("error", event, *args, **kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.CRITICAL):
            return None
        return self._proxy_to_logger("critical", event, *args, **kw)

    def fatal(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.CRITICAL):
            return None
        return self._proxy_to_logger("critical", event, *args, **kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(logging.ERROR):
            return None
        kw.setdefault("exc_info", True)
        return self._proxy_to_logger("exception", event, *args, **kw)

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if self._drops(level):
            return None
        return self._proxy_to_logger(_LEVEL_NAMES[level], event, *args, **kw)


# Run for structlog events (in the chain below) and for foreign stdlib records (in the formatter).
_SHARED: Final[tuple[Processor, ...]] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
)
# Rendering, for both; the renderer itself comes last.
_FINAL: Final[tuple[Processor, ...]] = (
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
    redact,
)

# The processor chain of structlog events: the same list object at every configure_logging, and
# nothing in it that a reconfigure changes (the renderer and the stream are looked up at each
# line). So a logger assembled under an earlier configuration - a cached module-level logger, a
# bound one kept by a worker - behaves exactly like a new one, and structlog.testing's
# capture_logs, which edits the configured list in place, reaches every logger.
_processors: list[Processor] = []


def configure_logging(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None
) -> None:
    """Set up structlog and stdlib logging. Safe to call again (SIGHUP) with a new level/format.

    ``level``: debug, info, warning, error or critical. ``fmt``: ``json``, ``console`` or
    ``auto`` (JSON unless ``stream`` is a TTY). ``stream`` defaults to ``sys.stderr`` at call
    time, which is what systemd connects to the journal.
    """
    global _handler, _renderer
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    out = stream if stream is not None else sys.stderr
    as_json = _use_json(fmt, out)

    renderer: Processor
    if as_json:
        renderer = _render_json
    else:
        # Colours only on a real terminal: escape codes in a file or a pipe are noise.
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(out),
            # Tracebacks are rendered to text by format_exc_info *before* redaction, so the
            # console shows that (redacted) text instead of re-rendering the live exception,
            # whose message may quote a secret.
            exception_formatter=structlog.dev.plain_traceback,
        )

    # Foreign records (aioimaplib, asyncio ...) go through stdlib logging to this handler.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_FINAL,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    # A line shows the event's own keys only, never the caller's file and line, thread or
    # process: stdlib logging is told not to collect them for each record (the logging
    # HOWTO's "Optimization" section). The caller's frame was the dearest part: a quarter of
    # a line's CPU, and a fleet starting writes a few lines per account.
    logging._srcfile = None  # the HOWTO names this attribute
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric)
    _renderer = renderer
    _handler = handler

    _processors[:] = [
        *_SHARED,
        structlog.stdlib.PositionalArgumentsFormatter(),
        *_FINAL,
        _render,
    ]
    structlog.configure(
        processors=_processors,
        # structlog events are rendered and written by the chain and _LineWriter, not by
        # stdlib logging; BoundLogger drops below-level events first (the stdlib level, read
        # live, so a reload's new level applies to loggers created earlier).
        logger_factory=_writer_factory,
        wrapper_class=_BoundLogger,
        # Not cached: a cached logger would keep this configuration after reset_logging (tests)
        # and miss a later capture_logs; caching saved ~1 us of a ~12 us line.
        cache_logger_on_first_use=False,
    )


_RECORD_DEFAULTS: Final = (
    logging._srcfile,
    logging.logThreads,
    logging.logProcesses,
    logging.logMultiprocessing,
)


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests): remove the handler, restore structlog."""
    global _handler
    (
        logging._srcfile,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
    ) = _RECORD_DEFAULTS
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    structlog.reset_defaults()
    clear_contextvars()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use ``__name__``). Usable before configure_logging."""
    return structlog.stdlib.get_logger(name)
