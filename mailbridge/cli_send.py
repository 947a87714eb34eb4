"""The sending commands: ``reply``, ``send``, ``outbox`` (list, retry, cancel) and ``snippets``.

``reply`` and ``send`` only queue: they insert an ``outbox`` row (exactly what an integrator's
INSERT does) into the configured database (SQLite or PostgreSQL), and a running daemon sends it
within a second: with SQLite nudged on its wake socket
(:func:`mailbridge.daemon.outbox.notify_daemon`), with PostgreSQL by the outbox trigger's
NOTIFY. Without a running daemon, ``mailbridge run --once`` sends it. Exit codes as in
:mod:`mailbridge.cli`: 0 fine, 1 no such row or conversation, 64 usage.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from mailbridge.config import Settings
from mailbridge.core.outbox import check_actions, not_addresses, parse_actions
from mailbridge.daemon.outbox import notify_daemon
from mailbridge.errors import describe
from mailbridge.store.base import Repository
from mailbridge.store.factory import connector
from mailbridge.store.outbox import OutgoingRequest
from mailbridge.term import console, mail_text

EX_USAGE = 64
EX_NOINPUT = 66


def _open(settings: Settings) -> Repository:
    """The configured database (SQLite or PostgreSQL), created and migrated if need be."""
    repo = connector(settings.database, settings.database_password())()
    try:
        repo.migrate()
    except BaseException:
        repo.close()
        raise
    return repo


def _no_database(settings: Settings) -> bool:
    """True (said on stderr) when ``database`` is a SQLite file not created yet."""
    path = settings.sqlite_path
    if path is not None and not path.exists():
        print(f"no database yet at {settings.database}", file=sys.stderr)
        return True
    return False


def _wake(settings: Settings, repo: Repository) -> bool:
    """Nudge a running daemon; False when none listens. PostgreSQL's trigger has NOTIFYed
    the daemons already: this only asks whether any listens."""
    watchers = repo.outbox_watchers()
    if watchers is not None:
        return watchers > 0
    path = settings.sqlite_path
    return path is not None and notify_daemon(path)


class _UnreadableError(Exception):
    """The body file named on the command line cannot be read (the message says why)."""


def _read_body(body_file: Path | None) -> str | None:
    """The body from ``--body-file`` (``-`` for stdin), else stdin when it is not a terminal.
    Raises _UnreadableError for a file that cannot be read."""
    if body_file is not None and str(body_file) != "-":
        try:
            return body_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _UnreadableError(f"cannot read --body-file {body_file}: {reason}") from exc
    if body_file is not None or not sys.stdin.isatty():
        try:
            return sys.stdin.read()
        except OSError:  # no stdin at all (a service, a test runner)
            return None
    return None


def _bad_actions(
    actions: str | None, parent_columns: Mapping[str, frozenset[str]] | None = None
) -> str | None:
    """Why ``--actions`` breaks the rules the worker applies, or None: refused when queued
    rather than failing the row later. Its form (:func:`parse_actions`); with
    ``parent_columns`` (the conversation's parent tables and their columns, as
    :meth:`~mailbridge.store.outbox.OutboxRepository.reply_context` reads them for the worker
    too), the tables and columns it names (:func:`check_actions`)."""
    try:
        parsed = parse_actions(actions)
    except ValueError as exc:
        return str(exc)
    return None if parent_columns is None else check_actions(parsed, parent_columns)


def _queued(settings: Settings, outbox_id: int, what: str, account: str, woke: bool) -> None:
    print(f"queued {what} as outbox row {outbox_id}")
    if settings.account(account).smtp is None:
        print(
            f"warning: account {account} has no smtp settings; the row waits until they are set",
            file=sys.stderr,
        )
    elif not woke:
        print("  no daemon is running: 'mailbridge run --once' sends it", file=sys.stderr)


def reply(
    settings: Settings,
    conversation_id: int,
    *,
    body_file: Path | None,
    snippet: str | None,
    html: bool,
    coworker: str,
    coworker_address: str | None,
    actions: str | None,
) -> int:
    """``mailbridge reply CONVERSATION``: queue an answer to the conversation's followers."""
    problem = _bad_actions(actions)
    if problem is not None:
        print(f"mailbridge: {problem}", file=sys.stderr)
        return EX_USAGE
    try:
        body = _read_body(body_file)  # with --snippet too: the snippet comes after it
    except _UnreadableError as exc:
        print(f"mailbridge: {exc}", file=sys.stderr)
        return EX_NOINPUT
    repo = _open(settings)
    try:
        context = repo.reply_context(conversation_id)
        if context is None:
            print(f"mailbridge: no conversation {conversation_id}", file=sys.stderr)
            return 1
        settings.account(context.account)  # ConfigError (78) for an account no longer configured
        problem = _bad_actions(actions, context.parent_columns)  # against the database
        if problem is not None:
            print(f"mailbridge: {problem}", file=sys.stderr)
            return EX_USAGE
        if snippet is not None:
            found = repo.use_snippet(snippet, datetime.now(UTC))
            if found is None:
                print(
                    f"mailbridge: no active snippet named {snippet!r} ('mailbridge snippets')",
                    file=sys.stderr,
                )
                return 1
            html = html or found.type == "html"
            body = f"{body.rstrip()}\n\n{found.text}" if body and body.strip() else found.text
        if body is None or not body.strip():
            print(
                "mailbridge: give the body with --body-file FILE, on stdin, or with --snippet NAME",
                file=sys.stderr,
            )
            return EX_USAGE
        outbox_id = repo.queue_outgoing(
            OutgoingRequest(
                account=context.account,
                conversation_id=conversation_id,
                body_html=body if html else None,
                body_text=None if html else body,
                coworker=coworker,
                coworker_address=coworker_address,
                actions=actions,
            )
        )
        woke = _wake(settings, repo)
    finally:
        repo.close()
    what = f"a reply to conversation {conversation_id}"
    _queued(settings, outbox_id, what, context.account, woke)
    return 0


def send(
    settings: Settings,
    account: str,
    *,
    to: Sequence[str],
    cc: Sequence[str],
    bcc: Sequence[str],
    subject: str,
    body_file: Path | None,
    html: bool,
    coworker: str,
    coworker_address: str | None,
) -> int:
    """``mailbridge send ACCOUNT --to ADDR --subject TEXT``: queue a new conversation."""
    settings.account(account)  # ConfigError naming the configured accounts
    bad = not_addresses([*to, *cc, *bcc])
    if bad:
        print(f"mailbridge: not an email address: {', '.join(map(repr, bad))}", file=sys.stderr)
        return EX_USAGE
    try:
        body = _read_body(body_file)
    except _UnreadableError as exc:
        print(f"mailbridge: {exc}", file=sys.stderr)
        return EX_NOINPUT
    if body is None or not body.strip():
        print("mailbridge: give the body with --body-file FILE or on stdin", file=sys.stderr)
        return EX_USAGE
    repo = _open(settings)
    try:
        outbox_id = repo.queue_outgoing(
            OutgoingRequest(
                account=account,
                to=", ".join(to),
                cc=", ".join(cc),
                bcc=", ".join(bcc),
                subject=subject,
                body_html=body if html else None,
                body_text=None if html else body,
                coworker=coworker,
                coworker_address=coworker_address,
            )
        )
        woke = _wake(settings, repo)
    finally:
        repo.close()
    _queued(settings, outbox_id, "a new conversation", account, woke)
    return 0


def outbox(
    settings: Settings, words: Sequence[str], *, failed: bool, every: bool, account: str | None
) -> int:
    """``mailbridge outbox [--failed|--all]``, ``outbox retry ID``, ``outbox cancel ID``."""
    if words and words[0] in {"retry", "cancel"}:
        if len(words) != 2 or not words[1].isdigit():
            print(f"usage: mailbridge outbox {words[0]} ID", file=sys.stderr)
            return EX_USAGE
        outbox_id = int(words[1])
        repo = _open(settings)
        try:
            done = (repo.outbox_retry if words[0] == "retry" else repo.outbox_cancel)(outbox_id)
            row = repo.outbox_row(outbox_id)
            if done and words[0] == "retry":
                _wake(settings, repo)
        finally:
            repo.close()
        if row is None:
            print(
                f"mailbridge: no outbox row {outbox_id} ('mailbridge outbox --all')",
                file=sys.stderr,
            )
            return 1
        if not done:
            state = row.state
            need = "failed or cancelled" if words[0] == "retry" else "queued or failed"
            print(
                f"mailbridge: outbox row {outbox_id} is {state}; {words[0]} needs a row {need}",
                file=sys.stderr,
            )
            return 1
        print(f"outbox row {outbox_id}: {'queued again' if words[0] == 'retry' else 'cancelled'}")
        return 0
    if words:
        print("usage: mailbridge outbox [--failed | --all] | retry ID | cancel ID", file=sys.stderr)
        return EX_USAGE
    if _no_database(settings):
        return 0
    states = ["failed"] if failed else None if every else ["queued", "sending", "failed"]
    repo = _open(settings)
    try:
        rows = repo.outbox(states=states, account=account, limit=200)
    finally:
        repo.close()
    table = Table(title=f"{len(rows)} outbox row(s)")
    for column in ("id", "account", "state", "to / conversation", "attempts", "next attempt",
                   "error"):  # fmt: skip
        table.add_column(column)
    for row in rows:
        target = f"conversation {row.conversation_id}" if row.conversation_id else row.to
        error = ""
        if row.last_error_code:
            error = f"{row.last_error_code}: {row.last_error or ''}"
            if row.state == "failed":
                error += f" — {describe(row.last_error_code).remedy}"
        table.add_row(
            str(row.id),
            row.account,
            row.state,
            mail_text(target),
            str(row.attempts),
            row.next_attempt.isoformat(timespec="seconds") if row.next_attempt else "",
            mail_text(error),
        )
    console().print(table)
    return 0


def snippets(settings: Settings, search: str | None) -> int:
    """``mailbridge snippets [--search TEXT]``: active snippets, pinned first."""
    if _no_database(settings):
        return 0
    repo = _open(settings)
    try:
        found = repo.snippets(search)
    finally:
        repo.close()
    table = Table(title=f"{len(found)} snippet(s)")
    for column in ("name", "pinned", "type", "language", "uses", "last used", "description"):
        table.add_column(column)
    for s in found:
        table.add_row(
            mail_text(s.name),
            "yes" if s.pinned else "",
            s.type,
            s.language or "",
            str(s.count),
            s.last_used.isoformat(timespec="seconds") if s.last_used else "never",
            mail_text(s.description),
        )
    console().print(table)
    return 0
