"""The import driver every backend shares: look up, ask the planner, write.

:func:`import_items` runs inside a backend's open write transaction, on its
:class:`~mailbridge.store.base.ImportPrimitives`. Messages go in UID order, each planned against
look-ups made in the transaction after the previous message's writes, so a reply later in the
batch finds its parent written by an earlier one; each in its own savepoint, so a message whose
rows fail leaves no row and the others commit. Every decision is a function of
:mod:`mailbridge.core.planner`; this module only sequences look-ups and writes.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Final

from mailbridge.core import planner
from mailbridge.core.messagekey import KeyDecision, StoredIdentity
from mailbridge.core.planner import ImportContext, Route, Routing
from mailbridge.store.base import (
    ImportItem,
    ImportPrimitives,
    ImportResult,
    Outcome,
    StoredRow,
)

_MAX_REASON: Final = 1000
# The outcome of a message the planner routes out of the conversations.
_NOT_STORED: Final = {
    Route.IGNORED: Outcome.IGNORED,
    Route.DISCARDED: Outcome.DISCARDED,
    Route.BOUNCE: Outcome.BOUNCE,
}


def import_items(
    db: ImportPrimitives, context: ImportContext, items: Sequence[ImportItem], now: str
) -> list[ImportResult]:
    """Import ``items`` (one result per item, in the items' order) without committing."""
    account = context.account
    results: list[ImportResult | None] = [None] * len(items)
    messages = [item.message for item in items]
    stored = db.stored_identities(
        account,
        list(dict.fromkeys(m.message_id for m in messages if m.message_id)),
        list(dict.fromkeys(m.message_key for m in messages)),
    )
    settled: list[str] = []  # keys whose import failures are now resolved (the planner's rule)
    # UID order, so that a reply in the same batch finds its parent already stored.
    for index in sorted(range(len(items)), key=lambda i: items[i].uid):
        item = items[index]
        message = item.message
        same_id = stored.setdefault(planner.identity_group(message), [])
        decision = planner.decide_key(
            message, [StoredIdentity(row.key, row.fingerprint, row.summary) for row in same_id]
        )
        if decision.duplicate:
            known = next(row for row in same_id if row.key == decision.key)
            result = ImportResult(
                uid=item.uid,
                message_key=decision.key,
                outcome=Outcome.DUPLICATE,
                conversation_id=known.conversation_id,
                message_row_id=known.row_id,
            )
        else:
            result = _import_in_savepoint(db, context, item, now, decision)
            if result.conversation_id is not None and result.message_row_id is not None:
                # Imported: a second copy later in the same batch is a duplicate of this one.
                same_id.append(
                    StoredRow(
                        decision.key,
                        message.fingerprint or None,
                        result.conversation_id,
                        result.message_row_id,
                    )
                )
        results[index] = result
        if planner.settles_failure(result.outcome):
            settled += planner.settled_keys(message, decision)
    db.resolve_failures(account, settled, now)
    return [result for result in results if result is not None]


def _import_in_savepoint(
    db: ImportPrimitives,
    context: ImportContext,
    item: ImportItem,
    now: str,
    decision: KeyDecision,
) -> ImportResult:
    """Import one message all-or-nothing under ``decision.key``."""
    db.savepoint()
    try:
        written = import_one(db, context, item, now, decision)
    except Exception as exc:
        if db.is_batch_error(exc):
            # The database itself failed (or rolled everything back): the batch fails as a
            # whole and the caller retries it.
            raise
        db.rollback()
        # The database refusing this one message (a constraint, a value it cannot store) is
        # import_failed; any other exception is a bug in mailbridge: internal, with its
        # traceback for the log.
        refused = db.is_refusal(exc)
        reason = (
            f"{type(exc).__name__}: {exc}"
            if refused
            else f"unexpected {type(exc).__name__} while importing: {exc}"
        )
        return ImportResult(
            uid=item.uid,
            message_key=decision.key,
            outcome=Outcome.FAILED,
            error_code="import_failed" if refused else "internal",
            error_reason=reason[:_MAX_REASON],
            traceback=None if refused else traceback.format_exc(),
        )
    db.release()
    if isinstance(written, Routing):
        return ImportResult(
            uid=item.uid,
            message_key=decision.key,
            outcome=_NOT_STORED[written.route],
            error_reason=written.reason,
        )
    if isinstance(written, ImportResult):
        return written
    conversation_id, row_id, new = written
    return ImportResult(
        uid=item.uid,
        message_key=decision.key,
        outcome=Outcome.IMPORTED,
        conversation_id=conversation_id,
        message_row_id=row_id,
        new_conversation=new,
        reused_key=decision.reused,
    )


def _route(
    db: ImportPrimitives,
    context: ImportContext,
    item: ImportItem,
    date: str,
    decision: KeyDecision,
    candidates: tuple[str, ...],
) -> Routing:
    """Look up what the routing rules need, only as far as they need it, and route."""
    message = item.message
    keys = planner.conversation_keys(message, context)
    by_key = planner.join_by_key(keys, db.conversations_by_key(context.account, keys))
    by_message_id = None
    if by_key is None:
        if candidates:
            carriers, copies = db.carriers(context.account, candidates)
            by_message_id = planner.conversation_of_parents(candidates, carriers, copies, date)
        if by_message_id is None:
            cited = planner.cited_ids(message, candidates, reused=decision.reused is not None)
            by_message_id = planner.conversation_of_citing(cited, db.citing(context.account, cited))
    return planner.route(
        message,
        context,
        by_key=by_key,
        by_message_id=by_message_id,
        automatic=item.automatic,
        report=item.report,
    )


def import_one(
    db: ImportPrimitives,
    context: ImportContext,
    item: ImportItem,
    now: str,
    decision: KeyDecision,
    *,
    sent: Routing | None = None,
) -> tuple[int, int, bool] | Routing | ImportResult:
    """Write one message (inside the caller's savepoint or transaction); (conversation id,
    message row id, new conversation), the Routing that says why it is not stored, or the
    result of a bounce (its delivery errors written). ``sent``: mail mailbridge sent, routed
    by :func:`mailbridge.core.planner.route_sent` instead of the threading rules."""
    account, message = context.account, item.message
    date = planner.timestamp_text(message.date)
    candidates = planner.candidates_of(message)
    routing = sent or _route(db, context, item, date, decision, candidates)
    if routing.route is Route.BOUNCE and item.report is not None:
        written, matched = db.record_delivery_errors(account, message, item.report, now)
        return ImportResult(
            uid=item.uid,
            message_key=decision.key,
            outcome=Outcome.BOUNCE,
            error_reason=routing.reason,
            delivery_errors=written,
            delivery_errors_matched=matched,
        )
    if not routing.stored:
        not_stored = planner.not_stored_values(message, decision.key, date, routing)
        if not_stored is not None:
            db.record_not_stored(account, not_stored, now)
        return routing
    if routing.conversation_id is None:
        conversation_id = db.insert_conversation(
            account, planner.new_conversation_values(message, context, date, routing.new_key), now
        )
        latest = True
    else:
        conversation_id = routing.conversation_id
        values, latest = planner.fold_conversation(
            db.conversation_row(conversation_id), message, context, date
        )
        db.update_conversation(conversation_id, values, now)

    row = planner.message_values(message, context, decision.key, date, routing, item.automatic)
    row_id = db.insert_message(conversation_id, account, item.uid, row, now)
    db.insert_references(row_id, candidates)

    people = planner.participants(message, context.own_addresses)
    link_tables = [fp.table for fp in context.follower_parents]
    existing = {} if routing.new else db.followers(conversation_id, link_tables)
    renamed = planner.followers_needing_dates(existing, people, latest=latest)
    newest = db.newest_dates(renamed) if renamed else {}
    plan = planner.plan_followers(existing, people, date, latest=latest, newest=newest)
    ids = db.write_followers(conversation_id, row_id, plan, now)
    if context.follower_parents and ids:
        followers = [
            (
                fid,
                email,
                plan.names[email],
                existing[email].links if email in existing else {},
            )
            for email, fid in ids.items()
        ]
        records = {
            fp.table: db.parent_records(
                fp,
                list(ids),
                [
                    link
                    for _fid, _email, _name, links in followers
                    if (link := links.get(fp.table)) is not None
                ],
            )
            for fp in context.follower_parents
        }
        links = planner.link_follower_parents(context.follower_parents, followers, records)
        db.link_followers(links)

    image_ids = db.insert_files(row_id, message.attachments, message.inline_images, now)
    html = planner.rewritten_html(
        message, row.html, planner.inline_image_links(message.inline_images, image_ids)
    )
    if html is not None:
        db.set_message_html(row_id, html)

    if routing.new:
        lookups = planner.pending_lookups(
            context.conversation_parents, message, context, row.html, date
        )
        found = [db.look_up(lookup) if lookup is not None else None for lookup in lookups]
        for table, columns, record in planner.parent_records(
            context.conversation_parents, message, context, row.html, date, found
        ):
            db.insert_parent(conversation_id, table, columns, record)
    return conversation_id, row_id, routing.new
