"""The ``mailbridge`` command line: run, check-config, status, conversations, failed, sync, doctor,
errors, inspect, auth, reply, send, outbox, snippets.

Exit codes follow sysexits.h so systemd units and scripts can act on them: 0 fine, 1 ``doctor``
found a failing line, 64 usage, 69 a mail server unavailable (``run --once``, ``sync``,
``failed retry``), 70 internal error, 75 temporary failure (database), 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import structlog

from mailbridge import __version__
from mailbridge.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    LogSettings,
    Settings,
    load_config,
    world_readable,
)
from mailbridge.core.policy import AutomaticPolicy
from mailbridge.errors import EX_CONFIG, ConfigError, StoreError, describe, exit_status
from mailbridge.log import configure_logging
from mailbridge.store.base import AccountState, Repository
from mailbridge.store.factory import open_store
from mailbridge.term import console, mail_text

EX_USAGE = 64

log = structlog.get_logger("mailbridge.cli")

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse with sysexits' usage code: a wrong argument exits 64 (EX_USAGE), as the
    commands' own usage errors do, instead of argparse's 2. Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailbridge",
        description="Turn shared IMAP mailboxes into a conversation database.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument("--version", action="version", version=f"mailbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd: Type=notify)")
    run.add_argument("--once", action="store_true", help="one pass over every account, then exit")
    run.add_argument("--account", action="append", help="only this account (repeatable)")

    sub.add_parser("check-config", help="validate the config and the secrets it names")

    status = sub.add_parser("status", help="one row per account: state, last import, counts")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    convs = sub.add_parser("conversations", help="list stored conversations")
    convs.add_argument("--account")
    convs.add_argument("--search", help="text to find in subjects, bodies and addresses")
    convs.add_argument("--limit", type=int, default=50)

    conv = sub.add_parser("conversation", help="one conversation")
    conv_sub = conv.add_subparsers(dest="conversation_command", required=True, metavar="ACTION")
    show = conv_sub.add_parser("show", help="show a conversation with its messages")
    show.add_argument("id", type=int)
    read = conv_sub.add_parser("read", help="mark a conversation read (earliestunread = NULL)")
    read.add_argument("id", type=int)

    failed = sub.add_parser(
        "failed",
        help="messages that could not be imported, and why; show or retry them",
        description="failed [ACCOUNT] [--all] lists them; failed show UID; "
        "failed retry UID... | --all. UIDs are the messages' UIDs in the Failed folder.",
    )
    failed.add_argument("words", nargs="*", metavar="ACCOUNT | show UID | retry UID...")
    failed.add_argument(
        "--all", action="store_true", help="list: include resolved; retry: every message"
    )
    failed.add_argument("--account", help="the account of the UIDs (when several are configured)")

    sync = sub.add_parser(
        "sync", help="the recovery sweep now: retry the Failed folder, import missed Inbox mail"
    )
    sync.add_argument("account", nargs="?")

    doctor = sub.add_parser(
        "doctor", help="check config, secret, network, TLS, login, capabilities, folders, SMTP"
    )
    doctor.add_argument("account", nargs="?")

    errors = sub.add_parser(
        "errors",
        help="delivery errors (bounces, spam complaints) per recipient; resolve one",
        description="errors [--unresolved] [--conversation ID] lists them, newest first; "
        "errors resolve ID marks one resolved.",
    )
    errors.add_argument("--unresolved", action="store_true", help="only unresolved errors")
    errors.add_argument("--conversation", type=int, help="only this conversation's errors")
    errors.add_argument("--json", action="store_true", help="machine-readable output")
    errors_sub = errors.add_subparsers(dest="errors_command", metavar="ACTION")
    resolve = errors_sub.add_parser("resolve", help="mark a delivery error resolved")
    resolve.add_argument("id", type=int)

    discarded = sub.add_parser(
        "discarded",
        help="mail moved to Processed without being stored (automatic mail the policy discards, "
        "the account's own mail), newest first",
    )
    discarded.add_argument("--account", help="only this account")
    discarded.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    discarded.add_argument("--json", action="store_true", help="machine-readable output")

    inspect = sub.add_parser(
        "inspect",
        help="what mailbridge makes of one message (addresses, threading keys, automatic "
        "verdict, bounce) without importing it; needs no config unless --account is given",
    )
    inspect.add_argument("file", type=Path, help="an RFC 5322 message (.eml); - for stdin")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument(
        "--account", help="read plus-address keys against this configured account's addresses"
    )
    auth = sub.add_parser(
        "auth",
        help="OAuth2 sign-in from a terminal (device code, pasted redirect) and token check",
    )
    auth.add_argument("account")
    _sending_parsers(sub)
    return parser


def _sending_parsers(sub: Any) -> None:
    """reply, send, outbox, snippets (mailbridge/cli_send.py)."""
    reply = sub.add_parser(
        "reply", help="queue an answer to a conversation (body from --body-file or stdin)"
    )
    reply.add_argument("conversation", type=int)
    reply.add_argument("--body-file", type=Path, help="the body ('-': stdin)")
    reply.add_argument("--snippet", help="add the text snippet of this name")
    reply.add_argument("--html", action="store_true", help="the body is HTML")
    reply.add_argument("--coworker", default="", help="the sending coworker's name")
    reply.add_argument("--coworker-address", help="the coworker's address (a message follower)")
    reply.add_argument("--actions", help='parent updates after sending, JSON: {"ticket": {...}}')

    send = sub.add_parser("send", help="queue a message that starts a new conversation")
    send.add_argument("account")
    send.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    send.add_argument("--cc", action="append", default=[])
    send.add_argument("--bcc", action="append", default=[])
    send.add_argument("--subject", required=True)
    send.add_argument("--body-file", type=Path, help="the body ('-' or left out: stdin)")
    send.add_argument("--html", action="store_true", help="the body is HTML")
    send.add_argument("--coworker", default="", help="the sending coworker's name")
    send.add_argument("--coworker-address", help="the coworker's address (a message follower)")

    outbox = sub.add_parser(
        "outbox",
        help="queued, failed and sent mail; retry or cancel a row",
        description="outbox [--failed | --all] lists rows (default: queued, sending, failed); "
        "outbox retry ID; outbox cancel ID.",
    )
    outbox.add_argument("words", nargs="*", metavar="retry ID | cancel ID")
    outbox.add_argument("--failed", action="store_true", help="only failed rows")
    outbox.add_argument("--all", action="store_true", help="every row, sent and cancelled too")
    outbox.add_argument("--account")

    snippets = sub.add_parser("snippets", help="text snippets, pinned first")
    snippets.add_argument("--search", help="text to find in name, description and text")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of the output went away (``mailbridge errors --json | head``): stop
        # quietly, as a command killed by SIGPIPE would. stdout goes to /dev/null so the
        # interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect" and args.account is None:
        return _inspect(args.file, as_json=args.json, own=frozenset(), policy=None)
    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        configure_logging(args.log_level or "info", args.log_format or "auto", stream=sys.stderr)
        print(f"mailbridge: config error: {exc}", file=sys.stderr)
        print(f"  fix: {exc.remedy}", file=sys.stderr)
        return EX_CONFIG
    # The daemon logs at the configured level; the operator's commands print their own
    # results, so their log lines are only warnings and errors unless asked for.
    default_level = settings.log.level if args.command == "run" else "warning"
    configure_logging(
        args.log_level or default_level,
        args.log_format or settings.log.format,
        stream=sys.stderr,
    )
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        if exc.code == "account_unknown":  # the command's argument, not the config, is wrong
            print(f"mailbridge: {exc}\n  fix: {exc.remedy}", file=sys.stderr)
            return 1
        print(f"mailbridge: config error: {exc}\n  fix: {exc.remedy}", file=sys.stderr)
        return EX_CONFIG
    except StoreError as exc:
        print(f"mailbridge: {exc.info.title}: {exc}\n  fix: {exc.remedy}", file=sys.stderr)
        return exit_status([exc])  # 75 when it may pass by itself, else 78
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command: str = args.command
    if command == "run":
        return _run(
            settings,
            once=args.once,
            accounts=args.account,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    if command == "check-config":
        return _check_config(settings)
    if command == "status":
        return _status(settings, as_json=args.json)
    if command == "conversations":
        return _conversations(settings, args.account, args.search, args.limit)
    if command == "conversation" and args.conversation_command == "read":
        return _conversation_read(settings, args.id)
    if command == "conversation":
        return _conversation_show(settings, args.id)
    if command == "errors":
        if args.errors_command == "resolve":
            return _errors_resolve(settings, args.id)
        return _errors(
            settings, unresolved=args.unresolved, conversation=args.conversation, as_json=args.json
        )
    if command == "discarded":
        return _discarded(settings, args.account, limit=args.limit, as_json=args.json)
    if command == "inspect":
        account = settings.account(args.account)
        return _inspect(
            args.file,
            as_json=args.json,
            own=account.own_addresses(),
            policy=settings.automatic_policy(account),
        )
    if command == "auth":
        from mailbridge import cli_auth  # msal/google-auth only when signing in

        return cli_auth.auth(settings, args.account)
    if command in {"reply", "send", "outbox", "snippets"}:
        from mailbridge import cli_send

        if command == "reply":
            return cli_send.reply(
                settings,
                args.conversation,
                body_file=args.body_file,
                snippet=args.snippet,
                html=args.html,
                coworker=args.coworker,
                coworker_address=args.coworker_address,
                actions=args.actions,
            )
        if command == "send":
            return cli_send.send(
                settings,
                args.account,
                to=args.to,
                cc=args.cc,
                bcc=args.bcc,
                subject=args.subject,
                body_file=args.body_file,
                html=args.html,
                coworker=args.coworker,
                coworker_address=args.coworker_address,
            )
        if command == "outbox":
            return cli_send.outbox(
                settings, args.words, failed=args.failed, every=args.all, account=args.account
            )
        return cli_send.snippets(settings, args.search)
    if command in {"failed", "sync", "doctor"}:
        from mailbridge import cli_ops  # the operator's tools pull in the IMAP/SMTP layers

        if command == "failed":
            return cli_ops.failed(settings, args.words, every=args.all, account=args.account)
        if command == "sync":
            return cli_ops.sync(settings, args.account)
        return cli_ops.doctor(settings, args.account)
    return EX_USAGE  # pragma: no cover - argparse rejects unknown commands first


def _run(
    settings: Settings,
    *,
    once: bool,
    accounts: list[str] | None,
    log_level: str | None = None,
    log_format: str | None = None,
) -> int:
    from mailbridge.daemon.supervisor import Supervisor, once_exit_code, run_once

    for name in accounts or []:
        settings.account(name)  # raises ConfigError naming the configured accounts
    if once:
        results = asyncio.run(run_once(settings, accounts))
        from rich.text import Text  # not at start-up: rich costs ~0.1 s to import

        out = console()
        for result in results:
            if result.error is not None:
                out.print(
                    Text.assemble(
                        (f"{result.account}: {result.error.code}", "red"),
                        f" {result.error} — {result.error.remedy}",
                    )
                )
            elif result.outbox is not None:
                out.print(result.outbox.line())
            elif result.summary is not None:
                s = result.summary
                out.print(
                    f"{result.account}: imported {s.imported}, duplicates {s.duplicates}, "
                    f"discarded {s.discarded}, bounces {s.bounces}, failed {s.failed}"
                )
        return once_exit_code(results)
    only = frozenset(accounts) if accounts else None

    def reconfigure_log(new: LogSettings) -> None:
        # What the command line says wins over the file, on a reload as at start-up.
        configure_logging(log_level or new.level, log_format or new.format, stream=sys.stderr)

    supervisor = Supervisor(settings, only=only, reconfigure_log=reconfigure_log)
    if settings.sqlite_path is None:
        return asyncio.run(supervisor.run())  # PostgreSQL: the leases share the accounts
    from mailbridge.daemon.instance import DatabaseLock

    lock = DatabaseLock(settings.sqlite_path)  # ConfigError (exit 78) while another runs
    try:
        return asyncio.run(supervisor.run())
    finally:
        lock.release()


def _check_config(settings: Settings) -> int:
    problems: list[str] = []
    for index, account in enumerate(settings.accounts):
        try:
            account.auth.secret()
        except ConfigError as exc:
            # The same key path as a validation error: accounts[0].auth.password_file.
            problems.append(f"accounts[{index}].{exc.path or 'auth'} ({account.name}): {exc}")
        if account.auth.flow in {"device_code", "authorization_code"}:
            cache = account.token_cache_path(settings.sqlite_path)
            if not cache.exists():
                print(
                    f"warning: {account.name}: not signed in yet (no {cache}); run: "
                    f"mailbridge auth {account.name}",
                    file=sys.stderr,
                )
        path = account.auth.password_file or account.auth.client_secret_file
        if path is not None and world_readable(path):
            print(
                f"warning: {path} is readable by every user; run: chmod 600 {path}",
                file=sys.stderr,
            )
        for kind, server in (("imap", account.imap), ("smtp", account.smtp)):
            if server is not None and not server.verify_certificate:
                print(
                    f"warning: accounts[{account.name}].{kind}.verify_certificate is false: "
                    "the connection can be intercepted; prefer ca_file",
                    file=sys.stderr,
                )
    try:
        settings.database_password()
    except ConfigError as exc:
        problems.append(str(exc))
    if settings.postgres is not None and not settings.postgres.tls_verified:
        print(
            f"warning: database: sslmode={settings.postgres.connection_parameters()['sslmode']} "
            "does not verify the server's certificate: the connection can be intercepted; "
            "prefer sslmode=verify-full (with sslrootcert for a private CA)",
            file=sys.stderr,
        )
    inline = [a.name for a in settings.accounts if a.auth.password is not None]
    if inline and settings.source is not None and world_readable(settings.source):
        print(
            f"warning: {settings.source} holds passwords ({', '.join(inline)}) and is readable "
            f"by every user; run: chmod 640 {settings.source}, or move them to password_file",
            file=sys.stderr,
        )
    if problems:
        for problem in problems:
            print(f"mailbridge: config error: {problem}", file=sys.stderr)
        print(f"  fix: {describe('secret_missing').remedy}", file=sys.stderr)
        return EX_CONFIG
    # The parent tables of an existing database must fit the config, as `run` will check them:
    # a config that passes here must not be refused by every other command.
    try:
        repo = _open_store(settings)
    except ConfigError as exc:
        print(f"mailbridge: config error: {exc}\n  fix: {exc.remedy}", file=sys.stderr)
        return EX_CONFIG
    except StoreError as exc:
        print(f"warning: database not checked: {exc.code}: {exc}", file=sys.stderr)
    else:
        if repo is not None:
            repo.close()
    names = ", ".join(a.name for a in settings.accounts)
    print(f"config OK: {settings.source}")
    print(f"  database: {settings.database}")
    print(f"  accounts: {len(settings.accounts)} ({names})")
    return 0


def _open_store(settings: Settings) -> Repository | None:
    # No write transaction beside the daemon unless the command writes (store.factory).
    return open_store(settings)


def _from_store(settings: Settings, ask: Callable[[Repository], T]) -> T | None:
    """What ``ask`` reads (or writes) in the database, which is closed again after it; None
    when there is no database yet."""
    repo = _open_store(settings)
    if repo is None:
        return None
    try:
        return ask(repo)
    finally:
        repo.close()


def _refuse_unknown_account(settings: Settings, account: str | None, found: Sequence[Any]) -> None:
    """An ``--account`` that is neither configured nor found in the database is a typo, not an
    empty list (an account removed from the config still lists what it stored): ConfigError
    ``account_unknown``, which the command line turns into exit 1."""
    if account is not None and not found and account not in {a.name for a in settings.accounts}:
        settings.account(account)


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = int((datetime.now(UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def _status(settings: Settings, *, as_json: bool) -> int:
    from rich.table import Table  # rich only for the commands that print it

    repo = _open_store(settings)
    stored: dict[str, AccountState] = {}
    holders: dict[str, str] = {}  # several daemons (PostgreSQL): who serves each account
    outbox: dict[str, dict[str, int]] = {}
    if repo is not None:
        try:
            stored = {s.account: s for s in repo.account_states()}
            holders = repo.lease_holders()
            outbox = repo.outbox_counts()
        finally:
            repo.close()
    rows: list[dict[str, Any]] = []
    for account in settings.accounts:
        state = stored.get(account.name)
        info = describe(state.code) if state and state.code else None
        expiry = account.auth.secret_expiry_warning()
        rows.append(
            {
                "account": account.name,
                "address": account.address,
                "enabled": account.enabled,
                "state": (state.state if state else "never run") if account.enabled else "disabled",
                "code": state.code if state else None,
                "remedy": info.remedy if info else None,
                "detail": state.detail if state else "",
                "since": _iso(state.since) or None if state else None,
                "last_import": _iso(state.last_import) or None if state else None,
                "imported": state.imported if state else 0,
                "failed": state.failed if state else 0,
                "last_sweep": _iso(state.last_sweep) if state and state.last_sweep else None,
                "sweep": state.sweep_summary if state else "",
                "updated": _iso(state.updated) or None if state else None,
                "holder": holders.get(account.name),
                # auth.client_secret_expires: from 14 days before, every day until renewed
                "warnings": [f"client_secret_expires: {expiry}"] if expiry else [],
                # Outgoing mail not sent yet: queued (incl. sending) and failed rows.
                "outbox": outbox.get(account.name, {}),
            }
        )
    # Queued rows naming an account the config does not have: no daemon with this config sends
    # them (with SQLite the daemon fails them; with PostgreSQL another daemon's config may).
    configured = {a.name for a in settings.accounts}
    unknown = {
        name: states["queued"]
        for name, states in sorted(outbox.items())
        if name not in configured and states.get("queued")
    }
    # Accounts a daemon serves that this config does not have: one not reloaded yet after the
    # shared config changed (a removed account is still served there), or another config.
    elsewhere = {name: holder for name, holder in sorted(holders.items()) if name not in configured}
    if as_json:
        print(
            json.dumps(
                {
                    "database": str(settings.database),
                    "accounts": rows,
                    "outbox_unknown_accounts": unknown,
                    "held_not_in_config": elsewhere,
                },
                indent=2,
            )
        )
        return 0
    table = Table(title=f"mailbridge status — {settings.database}")
    columns = ["account", "state", "last import", "imported", "failed", "outbox", "problem"]
    if holders:
        columns.insert(2, "holder")
    for column in columns:
        table.add_column(column, justify="right" if column in {"imported", "failed"} else "left")
    for row, account in zip(rows, settings.accounts, strict=True):
        state = stored.get(account.name)
        problem = "\n".join(
            ([f"{row['code']}: {row['remedy']}"] if row["code"] else []) + row["warnings"]
        )
        table.add_row(
            row["account"],
            row["state"],
            *([row["holder"] or "-"] if holders else []),
            _ago(state.last_import) if state else "never",
            str(row["imported"]),
            str(row["failed"]),
            ", ".join(f"{n} {state}" for state, n in sorted(row["outbox"].items())),
            problem,
        )
    console().print(table)
    if unknown:
        names = ", ".join(f"{name} ({n} queued)" for name, n in unknown.items())
        console().print(
            f"outbox rows of accounts not in the config: {mail_text(names)} — set their account"
            " to a configured name, or add the account (with several daemons: to each config)"
        )
    if elsewhere:
        names = ", ".join(f"{name} (held by {holder})" for name, holder in elsewhere.items())
        console().print(
            f"served by a daemon but not in this config: {mail_text(names)} — reload that "
            "daemon (systemctl reload mailbridge) if the account was removed"
        )
    return 0


def _conversations(settings: Settings, account: str | None, search: str | None, limit: int) -> int:
    from rich.table import Table  # rich only for the commands that print it

    repo = _open_store(settings)
    if repo is None:
        print(f"no database yet at {settings.database}: run the daemon first", file=sys.stderr)
        return 0
    try:
        found = repo.conversations(account=account, search=search, limit=limit)
    finally:
        repo.close()
    _refuse_unknown_account(settings, account, found)
    table = Table(title=f"{len(found)} conversation(s)")
    for column in ("id", "account", "subject", "messages", "followers", "last message", "key"):
        table.add_column(column)
    for conv in found:
        table.add_row(
            str(conv.id),
            conv.account,
            mail_text(conv.subject),
            str(conv.messages),
            str(conv.followers),
            _iso(conv.last_message),
            conv.uniqueid,
        )
    console().print(table)
    return 0


def _conversation_show(settings: Settings, conversation_id: int) -> int:
    from rich.text import Text

    detail = _from_store(settings, lambda repo: repo.conversation(conversation_id))
    if detail is None:
        print(f"mailbridge: no conversation {conversation_id}", file=sys.stderr)
        return 1
    out = console()
    s = detail.summary
    out.print(Text.assemble((f"Conversation {s.id}", "bold"), "  ", mail_text(s.subject)))
    out.print(f"account {s.account}, key {s.uniqueid}, {s.messages} message(s)")
    unread = _iso(s.earliest_unread) if s.earliest_unread else "none (read)"
    out.print(f"earliest unread: {unread}")
    for table, record in detail.parents:
        out.print(f"parent: {table} {record}")
    links: dict[str, list[str]] = {}
    for email, table, record in detail.follower_parents:
        links.setdefault(email, []).append(f"{table} {record}")
    followers = ", ".join(
        (f"{name} <{email}>" if name else email)
        + ("" if active else " (inactive)")
        + (f" [{', '.join(links[email])}]" if email in links else "")
        for email, name, active in detail.followers
    )
    out.print(mail_text(f"followers: {followers}"))
    for message in detail.messages:
        out.rule(f"#{message.id}  {_iso(message.date)}")
        sender = (
            f"{message.from_name} <{message.from_address}>"
            if message.from_name
            else message.from_address
        )
        out.print(
            mail_text(
                f"From: {sender}\nSubject: {message.subject}\nMessage-ID: {message.message_id}"
                f"\nThreaded by: {message.threaded_by or 'unknown'}"
            )
        )
        if message.message_key and message.message_key != message.message_id:
            # A derived key: the sender reused this Message-ID for another message.
            out.print(mail_text(f"Message key: {message.message_key}"))
        for defect in message.defects:
            out.print(mail_text(f"  defect: {defect}"))
        for filename, ctype, size in message.documents:
            out.print(mail_text(f"  attachment: {filename} ({ctype}, {size} bytes)"))
        for cid, ctype, size in message.embedded_files:
            out.print(mail_text(f"  inline image: cid:{cid} ({ctype}, {size} bytes)"))
        out.print(mail_text(message.plain_text.strip()[:2000]))
    return 0


def _conversation_read(settings: Settings, conversation_id: int) -> int:
    found = _from_store(settings, lambda repo: repo.mark_read(conversation_id))
    if not found:
        print(f"mailbridge: no conversation {conversation_id}", file=sys.stderr)
        return 1
    print(f"conversation {conversation_id} marked read")
    return 0


EX_DATAERR = 65
EX_NOINPUT = 66


def _inspect(
    path: Path, *, as_json: bool, own: frozenset[str], policy: AutomaticPolicy | None
) -> int:
    """``mailbridge inspect FILE``: exit 0, 65 (not a message), 66 (cannot read FILE)."""
    from mailbridge.core.inspect import inspect_message
    from mailbridge.errors import MessageError

    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        print(f"mailbridge: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return EX_NOINPUT
    try:
        _, report = inspect_message(raw, own, policy)
    except MessageError as exc:
        print(f"mailbridge: {path} is not a message mailbridge can read: {exc}", file=sys.stderr)
        return EX_DATAERR
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    out = console()

    def who(value: dict[str, str] | None) -> str:
        if not value:
            return "(none)"
        return f"{value['name']} <{value['address']}>" if value["name"] else value["address"]

    threading = report["threading"]
    lines = [
        f"Message-ID:   {report['message_id'] or '(none)'}",
        f"Key:          {report['message_key']}",
        f"Date:         {report['date']}",
        f"Subject:      {report['subject']}",
        f"From:         {who(report['from'])}",
        f"Reply-To:     {', '.join(who(a) for a in report['reply_to']) or '(none)'}",
        f"To:           {', '.join(who(a) for a in report['to']) or '(none)'}",
        f"Cc:           {', '.join(who(a) for a in report['cc']) or '(none)'}",
        f"Threading:    candidates {', '.join(threading['candidates']) or '(none)'}; "
        f"subject key {threading['subject_key'] or '(none)'}; "
        f"plus keys {', '.join(threading['plus_keys']) or '(none)'}",
        "Automatic:    "
        + (f"yes ({report['automatic_reason']})" if report["automatic"] else "no (a person)"),
    ]
    for case, label in (("new", "If new:      "), ("reply", "If a reply:  ")):
        outcome = report["disposition"][case]
        reason = f" ({outcome['reason']})" if outcome["reason"] else ""
        lines.append(f"{label} {outcome['action']}{reason}")
    bounce = report["bounce"]
    if bounce is None:
        lines.append("Bounce:       no")
    else:
        lines.append(
            f"Bounce:       {bounce['kind']}, original message "
            f"{bounce['original_message_id'] or '(not found)'}"
        )
        for r in bounce["recipients"]:
            kind = "permanent" if r["permanent"] else "temporary"
            lines.append(f"  {r['address']}: {kind} {r['status'] or ''} {r['diagnostic'] or ''}")
        if not bounce["recipients"]:
            lines.append("  (no failed recipient could be read)")
    if report["feedback_report"]:
        fb = report["feedback_report"]
        lines.append(f"Feedback:     {fb['feedback_type']} from {', '.join(fb['recipients'])}")
    if report["challenge"]:
        lines.append(f"Challenge:    {report['challenge']}")
    for attachment in report["attachments"]:
        lines.append(
            f"Attachment:   {attachment['filename']} ({attachment['content_type']}, "
            f"{attachment['size']} bytes)"
        )
    for defect in report["defects"]:
        lines.append(f"Defect:       {defect}")
    out.print(mail_text("\n".join(lines)))
    return 0


def _errors(
    settings: Settings, *, unresolved: bool, conversation: int | None, as_json: bool
) -> int:
    """``mailbridge errors``: one row per failed recipient of a bounce or complaint."""
    from rich.table import Table  # rich only for the commands that print it

    found = (
        _from_store(
            settings,
            lambda repo: repo.delivery_errors(unresolved=unresolved, conversation=conversation),
        )
        or []
    )
    if as_json:
        rows = [
            {
                "id": e.id,
                "account": e.account,
                "conversation": e.conversation,
                "conversationmessage": e.conversation_message,
                "messagefollower": e.message_follower,
                "recipient": e.recipient,
                "type": e.type,
                "status": e.status,
                "diagnostic": e.diagnostic,
                "original_message_id": e.original_message_id,
                "matched_by": e.matched_by,
                "report_kind": e.report_kind,
                "report_message_id": e.report_message_id,
                "report_subject": e.report_subject,
                "report_from": e.report_from,
                "date": _iso(e.date) or None,
                "resolved": _iso(e.resolved) or None,
            }
            for e in found
        ]
        print(json.dumps({"errors": rows}, indent=2, ensure_ascii=False))
        return 0
    table = Table(title=f"{len(found)} delivery error(s)")
    for column in ("id", "date", "account", "recipient", "type", "status", "conversation",
                   "diagnostic", "resolved"):  # fmt: skip
        table.add_column(column)
    for e in found:
        where = str(e.conversation) if e.conversation is not None else "(unmatched)"
        table.add_row(
            str(e.id),
            _iso(e.date),
            e.account,
            mail_text(e.recipient or "(not given)"),
            e.type,
            e.status or "",
            where,
            mail_text(e.diagnostic[:120] or e.report_subject),
            _iso(e.resolved) if e.resolved else "",
        )
    console().print(table)
    return 0


def _discarded(settings: Settings, account: str | None, *, limit: int, as_json: bool) -> int:
    """``mailbridge discarded``: what was moved to Processed without a conversation row, and why
    (README "Automatic mail"); the message itself is in the Processed folder."""
    from rich.table import Table  # rich only for the commands that print it

    found = _from_store(settings, lambda repo: repo.not_stored(account, limit=limit)) or []
    _refuse_unknown_account(settings, account, found)
    if as_json:
        rows = [
            {
                "id": d.id,
                "account": d.account,
                "route": d.route,
                "reason": d.reason,
                "message_id": d.message_id,
                "messagekey": d.message_key,
                "from": d.from_address,
                "subject": d.subject,
                "date": _iso(d.date) or None,
                "moved": _iso(d.at),
            }
            for d in found
        ]
        print(json.dumps({"discarded": rows}, indent=2, ensure_ascii=False))
        return 0
    table = Table(title=f"{len(found)} message(s) moved to Processed without being stored")
    for column in ("moved", "account", "route", "from", "subject", "reason"):
        table.add_column(column)
    for d in found:
        table.add_row(
            _iso(d.at),
            d.account,
            d.route,
            mail_text(d.from_address or "(none)"),
            mail_text(d.subject),
            mail_text(d.reason),
        )
    console().print(table)
    return 0


def _errors_resolve(settings: Settings, error_id: int) -> int:
    done = _from_store(settings, lambda repo: repo.resolve_delivery_error(error_id))
    if not done:
        print(f"mailbridge: no unresolved delivery error {error_id}", file=sys.stderr)
        return 1
    print(f"delivery error {error_id} resolved")
    return 0
