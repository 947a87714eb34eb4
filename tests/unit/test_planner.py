"""The import planner's rules with plain values: no database (mailbridge.core.planner).

The contract tests (test_store_contract.py) run the same rules end to end on every backend.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.config import FollowerParentSettings
from mailbridge.core import planner
from mailbridge.core.automatic import AutomaticVerdict
from mailbridge.core.bounce import Bounce
from mailbridge.core.messagekey import ParentCandidate, StoredIdentity
from mailbridge.core.planner import (
    CitedRow,
    ConversationValues,
    FollowerRow,
    ImportContext,
    ParentRecord,
    PropertyLookup,
    Route,
    Routing,
)
from mailbridge.core.policy import AutomaticPolicy
from tests.unit.factories import PERSON, TICKET, at, inline_image, message, reply

OWN = frozenset({"support@acme.test", "help@acme.test"})
CTX = ImportContext("support", own_addresses=OWN)
KEY = "abcdefghij234567"
D0, D5, D9 = (planner.timestamp_text(at(m)) for m in (0, 5, 9))


def ctx(**kw: object) -> ImportContext:
    return ImportContext("support", own_addresses=OWN, **kw)  # type: ignore[arg-type]


# -- timestamps -------------------------------------------------------------------------------


def test_timestamp_text_is_utc_seconds_and_orders_like_time() -> None:
    east = timezone(timedelta(hours=5))
    assert planner.timestamp_text(datetime(2024, 3, 1, 14, 0, 7, 999, tzinfo=east)) == (
        "2024-03-01T09:00:07Z"
    )
    assert planner.timestamp_text(datetime(2024, 3, 1, 9, 0)) == "2024-03-01T09:00:00Z"
    assert planner.timestamp_text(datetime(999, 1, 1)) < planner.timestamp_text(
        datetime(1000, 1, 1)
    )


# -- key --------------------------------------------------------------------------------------


def test_decide_key_duplicate_reused_and_grouping() -> None:
    m = message("m@x.test")
    assert planner.identity_group(m) == "m@x.test"
    assert planner.identity_group(message(None)).startswith("sha256:")
    assert not planner.decide_key(m, []).duplicate
    same = planner.decide_key(m, [StoredIdentity("m@x.test", m.fingerprint)])
    assert same.duplicate
    other = planner.decide_key(m, [StoredIdentity("m@x.test", "f" * 64)])
    assert not other.duplicate
    assert other.reused == "m@x.test"
    assert other.key.startswith("m@x.test#")


# -- route ------------------------------------------------------------------------------------


def test_conversation_keys_come_from_the_configured_marker_only() -> None:
    m = message(
        "m@x.test",
        subject=f"Re: hi [ID-{'b' * 16}] [ID-{KEY}]",
        to=[f"support+{KEY}@acme.test", f"someone+{'c' * 16}@else.test", "help+sales@acme.test"],
        delivered_to=[f"help+{'d' * 16}@acme.test"],
    )
    assert planner.conversation_keys(m, ctx()) == ()
    assert planner.conversation_keys(m, ctx(identification="subject")) == (KEY,)
    # Delivered-To first, then To/Cc/Bcc; only own addresses, only key-shaped suffixes.
    assert planner.conversation_keys(m, ctx(identification="plus_address")) == ("d" * 16, KEY)


def test_join_by_key_takes_the_first_key_the_account_holds() -> None:
    assert planner.join_by_key(["a", "b"], {"b": 2, "c": 3}) == 2
    assert planner.join_by_key(["a"], {}) is None


def test_candidates_never_include_the_message_itself() -> None:
    m = message("m@x.test", in_reply_to=["p@x.test"], references=["r@x.test", "m@x.test"])
    assert planner.candidates_of(m) == ("p@x.test", "r@x.test")


def test_parents_first_candidate_wins_and_reused_ids_pick_by_date() -> None:
    carriers = [
        CitedRow("r@x.test", ParentCandidate(D0, 1, 10)),
        CitedRow("p@x.test", ParentCandidate(D0, 2, 20)),
        CitedRow("p@x.test", ParentCandidate(D9, 3, 30)),  # a reused id, dated after the reply
    ]
    assert planner.conversation_of_parents(["p@x.test", "r@x.test"], carriers, [], D5) == 20
    assert planner.conversation_of_parents(["q@x.test", "r@x.test"], carriers, [], D5) == 10
    # A sent copy's per-recipient id counts; a carrier with that id wins over it.
    copies = [("copy@x.test", 40), ("p@x.test", 50)]
    assert planner.conversation_of_parents(["copy@x.test"], carriers, copies, D5) == 40
    assert planner.conversation_of_parents(["p@x.test"], carriers, copies, D5) == 20
    assert planner.conversation_of_parents(["z@x.test"], carriers, copies, D5) is None


def test_citing_own_id_first_then_the_nearest_ancestor() -> None:
    m = message("m@x.test", in_reply_to=["p@x.test"], references=["root@x.test", "p@x.test"])
    cited = planner.cited_ids(m, planner.candidates_of(m), reused=False)
    assert cited == ("m@x.test", "p@x.test", "root@x.test")
    # A message reusing a stored id is not pulled in by replies to the other message.
    assert planner.cited_ids(m, ("p@x.test",), reused=True) == ("p@x.test",)
    citing = [("root@x.test", 1), ("p@x.test", 2), ("p@x.test", 3), ("m@x.test", 4)]
    assert planner.conversation_of_citing(cited, citing) == 4  # a child first
    assert planner.conversation_of_citing(cited[1:], citing) == 2  # then the oldest sibling
    assert planner.conversation_of_citing(("x@x.test",), citing) is None


def test_route_key_beats_message_id_and_own_mail_alone_is_ignored() -> None:
    m = message("m@x.test")
    plus = ctx(identification="plus_address")
    assert planner.route(m, plus, by_key=7, by_message_id=8) == Routing(Route.PLUS_ADDRESS, 7)
    assert planner.route(m, CTX, by_key=None, by_message_id=8) == Routing(Route.MESSAGE_ID, 8)
    assert planner.route(m, CTX, by_key=None, by_message_id=None).route is Route.NEW
    to_self = message("s@acme.test", sender="support@acme.test", to=["help@acme.test"])
    ignored = planner.route(to_self, CTX, by_key=None, by_message_id=None)
    assert ignored.route is Route.IGNORED
    assert not ignored.stored
    assert ignored.reason == planner.IGNORED_OWN
    # Own mail that continues a conversation is stored; with an outside Reply-To it is new.
    assert planner.route(to_self, CTX, by_key=None, by_message_id=3).stored
    form = message(
        "f@acme.test", sender="support@acme.test", to=["support@acme.test"], reply_to=["c@x.t"]
    )
    assert planner.route(form, CTX, by_key=None, by_message_id=None).new


# -- conversation row -------------------------------------------------------------------------


def test_new_conversation_values() -> None:
    m = message("m@x.test", subject="Hi", to=[f"Help+{KEY}@acme.test"], date=at(0))
    values = planner.new_conversation_values(m, CTX, D0)
    assert len(values.uniqueid) == 16
    assert (values.email, values.subject, values.threadid, values.replytoid) == (
        "help@acme.test",
        "Hi",
        "m@x.test",
        "m@x.test",
    )
    assert (values.firstmessagedate, values.lastmessagedate, values.earliestunread) == (D0,) * 3
    sent = message("s@acme.test", sender="support@acme.test", to=["ann@x.test"])
    assert planner.new_conversation_values(sent, CTX, D0).earliestunread is None


ROW = ConversationValues(
    uniqueid=KEY,
    email=None,
    subject="Re: Hi",
    threadid="c@x.test",
    replytoid="c@x.test",
    firstmessagedate=D5,
    lastmessagedate=D5,
    earliestunread=None,
)


def test_fold_a_late_first_message_names_the_conversation() -> None:
    first = message("p@x.test", subject="Hi", date=at(0))
    folded, latest = planner.fold_conversation(ROW, first, CTX, D0)
    assert not latest
    assert (folded.subject, folded.threadid, folded.replytoid) == ("Hi", "p@x.test", "c@x.test")
    assert (folded.firstmessagedate, folded.lastmessagedate) == (D0, D5)
    assert folded.earliestunread == D0
    assert folded.email == "support@acme.test"  # an empty email takes the reached address
    assert folded.uniqueid == KEY


def test_fold_the_newest_message_sets_reply_id_and_own_mail_stays_read() -> None:
    ours = message("o@acme.test", sender="support@acme.test", to=["ann@x.test"], date=at(9))
    folded, latest = planner.fold_conversation(ROW, ours, CTX, D9)
    assert latest
    assert (folded.lastmessagedate, folded.replytoid) == (D9, "o@acme.test")
    assert (folded.subject, folded.firstmessagedate) == ("Re: Hi", D5)
    assert folded.earliestunread is None
    # Same date as the newest counts as newest; an earlier unread date is kept.
    unread = planner.fold_conversation(
        dataclasses.replace(ROW, earliestunread=D0),
        message("n@x.test", date=at(5)),
        CTX,
        D5,
    )
    assert unread[1]
    assert unread[0].earliestunread == D0


# -- message row ------------------------------------------------------------------------------


def test_message_values() -> None:
    m = message(
        "m@x.test",
        sender="Ann <Ann@X.test>",
        in_reply_to=["p@x.test"],
        references=["r@x.test", "p@x.test"],
        defects=["bad charset"],
    )
    row = planner.message_values(m, CTX, "m@x.test", D0, Routing(Route.MESSAGE_ID, 3))
    assert (row.direction, row.from_address, row.from_name) == ("incoming", "ann@x.test", "Ann")
    assert (row.in_reply_to, row.references) == ("p@x.test", "r@x.test p@x.test")
    assert row.threaded_by == "message_id"
    assert "Hello there" in row.html  # text rendered as HTML
    assert row.defects == ("bad charset",)
    bare = planner.message_values(message(None, sender=None), CTX, "k", D0, Routing(Route.NEW))
    assert (bare.from_address, bare.in_reply_to, bare.threaded_by) == ("", None, "new")


# -- followers --------------------------------------------------------------------------------


def test_participants_leave_out_the_account_and_keep_the_first_name() -> None:
    m = message(
        "m@x.test",
        sender="Ann@X.test",
        to=[f"support+{KEY}@acme.test", "Ann A <ann@x.test>", "Bob <bob@x.test>"],
        cc=["help@acme.test"],
        reply_to=["ann@x.test"],
    )
    people = planner.participants(m, OWN)
    assert dict(people.names) == {"ann@x.test": "Ann A", "bob@x.test": "Bob"}
    assert people.levels == (
        ("ann@x.test", "from"),
        ("ann@x.test", "to"),
        ("bob@x.test", "to"),
        ("ann@x.test", "replyto"),
    )


def _people(**names: str) -> planner.Participants:
    emails = {f"{k}@x.test": v for k, v in names.items()}
    return planner.Participants(emails, tuple((e, "to") for e in emails))


EXISTING = {
    "ann@x.test": FollowerRow(1, "Ann", active=True),
    "bob@x.test": FollowerRow(2, "", active=True),
    "cat@x.test": FollowerRow(3, "Cat", active=False),
}


def test_the_newest_message_sets_who_is_active() -> None:
    plan = planner.plan_followers(EXISTING, _people(cat="", dan="Dan"), D9, latest=True, newest={})
    assert plan.inserts == (("dan@x.test", "Dan", True),)
    # Cat is back; Ann and Bob are left out, so inactive.
    assert set(plan.updates) == {(3, "Cat", True), (1, "Ann", False), (2, "", False)}
    assert dict(plan.existing) == {"cat@x.test": 3}
    assert dict(plan.names) == {"cat@x.test": "Cat", "dan@x.test": "Dan"}


def test_a_late_message_deactivates_no_one_and_its_new_followers_start_inactive() -> None:
    plan = planner.plan_followers(EXISTING, _people(dan="Dan"), D0, latest=False, newest={})
    assert plan.inserts == (("dan@x.test", "Dan", False),)
    assert plan.updates == ()


def test_names_come_from_the_newest_message_a_follower_took_part_in() -> None:
    people = _people(ann="Annie", bob="Bob", cat="Kat")
    assert planner.followers_needing_dates(EXISTING, people, latest=True) == []
    # Only a late message that brings a different name needs the dates; an empty name takes any.
    assert planner.followers_needing_dates(EXISTING, people, latest=False) == [1, 3]
    newest = {1: D9, 3: D0}
    plan = planner.plan_followers(EXISTING, people, D5, latest=False, newest=newest)
    # Ann took part in a newer message: keeps "Ann"; Bob had none; Cat's newest is older.
    assert set(plan.updates) == {(2, "Bob", True), (3, "Kat", False)}
    assert plan.names["ann@x.test"] == "Ann"


@given(st.permutations(range(3)))
def test_followers_end_the_same_whatever_the_arrival_order(order: list[int]) -> None:
    """Replays the planner over three messages in any order, as the store would."""
    names = [{"ann@x.test": "A0", "bob@x.test": "B"}, {"ann@x.test": ""}, {"ann@x.test": "A2"}]
    dates = [planner.timestamp_text(at(m)) for m in (0, 1, 2)]
    rows: dict[str, FollowerRow] = {}
    took_part: dict[int, list[str]] = {}
    newest_message = ""
    next_id = itertools.count(1)
    for i in order:
        people = planner.Participants(names[i], tuple((e, "to") for e in names[i]))
        latest = dates[i] >= newest_message
        newest_message = max(newest_message, dates[i])
        wanted = planner.followers_needing_dates(rows, people, latest=latest)
        newest = {fid: max(took_part[fid]) for fid in wanted if took_part.get(fid)}
        plan = planner.plan_followers(rows, people, dates[i], latest=latest, newest=newest)
        for email, name, active in plan.inserts:
            rows[email] = FollowerRow(next(next_id), name, active)
        by_id = {row.id: email for email, row in rows.items()}
        for fid, name, active in plan.updates:
            rows[by_id[fid]] = FollowerRow(fid, name, active)
        for email in people.names:
            took_part.setdefault(rows[email].id, []).append(dates[i])
    assert {e: (r.name, r.active) for e, r in rows.items()} == {
        "ann@x.test": ("A2", True),
        "bob@x.test": ("B", False),
    }


# -- follower parents -------------------------------------------------------------------------

COWORKER = FollowerParentSettings(table="coworker", name_column=None)  # no name column


def test_follower_parents_match_by_address_keep_hand_links_and_lend_names() -> None:
    followers = [
        (1, "ann@x.test", "", {}),
        (2, "bob@x.test", "Bob", {"person": 50}),  # linked by hand to another record
        (3, "cat@x.test", "", {"person": 60}),
        (4, "dan@x.test", "", {}),
    ]
    records = {
        "person": [
            ParentRecord(9, "ANN@x.test", "Ann P"),
            ParentRecord(8, "Ann@X.test", "Ann First"),  # the lowest id wins
            ParentRecord(50, "robert@x.test", "Robert"),
            ParentRecord(60, "other@x.test", "Cathy"),
        ],
        "coworker": [ParentRecord(5, "dan@x.test", "")],
    }
    links = planner.link_follower_parents([PERSON, COWORKER], followers, records)
    # Only changes: Bob's hand link holds and he has a name; nobody else matches a coworker.
    assert [(link.follower_id, link.table, link.link, link.name) for link in links] == [
        (1, "person", 8, "Ann First"),
        (3, "person", 60, "Cathy"),
        (4, "coworker", 5, ""),  # no name column: no name taken
    ]


def test_follower_parent_addresses_fold_ascii_case_only() -> None:
    # As SQLite's NOCASE: only A-Z fold, so É and é differ (no link, nothing to change).
    records = {"person": [ParentRecord(1, "ÉMILE@x.test"), ParentRecord(2, "ZOË@X.test", "Zoë")]}
    followers: list[tuple[int, str, str, dict[str, int | None]]] = [
        (1, "émile@x.test", "", {}),
        (2, "zoË@x.test", "", {}),
    ]
    [link] = planner.link_follower_parents([PERSON], followers, records)
    assert (link.follower_id, link.link, link.name) == (2, 2, "Zoë")


# -- files ------------------------------------------------------------------------------------


def test_inline_images_are_linked_by_content_id_and_html_rewritten() -> None:
    images = [inline_image("a@x"), inline_image("a@x"), inline_image("b@x")]
    links = planner.inline_image_links(images, [11, 12, 13])
    assert links == {"a@x": "embeddedfile:11", "b@x": "embeddedfile:13"}
    m = message("m@x.test", html='<img src="cid:a@x">', inline_images=images)
    html = planner.rewritten_html(m, m.html, links)
    assert html is not None
    assert "embeddedfile:11" in html
    assert planner.rewritten_html(m, "<p>no images</p>", links) is None
    text_only = message("t@x.test")
    assert planner.rewritten_html(text_only, planner.message_html(text_only), links) is None
    with pytest.raises(ValueError, match="zip"):
        planner.inline_image_links(images, [1])


# -- conversation parents ---------------------------------------------------------------------


def test_parent_lookups_and_values() -> None:
    context = ctx(follower_parents=(PERSON,), conversation_parents=(TICKET,))
    m = message("t@x.test", subject="Fire", sender="Ann@X.test", to=["a@b.test", "c@d.test"])
    html = planner.message_html(m)
    lookups = planner.pending_lookups((TICKET,), m, context, html, D0)
    assert lookups == [
        None,
        None,
        PropertyLookup("person", "email", "ann@x.test", "id"),
        PropertyLookup("person", "email", "ann@x.test", "company"),
        None,
        None,
        None,
        None,
        None,
    ]
    found = [None, None, 7, 42, None, None, None, None, None]
    [(table, columns, values)] = planner.parent_records((TICKET,), m, context, html, D0, found)
    assert table == "ticket"
    assert columns[:5] == ("subject", "description", "person", "company", "source")
    assert values == (
        "Fire",
        "Hello there",
        7,
        42,
        "email",
        "unknown",
        D0,
        "support",
        "a@b.test, c@d.test",
    )


def test_parent_lookups_need_a_value_and_a_follower_parent() -> None:
    nobody = message("t@x.test", sender=None)
    context = ctx(conversation_parents=(TICKET,))  # no follower parent 'person'
    html = planner.message_html(nobody)
    assert planner.pending_lookups((TICKET,), nobody, context, html, D0) == [None] * 9
    [(_t, _c, values)] = planner.parent_records((TICKET,), nobody, context, html, D0, [None] * 9)
    # No sender: no person, no company; from_name '' takes the default.
    assert values[2:6] == (None, None, "email", "unknown")


def test_a_reply_plan_routes_into_the_parents_conversation() -> None:
    """The steps chained for one reply, as the driver chains them."""
    parent = message("p@x.test", date=at(0))
    child = reply(parent, "c@x.test", minutes=5)
    candidates = planner.candidates_of(child)
    found = planner.conversation_of_parents(
        candidates, [CitedRow("p@x.test", ParentCandidate(D0, 1, 77))], [], D5
    )
    routing = planner.route(child, CTX, by_key=None, by_message_id=found)
    assert routing == Routing(Route.MESSAGE_ID, 77)
    assert not routing.new


# -- automatic mail, bounces, sent mail -------------------------------------------------------

ROBOT = AutomaticVerdict(automatic=True, reason="Auto-Submitted: auto-generated")


def test_automatic_mail_joins_only_an_existing_conversation_by_default() -> None:
    m = message("robot@x.test", sender="noreply@shop.test")
    discarded = planner.route(m, CTX, by_key=None, by_message_id=None, automatic=ROBOT)
    assert discarded.route is Route.DISCARDED
    assert not discarded.stored
    assert discarded.reason == "automatic: Auto-Submitted: auto-generated"
    joined = planner.route(m, CTX, by_key=None, by_message_id=4, automatic=ROBOT)
    assert joined == Routing(Route.MESSAGE_ID, 4)
    always = ctx(automatic_policy=AutomaticPolicy(automatic_emails="import"))
    assert planner.route(m, always, by_key=None, by_message_id=None, automatic=ROBOT).new
    # Stored automatic mail says so on its row.
    row = planner.message_values(m, CTX, "k", D0, joined, ROBOT)
    assert (row.automatic, row.automatic_reason) == (True, ROBOT.reason)
    assert not planner.message_values(m, CTX, "k", D0, joined).automatic


def test_a_delivery_report_is_a_bounce_even_inside_a_conversation() -> None:
    report = Bounce(kind="dsn", recipients=(), original_message_id="sent@acme.test")
    m = message("dsn@x.test", sender="mailer-daemon@x.test")
    routing = planner.route(m, CTX, by_key=None, by_message_id=7, report=report)
    assert routing.route is Route.BOUNCE
    assert not routing.stored


def test_sent_mail_goes_where_it_was_composed_for() -> None:
    assert planner.route_sent(9, None) == Routing(Route.OUTBOX, 9)
    new = planner.route_sent(None, KEY)
    assert (new.route, new.new_key, new.new) == (Route.NEW, KEY, True)
    m = message("s@acme.test", sender="support@acme.test", to=["ann@x.test"])
    assert planner.new_conversation_values(m, CTX, D0, new.new_key).uniqueid == KEY


def test_a_stored_message_settles_its_key_and_its_failure_key() -> None:
    m = message("m@x.test")
    stored, failure = planner.settled_keys(m, planner.decide_key(m, []))
    assert stored == "m@x.test"
    assert failure == f"m@x.test#{m.fingerprint[:16]}"


# -- which outcomes settle an earlier import failure ----------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "settles"),
    [
        (planner.Outcome.IMPORTED, True),  # now in the database
        (planner.Outcome.DUPLICATE, True),  # was in the database already
        (planner.Outcome.IGNORED, True),  # own mail: dealt with for good
        (planner.Outcome.DISCARDED, True),  # automatic mail the policy keeps out
        (planner.Outcome.BOUNCE, True),  # its delivery errors are recorded
        (planner.Outcome.FAILED, False),  # still failing: the sweep retries it
    ],
)
def test_which_outcomes_settle_an_earlier_failure(outcome: planner.Outcome, settles: bool) -> None:
    assert planner.settles_failure(outcome) is settles


def test_every_outcome_has_a_settling_rule() -> None:
    assert set(planner.Outcome) - planner.SETTLING_OUTCOMES == {planner.Outcome.FAILED}
