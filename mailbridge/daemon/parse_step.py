"""The parse step of an import, in a module of its own: what parse worker processes import.

Worker processes (``daemon/parsing.py``) unpickle :func:`parse_batch` by module name, and the
forkserver preloads this module. It imports only the parser and the store's data classes, not
the daemon (the config's pydantic models, SQLite, the IMAP client, the CLI's rich tables): a
worker pool used to start by importing all of ``mailbridge.daemon.account``, ~0.9 s of imports
on a busy 2-core machine before the first message of a backlog could be parsed.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

from mailbridge.core.messagekey import content_fingerprint, failure_key
from mailbridge.core.parse import parse_message, summarise_headers
from mailbridge.core.policy import analyse
from mailbridge.errors import MessageError
from mailbridge.store.base import FailureInfo, ImportItem


class FetchedMessage(Protocol):
    """What the parse step reads of a fetched message (``mail.imap.FetchedMessage``)."""

    @property
    def uid(self) -> int: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def internaldate(self) -> datetime | None: ...


class RawMessage(NamedTuple):
    """A fetched message as sent to a worker process: unpickling it imports nothing more
    (``mail.imap.FetchedMessage`` would import the IMAP client and the config in each worker)."""

    uid: int
    raw: bytes
    internaldate: datetime | None


def portable(fetched: Iterable[FetchedMessage]) -> list[RawMessage]:
    """``fetched`` as :class:`RawMessage` tuples, for :func:`parse_batch` in a worker."""
    return [RawMessage(m.uid, m.raw, m.internaldate) for m in fetched]


def parse_batch(
    fetched: Sequence[FetchedMessage], max_attachment_bytes: int
) -> tuple[list[ImportItem], list[FailureInfo]]:
    """Parse a fetched batch; runs on a worker thread, never on the event loop."""
    items: list[ImportItem] = []
    failures: list[FailureInfo] = []
    for message in fetched:
        try:
            parsed = parse_message(
                message.raw,
                max_attachment_bytes=max_attachment_bytes,
                # A missing, broken or future Date falls back to when the message arrived.
                arrival=message.internaldate,
            )
            # What core/policy.py needs: the automatic verdict and any delivery report. Inside
            # the try: a bug here fails this message, not the batch (and the account's loop).
            automatic, report = analyse(message.raw, parsed)
        except MessageError as exc:
            failures.append(failure_from_raw(message, exc.code, str(exc)))
        except Exception as exc:  # the parser promises MessageError; a bug must not stop the batch
            failure = failure_from_raw(
                message, "internal", f"unexpected {type(exc).__name__} in the parser: {exc}"
            )
            failures.append(dataclasses.replace(failure, traceback=traceback.format_exc()))
        else:
            items.append(
                ImportItem(uid=message.uid, message=parsed, automatic=automatic, report=report)
            )
    return items, failures


def failure_from_raw(message: FetchedMessage, code: str, reason: str) -> FailureInfo:
    """Describe a message we could not parse, from what its headers still tell."""
    headers = summarise_headers(message.raw)
    return FailureInfo(
        uid=message.uid,
        # One key per content, resolved when this message itself is imported.
        message_key=failure_key(headers.message_id, content_fingerprint(message.raw)),
        code=code,
        reason=reason,
        message_id=headers.message_id,
        subject=headers.subject,
        from_address=headers.from_address,
        # When it arrived (INTERNALDATE), as the recovery sweep's age limit counts it.
        date=message.internaldate,
        size=len(message.raw),
    )


def exit_with_parent(daemon_pid: int) -> None:
    """Pool worker start-up (the pool's initializer): exit when the daemon is gone.

    A worker waits on a queue whose write end it holds itself, so it would outlive a daemon
    killed with SIGKILL (found by ``scripts/crashtest``); a daemon thread watches instead.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(daemon_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid was reused by another user's process
                os._exit(0)

    threading.Thread(target=watch, name="mailbridge-parent-watch", daemon=True).start()
