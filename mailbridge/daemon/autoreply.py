"""Automatic replies to messages that start a conversation: the import step's hook.

After a batch is imported, every message that started a new conversation is put to
:func:`mailbridge.core.autoreply.decide_auto_reply`; a yes queues an ``outbox`` row marked
``automatic`` (sent with ``Auto-Submitted: auto-replied``, ``X-Auto-Response-Suppress: All``
and ``Precedence: auto_reply``) to the sender only. The loop-protection count is read from those
rows, so it holds across restarts. A crash between the import's commit and the queueing costs
the automatic reply (the message is a duplicate on the next pass), never a second one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from mailbridge.config import AccountSettings, Settings
from mailbridge.core.automatic import AutomaticVerdict, detect_automatic
from mailbridge.core.autoreply import decide_auto_reply
from mailbridge.core.model import ParsedMessage
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import ImportItem, ImportResult, Outcome
from mailbridge.store.outbox import OutgoingRequest

log = structlog.get_logger("mailbridge.autoreply")


# RFC 3834 section 5 and the de-facto Precedence values of list servers and vacation programs.
def is_automatic_mail(message: ParsedMessage, verdict: AutomaticVerdict | None = None) -> bool:
    """Whether ``message`` was written by a program: ``verdict``, the one the import step
    computed (:func:`mailbridge.core.policy.analyse`), else :func:`detect_automatic` now.
    RFC 3834 section 2: never answer automatic mail automatically."""
    return (verdict if verdict is not None else detect_automatic(message)).automatic


async def queue_auto_replies(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    items: Sequence[ImportItem],
    results: Sequence[ImportResult],
    arrived: Mapping[int, datetime | None],
) -> int:
    """Queue the automatic replies a just-imported batch calls for; how many were queued."""
    auto = account.auto_reply
    if not auto.enabled:
        return 0
    by_uid = {item.uid: item for item in items}
    protection = settings.loop_protection
    own = account.own_addresses()
    queued = 0
    for result in results:
        if result.outcome is not Outcome.IMPORTED or not result.new_conversation:
            continue
        item = by_uid[result.uid]
        message = item.message
        sender = message.from_address.email.strip().lower() if message.from_address else None
        now = datetime.now(UTC)
        count = 0
        if sender:
            since = now - timedelta(hours=protection.window_hours)
            count = await repo.automatic_replies_since(account.name, sender, since)
        decision = decide_auto_reply(
            enabled=auto.enabled,
            new_conversation=result.new_conversation,
            is_automatic=is_automatic_mail(message, item.automatic),
            sender=sender,
            own_addresses=own,
            arrived=arrived.get(result.uid) or message.date,
            now=now,
            max_age=timedelta(hours=auto.max_age_hours),
            replies_in_window=count,
            max_replies=protection.max_auto_replies,
        )
        if not decision.reply or sender is None:
            log.info(
                "auto_reply_skipped", account=account.name, uid=result.uid,
                conversation=result.conversation_id, reason=decision.reason,
            )  # fmt: skip
            continue
        outbox_id = await repo.queue_outgoing(
            OutgoingRequest(
                account=account.name,
                conversation_id=result.conversation_id,
                to=sender,
                subject=auto.subject,
                body_text=auto.body_text,
                body_html=auto.body_html,
                automatic=True,
            )
        )
        queued += 1
        log.info(
            "auto_reply_queued", account=account.name, uid=result.uid, outbox=outbox_id,
            conversation=result.conversation_id,
        )  # fmt: skip
    return queued
