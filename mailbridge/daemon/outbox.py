"""The outbox worker: sends the ``outbox`` table's due rows over each account's SMTP.

One task in the daemon (beside the account loops) and one pass in ``run --once``. Per row:

1. **Fix the message** (first attempt only): compose it (:mod:`mailbridge.core.outbox`) and
   store its Message-ID, conversation key and bytes on the row, committed. Every later attempt
   sends those very bytes, so a retry is never a different mail. A row that cannot be composed
   (no recipient, unknown conversation, unreadable attachment, invalid message actions, over
   ``outbox.max_outgoing_size_mb``) fails at once with the reason.
2. **Begin**: ``queued`` -> ``sending`` (attempts + 1, attemptstarted), committed before MAIL FROM.
3. **Send** on one of the account's SMTP connections (up to ``smtp.connections`` at once, one
   per LANE_ROWS rows due; the rows of one conversation in order on one connection; each kept
   open for the rest of the batch and SESSION_IDLE_SECONDS after).
4. **Sent**: after the 250 to DATA one short transaction marks the row ``sent`` and stores
   the message in its conversation (as composed: its bytes are not parsed back), at once
   (rows accepted while the previous such transaction runs, on any of the account's
   connections, share the next: :class:`_SentRecorder`). Then, with
   ``folders.sent`` and ``append_sent``, a copy is APPENDed to the Sent folder. A refusal:
   5xx fails the row; 4xx, a lost connection or a timeout puts it back to ``queued`` for a
   retry with backoff, until ``outbox.max_age_hours``.

**After a crash** (kill -9, power cut) between the end of DATA and step 4 the server may have
the message while the row says ``sending``. At start-up every such row is resolved first: with
``folders.sent`` set, the Sent folder is searched for its Message-ID (``UID SEARCH HEADER
Message-ID``); found, the row is recorded as sent. A personalised row (one copy per
recipient, each with its own Message-ID) is checked copy by copy: a copy recorded as accepted,
or found in the Sent folder by its own Message-ID, is not sent again. Otherwise it (each copy
not found) is sent again, with the same Message-ID and bytes: **at-least-once**. The
recipient may get a second copy with the same Message-ID, which clients that de-duplicate by
Message-ID (Gmail) show once.

**Pick-up** without a felt delay: the worker sleeps until the next row is due, and wakes when
the database changes (SQLite: inotify on the database file and its WAL, as any commit writes
one of them, then ``PRAGMA data_version`` on its own connection tells; without inotify that
counter is read every 25 ms: a read of shared memory, no disk I/O) or when a command that
queued mail sends a datagram to the daemon's wake socket (:func:`notify_daemon`). On PostgreSQL
it waits on ``LISTEN``: a trigger NOTIFYs whenever a row is queued, whoever wrote it (the CLI,
an integrator's INSERT, on any host). :class:`Watch` is the one place that knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.policy
import hashlib
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import getaddresses, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mailbridge.config import AccountSettings, Settings
from mailbridge.core.html import html_to_text, text_to_html
from mailbridge.core.identify import new_conversation_key, normalize_message_id
from mailbridge.core.model import Address, ParsedMessage
from mailbridge.core.outbox import (
    MessageAction,
    OutgoingFile,
    address_entry,
    address_of,
    after_failure,
    build_message,
    check_actions,
    connection_limit_reply,
    envelope_recipients,
    parse_actions,
    recipient_problem,
    recovered_state,
    reply_subject,
    sender_display_name,
    split_addresses,
)
from mailbridge.core.parse import parse_composed, parse_message
from mailbridge.core.templates import HistoryMessage, MergeData, has_codes, render, render_text
from mailbridge.errors import MailbridgeError, MessageError, StoreError
from mailbridge.mail.imap import ImapSession, quote
from mailbridge.mail.smtp import SendError, SmtpSender
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import ImportContext
from mailbridge.store.outbox import (
    OutboxCopy,
    OutboxFile,
    OutboxFix,
    OutboxRow,
    ReplyContext,
    SentRecord,
    TemplateRecords,
)

if TYPE_CHECKING:
    from mailbridge.store.postgres import OutboxListener

log = structlog.get_logger("mailbridge.outbox")

# How often the database's change counter is read while waiting: a read of SQLite's shared
# memory (microseconds), so 40 a second cost nothing measurable and keep an integrator's INSERT
# from waiting (scripts/bench: insert -> end of DATA).
DATA_VERSION_SECONDS = 0.025
# With inotify watching the database's files (the usual case on Linux), the counter is read
# only this often, as a safety net (a lost event).
WATCH_POLL_SECONDS = 1.0
# After a write to the database's files without a visible commit (yet), the counter is read
# again this often, for this long (a commit becomes visible after the WAL is synced).
RECHECK_SECONDS = 0.003
RECHECK_FOR_SECONDS = 0.5
# The longest sleep without looking at the table (a row whose next attempt an integrator
# moved forward by hand is seen within this, or at once when the database changes).
MAX_SLEEP_SECONDS = 60.0
# PostgreSQL without a LISTENing session (the server unreachable): how often the table is
# looked at, and how often a new session is tried.
LISTEN_POLL_SECONDS = 1.0
LISTEN_RETRY_SECONDS = 5.0
# Queued rows naming an account the config does not have are looked for at most this often
# (one GROUP BY over the queued rows); a look put off is made by a wake-up this much later.
UNKNOWN_ACCOUNTS_SECONDS = 1.0
# A queued row of an account not in the config fails only once it is this old: it may be for
# an account being added (the config edited, the daemon not reloaded yet).
UNKNOWN_ACCOUNT_GRACE = timedelta(minutes=10)
# The most rows looked up at once: their lanes' pipelines run until all are sent, so a larger
# batch leaves fewer pipelines to drain and fill (scripts/bench, sending row). Retried rows
# carry their stored message: a batch holds no more than BATCH_BYTES of them (a message up to
# outbox.max_outgoing_size_mb alone).
BATCH_SIZE = 200
BATCH_BYTES = 64 * 1024 * 1024
# Messages up to this size are composed and read back on the event loop (about a millisecond);
# longer ones on a thread.
INLINE_BYTES = 64 * 1024
# How long an account's SMTP connection is kept open after its last message, for the next row
# (RSET first, RFC 5321 section 4.1.1.5): well below the 5 minutes a server waits for the
# next command (RFC 5321 section 4.5.3.2.7) before it closes the connection.
SESSION_IDLE_SECONDS = 30.0
# The most rows composed, marked sending and sent together; the next chunk is composed and
# marked meanwhile.
PIPELINE_CHUNK = 16
# An account's rows are sent over up to ``smtp.connections`` connections at once (lanes), one
# more lane per this many rows: a row queued alone goes out on one connection, a batch on
# several, so that the worker composes and records on one core while the server answers
# (a connection's dialogue is four round trips per message, RFC 5321 section 3.3).
LANE_ROWS = 4
# A further connection the server refused (Exchange Online: "432 4.3.2 Concurrent connections
# limit exceeded"): the account is sent on the connections that worked for this long.
LANE_CAP_SECONDS = 600.0


class InvalidRowError(Exception):
    """The row cannot be sent as written; the message is the reason (code outbox_invalid)."""

    def __init__(self, reason: str, code: str = "outbox_invalid") -> None:
        super().__init__(reason)
        self.code = code


def wake_address(database: Path) -> str:
    """The daemon's wake socket: an abstract Unix datagram address (Linux) named after the
    database file, so a command finds the daemon serving the same database. Abstract names
    need no file (no path-length limit, nothing left behind); a datagram only makes the worker
    look at the table, so no permission is needed to send one."""
    digest = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:32]
    return f"\0mailbridge-outbox-{digest}"


def notify_daemon(database: Path) -> bool:
    """Tell a running daemon that mail was queued; False when none listens (it still finds
    the row within DATA_VERSION_SECONDS)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"outbox", wake_address(database))
    except OSError:
        return False
    return True


async def daemon_serves(settings: Settings, repo: AsyncRepository) -> bool:
    """A daemon serves this database: PostgreSQL counts the LISTENing daemons (any host);
    with SQLite the daemon's wake socket answers (and the daemon looks at its outbox)."""
    watchers = await repo.outbox_watchers()
    if watchers is not None:
        return watchers > 0
    path = settings.sqlite_path
    return path is not None and notify_daemon(path)


async def served_by_daemons(
    settings: Settings, repo: AsyncRepository, accounts: Collection[str]
) -> set[str] | None:
    """Which of ``accounts`` a running daemon serves: all of them when one serves this SQLite
    database (it serves every account of the config), None when none does; on PostgreSQL
    those whose lease a daemon holds — the lease table alone, not whether a daemon LISTENs
    (a daemon whose listening session is down, reconnecting, still sends)."""
    if settings.postgres is not None:
        holders = await repo.lease_holders()
        return {name for name in accounts if name in holders}
    if not await daemon_serves(settings, repo):
        return None
    return set(accounts)


class Watch:
    """Waits for news of the outbox: a database change, a wake datagram, or :meth:`wake`
    (SQLite); a NOTIFY on a LISTENing session, or :meth:`wake` (PostgreSQL)."""

    def __init__(self, settings: Settings, quiet_commits: Callable[[], int] | None = None) -> None:
        """``quiet_commits``: a count of this process's commits that cannot have changed the
        outbox (:meth:`AsyncRepository.quiet_commits`). A database change seen together with
        one of them wakes the worker at most once per WATCH_POLL_SECONDS instead of at once:
        a fleet's state writes do not each start a round, and a row an integrator commits
        meanwhile is still looked at within that second."""
        self.database = settings.sqlite_path  # None: PostgreSQL
        self._quiet_commits = quiet_commits
        self._quiet_seen = quiet_commits() if quiet_commits is not None else 0
        # Monotonic time of the first change left for later (seen with a quiet commit).
        self._deferred_since: float | None = None
        self._postgres = settings.postgres
        self._password = settings.database_password() if settings.postgres else None
        self._event = asyncio.Event()
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._socket: socket.socket | None = None
        self._listener: OutboxListener | None = None
        self._listen_at = 0.0  # monotonic time of the next attempt to LISTEN
        self._listen_fd = -1
        self._notify: Any = None  # inotify_simple.INotify on the database's directory
        self._poll_seconds = DATA_VERSION_SECONDS
        # After a file event: until when the counter is read again, and whether a read is due.
        self._recheck_until = 0.0
        self._recheck_pending = False

    def open(self) -> None:
        if self.database is None:
            return  # PostgreSQL: the first wait() starts to LISTEN (off the event loop)
        try:
            self._conn = sqlite3.connect(self.database, isolation_level=None)
            self._version = self._data_version()
        except sqlite3.Error as exc:
            log.warning("outbox_watch_unavailable", error=str(exc))
            self._conn = None
        self._watch_files(self.database)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(wake_address(self.database))
        except OSError as exc:  # another daemon on this database holds it
            sock.close()
            log.info("outbox_wake_socket_unavailable", error=str(exc))
            return
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_datagram)
        self._socket = sock

    def _watch_files(self, database: Path) -> None:
        """Wake on any write to the database file or its WAL or journal
        (https://sqlite.org/wal.html): every commit, by any process, writes one of them, so an
        integrator's INSERT wakes the worker at once (inotify, Linux); the data_version read
        then runs only as a safety net, every WATCH_POLL_SECONDS. Without inotify the change
        counter is read every DATA_VERSION_SECONDS."""
        try:
            from inotify_simple import INotify, flags

            notify = INotify(nonblocking=True)
            notify.add_watch(database.parent, flags.MODIFY | flags.CREATE | flags.MOVED_TO)
        except (ImportError, OSError) as exc:
            log.info("outbox_file_watch_unavailable", error=str(exc))
            return
        names = {database.name + suffix for suffix in ("", "-wal", "-journal")}

        loop = asyncio.get_running_loop()

        def look() -> None:
            # A writer makes its commit visible (in the -shm index, which raises no event) only
            # after writing the WAL and, with synchronous=FULL, syncing it: the change counter
            # (a read of shared memory) is read at once and, until it moves, again every few
            # ms for a while; a change that can concern the outbox wakes the worker.
            self._recheck_pending = False
            news = self._news() if self._conn is not None else None
            if news:
                self._event.set()
            elif news is None and loop.time() < self._recheck_until:
                self._recheck_pending = True
                loop.call_later(RECHECK_SECONDS, look)

        def on_events() -> None:
            with contextlib.suppress(OSError):
                if any(event.name in names for event in notify.read(timeout=0)):
                    self._recheck_until = loop.time() + RECHECK_FOR_SECONDS
                    if not self._recheck_pending:
                        self._recheck_pending = True
                        loop.call_soon(look)

        loop.add_reader(notify.fileno(), on_events)
        self._notify = notify
        self._poll_seconds = WATCH_POLL_SECONDS

    async def _listen(self) -> None:
        """PostgreSQL: open the LISTENing session, at most every LISTEN_RETRY_SECONDS."""
        if self._postgres is None or time.monotonic() < self._listen_at:
            return
        from mailbridge.store.postgres import OutboxListener  # psycopg only with PostgreSQL

        self._listen_at = time.monotonic() + LISTEN_RETRY_SECONDS
        try:
            listener = await asyncio.to_thread(OutboxListener, self._postgres, self._password)
        except StoreError as exc:
            log.warning(
                "outbox_listen_unavailable",
                code=exc.code,
                error=str(exc),
                remedy=f"the outbox is looked at every {LISTEN_POLL_SECONDS:g} s meanwhile",
            )
            return
        self._listen_fd = listener.fileno()  # kept: a lost session may not say it any more
        asyncio.get_running_loop().add_reader(self._listen_fd, self._on_notify)
        self._listener = listener
        self._event.set()  # rows queued before LISTEN began: look once more

    def _on_notify(self) -> None:
        assert self._listener is not None
        try:
            news = self._listener.drain()
        except StoreError as exc:
            log.warning("outbox_listen_lost", code=exc.code, error=str(exc))
            self._unlisten()
            news = True  # nobody listened for a while: look
        if news:
            self._event.set()

    def _unlisten(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listen_fd)
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._unlisten()
        if self._notify is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._notify.close()
            self._notify = None
        if self._socket is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def wake(self) -> None:
        self._event.set()

    def _on_datagram(self) -> None:
        assert self._socket is not None
        with contextlib.suppress(OSError):
            while self._socket.recv(64):
                pass
        self._event.set()

    def _data_version(self) -> int | None:
        if self._conn is None:
            return None
        # Changes whenever another connection commits (https://sqlite.org/pragma.html#pragma_data_version).
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _changed(self) -> bool:
        try:
            version = self._data_version()
        except sqlite3.Error:
            return False
        changed = version != self._version
        self._version = version
        return changed

    def _news(self) -> bool | None:
        """None: the database did not change. True: it changed and the outbox may have (a
        commit of another process, or one of ours that can write the outbox). False: the
        change came with a quiet commit of ours (an account state): it is left for the look
        at most WATCH_POLL_SECONDS later (:meth:`wait`), which also covers another process's
        commit that landed in the same moment."""
        quiet = self._quiet_commits() if self._quiet_commits is not None else None
        if not self._changed():
            return None
        if quiet is None or quiet == self._quiet_seen:
            return True
        self._quiet_seen = quiet
        if self._deferred_since is None:
            self._deferred_since = time.monotonic()
        return False

    def _deferred_due(self) -> float | None:
        """Seconds until a change left for later must be looked at (0: now); None: none is."""
        if self._deferred_since is None:
            return None
        return max(0.0, self._deferred_since + WATCH_POLL_SECONDS - time.monotonic())

    async def wait(self, seconds: float, stopping: asyncio.Event) -> None:
        """Return after ``seconds``, on news, or when ``stopping`` is set."""
        deadline = time.monotonic() + max(seconds, 0.0)
        if self.database is None and self._listener is None:
            await self._listen()
            if self._listener is None:  # no NOTIFY to wait for: look again soon
                deadline = min(deadline, time.monotonic() + LISTEN_POLL_SECONDS)
        while not stopping.is_set():
            if self._event.is_set():
                self._event.clear()
                self._deferred_since = None  # this round looks at the change left for later
                return
            if self._news():
                self._deferred_since = None
                return
            deferred = self._deferred_due()
            if deferred == 0:
                self._deferred_since = None
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                if self._conn is not None:  # SQLite: read data_version again now and then
                    poll = (
                        self._poll_seconds
                        if deferred is None
                        else min(self._poll_seconds, deferred)
                    )
                    await asyncio.wait_for(self._event.wait(), min(left, poll))
                else:  # nothing to poll (PostgreSQL's NOTIFY sets the event): news or the stop
                    await asyncio.wait_for(_first_of(self._event, stopping), left)


async def _first_of(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


@dataclass
class OutboxSummary:
    """What a pass of the worker did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    codes: Counter[str] = dataclasses.field(default_factory=Counter)

    def line(self) -> str:
        why = ", ".join(f"{code} ×{n}" for code, n in sorted(self.codes.items()))
        return f"outbox: sent {self.sent}, retrying {self.retrying}, failed {self.failed}" + (
            f" ({why})" if why else ""
        )


@dataclass(frozen=True, slots=True)
class _Prepared:
    raw: bytes
    recipients: list[str]
    actions: list[MessageAction]
    # Personalised sending: (recipient, bytes) of each copy the server has not accepted yet.
    copies: list[tuple[str, bytes]]
    personal: bool
    fix: OutboxFix | None  # the message to fix at the first attempt


@dataclass(eq=False)
class _Lane:
    """One of an account's connections in a round, with the rows it sends."""

    index: int
    rows: Sequence[OutboxRow]
    sender: SmtpSender | None = None
    finished: bool = False


@dataclass(eq=False)
class _Round:
    """An account's lanes in one round of sending."""

    lanes: list[_Lane]
    # The round's first connection being opened (True once up, False when it failed): lanes
    # that need a connection meanwhile wait for it instead of each trying its own.
    pioneer: asyncio.Future[bool] | None = None

    def connected(self, besides: _Lane | None = None) -> int:
        """How many lanes (other than ``besides``) have a usable connection."""
        return sum(
            1
            for lane in self.lanes
            if lane is not besides and lane.sender is not None and lane.sender.usable
        )

    def others_connected(self, lane: _Lane) -> bool:
        return self.connected(besides=lane) > 0


class OutboxWorker:
    """Sends due outbox rows; ``run()`` in the daemon, ``run_once()`` for ``run --once``.

    ``settings`` may be a callable returning the current settings (the supervisor's, which a
    reload replaces); accounts without ``smtp`` are not served (their rows wait).
    """

    def __init__(
        self,
        settings: Settings | Callable[[], Settings],
        repo: AsyncRepository,
        *,
        stopping: asyncio.Event | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        self._settings = settings if callable(settings) else (lambda: settings)
        self.repo = repo
        self.stopping = stopping or asyncio.Event()
        self.only = only
        self.watch: Watch | None = None
        # Account -> monotonic time before which it is not tried (after a connection failure).
        self._paused: dict[str, float] = {}
        self._failures: Counter[str] = Counter()
        self._served: tuple[Settings, frozenset[str] | None, dict[str, AccountSettings]] | None = (
            None
        )
        # Account -> its logged-in SMTP connections with the monotonic time of their last use,
        # kept between rounds so that a row queued alone is not delayed by connect, EHLO and
        # AUTH (one per lane of the account's last round).
        self._sessions: dict[str, list[tuple[SmtpSender, float]]] = {}
        # Account -> (how many connections the server allowed, monotonic time until when).
        self._lane_cap: dict[str, tuple[int, float]] = {}
        # Rows a refused further connection handed back untried: due again in the same pass.
        self._handed_back: set[int] = set()
        # Outbox id -> its message as stored once sent, read back when it was prepared.
        self._parsed: dict[int, ParsedMessage] = {}
        # Template file -> its text, for the settings object it was read under.
        self._templates: dict[Path, str] = {}
        self._templates_of: Settings | None = None
        # Account -> set when its rows in hand are settled (sent, failed or back to queued).
        self._in_hand: dict[str, asyncio.Event] = {}
        # Accounts let go of since run() last looked: their rows left ``sending`` are resolved
        # again when they are served again.
        self._given_up: set[str] = set()
        # Queued rows of accounts not in the config: when next looked for (monotonic); the
        # accounts warned of (PostgreSQL: once each per run); a wake-up set for the next look.
        # Not looked for by a worker given a part of the config (``run --account``): there a
        # configured account outside the part would look unknown.
        self._unknown: tuple[float, set[str], asyncio.TimerHandle | None] | None = (
            (0.0, set(), None) if only is None else None
        )
        # Whether this worker's config is the truth about accounts (SQLite's one daemon, or
        # `run --once` with no daemon beside it): then their rows fail after the grace period.
        self._judge_unknown = True

    @property
    def settings(self) -> Settings:
        return self._settings()

    def accounts(self) -> dict[str, AccountSettings]:
        # Once per settings object (a reload brings a new one): the loop asks after every
        # commit it sees, and while a 1,000-account fleet started (a state write every few
        # ms) this walk over all accounts was 3 % of the daemon's CPU (py-spy, issue 10).
        # Keyed by the held accounts too: with several daemons ``only`` changes with the leases.
        settings, only = self.settings, self.only
        cached = self._served
        if cached is not None and cached[0] is settings and cached[1] == only:
            return dict(cached[2])
        served = {
            a.name: a
            for a in settings.accounts
            if a.enabled and a.smtp is not None and (only is None or a.name in only)
        }
        self._served = (settings, only, served)
        return dict(served)

    def wake(self) -> None:
        if self.watch is not None:
            self.watch.wake()

    def _serves(self, account: str) -> bool:
        """Still this worker's to send (``only`` follows the leases of several daemons)."""
        return self.only is None or account in self.only

    async def let_go(self, account: str, within: float) -> None:
        """``account`` is no longer served (its lease lost or given up; ``only`` already says
        so): wait, up to ``within`` seconds, until its rows in hand are settled - the message
        being sent finished and recorded, the rows marked ``sending`` but not yet attempted
        back to ``queued`` - so that the daemon taking the lease next does not find them in
        ``sending`` and send them again (recover) while this one still sends them."""
        # Taken again later, even before run() saw it go, it is looked at again then: another
        # daemon may have held it meanwhile and died leaving rows in ``sending``.
        self._given_up.add(account)
        in_hand = self._in_hand.get(account)
        if in_hand is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(in_hand.wait(), within)
        for sender, _used in self._sessions.pop(account, []):
            await sender.close()

    # -- loops --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until ``stopping``: resolve rows left ``sending``, then send what is due, sleeping
        until the next row is due or news arrives."""
        self.watch = Watch(self.settings, self.repo.quiet_commits)
        self.watch.open()
        try:
            recover = True
            recovered: set[str] = set()  # served accounts whose rows left sending are resolved
            while not self.stopping.is_set():
                # Rows left ``sending`` are resolved for every account the worker starts to
                # serve: all at start; with several daemons, each account whose lease this
                # daemon takes (its previous holder died mid-attempt, or handed it over).
                served = set(self.accounts())
                recovered &= served  # one given up and taken again is looked at again,
                recovered -= self._given_up  # even when taken again before this look
                self._given_up.clear()
                pending = served if recover else served - recovered
                if pending:
                    recover = not await self._guarded(self.recover(accounts=pending))
                    if not recover:
                        recovered |= pending
                # A round that failed (the database refused a write) may leave rows marked
                # sending: between rounds nothing is in flight, so they are resolved as after a
                # crash before the next round.
                recover = not await self._guarded(self.send_due()) or recover
                await self.watch.wait(await self._sleep_seconds(), self.stopping)
                await self._close_sessions(idle_for=SESSION_IDLE_SECONDS)
        finally:
            self.watch.close()
            await self._close_sessions()

    async def run_once(self) -> OutboxSummary:
        """Resolve rows left ``sending``, then send every row due now (``run --once``).

        Beside a running daemon (its wake socket answers, or it LISTENs on PostgreSQL) rows in
        ``sending`` are the daemon's attempts in flight, not a crash's: they are left to it (it
        resolves its own at start) — except, on PostgreSQL, those of accounts whose lease no
        daemon holds, which no daemon would resolve until one takes it.
        """
        summary = OutboxSummary()
        unserved = await self._unserved_accounts()
        # Beside a daemon (maybe with another config) rows of accounts unknown here are its to
        # judge: only warned of.
        self._judge_unknown = unserved is None
        if unserved is None:
            await self.recover(summary)
        else:
            if unserved:
                await self.recover(summary, accounts=unserved)
            log.info(
                "outbox_recovery_left_to_daemon",
                reason="a daemon serves this database",
                **({"recovered_here": sorted(unserved)} if unserved else {}),
            )
        try:
            await self.send_due(summary)
        finally:
            await self._close_sessions()
        return summary

    async def _unserved_accounts(self) -> set[str] | None:
        """The accounts whose rows left ``sending`` no daemon will resolve: None when no daemon
        serves this database (all of them); with SQLite's one daemon, none; on PostgreSQL, the
        accounts whose lease no daemon holds (a daemon that takes one resolves its rows then)."""
        names = set(self.accounts())
        served = await served_by_daemons(self.settings, self.repo, names)
        return None if served is None else names - served

    async def _guarded(self, work: Awaitable[object]) -> bool:
        """Run ``work``; False (logged, after a 5 s pause) when it failed."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            log.warning("outbox_store_error", code=exc.code, error=str(exc), remedy=exc.remedy)
        except Exception:  # a bug must not end sending for good; the daemon goes on
            log.exception("outbox_worker_crashed")
        else:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), 5)
        return False

    async def _sleep_seconds(self) -> float:
        names = [n for n in self.accounts() if not self._is_paused(n)]
        sleep = MAX_SLEEP_SECONDS
        due = await self.repo.outbox_next_due(names)
        if due is not None:
            sleep = min(sleep, (due - datetime.now(UTC)).total_seconds())
        now = time.monotonic()
        for until in self._paused.values():
            if until > now:
                sleep = min(sleep, until - now)
        for kept in self._sessions.values():
            for _sender, used in kept:
                sleep = min(sleep, used + SESSION_IDLE_SECONDS - now)
        return max(sleep, 0.0)

    async def _kept_sessions(self, account: AccountSettings, wanted: int) -> list[SmtpSender]:
        """Up to ``wanted`` of the account's connections kept from an earlier round, reset and
        ready (those beyond ``wanted`` stay kept)."""
        kept = self._sessions.pop(account.name, [])
        ready: list[SmtpSender] = []
        for index, (sender, _used) in enumerate(kept):
            if len(ready) == wanted:
                rest = kept[index:]
                if self._serves(account.name) and not self.stopping.is_set():
                    self._sessions.setdefault(account.name, []).extend(rest)
                else:  # let go of (or stopping) while the others were reset
                    for unused, _at in rest:
                        await unused.close()
                break
            if sender.account != account:  # the settings were reloaded: sign in anew
                await sender.close()
            elif await sender.reset():
                ready.append(sender)
        return ready

    def _keep_session(self, account: AccountSettings, sender: SmtpSender) -> bool:
        """Keep ``sender`` for the account's next round; False when it cannot be kept."""
        if not sender.usable or self.stopping.is_set():
            return False
        self._sessions.setdefault(account.name, []).append((sender, time.monotonic()))
        return True

    async def _close_sessions(self, idle_for: float | None = None) -> None:
        """QUIT the kept connections (only those idle for ``idle_for`` seconds, if given)."""
        now = time.monotonic()
        for name, kept in list(self._sessions.items()):
            idle = [k for k in kept if idle_for is None or now - k[1] >= idle_for]
            if not idle:
                continue
            left = [k for k in kept if k not in idle]
            if left:
                self._sessions[name] = left
            else:
                del self._sessions[name]
            for sender, _used in idle:
                await sender.close()

    def _lane_count(self, account: AccountSettings, rows: int) -> int:
        """How many connections send ``rows`` rows of ``account`` (see LANE_ROWS)."""
        assert account.smtp is not None
        most = account.smtp.connections
        cap = self._lane_cap.get(account.name)
        if cap is not None:
            if cap[1] > time.monotonic():
                most = min(most, cap[0])
            else:
                del self._lane_cap[account.name]
        return max(1, min(most, -(-rows // LANE_ROWS)))

    def _is_paused(self, account: str) -> bool:
        return self._paused.get(account, 0.0) > time.monotonic()

    # -- crash recovery -----------------------------------------------------------------------

    async def recover(
        self, summary: OutboxSummary | None = None, *, accounts: Collection[str] | None = None
    ) -> None:
        """Resolve rows a previous process left in ``sending`` (see the module docstring), of
        every served account or of those named."""
        summary = summary if summary is not None else OutboxSummary()
        chosen = {n: a for n, a in self.accounts().items() if accounts is None or n in accounts}
        for row in await self.repo.outbox_in_flight(list(chosen)):
            account = chosen[row.account]
            found: bool | None = None
            copies_found: int | None = None
            if row.raw is not None and row.copies:
                found, copies_found = await self._recover_copies(account, row)
            elif account.folders.sent is not None and row.message_id and row.raw is not None:
                ids = await self._in_sent_folder(account, [row.message_id])
                found = None if ids is None else row.message_id in ids
            outcome = recovered_state(found) if row.raw is not None else "queued"
            # Stored, then logged: the row reads as the line says.
            if outcome == "sent" and row.raw is not None:
                await self._record_sent(account, [(row, row.raw, ())], summary, append=False)
            else:
                await self.repo.outbox_failed_attempt(
                    row.id,
                    state="queued",
                    next_attempt=None,
                    code="connection_lost",
                    error="the daemon stopped during this attempt; sent again with the same "
                    "Message-ID",
                    now=datetime.now(UTC),
                )
            log.warning(
                "outbox_interrupted_attempt",
                account=row.account,
                outbox=row.id,
                message_id=row.message_id,
                found_in_sent=found,
                **({} if copies_found is None else {"copies_found_in_sent": copies_found}),
                outcome="recorded as sent" if outcome == "sent" else "sent again, same Message-ID",
            )

    async def _recover_copies(
        self, account: AccountSettings, row: OutboxRow
    ) -> tuple[bool | None, int | None]:
        """A personalised row's copies not yet recorded as accepted, looked for in the Sent
        folder by their own Message-IDs: each one found is recorded as accepted (not sent
        again). Returns (whether every copy is accepted now, None without a Sent folder to
        tell; how many were found there, None when not looked)."""
        pending = [c for c in await self.repo.outbox_copies(row.id) if c.sent is None]
        if not pending:
            return True, None  # every copy was accepted: only the status update is missing
        if account.folders.sent is None:
            return None, None
        ids = await self._in_sent_folder(account, [c.message_id for c in pending])
        if ids is None:
            return None, None
        now = datetime.now(UTC)
        found = [c for c in pending if c.message_id in ids]
        for copy in found:
            await self.repo.outbox_copy_sent(row.id, copy.recipient, now)
        return len(found) == len(pending), len(found)

    async def _in_sent_folder(
        self, account: AccountSettings, message_ids: Sequence[str]
    ) -> set[str] | None:
        """Which of ``message_ids`` the Sent folder holds (``UID SEARCH HEADER Message-ID``,
        RFC 3501 section 6.4.4, one session for all); None when it cannot be told."""
        assert account.folders.sent is not None
        try:
            session = await ImapSession.open(account)
        except MailbridgeError as exc:
            log.warning("outbox_sent_folder_unreadable", account=account.name, code=exc.code)
            return None
        try:
            await session.select(account.folders.sent)
            found: set[str] = set()
            for message_id in message_ids:
                if await session.search("HEADER", "Message-ID", quote(f"<{message_id}>")):
                    found.add(message_id)
            return found
        except MailbridgeError as exc:
            log.warning("outbox_sent_folder_unreadable", account=account.name, code=exc.code)
            return None
        finally:
            await session.close()

    # -- rows of accounts not in the config ---------------------------------------------------

    async def _unknown_accounts(self, summary: OutboxSummary) -> None:
        """Make queued rows whose ``account`` the config does not name visible (they would wait
        forever, unsent and unlogged). SQLite has one daemon, whose config is the truth: such
        rows fail (``outbox_invalid``, the reason naming the account and the configured ones).
        On PostgreSQL another daemon's config may name the account (a fleet reloading one host
        after another): a warning per account, once per run, and ``status`` shows them.
        Stored first, then logged. At most every UNKNOWN_ACCOUNTS_SECONDS."""
        if self._unknown is None:
            return
        due, warned, timer = self._unknown
        wait = due - time.monotonic()
        if wait > 0:
            if timer is None:  # a look put off: made soon, not at the next unrelated wake-up
                timer = asyncio.get_running_loop().call_later(wait, self._unknown_look_due)
                self._unknown = (due, warned, timer)
            return
        self._unknown = (time.monotonic() + UNKNOWN_ACCOUNTS_SECONDS, warned, None)
        settings = self.settings
        configured = [a.name for a in settings.accounts]
        queued = await self.repo.outbox_queued_accounts()
        now = datetime.now(UTC)
        for account in sorted(set(queued) - set(configured)):
            reason = unknown_account_reason(account, configured)
            failed: list[int] = []
            if settings.postgres is None and self._judge_unknown:
                # Rows younger than the grace period may be for an account being added (the
                # config edited, the daemon not reloaded yet): they wait, with the warning.
                failed = await self.repo.outbox_fail_account(
                    account, code="outbox_invalid", error=reason, now=now,
                    created_before=now - UNKNOWN_ACCOUNT_GRACE,
                )  # fmt: skip
            if not failed:
                if account not in warned:
                    warned.add(account)
                    log.warning(
                        "outbox_unknown_account", code="account_unknown", account=account,
                        rows=queued[account], reason=reason, remedy=UNKNOWN_ACCOUNT_REMEDY,
                    )  # fmt: skip
                continue
            ids = failed
            if ids:
                summary.failed += len(ids)
                summary.codes["outbox_invalid"] += len(ids)
                log.error(
                    "outbox_unknown_account", code="outbox_invalid", account=account,
                    rows=len(ids), outbox=ids, reason=reason, remedy=UNKNOWN_ACCOUNT_REMEDY,
                )  # fmt: skip

    def _unknown_look_due(self) -> None:
        if self._unknown is not None:
            self._unknown = (*self._unknown[:2], None)
        self.wake()

    # -- sending ------------------------------------------------------------------------------

    async def send_due(self, summary: OutboxSummary | None = None) -> OutboxSummary:
        """Send every due row of the served accounts (batch by batch, until none is due)."""
        summary = summary if summary is not None else OutboxSummary()
        await self._unknown_accounts(summary)
        tried: set[int] = set()
        while not self.stopping.is_set():
            accounts = self.accounts()
            names = [n for n in accounts if not self._is_paused(n)]
            rows = [
                r
                for r in await self.repo.outbox_due(
                    names, datetime.now(UTC), BATCH_SIZE, BATCH_BYTES
                )
                if r.id not in tried
            ]
            if not rows:
                return summary
            tried.update(r.id for r in rows)
            self._handed_back.clear()
            by_account: dict[str, list[OutboxRow]] = {}
            for row in rows:
                by_account.setdefault(row.account, []).append(row)
            # Every account's sending ends before a failure is raised: the caller then resolves
            # the rows left 'sending' (recover), which must not catch another account's in flight.
            outcomes = await asyncio.gather(
                *(self._send_account(accounts[n], rs, summary) for n, rs in by_account.items()),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            tried -= self._handed_back
        return summary

    async def _send_account(
        self, account: AccountSettings, rows: Sequence[OutboxRow], summary: OutboxSummary
    ) -> None:
        """Send ``rows`` over up to ``smtp.connections`` connections at once (lanes: see
        :func:`lane_rows`; the rows of one conversation go out in order on one of them), each
        kept from the account's last round (RSET) or new, and kept afterwards for
        SESSION_IDLE_SECONDS. Accepted rows are recorded by group commit, for all lanes."""
        # Registered before anything is awaited: a let_go() from now on waits for this round.
        in_hand = self._in_hand[account.name] = asyncio.Event()
        lanes = [
            _Lane(index, part)
            for index, part in enumerate(lane_rows(rows, self._lane_count(account, len(rows))))
        ]
        round_ = _Round(lanes)
        recorder = _SentRecorder(self, account, summary)
        outcomes: list[BaseException | None] = []
        try:
            kept = await self._kept_sessions(account, len(lanes))  # as many as lanes, or fewer
            for lane, sender in zip(lanes, kept, strict=False):
                lane.sender = sender
            outcomes = await asyncio.gather(
                *(self._send_lane(account, lane, round_, recorder, summary) for lane in lanes),
                return_exceptions=True,
            )
        finally:
            try:
                await recorder.flush()
            finally:
                in_hand.set()
                if self._in_hand.get(account.name) is in_hand:
                    del self._in_hand[account.name]
                for row in rows:  # prepared but not recorded (failed, cancelled, released)
                    self._parsed.pop(row.id, None)
                closing = [
                    lane.sender.close()
                    for lane in lanes
                    if lane.sender is not None
                    and not (
                        lane.finished
                        and self._serves(account.name)
                        and self._keep_session(account, lane.sender)
                    )
                ]
                await asyncio.gather(*closing)  # QUIT on each at once (close never raises)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _send_lane(
        self,
        account: AccountSettings,
        lane: _Lane,
        round_: _Round,
        recorder: _SentRecorder,
        summary: OutboxSummary,
    ) -> None:
        """Send a lane's rows on its connection, in chunks: while a chunk is being sent, the
        next is composed and marked ``sending`` in one transaction. Chunks grow (1, 2, 4 ...
        PIPELINE_CHUNK rows): the first row goes out at once, later ones share their
        transactions."""
        chunks = pipeline_chunks(lane.rows)
        ahead: asyncio.Future[list[tuple[OutboxRow, _Prepared]]] | None
        ahead = asyncio.ensure_future(self._begin_chunk(account, chunks[0], summary))
        try:
            for number in range(len(chunks)):
                assert ahead is not None
                # Shielded: cancelled here (the drain's last resort), the chunk's transaction
                # would commit on the database thread anyway; finally releases its rows.
                ready, ahead = await asyncio.shield(ahead), None
                if number + 1 < len(chunks):
                    ahead = asyncio.ensure_future(
                        self._begin_chunk(account, chunks[number + 1], summary)
                    )
                if not ready:
                    continue
                if not await self._send_chunk(account, ready, lane, round_, recorder, summary):
                    break
            lane.finished = True  # no exception: the connection is between transactions
        finally:
            if ahead is not None:
                # Never cancelled: a transaction on the database thread would commit anyway,
                # leaving rows marked sending that nobody sends. Its rows go back to queued.
                with contextlib.suppress(Exception):
                    left = await ahead
                    await self._release([r for r, _p in left], self._why_stopped(account))

    def _why_stopped(self, account: AccountSettings) -> str:
        """Why rows marked ``sending`` go back to ``queued`` unattempted."""
        if self.stopping.is_set():
            return "the daemon is stopping"
        if not self._serves(account.name):
            return "the daemon no longer serves the account"
        return "the account's sending stopped before this row (see the error before)"

    async def _begin_chunk(
        self, account: AccountSettings, rows: Sequence[OutboxRow], summary: OutboxSummary
    ) -> list[tuple[OutboxRow, _Prepared]]:
        """Compose ``rows`` (fixing the message of each on its first attempt) and mark them
        ``sending`` in one transaction, committed before any of them is sent; returns those
        that began (not those cancelled meanwhile, left for the next round)."""
        ready = await self._prepare_chunk(account, rows, summary)
        if not ready:
            return []
        began = await self.repo.outbox_begin(
            [(row.id, prepared.fix) for row, prepared in ready], datetime.now(UTC)
        )
        return [(row, prepared) for row, prepared in ready if row.id in began]

    async def _prepare_chunk(
        self, account: AccountSettings, rows: Sequence[OutboxRow], summary: OutboxSummary
    ) -> list[tuple[OutboxRow, _Prepared]]:
        ready: list[tuple[OutboxRow, _Prepared]] = []
        for row in rows:
            # Each row's composing (about a millisecond of CPU) is its own step on the event
            # loop: the SMTP dialogue of the chunk being sent goes on between two rows, instead
            # of waiting for the whole chunk (its replies were read a chunk late).
            await asyncio.sleep(0)
            try:
                ready.append((row, await self._prepare(account, row)))
            except InvalidRowError as exc:
                await self._failed(row, exc.code, str(exc), permanent=True, summary=summary)
        return ready

    async def _send_chunk(
        self,
        account: AccountSettings,
        ready: Sequence[tuple[OutboxRow, _Prepared]],
        lane: _Lane,
        round_: _Round,
        recorder: _SentRecorder,
        summary: OutboxSummary,
    ) -> bool:
        """Send rows already marked ``sending`` on ``lane``'s connection; whether to go on."""
        for index, (row, prepared) in enumerate(ready):
            try:
                # Looked at before the connection is opened and again after (opening may wait
                # for the round's first connection, and sign in): a lease lost or a stop
                # meanwhile leaves the rows to the next holder, unsent.
                if await self._released_if_stopped(account, ready[index:]):
                    return False
                if lane.sender is None or not lane.sender.usable:
                    if not await self._open(account, lane, round_, ready[index:]):
                        return False
                    if await self._released_if_stopped(account, ready[index:]):
                        return False
                assert lane.sender is not None
                refused = await self._send(lane.sender, account, row, prepared)
            except SendError as exc:
                if round_.others_connected(lane) and connection_limit_reply(exc.reply):
                    # Over the server's limit of connections at once, said at MAIL or DATA
                    # (Exchange Online: "432 4.3.2 Concurrent connections limit exceeded"):
                    # not this row's fault, it goes with the others on fewer connections.
                    await self._limit_lane(account, lane, round_, ready[index:], str(exc))
                    return False
                await self._failed(
                    row, exc.code, exc.reply, permanent=exc.permanent, summary=summary
                )
                continue
            except StoreError:
                raise  # the database, not the server: the round fails and recover() resolves it
            except MailbridgeError as exc:  # ServerError, or a secret/token not to be had
                lane.sender = None
                await self._failed(row, exc.code, str(exc), permanent=False, summary=summary)
                # The server (or the sign-in) is the problem, not the row: the account's other
                # rows wait.
                self._pause(account.name)
                await self._release([r for r, _p in ready[index + 1 :]], str(exc))
                return False
            self._failures.pop(account.name, None)
            if refused:
                log.warning(
                    "outbox_recipients_refused", account=account.name, outbox=row.id,
                    refused=refused,
                )  # fmt: skip
            recorder.add(row, prepared.raw, prepared.actions)
            recorder.commit()  # at once: a kill -9 leaves at most the rows in hand unrecorded
        return True

    def _stopped(self, account: AccountSettings) -> bool:
        return self.stopping.is_set() or not self._serves(account.name)

    async def _released_if_stopped(
        self, account: AccountSettings, left: Sequence[tuple[OutboxRow, _Prepared]]
    ) -> bool:
        """When the daemon stops or no longer serves ``account``: ``left`` back to queued
        (for the next holder), True."""
        if not self._stopped(account):
            return False
        await self._release([r for r, _p in left], self._why_stopped(account))
        return True

    async def _open(
        self,
        account: AccountSettings,
        lane: _Lane,
        round_: _Round,
        left: Sequence[tuple[OutboxRow, _Prepared]],
    ) -> bool:
        """Give ``lane`` a new connection; False (``left`` back to queued) when it is not to
        be had for a reason that is not the lane's rows'.

        While no lane of the round is connected, one lane opens the round's first connection
        and the others wait for it: its failure is raised to the caller (the row fails for a
        retry, the account pauses) and the waiting lanes hand their rows back. A further
        connection, opened while another lane is connected, that the server refuses as over
        its limit of connections at once (:func:`connection_limit_reply`) hands its rows
        back too, not attempted, and the account is sent on fewer connections for
        LANE_CAP_SECONDS; any other failure of it is raised like the first's."""
        pioneer = round_.pioneer
        if not round_.others_connected(lane) and pioneer is not None:
            up = await pioneer
            if not up or self._stopped(account):
                why = self._why_stopped(account) if up else "the account's connection failed"
                await self._release([r for r, _p in left], why)
                return False
        if not round_.others_connected(lane):
            # This lane opens the round's connection (none is up: the first lane needed none,
            # or the one up was lost meanwhile).
            opening = round_.pioneer = asyncio.get_running_loop().create_future()
            try:
                lane.sender = await SmtpSender.open(account)
            finally:
                opening.set_result(lane.sender is not None and lane.sender.usable)
            return True
        try:
            lane.sender = await SmtpSender.open(account)
        except MailbridgeError as exc:
            # A reply quoted as "<server> refused: <code> <words>" (mail.smtp's mapping).
            if not connection_limit_reply(str(exc).rpartition(" refused: ")[2]):
                raise
            await self._limit_lane(account, lane, round_, left, str(exc))
            return False
        return True

    async def _limit_lane(
        self,
        account: AccountSettings,
        lane: _Lane,
        round_: _Round,
        left: Sequence[tuple[OutboxRow, _Prepared]],
        error: str,
    ) -> None:
        """``lane`` is over the server's limit of connections at once: its rows back to
        queued (sent again in this pass, send_due, on the connections that work), the
        account capped to those for LANE_CAP_SECONDS; stored first, then logged."""
        if lane.sender is not None:
            await lane.sender.close()
            lane.sender = None
        why = f"connection {lane.index + 1} of the account was refused ({error})"
        await self._release([r for r, _p in left], why, code="connection_limit")
        self._handed_back.update(r.id for r in lane.rows)  # those sent are not queued
        allowed = max(1, round_.connected())
        cap = self._lane_cap.get(account.name)
        if cap is not None and cap[0] <= allowed and cap[1] > time.monotonic():
            return  # another lane's refusal set as low a cap, and said so
        self._lane_cap[account.name] = (allowed, time.monotonic() + LANE_CAP_SECONDS)
        log.warning(
            "outbox_connection_refused", code="connection_limit", account=account.name,
            connections=allowed, error=error, cap_seconds=LANE_CAP_SECONDS,
            remedy="the server allows fewer connections at once: set smtp.connections to "
            f"{allowed} (until then its rows go out on the connections that worked)",
        )  # fmt: skip

    def _pause(self, account: str) -> None:
        self._failures[account] += 1
        outbox = self.settings.outbox
        delay = min(
            outbox.max_retry_seconds,
            outbox.first_retry_seconds * 2 ** min(self._failures[account] - 1, 10),
        )
        self._paused[account] = time.monotonic() + delay

    async def _release(
        self, rows: Sequence[OutboxRow], why: str, code: str = "connection_lost"
    ) -> None:
        """Rows marked ``sending`` but not attempted: back to ``queued``, due at once (the
        account's pause, if any, holds them), the attempt not counted."""
        await self.repo.outbox_release(
            [row.id for row in rows], code=code, error=f"not attempted: {why}",
            now=datetime.now(UTC),
        )  # fmt: skip

    async def _failed(
        self, row: OutboxRow, code: str, error: str, *, permanent: bool, summary: OutboxSummary
    ) -> None:
        now = datetime.now(UTC)
        outbox = self.settings.outbox
        decision = after_failure(
            code=code,
            permanent=permanent,
            attempts=max(row.attempts + 1, 1),
            created=row.created,
            now=now,
            max_age=timedelta(hours=outbox.max_age_hours),
            first_retry=outbox.first_retry_seconds,
            max_retry=outbox.max_retry_seconds,
        )
        await self.repo.outbox_failed_attempt(
            row.id,
            state=decision.state,
            next_attempt=decision.next_attempt,
            code=decision.code,
            error=error,
            now=now,
        )
        summary.codes[decision.code] += 1
        if decision.state == "failed":
            summary.failed += 1
            log.error(
                "outbox_failed", account=row.account, outbox=row.id, code=decision.code,
                error=error,
            )  # fmt: skip
        else:
            summary.retrying += 1
            log.warning(
                "outbox_retry_later", account=row.account, outbox=row.id, code=decision.code,
                error=error, next_attempt=decision.next_attempt.isoformat()
                if decision.next_attempt else None,
            )  # fmt: skip

    async def _prepare(self, account: AccountSettings, row: OutboxRow) -> _Prepared:
        """The row's fixed bytes and envelope; composed and fixed on its first attempt."""
        actions = self._actions(row)
        columns = {"toaddresses": row.to, "ccaddresses": row.cc, "bccaddresses": row.bcc}
        problem = recipient_problem(columns)  # not sent to the others with one left out
        if problem:
            raise InvalidRowError(problem)
        context = None
        if row.conversation_id is not None:
            context = await self.repo.reply_context(row.conversation_id)
            if context is None or context.account != row.account:
                raise InvalidRowError(
                    f"conversation {row.conversation_id} does not exist"
                    if context is None
                    else f"conversation {row.conversation_id} belongs to account "
                    f"{context.account!r}, not {row.account!r}"
                )
            problem = check_actions(actions, context.parent_columns)
            if problem:
                raise InvalidRowError(problem)
        elif actions:
            # A new conversation gets a record in each conversation parent table of the
            # account when it is stored, the same transaction that applies the actions.
            tables = [
                p.table for p in self.settings.conversation_parents if p.applies_to(account.name)
            ]
            problem = check_actions(actions, await self.repo.table_columns(tables))
            if problem:
                raise InvalidRowError(problem)
        fix: OutboxFix | None = None
        parsed: ParsedMessage | None = None
        if row.raw is None:
            # The envelope and the stored message come from the message as composed: its
            # bytes are not parsed back.
            fix, recipients, parsed = await self._compose(account, row, context)
            raw, fixed_copies = fix.raw, list(fix.copies)
        else:
            raw = row.raw
            fixed_copies = await self.repo.outbox_copies(row.id) if row.copies else []
            recipients = envelope_recipients(parse_for_envelope(raw), split_addresses(row.bcc))
            # A retry: what is stored once the server accepts it is read back now, on the
            # loop for a short message (well under a millisecond; a thread would hold the GIL
            # while the loop waits to read the server's replies), so recording a batch waits
            # for no parsing.
            with contextlib.suppress(MessageError):  # read back (and raised) when recorded
                parsed = (
                    parse_message(raw) if len(raw) <= INLINE_BYTES
                    else await asyncio.to_thread(parse_message, raw)
                )  # fmt: skip
        if not recipients:
            raise InvalidRowError(
                "no recipient left (the account's own addresses are never sent to)"
            )
        # Before the first copy goes out (a personalised row sends one per recipient): an
        # envelope address SMTP cannot carry fails the row whole, not after some copies.
        unsendable = next((r for r in recipients if not r.isascii()), None)
        if unsendable is not None:
            raise InvalidRowError(
                f"recipient {unsendable!r}: a non-ASCII address needs SMTPUTF8 (RFC 6531), "
                "which mailbridge does not send"
            )
        if parsed is not None:
            self._parsed[row.id] = parsed
        copies = [(c.recipient, c.raw) for c in fixed_copies if not c.sent]
        return _Prepared(raw, recipients, actions, copies, bool(fixed_copies), fix)

    async def _send(
        self, sender: SmtpSender, account: AccountSettings, row: OutboxRow, prepared: _Prepared
    ) -> dict[str, str]:
        """One message for all recipients, or each personalised copy to its recipient (each
        recorded as accepted at once, so a retry sends only the rest)."""
        if not prepared.personal:
            return await sender.send(prepared.raw, account.address, prepared.recipients)
        refused: dict[str, str] = {}
        for recipient, raw in prepared.copies:
            refused.update(await sender.send(raw, account.address, [recipient]))
            await self.repo.outbox_copy_sent(row.id, recipient, datetime.now(UTC))
        return refused

    @staticmethod
    def _actions(row: OutboxRow) -> list[MessageAction]:
        try:
            return parse_actions(row.actions)
        except ValueError as exc:
            raise InvalidRowError(str(exc)) from exc

    async def _compose(
        self, account: AccountSettings, row: OutboxRow, context: ReplyContext | None
    ) -> tuple[OutboxFix, list[str], ParsedMessage | None]:
        """The row's message, to be fixed by :meth:`outbox_begin` before its first attempt,
        its envelope recipients (To, Cc, then Bcc) and the message as it is stored once sent
        (None when it cannot be read: then it is parsed back, and fails, when recorded)."""
        settings = self.settings
        own = account.own_addresses()
        to, cc = split_addresses(row.to), split_addresses(row.cc)
        address = account.address
        parent: dict[str, object] = {}
        if context is not None:
            key = context.key
            subject = row.subject or reply_subject(context.subject)
            if not to and not cc:
                to = list(context.reply_to)
                cc = [address_entry(e, n) for e, n in context.followers]
            if context.own_email and context.own_email in own:
                address = context.own_email  # answer from the alias the customer wrote to
            parent = {
                "parent_message_id": context.parent_message_id,
                "parent_references": context.parent_references,
                "parent_in_reply_to": context.parent_in_reply_to,
            }
        else:
            key = new_conversation_key()
            subject = row.subject or ""
        stored = await self.repo.outbox_files(row.id) if row.files else []
        files = [await self._read_file(f) for f in stored]
        display_name = sender_display_name(
            account.display_name, row.coworker, personalized=account.personalized_emails
        )
        templated = (
            account.template_file is not None
            or bool(account.signature)
            or has_codes(row.body_html)
            or has_codes(row.body_text)
        )
        limit = settings.outbox.max_outgoing_bytes

        async def bodies(recipient: Sequence[str]) -> tuple[str | None, str | None]:
            """The row's bodies with template, signature and merge codes for ``recipient``."""
            if not templated:
                return row.body_html, row.body_text
            data = await self._merge_data(
                account, context, subject, display_name, address, recipient
            )
            return await self._apply_template(account, row.body_html, row.body_text, data)

        def build(
            html: str | None, text: str | None, stored: bool
        ) -> tuple[EmailMessage, bytes, ParsedMessage | None]:
            # CPU work (the stdlib email package): on a thread, beside the SMTP dialogue.
            try:
                message = build_message(
                    address=address,
                    display_name=display_name,
                    identification=settings.identification,
                    conversation_key=key,
                    subject=subject,
                    to=to,
                    cc=cc,
                    own_addresses=own,
                    text=text,
                    html=html,
                    files=files,
                    automatic=row.automatic,
                    **parent,  # type: ignore[arg-type]
                )
            except ValueError as exc:
                raise InvalidRowError(str(exc)) from exc
            raw = message.as_bytes()
            if len(raw) > limit:
                raise InvalidRowError(
                    f"the message is {len(raw)} bytes, over outbox.max_outgoing_size_mb "
                    f"({settings.outbox.max_outgoing_size_mb:g} MB)",
                    code="outgoing_too_large",
                )
            # What is stored once the server accepts it, read from the message as composed
            # (not parsed back from its bytes; the same reading, see parse_composed). Before
            # personal_copies changes the Message-ID: the row stores the first copy (another
            # recipient's own rendering is not stored: ``stored`` False).
            if not stored:
                return message, raw, None
            try:
                parsed: ParsedMessage | None = parse_composed(message, raw)
            except MessageError:
                parsed = None  # parsed back (and raised) when recorded
            return message, raw, parsed

        async def built(
            recipient: Sequence[str], *, stored: bool = True
        ) -> tuple[EmailMessage, bytes, ParsedMessage | None]:
            html, text = await bodies(recipient)
            if files or len(html or "") + len(text or "") > INLINE_BYTES:
                # Attachments or a long text: long work, on a thread beside the SMTP dialogue.
                return await asyncio.to_thread(build, html, text, stored)
            # A short message (about 1 ms) is built in place: a thread would hold the GIL
            # while the loop waits for it to read the server's replies (scripts/bench).
            return build(html, text, stored)

        message, raw, parsed = await built([*to, *cc])
        message_id = message_id_of(message)
        assert message_id is not None
        copies: list[OutboxCopy] = []
        recipients = envelope_recipients(message, split_addresses(row.bcc))
        if account.personalized_emails and len(recipients) > 1:
            if not templated:
                copies = personal_copies(message, recipients)
            else:
                # Each recipient's own rendering: {{ recipient_name }} is theirs.
                copies = [OutboxCopy(recipients[0], message_id, raw)]
                for recipient in recipients[1:]:
                    own_copy, own_raw, _none = await built([recipient], stored=False)
                    own_id = message_id_of(own_copy) or ""
                    copies.append(OutboxCopy(recipient, own_id, own_raw))
        return OutboxFix(message_id, key, raw, tuple(copies)), recipients, parsed

    async def _merge_data(
        self,
        account: AccountSettings,
        context: ReplyContext | None,
        subject: str,
        sender_name: str,
        sender_address: str,
        recipients: Sequence[str],
    ) -> MergeData:
        """What the merge codes are filled from; the recipient is the first To (or Cc)."""
        recipient = address_of(recipients[0]) if recipients else ""
        if context is not None:
            found = await self.repo.template_records(context.conversation_id, recipient)
        else:
            named = [(address_of(r), getaddresses([r])[0][0]) for r in recipients]
            found = TemplateRecords(followers=tuple(named))
        names = dict(found.followers)
        return MergeData(
            subject=subject,
            sender_name=sender_name,
            sender_address=sender_address,
            recipient_name=names.get(recipient, ""),
            recipient_address=recipient,
            followers=found.followers,
            history=[HistoryMessage(*m) for m in found.history],
            records=found.records,
            signature=account.signature,
            language=account.language,
            time_zone=account.time_zone,
        )

    async def _template_source(self, path: Path) -> str:
        """The template file's text, read once for the settings in force: a reload (SIGHUP)
        gives new settings, and the files are read again on their next use."""
        settings = self.settings
        if self._templates_of is not settings:
            self._templates_of, self._templates = settings, {}
        source = self._templates.get(path)
        if source is None:
            try:
                source = await asyncio.to_thread(path.read_text, "utf-8")
            except OSError as exc:
                raise InvalidRowError(f"cannot read template_file {path}: {exc.strerror}") from exc
            self._templates[path] = source
        return source

    async def _apply_template(
        self,
        account: AccountSettings,
        body_html: str | None,
        body_text: str | None,
        data: MergeData,
    ) -> tuple[str | None, str | None]:
        """(html, text) with the account's template, signature and merge codes applied."""
        try:
            if account.template_file is not None:
                source = await self._template_source(account.template_file)
                body = body_html if body_html is not None else text_to_html(body_text or "")
                return render(source, body, data), None
            if body_html is not None:
                return render("{{ body }}{{ signature }}", body_html, data), None
            text = render_text(body_text or "", data)
            if account.signature:
                text = f"{text.rstrip()}\n\n-- \n{html_to_text(account.signature)}"
            return None, text
        except ValueError as exc:
            where = account.template_file or "the body"
            raise InvalidRowError(f"{where}: {exc}") from exc

    async def _read_file(self, file: OutboxFile) -> OutgoingFile:
        data = file.data
        if data is None and file.path is not None:
            allowed = self.settings.outbox.attachment_directories
            if not attachment_allowed(Path(file.path), allowed):
                raise InvalidRowError(
                    f"the attachment {file.path} is not under outbox.attachment_directories "
                    f"({', '.join(map(str, allowed)) or 'none configured'})"
                )
            try:
                data = await asyncio.to_thread(Path(file.path).read_bytes)
            except OSError as exc:
                raise InvalidRowError(
                    f"cannot read the attachment {file.path}: {exc.strerror}"
                ) from exc
        name = file.filename or (Path(file.path).name if file.path else "attachment")
        return OutgoingFile(name, file.content_type, data or b"")

    async def _record_sent(
        self,
        account: AccountSettings,
        sent: Sequence[tuple[OutboxRow, bytes, Sequence[MessageAction]]],
        summary: OutboxSummary,
        *,
        append: bool = True,
    ) -> None:
        """Record rows the server accepted as sent, in one transaction; then their Sent copies."""
        if not sent:
            return
        now = datetime.now(UTC)
        # Read back when the row was prepared (see _prepare), else here (crash recovery).
        kept = [self._parsed.pop(row.id, None) for row, _raw, _a in sent]

        def read_back() -> list[ParsedMessage]:
            return [p or parse_message(r) for p, (_row, r, _a) in zip(kept, sent, strict=True)]

        parsed = read_back() if all(kept) else await asyncio.to_thread(read_back)
        records = []
        for (row, _raw, actions), message in zip(sent, parsed, strict=True):
            bcc = tuple(Address(a) for a in map(address_of, split_addresses(row.bcc)))
            if bcc:
                message = dataclasses.replace(message, bcc=bcc)
            if not actions:
                with contextlib.suppress(InvalidRowError):
                    actions = self._actions(row)
            changes = tuple((a.table, a.column, a.value) for a in actions)
            records.append(SentRecord(row.id, message, now, changes))
        context = ImportContext.for_account(self.settings, account)
        message_rows = await self.repo.outbox_sent(context, records)
        for (row, _raw, _a), record, message_row in zip(sent, records, message_rows, strict=True):
            summary.sent += 1
            log.info(
                "message_sent",
                account=account.name,
                outbox=row.id,
                message_id=record.message.message_id,
                conversationmessage=message_row,
                attempts=row.attempts + 1,
            )
        folders = account.folders
        if append and folders.sent is not None and folders.append_sent:
            await self._append_sent(account, [raw for _row, raw, _a in sent])

    async def _append_sent(self, account: AccountSettings, raws: Sequence[bytes]) -> None:
        assert account.folders.sent is not None
        try:
            session = await ImapSession.open(account)
            try:
                await session.ensure_folders([account.folders.sent])
                for raw in raws:
                    await session.append(account.folders.sent, raw, flags=("\\Seen",))
            finally:
                await session.close()
        except MailbridgeError as exc:
            # Sent already (and recorded): only the copy is missing. Said, not retried.
            log.warning(
                "outbox_sent_copy_failed", account=account.name, folder=account.folders.sent,
                code=exc.code, error=str(exc), remedy=exc.remedy,
            )  # fmt: skip


class _SentRecorder:
    """Group commit: rows accepted by the server are recorded as sent by one background task,
    all those accepted while the previous transaction ran in the next one. The SMTP session
    goes on with the next message meanwhile. The transactions are not synced to the disk
    (``Repository.outbox_sent``): a commit per accepted row costs no fsync, and a kill -9
    leaves at most the rows accepted since the running transaction began unrecorded."""

    def __init__(self, worker: OutboxWorker, account: AccountSettings, summary: OutboxSummary):
        self.worker = worker
        self.account = account
        self.summary = summary
        self.pending: list[tuple[OutboxRow, bytes, Sequence[MessageAction]]] = []
        self.task: asyncio.Task[None] | None = None
        # The first commit that failed: raised by flush() even when a later task succeeded, so
        # the round fails and the worker resolves the rows left ``sending`` (recover).
        self.error: Exception | None = None

    def add(self, row: OutboxRow, raw: bytes, actions: Sequence[MessageAction]) -> None:
        """Hold an accepted row; :meth:`commit` records what is held."""
        self.pending.append((row, raw, actions))

    def commit(self) -> None:
        """Record the rows held, now or, while a transaction runs, in the next one."""
        if self.pending and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._drain(), name=f"outbox-sent:{self.account.name}")

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self.worker._record_sent(self.account, batch, self.summary)
            except Exception as exc:  # kept for flush(); the next rows are still recorded
                if self.error is None:
                    self.error = exc

    async def flush(self) -> None:
        """Wait until every accepted row is recorded (raises what recording raised)."""
        self.commit()
        while self.task is not None:
            task, self.task = self.task, None
            await task
            if self.pending:
                self.task = asyncio.create_task(self._drain())
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def message_id_of(message: EmailMessage) -> str | None:
    """The Message-ID of a message composed here, normalised (read as stored: no header
    object is built for it)."""
    for name, value in message.raw_items():
        if name.lower() == "message-id":
            return normalize_message_id(str(value))
    return None


def pipeline_chunks(rows: Sequence[OutboxRow]) -> list[Sequence[OutboxRow]]:
    """``rows`` in order, in chunks of 1, 2, 4 ... then PIPELINE_CHUNK rows: the first row is
    sent as soon as it alone is composed and marked, later chunks share one transaction each.
    A row with attachments is a chunk of its own: a lane holds at most two of them composed
    (the one being sent and the next), not two chunks' worth."""
    chunks: list[Sequence[OutboxRow]] = []
    current: list[OutboxRow] = []
    size = 1

    def close(chunk: list[OutboxRow]) -> None:
        nonlocal size
        chunks.append(chunk)
        size = min(size * 2, PIPELINE_CHUNK)

    for row in rows:
        if row.files:
            if current:
                close(current)
                current = []
            close([row])
            continue
        current.append(row)
        if len(current) == size:
            close(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def lane_rows(rows: Sequence[OutboxRow], lanes: int) -> list[list[OutboxRow]]:
    """``rows`` shared among ``lanes`` connections (at most; no lane is empty): the rows of one
    conversation (``conversation_id``) all in one lane, in their order, so that replies in a
    conversation leave in the order they were queued; each conversation (a row of a new one on
    its own) to the lane with the fewest rows so far, the earliest lane on a tie."""
    shares: list[list[OutboxRow]] = [[] for _ in range(max(1, lanes))]
    placed: dict[int, list[OutboxRow]] = {}
    for row in rows:
        share = placed.get(row.conversation_id) if row.conversation_id is not None else None
        if share is None:
            share = min(shares, key=len)
            if row.conversation_id is not None:
                placed[row.conversation_id] = share
        share.append(row)
    return [share for share in shares if share]


def attachment_allowed(path: Path, directories: Sequence[Path]) -> bool:
    """Whether ``path``, symbolic links and ``..`` resolved, lies in one of ``directories``."""
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError):
        return False
    return any(real.is_relative_to(d.resolve(strict=False)) for d in directories)


def personal_copies(message: EmailMessage, recipients: Sequence[str]) -> list[OutboxCopy]:
    """One copy per recipient, each with its own Message-ID (the first keeps the message's):
    the same headers and body otherwise, so every recipient sees everyone addressed, and an
    answer from any of them cites an id that leads back to the conversation."""
    first_id = normalize_message_id(str(message["Message-ID"])) or ""
    domain = first_id.rpartition("@")[2] or "localhost"
    copies: list[OutboxCopy] = []
    for index, recipient in enumerate(recipients):
        if index:
            del message["Message-ID"]
            # RFC 5322 section 3.6.4: globally unique; on our domain, no resolver asked.
            message["Message-ID"] = make_msgid(domain=domain)
        message_id = message_id_of(message) or ""
        copies.append(OutboxCopy(recipient, message_id, message.as_bytes()))
    return copies


def parse_for_envelope(raw: bytes) -> EmailMessage:
    """The headers of ``raw`` (for its To and Cc)."""
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)  # policy.default's message factory
    return parsed


UNKNOWN_ACCOUNT_REMEDY = (
    "Set the rows' account to a configured accounts[].name (UPDATE outbox SET account = ..."
    " WHERE id = ...; a failed row then: mailbridge outbox retry ID), or add the account to the"
    " config (with several daemons: to the config of each)."
)


def unknown_account_reason(account: str, configured: Sequence[str], shown: int = 20) -> str:
    """Why a row of ``account`` is not sent: the account, a configured name it may have meant
    (same letters in another case), and the configured names (the first ``shown``)."""
    names = ", ".join(sorted(configured)[:shown]) or "none"
    if len(configured) > shown:
        names += f" and {len(configured) - shown} more"
    near = [n for n in configured if n.casefold() == account.casefold()]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"account {account!r} is not in the config{hint}; configured: {names}"
