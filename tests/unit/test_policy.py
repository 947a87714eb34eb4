"""The automatic-mail policy (core/policy.py) and its config keys (automatic_emails, bots)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.config import parse_config
from mailbridge.core.automatic import AutomaticVerdict
from mailbridge.core.bounce import Bounce, BounceRecipient
from mailbridge.core.policy import (
    AutomaticPolicy,
    BotLists,
    Decision,
    Disposition,
    decide,
    matching_pattern,
)
from mailbridge.errors import ConfigError

PERSON = AutomaticVerdict(False, None)
OOO = AutomaticVerdict(True, "out-of-office subject (en)")
BOUNCE = Bounce("dsn", (BounceRecipient("gone@x.example", True, "5.1.1"),), "out-1@h.example")
DEFAULT = AutomaticPolicy()


def _decide(
    verdict: AutomaticVerdict = OOO,
    *,
    found: bool = False,
    sender: str = "ann@customer.example",
    policy: AutomaticPolicy = DEFAULT,
    bounce: Bounce | None = None,
) -> Decision:
    return decide(verdict, bounce, conversation_found=found, sender=sender, policy=policy)


def test_default_imports_automatic_mail_only_into_an_existing_conversation() -> None:
    assert _decide(found=False) == Decision(
        Disposition.DISCARD, "automatic: out-of-office subject (en)"
    )
    assert _decide(found=True) == Decision(
        Disposition.IMPORT, "automatic: out-of-office subject (en)"
    )


def test_import_and_discard_modes() -> None:
    importing = AutomaticPolicy(automatic_emails="import")
    discarding = AutomaticPolicy(automatic_emails="discard")
    assert _decide(policy=importing).disposition is Disposition.IMPORT
    assert _decide(policy=discarding, found=True).disposition is Disposition.DISCARD


@pytest.mark.parametrize("mode", ["import", "import_if_conversation_exists", "discard"])
@pytest.mark.parametrize("found", [True, False])
def test_a_person_is_always_imported(mode: str, found: bool) -> None:
    policy = AutomaticPolicy(automatic_emails=mode)  # type: ignore[arg-type]
    assert _decide(PERSON, found=found, policy=policy) == Decision(Disposition.IMPORT)


def test_a_bounce_is_a_bounce_whatever_the_lists_say() -> None:
    policy = AutomaticPolicy(bots=(BotLists(allow=("*",)),))
    decision = _decide(bounce=BOUNCE, policy=policy, sender="mailer-daemon@x.example")
    assert decision == Decision(Disposition.BOUNCE, "bounce: dsn")
    assert not decision.may_create_conversation


def test_allow_list_lets_a_bot_create_a_conversation() -> None:
    policy = AutomaticPolicy(bots=(BotLists(allow=("alerts@monitor.example",)),))
    decision = _decide(sender="alerts@monitor.example", policy=policy)
    assert decision == Decision(Disposition.IMPORT, "bots.allow: alerts@monitor.example")
    assert decision.may_create_conversation


def test_deny_list_discards_even_a_reply() -> None:
    policy = AutomaticPolicy(automatic_emails="import", bots=(BotLists(deny=("spam.example",)),))
    assert _decide(PERSON, sender="x@spam.example", found=True, policy=policy) == Decision(
        Disposition.DISCARD, "bots.deny: spam.example"
    )


def test_the_account_lists_come_before_the_global_ones_and_deny_beats_allow() -> None:
    account = BotLists(allow=("noreply@shop.example",))
    global_ = BotLists(deny=("shop.example", "*.shop.example"))
    policy = AutomaticPolicy(bots=(account, global_))
    assert _decide(sender="noreply@shop.example", policy=policy).disposition is (Disposition.IMPORT)
    assert _decide(sender="news@shop.example", policy=policy).reason == "bots.deny: shop.example"
    both = AutomaticPolicy(bots=(BotLists(allow=("a@x.example",), deny=("x.example",)),))
    assert _decide(sender="a@x.example", policy=both).disposition is Disposition.DISCARD


@pytest.mark.parametrize(
    ("email", "pattern", "matches"),
    [
        ("alerts@monitor.example", "alerts@monitor.example", True),
        ("Alerts@Monitor.Example", "alerts@monitor.example", True),
        ("alerts@monitor.example", "monitor.example", True),
        ("alerts@monitor.example", "@monitor.example", True),
        ("alerts@eu.monitor.example", "monitor.example", False),
        ("alerts@eu.monitor.example", "*.monitor.example", True),
        ("alerts@monitor.example", "*.monitor.example", True),
        ("alerts@evilmonitor.example", "*.monitor.example", False),
        ("alerts@monitor.example.evil", "monitor.example", False),
        ("noreply-billing@bank.example", "noreply*@*", True),
        ("billing@bank.example", "noreply*@*", False),
        ("a@x.example", "*", True),
    ],
)
def test_patterns(email: str, pattern: str, matches: bool) -> None:
    assert (matching_pattern(email, (pattern,)) == pattern) is matches


@given(st.emails())
def test_a_domain_pattern_matches_exactly_its_domain(email: str) -> None:
    domain = email.rpartition("@")[2].lower()
    assert matching_pattern(email, (domain,)) == domain
    assert matching_pattern(email, ("other-" + domain,)) is None


# ---------------------------------------------------------------------------------------------
# Config


def _account(name: str = "support", **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "address": f"{name}@example.com",
        "imap": {"host": "imap.example.com"},
        "auth": {"username": name, "password": "pw"},
        **extra,
    }


def test_config_defaults() -> None:
    settings = parse_config({"accounts": [_account()]})
    assert settings.automatic_emails == "import_if_conversation_exists"
    policy = settings.automatic_policy(settings.accounts[0])
    assert policy == AutomaticPolicy("import_if_conversation_exists", (BotLists(),))


def test_config_per_account_overrides() -> None:
    settings = parse_config(
        {
            "automatic_emails": "discard",
            "bots": {"allow": ["Alerts@Monitor.example"], "deny": ["*.spam.example"]},
            "accounts": [
                _account("support"),
                _account(
                    "sales",
                    automatic_emails="import",
                    bots={"allow": ["crm.example"]},
                ),
            ],
        }
    )
    support, sales = settings.accounts
    assert settings.automatic_policy(support) == AutomaticPolicy(
        "discard", (BotLists(("alerts@monitor.example",), ("*.spam.example",)),)
    )
    assert settings.automatic_policy(sales) == AutomaticPolicy(
        "import",
        (
            BotLists(("crm.example",), ()),
            BotLists(("alerts@monitor.example",), ("*.spam.example",)),
        ),
    )


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"automatic_emails": "sometimes"}, "automatic_emails", "import_if_conversation_exists"),
        ({"bots": {"allow": ["two words"]}}, "bots.allow[0]", "not an address or domain"),
        ({"bots": {"deny": ["a@b@c"]}}, "bots.deny[0]", "not an address or domain"),
        ({"bots": {"deny": ["@"]}}, "bots.deny[0]", "not an address or domain"),
        ({"bots": {"deny": ["x@exa_mple"]}}, "bots.deny[0]", "is not a domain"),
        ({"bots": {"block": ["x.example"]}}, "bots.block", ""),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**data, "accounts": [_account()]})
    assert path in str(info.value)
    assert words in str(info.value)


def test_config_account_error_names_the_account_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"accounts": [_account(automatic_emails="never")]})
    assert "accounts[0].automatic_emails" in str(info.value)
