"""The names of mailbridge's own tables and of the columns it creates on the two tables that
config-named link columns are added to: what a configured parent table must not be called.

Constants only, beside the rules that read them (``config.py`` checks the names at start-up);
the DDL that creates them is :mod:`mailbridge.store.schema`, which imports these names, so the
two cannot drift apart.
"""

from __future__ import annotations

from typing import Final

TABLES: Final[tuple[str, ...]] = (
    "conversation",
    "conversationmessage",
    "messagereference",
    "follower",
    "messagefollower",
    "document",
    "embeddedfile",
    "importfailure",
    "accountstate",
    "conversationmessageerror",
    "lease",
    "leaseholder",
    "outbox",
    "outboxattachment",
    "outboxcopy",
    "textsnippet",
    "discardedmessage",
)

# Columns of the two tables that config-named link columns are added to (``follower.<table>``,
# ``conversation.<table>``): a configured table name must not collide with them.
CONVERSATION_COLUMNS: Final[frozenset[str]] = frozenset(
    {
        "id",
        "uniqueid",
        "account",
        "email",
        "subject",
        "threadid",
        "replytoid",
        "earliestunread",
        "firstmessagedate",
        "lastmessagedate",
        "language",
        "source",
        "createdtime",
        "updatedtime",
    }
)
FOLLOWER_COLUMNS: Final[frozenset[str]] = frozenset(
    {
        "id",
        "conversation",
        "email",
        "name",
        "active",
        "subscribed",
        "createdtime",
        "updatedtime",
        "deliveryerror",
    }
)
