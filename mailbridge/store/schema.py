"""The database schema as SQL DDL, and the migrations that create and upgrade it.

On SQLite the schema version lives in ``PRAGMA user_version``; on PostgreSQL in the
``schemaversion`` table (see :func:`for_postgres`, which also translates the DDL below, written
once in SQLite's dialect). 0 is an empty database, and migration *N*
takes a database from version N-1 to N. A backend applies every migration above the stored
version inside one write transaction (SQLite DDL is transactional), so an upgrade interrupted by
a crash leaves the previous version intact. Migrations are append-only: a shipped migration is
never edited, because installs already ran it; a change is a new migration.

Table and column names follow the reference product's defaults (lower case, no underscores), so
integrators can point existing tooling at the file. Integrators read and write these tables
directly; README.md ("The database schema") documents every table and column for them.
Timestamps are ISO-8601 UTC text of one shape (``YYYY-MM-DDTHH:MM:SSZ``) so that text order
is time order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from mailbridge.core.tables import CONVERSATION_COLUMNS as CONVERSATION_COLUMNS
from mailbridge.core.tables import FOLLOWER_COLUMNS as FOLLOWER_COLUMNS
from mailbridge.core.tables import TABLES as TABLES

# The ISO-8601 UTC form every timestamp column uses; the SQL defaults below write the same shape.
TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_NOW: Final = "(strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))"


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: ``statements`` take the database to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]
    # PostgreSQL only, run after ``statements`` (which for_postgres translates) and not
    # translated: what SQLite has no counterpart for.
    postgres_only: tuple[str, ...] = ()


# Child rows name their parent with ON DELETE CASCADE: an integrator deleting a conversation (or
# a message) must not be refused by a foreign key nor leave orphans behind.
_V1: Final[tuple[str, ...]] = (
    f"""
    CREATE TABLE conversation (
        id               INTEGER PRIMARY KEY,
        uniqueid         TEXT NOT NULL UNIQUE,
        account          TEXT,
        email            TEXT,
        subject          TEXT NOT NULL DEFAULT '',
        threadid         TEXT,
        replytoid        TEXT,
        earliestunread   TEXT,
        firstmessagedate TEXT,
        lastmessagedate  TEXT,
        language         TEXT,
        source           TEXT NOT NULL DEFAULT 'email',
        createdtime      TEXT NOT NULL DEFAULT {_NOW},
        updatedtime      TEXT NOT NULL DEFAULT {_NOW}
    )
    """,
    # Listing (most recent first, optionally per account).
    "CREATE INDEX conversation_account_lastmessagedate ON conversation (account, lastmessagedate)",
    "CREATE INDEX conversation_lastmessagedate ON conversation (lastmessagedate)",
    f"""
    CREATE TABLE conversationmessage (
        id           INTEGER PRIMARY KEY,
        conversation INTEGER NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
        account      TEXT NOT NULL,
        uid          INTEGER,
        messageid    TEXT,
        messagekey   TEXT NOT NULL,
        uniqueid     TEXT NOT NULL UNIQUE,
        direction    TEXT NOT NULL DEFAULT 'incoming'
                     CHECK (direction IN ('incoming', 'outgoing')),
        subject      TEXT NOT NULL DEFAULT '',
        fromaddress  TEXT NOT NULL DEFAULT '',
        fromname     TEXT NOT NULL DEFAULT '',
        date         TEXT NOT NULL,
        message      TEXT NOT NULL DEFAULT '',
        plaintext    TEXT NOT NULL DEFAULT '',
        inreplyto    TEXT,
        "references" TEXT,
        size         INTEGER NOT NULL DEFAULT 0,
        source       TEXT NOT NULL DEFAULT 'email',
        createdtime  TEXT NOT NULL DEFAULT {_NOW},
        UNIQUE (account, messagekey)
    )
    """,
    # Threading: a candidate parent id -> its message (and conversation), per account.
    "CREATE INDEX conversationmessage_account_messageid"
    " ON conversationmessage (account, messageid)",
    # A conversation's messages in date order; also serves the foreign key.
    "CREATE INDEX conversationmessage_conversation_date"
    " ON conversationmessage (conversation, date)",
    """
    CREATE TABLE messagereference (
        messageid           TEXT NOT NULL,
        conversationmessage INTEGER NOT NULL
                            REFERENCES conversationmessage (id) ON DELETE CASCADE,
        PRIMARY KEY (messageid, conversationmessage)
    ) WITHOUT ROWID
    """,
    # The primary key serves "who cites this id"; this one serves the cascade from a message.
    "CREATE INDEX messagereference_conversationmessage ON messagereference (conversationmessage)",
    f"""
    CREATE TABLE follower (
        id           INTEGER PRIMARY KEY,
        conversation INTEGER NOT NULL REFERENCES conversation (id) ON DELETE CASCADE,
        email        TEXT NOT NULL,
        name         TEXT NOT NULL DEFAULT '',
        active       INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
        subscribed   INTEGER NOT NULL DEFAULT 1 CHECK (subscribed IN (0, 1)),
        createdtime  TEXT NOT NULL DEFAULT {_NOW},
        updatedtime  TEXT NOT NULL DEFAULT {_NOW},
        UNIQUE (conversation, email)
    )
    """,
    "CREATE INDEX follower_email ON follower (email)",
    """
    CREATE TABLE messagefollower (
        id                  INTEGER PRIMARY KEY,
        conversationmessage INTEGER NOT NULL
                            REFERENCES conversationmessage (id) ON DELETE CASCADE,
        follower            INTEGER NOT NULL REFERENCES follower (id) ON DELETE CASCADE,
        participationlevel  TEXT NOT NULL
                            CHECK (participationlevel IN ('from', 'to', 'cc', 'bcc')),
        messageid           TEXT,
        queueid             TEXT,
        UNIQUE (conversationmessage, follower, participationlevel)
    )
    """,
    "CREATE INDEX messagefollower_follower ON messagefollower (follower)",
    f"""
    CREATE TABLE document (
        id                  INTEGER PRIMARY KEY,
        conversationmessage INTEGER NOT NULL
                            REFERENCES conversationmessage (id) ON DELETE CASCADE,
        filename            TEXT NOT NULL DEFAULT '',
        contenttype         TEXT NOT NULL DEFAULT 'application/octet-stream',
        size                INTEGER NOT NULL DEFAULT 0,
        document            BLOB,
        comment             TEXT,
        type                TEXT NOT NULL DEFAULT 'other',
        createdtime         TEXT NOT NULL DEFAULT {_NOW}
    )
    """,
    "CREATE INDEX document_conversationmessage ON document (conversationmessage)",
    f"""
    CREATE TABLE embeddedfile (
        id                  INTEGER PRIMARY KEY,
        conversationmessage INTEGER NOT NULL
                            REFERENCES conversationmessage (id) ON DELETE CASCADE,
        contentid           TEXT,
        filename            TEXT NOT NULL DEFAULT '',
        contenttype         TEXT NOT NULL DEFAULT 'application/octet-stream',
        size                INTEGER NOT NULL DEFAULT 0,
        document            BLOB,
        createdtime         TEXT NOT NULL DEFAULT {_NOW}
    )
    """,
    "CREATE INDEX embeddedfile_conversationmessage ON embeddedfile (conversationmessage)",
    """
    CREATE TABLE importfailure (
        id          INTEGER PRIMARY KEY,
        account     TEXT NOT NULL,
        uid         INTEGER,
        folderuid   INTEGER,
        messagekey  TEXT NOT NULL,
        messageid   TEXT,
        subject     TEXT NOT NULL DEFAULT '',
        fromaddress TEXT NOT NULL DEFAULT '',
        date        TEXT,
        size        INTEGER NOT NULL DEFAULT 0,
        code        TEXT NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL DEFAULT 1,
        firstfailed TEXT NOT NULL,
        lastfailed  TEXT NOT NULL,
        resolved    TEXT,
        UNIQUE (account, messagekey)
    )
    """,
    "CREATE INDEX importfailure_lastfailed ON importfailure (lastfailed)",
    """
    CREATE TABLE accountstate (
        account    TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        code       TEXT,
        detail     TEXT NOT NULL DEFAULT '',
        since      TEXT,
        lastimport TEXT,
        imported   INTEGER NOT NULL DEFAULT 0,
        updated    TEXT
    )
    """,
)

# Version 2: how each message was threaded (so an operator can see why it landed where it did),
# replies to per-recipient Message-IDs (messagefollower.messageid) found by index, and unread
# conversations listed without a scan.
_V2: Final[tuple[str, ...]] = (
    "ALTER TABLE conversationmessage ADD COLUMN threadedby TEXT",
    "CREATE INDEX messagefollower_messageid ON messagefollower (messageid)"
    " WHERE messageid IS NOT NULL",
    "CREATE INDEX conversation_earliestunread ON conversation (earliestunread)"
    " WHERE earliestunread IS NOT NULL",
)

# Version 3: when the recovery sweep last ran for an account and what it did, for
# ``mailbridge status`` (a separate process that can only learn it from the database).
_V3: Final[tuple[str, ...]] = (
    "ALTER TABLE accountstate ADD COLUMN lastsweep TEXT",
    "ALTER TABLE accountstate ADD COLUMN sweepsummary TEXT NOT NULL DEFAULT ''",
)

# Version 4: how a failure was resolved (imported, or its message removed from the Failed folder
# by hand, found by the recovery sweep), and the Failed folder's UIDVALIDITY as the sweep last saw
# it, without which a Failed-folder UID cannot be trusted (RFC 3501 section 2.3.1.1).
_V4: Final[tuple[str, ...]] = (
    "ALTER TABLE importfailure ADD COLUMN resolution TEXT",
    "ALTER TABLE accountstate ADD COLUMN faileduidvalidity INTEGER",
)

# Version 5 (issue 9): what makes a message "the same message" and what the parser repaired.
# ``fingerprint`` is the content fingerprint (mailbridge.core.messagekey): a sender that reuses a
# Message-ID for different messages gets each stored (the later ones under a derived messagekey),
# while the same message fetched again is still recognised (candidates are found by messageid
# or messagekey, both indexed, so the fingerprint needs no index). ``defects`` lists, one per
# line, what the parser repaired or could not read. Reply-To addresses become message
# followers with their own level, ``replyto``: SQLite cannot change a CHECK constraint in place,
# so messagefollower is rebuilt (same columns, ids and indexes). legacy_alter_table keeps the
# RENAME from rewriting or checking views and triggers an integrator may have on other tables;
# triggers on messagefollower itself go with the old table and must be re-created.
_V5: Final[tuple[str, ...]] = (
    "ALTER TABLE conversationmessage ADD COLUMN fingerprint TEXT",
    "ALTER TABLE conversationmessage ADD COLUMN defects TEXT",
    """
    CREATE TABLE messagefollower_v5 (
        id                  INTEGER PRIMARY KEY,
        conversationmessage INTEGER NOT NULL
                            REFERENCES conversationmessage (id) ON DELETE CASCADE,
        follower            INTEGER NOT NULL REFERENCES follower (id) ON DELETE CASCADE,
        participationlevel  TEXT NOT NULL
                            CHECK (participationlevel IN ('from', 'to', 'cc', 'bcc', 'replyto')),
        messageid           TEXT,
        queueid             TEXT,
        UNIQUE (conversationmessage, follower, participationlevel)
    )
    """,
    "INSERT INTO messagefollower_v5 (id, conversationmessage, follower, participationlevel,"
    " messageid, queueid) SELECT id, conversationmessage, follower, participationlevel,"
    " messageid, queueid FROM messagefollower",
    "DROP TABLE messagefollower",
    "PRAGMA legacy_alter_table = ON",
    "ALTER TABLE messagefollower_v5 RENAME TO messagefollower",
    "PRAGMA legacy_alter_table = OFF",
    "CREATE INDEX messagefollower_follower ON messagefollower (follower)",
    "CREATE INDEX messagefollower_messageid ON messagefollower (messageid)"
    " WHERE messageid IS NOT NULL",
)

# Version 6 (issue 13): automatic mail and delivery errors. Whether a stored message is
# automatic and why (core/automatic.py); bounces and ARF complaints as rows on the message
# follower they concern (RFC 3464 / RFC 5965), the follower marked with the type of its latest
# unresolved error.
_V6: Final[tuple[str, ...]] = (
    "ALTER TABLE conversationmessage ADD COLUMN automatic INTEGER NOT NULL DEFAULT 0"
    " CHECK (automatic IN (0, 1))",
    "ALTER TABLE conversationmessage ADD COLUMN automaticreason TEXT",
    "ALTER TABLE follower ADD COLUMN deliveryerror TEXT"
    " CHECK (deliveryerror IN ('permanent', 'temporary', 'complaint'))",
    f"""
    CREATE TABLE conversationmessageerror (
        id                  INTEGER PRIMARY KEY,
        account             TEXT NOT NULL,
        conversation        INTEGER REFERENCES conversation (id) ON DELETE CASCADE,
        conversationmessage INTEGER REFERENCES conversationmessage (id) ON DELETE CASCADE,
        messagefollower     INTEGER REFERENCES messagefollower (id) ON DELETE SET NULL,
        follower            INTEGER REFERENCES follower (id) ON DELETE SET NULL,
        recipient           TEXT NOT NULL DEFAULT '',
        type                TEXT NOT NULL CHECK (type IN ('permanent', 'temporary', 'complaint')),
        status              TEXT,
        diagnostic          TEXT NOT NULL DEFAULT '',
        originalmessageid   TEXT,
        matchedby           TEXT NOT NULL DEFAULT 'none'
                            CHECK (matchedby IN ('message_id', 'recipient', 'none')),
        reportkind          TEXT NOT NULL DEFAULT 'dsn',
        reportmessageid     TEXT,
        reportkey           TEXT NOT NULL,
        reportsubject       TEXT NOT NULL DEFAULT '',
        reportfrom          TEXT NOT NULL DEFAULT '',
        date                TEXT NOT NULL,
        resolved            TEXT,
        createdtime         TEXT NOT NULL DEFAULT {_NOW},
        UNIQUE (account, reportkey, recipient)
    )
    """,
    "CREATE INDEX conversationmessageerror_conversation ON conversationmessageerror (conversation)",
    "CREATE INDEX conversationmessageerror_message"
    " ON conversationmessageerror (conversationmessage)",
    "CREATE INDEX conversationmessageerror_follower ON conversationmessageerror (follower)",
    "CREATE INDEX conversationmessageerror_unresolved ON conversationmessageerror (date)"
    " WHERE resolved IS NULL",
)

# Version 7 (issue 12): leases, so that several daemons sharing one PostgreSQL database serve
# each account from exactly one of them (daemon/leases.py). ``holder`` is host:pid:random of the
# daemon that serves the account (NULL once released), ``expires`` when the lease lapses unless
# renewed (the database's clock), ``token`` the fencing token: it grows every time the account
# changes hands, so a write checked against (holder, token) from a daemon that lost its lease
# fails. ``leaseholder`` lists the daemons alive. With SQLite there is one daemon, and both stay
# empty.
_V7: Final[tuple[str, ...]] = (
    """
    CREATE TABLE lease (
        account  TEXT PRIMARY KEY,
        holder   TEXT,
        expires  TEXT NOT NULL,
        token    INTEGER NOT NULL DEFAULT 0,
        acquired TEXT
    )
    """,
    "CREATE INDEX lease_holder ON lease (holder)",
    # The daemons alive now (each renews its row with its leases), so that a daemon that holds
    # nothing yet still counts when the others work out their fair share.
    """
    CREATE TABLE leaseholder (
        holder  TEXT PRIMARY KEY,
        expires TEXT NOT NULL,
        started TEXT NOT NULL
    )
    """,
)

# Version 8 (issue 14): sending. ``outbox`` is the queue an integrator (or ``mailbridge
# reply``/``send``) inserts into and the daemon sends from; ``outboxattachment`` its files (a
# path the daemon can read, or the bytes); ``textsnippet`` reusable texts for ``reply
# --snippet``. README.md "The outbox" documents every column, the states and the crash
# guarantee.
_V8: Final[tuple[str, ...]] = (
    f"""
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY,
        account          TEXT NOT NULL,
        conversation     INTEGER REFERENCES conversation (id) ON DELETE SET NULL,
        toaddresses      TEXT NOT NULL DEFAULT '',
        ccaddresses      TEXT NOT NULL DEFAULT '',
        bccaddresses     TEXT NOT NULL DEFAULT '',
        subject          TEXT,
        bodyhtml         TEXT,
        bodytext         TEXT,
        coworker         TEXT NOT NULL DEFAULT '',
        coworkeraddress  TEXT,
        actions          TEXT,
        automatic        INTEGER NOT NULL DEFAULT 0 CHECK (automatic IN (0, 1)),
        state            TEXT NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'cancelled')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        nextattempt      TEXT,
        attemptstarted   TEXT,
        lasterrorcode    TEXT,
        lasterror        TEXT,
        messageid        TEXT,
        conversationkey  TEXT,
        raw              BLOB,
        conversationmessage INTEGER REFERENCES conversationmessage (id) ON DELETE SET NULL,
        createdtime      TEXT NOT NULL DEFAULT {_NOW},
        senttime         TEXT,
        updatedtime      TEXT NOT NULL DEFAULT {_NOW}
    )
    """,
    # The worker's question: what is due now (queued, next attempt passed or never set).
    "CREATE INDEX outbox_state_nextattempt ON outbox (state, nextattempt)",
    "CREATE INDEX outbox_conversation ON outbox (conversation)",
    # A sender's automatic replies in the loop-protection window are counted from here.
    "CREATE INDEX outbox_automatic ON outbox (account, automatic, createdtime) WHERE automatic = 1",
    """
    CREATE TABLE outboxattachment (
        id          INTEGER PRIMARY KEY,
        outbox      INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
        filename    TEXT NOT NULL DEFAULT '',
        contenttype TEXT NOT NULL DEFAULT 'application/octet-stream',
        path        TEXT,
        document    BLOB,
        CHECK (path IS NOT NULL OR document IS NOT NULL)
    )
    """,
    "CREATE INDEX outboxattachment_outbox ON outboxattachment (outbox)",
    # Personalised sending: one copy per recipient, each with its own Message-ID (kept on the
    # recipient's messagefollower row once sent); senttime set as each copy is accepted.
    """
    CREATE TABLE outboxcopy (
        id        INTEGER PRIMARY KEY,
        outbox    INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
        recipient TEXT NOT NULL,
        messageid TEXT NOT NULL,
        raw       BLOB NOT NULL,
        senttime  TEXT,
        UNIQUE (outbox, recipient)
    )
    """,
    f"""
    CREATE TABLE textsnippet (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        text        TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        type        TEXT NOT NULL DEFAULT 'text' CHECK (type IN ('text', 'html')),
        status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
        language    TEXT,
        pinned      INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
        count       INTEGER NOT NULL DEFAULT 0,
        lastused    TEXT,
        createdtime TEXT NOT NULL DEFAULT {_NOW}
    )
    """,
)

# Version 9: mail the daemon moved to Processed without storing it — automatic mail the policy
# discards (core/policy.py) and the account's own mail continuing nothing — one row per message,
# so that what is not imported is visible in a command (``mailbridge discarded``) and a table, not
# only in the log. ``route`` is the planner's Route; ``reason`` its words.
_V9: Final[tuple[str, ...]] = (
    f"""
    CREATE TABLE discardedmessage (
        id          INTEGER PRIMARY KEY,
        account     TEXT NOT NULL,
        messagekey  TEXT NOT NULL,
        messageid   TEXT,
        fromaddress TEXT NOT NULL DEFAULT '',
        subject     TEXT NOT NULL DEFAULT '',
        date        TEXT,
        route       TEXT NOT NULL CHECK (route IN ('discarded', 'ignored')),
        reason      TEXT NOT NULL DEFAULT '',
        createdtime TEXT NOT NULL DEFAULT {_NOW},
        UNIQUE (account, messagekey)
    )
    """,
    "CREATE INDEX discardedmessage_createdtime ON discardedmessage (createdtime)",
)

# Version 10 (PostgreSQL only): the channel the outbox trigger NOTIFYs (payload: the row's
# account) whenever a row is queued (an INSERT, a retry, a due time changed): a daemon LISTENing
# picks it up at once, whoever wrote it (the CLI, an integrator's plain INSERT). SQLite's daemon
# watches PRAGMA data_version.
OUTBOX_CHANNEL: Final = "mailbridge_outbox"
_V10_POSTGRES: Final[tuple[str, ...]] = (
    f"""
    CREATE OR REPLACE FUNCTION mailbridge_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{OUTBOX_CHANNEL}', NEW.account);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER outbox_notify AFTER INSERT OR UPDATE OF state, nextattempt ON outbox
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION mailbridge_outbox_notify()
    """,
)

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "conversations, messages, followers, files, import failures", _V1),
    Migration(2, "threadedby, per-recipient Message-ID and unread indexes", _V2),
    Migration(3, "the recovery sweep's last run and summary per account", _V3),
    Migration(4, "how a failure was resolved; the Failed folder's UIDVALIDITY", _V4),
    Migration(5, "content fingerprint, parser defects, the replyto participation level", _V5),
    Migration(6, "automatic mail; delivery errors (bounces, complaints) per message follower", _V6),
    Migration(7, "leases of accounts for several daemons on one database", _V7),
    Migration(8, "sending: outbox, its attachments and copies, text snippets", _V8),
    Migration(9, "mail moved to Processed without being stored (discarded, ignored)", _V9),
    Migration(10, "PostgreSQL: NOTIFY the daemons when an outbox row is queued", (), _V10_POSTGRES),
)

# The version a fully migrated database reports in PRAGMA user_version.
SCHEMA_VERSION: Final[int] = MIGRATIONS[-1].version


# -- PostgreSQL -------------------------------------------------------------------------------
# The migrations above are written once, in SQLite's dialect; for_postgres() translates a
# statement in this one place. PostgreSQL keeps the schema version in a table (it has no
# user_version): one row, the version of the last migration applied, updated in the migration's
# transaction.
POSTGRES_VERSION_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schemaversion (version INTEGER NOT NULL,"
    " updated TEXT NOT NULL DEFAULT {now})"
)
# The same ISO-8601 shape as TIMESTAMP_FORMAT, from the database's clock.
POSTGRES_NOW: Final = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

_POSTGRES_TYPES: Final[tuple[tuple[str, str], ...]] = (
    # Ids an integrator may also set by hand, as SQLite's rowid allows.
    (r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    # IMAP UIDs and UIDVALIDITY are 32-bit unsigned (RFC 3501 section 2.3.1.1): past int4.
    (r"\bINTEGER\b", "BIGINT"),
    (r"\bBLOB\b", "BYTEA"),
    (r"\)\s*WITHOUT ROWID", ")"),
)


def for_postgres(statement: str) -> str | None:
    """``statement`` (SQLite dialect, from MIGRATIONS) in PostgreSQL's dialect: identity ids,
    BIGINT for INTEGER, BYTEA for BLOB, no WITHOUT ROWID, and the timestamp default from
    ``now()``; None for a statement that only concerns SQLite (``PRAGMA``). Everything else
    the migrations use is common SQL.

    A migration that copies rows with their ids into a new table (a rebuild) must also move
    the new table's identity on PostgreSQL (``setval``); no shipped one needs it on a fresh
    database, where the copied table is empty."""
    if statement.lstrip().upper().startswith("PRAGMA"):
        return None
    out = statement.replace(_NOW, f"({POSTGRES_NOW})")
    for pattern, replacement in _POSTGRES_TYPES:
        out = re.sub(pattern, replacement, out)
    return out
