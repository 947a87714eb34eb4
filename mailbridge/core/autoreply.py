"""Whether a message gets an automatic reply: one pure rule, every input given.

RFC 3834 (Recommendations for Automatic Responses to Electronic Mail) is the source:

* section 2: respond only to a message that is not itself automatic (``is_automatic``, decided
  elsewhere from Auto-Submitted, Precedence and the like);
* section 2: never respond to oneself (the account's own addresses, aliases, plus-variants);
* section 2: "a responder MUST NOT respond more than once within a period to the same sender"
  is relaxed here to ``max_replies`` within ``window`` (loop_protection), which still ends any
  loop with a responder that ignores the headers we send;
* plus the reference's rule: only a message that *starts* a conversation is answered, and only
  when it is younger than ``max_age`` (mail the recovery sweep imports late gets none).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from mailbridge.core.identify import is_own_address


@dataclass(frozen=True, slots=True)
class AutoReplyDecision:
    reply: bool
    reason: str  # why not (or "new conversation" when it does)


def decide_auto_reply(
    *,
    enabled: bool,
    new_conversation: bool,
    is_automatic: bool,
    sender: str | None,
    own_addresses: frozenset[str],
    arrived: datetime,
    now: datetime,
    max_age: timedelta,
    replies_in_window: int,
    max_replies: int,
) -> AutoReplyDecision:
    """Whether to answer ``sender`` automatically; the first rule that says no gives the reason.

    ``arrived`` and ``now`` are timezone-aware; ``replies_in_window`` counts the automatic
    replies already queued to ``sender`` within the loop-protection window.
    """
    if not enabled:
        return AutoReplyDecision(False, "automatic replies are off for the account")
    if not new_conversation:
        return AutoReplyDecision(False, "it continues a conversation")
    if is_automatic:
        return AutoReplyDecision(False, "it is automatic mail (RFC 3834)")
    if not sender or "@" not in sender:
        return AutoReplyDecision(False, "it has no sender address")
    if is_own_address(sender, own_addresses):
        return AutoReplyDecision(False, "it comes from the account's own address")
    if now - arrived > max_age:
        return AutoReplyDecision(False, "it is older than auto_reply.max_age_hours")
    if replies_in_window >= max_replies:
        return AutoReplyDecision(
            False,
            f"the sender got {replies_in_window} automatic replies within "
            "loop_protection.window_hours already",
        )
    return AutoReplyDecision(True, "new conversation")
