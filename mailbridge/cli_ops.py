"""The operator's commands: ``sync``, ``failed`` (list, show, retry) and ``doctor``.

They answer "what failed, why, and is it fixed now?" without SQL. Failed messages are named by
their UID in the account's *Failed folder* (``importfailure.folderuid``): the number an
operator also sees in a mail client and the one ``failed show``/``failed retry`` take.
Exit codes as in :mod:`mailbridge.cli`: 0 fine, 1 ``doctor`` found a failing line, 64 usage,
69 an account could not connect or log in.

Mail text (subjects, senders, headers, the reasons that quote them) is printed exactly as it is
written, through :func:`mailbridge.term.mail_text`: "[external] Invoice [/b]" is not rich
markup, ":warning:" is not an emoji code, and an escape sequence in a subject must not drive the
operator's terminal.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from mailbridge.config import AccountSettings, Settings
from mailbridge.daemon.doctor import Check, check_database, diagnose, failing
from mailbridge.daemon.outbox import served_by_daemons
from mailbridge.daemon.sweep import SweepSummary, fetch_failed, retry_failed, sweep_and_record
from mailbridge.errors import (
    EX_CONFIG,
    ConfigError,
    MailbridgeError,
    MessageError,
    describe,
    exit_status,
)
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import FailureRecord
from mailbridge.store.factory import open_repository, open_store
from mailbridge.term import console, mail_text

EX_USAGE = 64
_CONFIG_CODES = frozenset({"config_invalid", "secret_missing"})

_MARKS = {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""


def _chosen(settings: Settings, name: str | None) -> list[AccountSettings]:
    if name is not None:
        return [settings.account(name)]  # ConfigError naming the configured accounts
    return [a for a in settings.accounts if a.enabled]


# -- sync -------------------------------------------------------------------------------------


def sync(settings: Settings, account: str | None) -> int:
    """``mailbridge sync [ACCOUNT]``: the recovery sweep now, with a summary per account."""
    accounts = _chosen(settings, account)
    out = console()
    results = asyncio.run(_sync(settings, accounts, out))
    table = Table(title="recovery sweep")
    for column in ("account", "retried", "recovered", "still failing", "inbox imported",
                   "new failures", "skipped (grace)", "why"):  # fmt: skip
        table.add_column(column)
    errors: list[tuple[str, MailbridgeError]] = []
    for name, outcome in results:
        if isinstance(outcome, MailbridgeError):
            errors.append((name, outcome))
            table.add_row(
                name, "-", "-", "-", "-", "-", "-", mail_text(f"{outcome.code}: {outcome}")
            )
            continue
        why = ", ".join(f"{code} ×{n}" for code, n in sorted(outcome.reasons().items()))
        table.add_row(
            name,
            str(outcome.retried),
            str(outcome.recovered + outcome.already_imported),
            str(len(outcome.still_failing)),
            str(outcome.inbox_imported),
            str(len(outcome.new_failures)),
            str(outcome.skipped_young),
            why,
        )
    out.print(table)
    for name, outcome in results:
        if isinstance(outcome, SweepSummary):
            _print_failures(out, name, outcome)
            _print_reconciled(out, name, outcome)
            if outcome.left_old:
                out.print(
                    f"{name}: {outcome.left_old} older message(s) in the Failed folder were not "
                    f"retried (over recovery.max_failed_age_days); 'mailbridge failed retry "
                    f"--all --account {name}' retries them"
                )
    for name, exc in errors:
        _print_error(out, name, exc)
    return exit_status([exc for _, exc in errors])  # as `run --once`


async def _sync(
    settings: Settings, accounts: Sequence[AccountSettings], out: Console
) -> list[tuple[str, SweepSummary | MailbridgeError]]:
    repo = await open_repository(settings.database, settings)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=out,
        transient=True,
        disable=not out.is_terminal,  # a bar in a pipe or a log is noise
    )
    try:
        with progress:

            async def one(account: AccountSettings) -> tuple[str, SweepSummary | MailbridgeError]:
                tasks: dict[str, object] = {}

                def report(phase: str, done: int, total: int) -> None:
                    if phase not in tasks:
                        label = "Failed folder" if phase == "failed" else "Inbox"
                        tasks[phase] = progress.add_task(f"{account.name}: {label}", total=total)
                    progress.update(tasks[phase], completed=done, total=total)  # type: ignore[arg-type]

                try:
                    summary = await sweep_and_record(settings, account, repo, progress=report)
                except MailbridgeError as exc:
                    return account.name, exc
                await _clear_command_error(settings, repo, account.name)
                return account.name, summary

            return list(await asyncio.gather(*(one(a) for a in accounts)))
    finally:
        await repo.aclose()


async def _clear_command_error(settings: Settings, repo: AsyncRepository, name: str) -> None:
    """After a command reached the server and did its work, an error state a command left
    (``run --once`` that could not log in, say) is stale: store ``stopped``, as a successful
    ``run --once`` leaves it, so that ``status`` no longer asks to fix what is fixed. A running
    daemon's state is its own (it stores the next one itself): left alone, by the rule
    ``run --once`` follows (:func:`served_by_daemons`: on PostgreSQL the lease table)."""
    stored = next((s for s in await repo.account_states() if s.account == name), None)
    if stored is None or stored.code is None or await served_by_daemons(settings, repo, [name]):
        return
    now = datetime.now(UTC)
    # `imported` is added to the stored count, not set: 0 keeps it.
    await repo.set_account_state(
        replace(stored, state="stopped", code=None, detail="", imported=0, since=now, updated=now)
    )


def _print_failures(out: Console, name: str, summary: SweepSummary) -> None:
    for failure in summary.still_failing:
        out.print(
            mail_text(
                f"{name}: still failing, Failed-folder UID {failure.uid}: {failure.subject!r} — "
                f"{failure.code}: {failure.reason}"
            )
        )
        out.print(f"  fix: {describe(failure.code).remedy}")
    for failure in summary.new_failures:
        out.print(
            mail_text(
                f"{name}: new failure (moved to the Failed folder): {failure.subject!r} — "
                f"{failure.code}: {failure.reason}"
            )
        )


def _print_reconciled(out: Console, name: str, summary: SweepSummary) -> None:
    if summary.reconciled:
        out.print(
            f"{name}: {summary.reconciled} failure(s) no longer in the Failed folder (deleted or "
            "moved by hand) marked resolved; 'mailbridge failed --all' lists them"
        )


def _print_error(out: Console, name: str, exc: MailbridgeError) -> None:
    # The detail can quote the server (or a folder name): literal as well.
    out.print(Text.assemble((f"{name}: {exc.code}", "red"), " ", mail_text(str(exc))))
    out.print(f"  fix: {exc.remedy}")


# -- failed -----------------------------------------------------------------------------------


def failed(settings: Settings, words: Sequence[str], *, every: bool, account: str | None) -> int:
    """``failed [ACCOUNT] [--all]``, ``failed show UID``, ``failed retry UID...|--all``."""
    if words and words[0] == "show":
        if len(words) != 2 or not words[1].isdigit():
            print("usage: mailbridge failed show UID [--account A]", file=sys.stderr)
            return EX_USAGE
        return _show(settings, int(words[1]), account)
    if words and words[0] == "retry":
        uids = words[1:]
        if (not uids and not every) or (uids and every) or not all(u.isdigit() for u in uids):
            print("usage: mailbridge failed retry UID... | --all [--account A]", file=sys.stderr)
            return EX_USAGE
        return _retry(settings, [int(u) for u in uids] if uids else None, account)
    if len(words) > 1:
        print("usage: mailbridge failed [ACCOUNT] [--all]", file=sys.stderr)
        return EX_USAGE
    return _list(settings, words[0] if words else account, include_resolved=every)


def _records(
    settings: Settings, account: str | None, *, include_resolved: bool
) -> list[FailureRecord]:
    repo = open_store(settings)
    if repo is None:
        return []
    try:
        return repo.failures(account, include_resolved=include_resolved)
    finally:
        repo.close()


def _list(settings: Settings, account: str | None, *, include_resolved: bool) -> int:
    if account is not None:
        settings.account(account)
    records = _records(settings, account, include_resolved=include_resolved)
    table = Table(
        title=f"{len(records)} failed message(s)",
        caption="UID: the message's UID in the account's Failed folder "
        "(for 'failed show UID' and 'failed retry UID'); '?': the server did not report it",
    )
    columns = ["account", "UID", "date", "from", "subject", "size", "last reason", "attempts"]
    if include_resolved:
        columns += ["resolved", "resolution"]
    for column in columns:
        table.add_column(
            column, justify="right" if column in {"UID", "size", "attempts"} else "left"
        )
    for rec in records:
        row: list[str | Text] = [
            rec.account,
            str(rec.folder_uid) if rec.folder_uid is not None else "?",
            _iso(rec.date),
            mail_text(rec.from_address),
            mail_text(rec.subject),
            _size(rec.size),
            mail_text(f"{rec.code}: {rec.reason}"),
            str(rec.attempts),
        ]
        if include_resolved:
            row += [_iso(rec.resolved), rec.resolution or ""]
        table.add_row(*row)
    console().print(table)
    return 0


def _resolved(record: FailureRecord) -> str:
    if record.resolved is None:
        return "no"
    how = f" ({record.resolution})" if record.resolution else ""
    return f"{_iso(record.resolved)}{how}"


def _size(size: int) -> str:
    for unit, scale in (("MB", 1024 * 1024), ("kB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _find(
    settings: Settings, uid: int, account: str | None
) -> tuple[AccountSettings | None, FailureRecord | None, str]:
    """The account and stored failure of Failed-folder UID ``uid``; the str explains a miss."""
    records = [r for r in _records(settings, account, include_resolved=True) if r.folder_uid == uid]
    unresolved = [r for r in records if r.resolved is None] or records
    if account is not None:
        return settings.account(account), (unresolved[0] if unresolved else None), ""
    owners = {r.account for r in unresolved}
    if len(owners) > 1:
        return (
            None,
            None,
            f"UID {uid} is in the Failed folder of {', '.join(sorted(owners))}: add --account",
        )
    if owners:
        name = owners.pop()
        return settings.account(name), unresolved[0], ""
    enabled = [a for a in settings.accounts if a.enabled]
    if len(enabled) == 1:
        return enabled[0], None, ""
    return (
        None,
        None,
        f"no stored failure has Failed-folder UID {uid}: add --account to look on the server",
    )


def _show(settings: Settings, uid: int, account_name: str | None) -> int:
    account, record, problem = _find(settings, uid, account_name)
    if account is None:
        print(f"mailbridge: {problem}", file=sys.stderr)
        return EX_USAGE
    out = console()
    out.print(
        Text.assemble(
            (account.name, "bold"),
            mail_text(f": Failed-folder UID {uid} ({account.folders.failed!r})"),
        )
    )
    if record is not None:
        info = describe(record.code)
        for label, value in (
            ("reason", f"{record.code}: {record.reason}"),
            ("fix", info.remedy),
            ("attempts", str(record.attempts)),
            ("first failed", _iso(record.first_failed)),
            ("last failed", _iso(record.last_failed)),
            ("resolved", _resolved(record)),
            ("Inbox UID", str(record.uid)),
            ("Message-ID", record.message_id or ""),
            ("message key", record.message_key),
            ("from", record.from_address),
            ("subject", record.subject),
            ("date", _iso(record.date)),
            ("size", f"{record.size} bytes"),
        ):
            out.print(mail_text(f"  {label:<13} {value}"))
    else:
        out.print("  no failure is stored for this UID (moved to the Failed folder by hand?)")
    shown = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Content-Type")
    try:
        fetched = asyncio.run(
            fetch_failed(account, [uid], shown, whole_up_to=settings.limits.message_max_bytes)
        )
    except MailbridgeError as exc:
        out.print(mail_text(f"on the server: not reachable — {exc.code}: {exc}"))
        out.print(f"  fix: {exc.remedy}")
        return EX_CONFIG if isinstance(exc, ConfigError) else 0
    if not fetched:
        out.print(f"on the server: no message with UID {uid} in {account.folders.failed!r} "
                  "(imported, moved or deleted since)")  # fmt: skip
        return 0 if record is not None else 1
    meta, message, whole = fetched[0]
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(message.raw)
    out.print(f"on the server: {meta.size} bytes, received {_iso(meta.internaldate)}")
    for header in shown:
        found = headers.get(header)
        if found is not None:
            out.print(mail_text(f"  {header}: {found}"))
    # What the parser repairs or cannot read in it (an imported message keeps these in
    # conversationmessage.defects; this one is read again from the server). A message over the
    # size limit is not downloaded: its header fields alone would show made-up defects.
    if not whole:
        out.print("  (over limits.message_max_size_mb: not downloaded, so not parsed here)")
        return 0
    from mailbridge.core.parse import parse_message  # only here: keeps start-up light

    try:
        defects = parse_message(message.raw).defects
    except MessageError as exc:
        out.print(mail_text(f"  parser: {exc.code}: {exc}"))
    else:
        for defect in defects:
            out.print(mail_text(f"  defect: {defect}"))
    return 0


def _retry(settings: Settings, uids: list[int] | None, account_name: str | None) -> int:
    plan: dict[str, tuple[AccountSettings, list[int] | None]] = {}
    if uids is None:
        for chosen in _chosen(settings, account_name):
            plan[chosen.name] = (chosen, None)
    else:
        for uid in uids:
            account, _record, problem = _find(settings, uid, account_name)
            if account is None:
                print(f"mailbridge: {problem}", file=sys.stderr)
                return EX_USAGE
            entry = plan.setdefault(account.name, (account, []))
            assert entry[1] is not None
            entry[1].append(uid)
    out = console()
    results = asyncio.run(_retry_all(settings, list(plan.values())))
    errors: list[MailbridgeError] = []
    missing = failing = 0
    for name, outcome in results:
        if isinstance(outcome, MailbridgeError):
            errors.append(outcome)
            _print_error(out, name, outcome)
            continue
        out.print(f"{name}: {outcome.line()}")
        _print_failures(out, name, outcome)
        _print_reconciled(out, name, outcome)
        failing += len(outcome.still_failing)
        asked = len(plan[name][1] or ())
        if asked > outcome.retried:
            missing += asked - outcome.retried
            out.print(f"{name}: {asked - outcome.retried} UID(s) not in the Failed folder")
    # A UID asked for that is not there is "not found" (exit 1), as for `failed show UID`; a
    # message retried that failed again is not done either (exit 1), so a script can tell.
    return exit_status(errors) or (1 if missing or failing else 0)


async def _retry_all(
    settings: Settings, plan: list[tuple[AccountSettings, list[int] | None]]
) -> list[tuple[str, SweepSummary | MailbridgeError]]:
    repo = await open_repository(settings.database, settings)
    try:

        async def one(
            account: AccountSettings, uids: list[int] | None
        ) -> tuple[str, SweepSummary | MailbridgeError]:
            try:
                summary = await retry_failed(settings, account, repo, uids)
            except MailbridgeError as exc:
                return account.name, exc
            await repo.record_sweep(
                account.name,
                summary.finished or datetime.now(UTC),
                f"failed retry: {summary.line()}",
                summary.imported,
            )
            await _clear_command_error(settings, repo, account.name)
            return account.name, summary

        return list(await asyncio.gather(*(one(a, u) for a, u in plan)))
    finally:
        await repo.aclose()


# -- doctor -----------------------------------------------------------------------------------


def doctor(settings: Settings, account: str | None) -> int:
    """``mailbridge doctor [ACCOUNT]``: the checklist; exit 1 when any line fails."""
    accounts = _chosen(settings, account)
    out = console()
    general = [Check("config valid", "ok", str(settings.source or "")), check_database(settings)]
    per_account = asyncio.run(_diagnose_all(accounts, settings.limits.backlog_warning))
    _print_checks(out, general, indent="")
    for acc, checks in zip(accounts, per_account, strict=True):
        out.print(Text.assemble((acc.name, "bold"), f" ({acc.address})"))
        _print_checks(out, checks, indent="  ")
    bad = failing(general) or any(failing(c) for c in per_account)
    if bad:
        out.print("some checks failed: fix the first ✗ line first", style="red")
    else:
        out.print("all checks passed")
    # A secret that cannot be read is a configuration error, as for every other command.
    if any(c.code in _CONFIG_CODES for checks in per_account for c in checks):
        return EX_CONFIG
    return 1 if bad else 0


async def _diagnose_all(
    accounts: Sequence[AccountSettings], backlog_warning: int
) -> list[list[Check]]:
    return list(
        await asyncio.gather(*(diagnose(a, backlog_warning=backlog_warning) for a in accounts))
    )


def _print_checks(out: Console, checks: Sequence[Check], *, indent: str) -> None:
    colours = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
    for check in checks:
        mark = (_MARKS[check.status], colours[check.status])
        line = Text.assemble(indent, mark, f" {check.name}")
        if check.code:
            line.append(f": {check.code}")
        if check.detail:
            line.append(f" — {check.detail}")
        out.print(line)
        if check.remedy:
            out.print(f"{indent}    fix: {check.remedy}")
