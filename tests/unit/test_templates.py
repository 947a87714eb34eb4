"""Templates and merge codes (core/templates.py) and their start-up check (check-config 78)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mailbridge.cli import main as cli_main
from mailbridge.core.templates import (
    MERGE_CODES,
    HistoryMessage,
    MergeData,
    render,
    render_text,
    unknown_codes,
)


def data(**changes: object) -> MergeData:
    values: dict[str, object] = {
        "subject": "Order 1042",
        "sender_name": "Ann - Support",
        "sender_address": "support@example.test",
        "recipient_name": "John <Doe>",
        "recipient_address": "john@customer.example",
        "followers": [("john@customer.example", "John <Doe>"), ("jane@x.example", "")],
        "history": [
            HistoryMessage(
                datetime(2026, 11, 30, 8, 0, tzinfo=UTC),
                "John",
                "john@customer.example",
                "Where is it?",
            )
        ],
        "records": {"ticket": {"id": 7, "number": "T-7", "company": {"id": 1, "name": "ACME"}}},
        "signature": "<p>Support team</p>",
        "language": "en",
        "time_zone": "Europe/Stockholm",
    }
    values.update(changes)
    return MergeData(**values)  # type: ignore[arg-type]


def test_the_thirteen_merge_codes() -> None:
    assert len(MERGE_CODES) == 13
    source = "".join(f"[{code}={{{{ {code} }}}}]" for code in sorted(MERGE_CODES))
    out = render(source, "<p>Body</p>", data())
    assert "[num_followers=2]" in out
    assert "[recipient_name=John &lt;Doe&gt;]" in out  # escaped: a name is text, not markup
    assert "[follower_addresses=john@customer.example, jane@x.example]" in out
    assert '<a href="mailto:jane@x.example">' in out
    assert "[other_followers_info=Also sent to: jane@x.example.]" in out
    assert "2026-11-30 09:00 CET" in out  # the history in the account's time zone


def test_table_codes_follow_relations() -> None:
    out = render("{{ body }} {{ ticket.number }} {{ ticket.company.name }}", "<b>Hi</b>", data())
    assert out == "<b>Hi</b> T-7 ACME"


@pytest.mark.parametrize(
    ("language", "words"),
    [("de", "antworten Sie"), ("sv", "Svara"), ("fr", "répondez"), ("es", "responda")],
)
def test_fixed_texts_follow_the_language(language: str, words: str) -> None:
    assert words in render("{{ reply_info }}", "", data(language=language))


def test_undefined_codes_and_sandbox_escapes_are_errors() -> None:
    with pytest.raises(ValueError, match="ticket_number"):
        render("{{ ticket_number }}", "", data())
    with pytest.raises(ValueError, match="missing"):
        render("{{ ticket.missing }}", "", data())
    with pytest.raises(ValueError, match=r"unsafe|not safely|access"):
        render("{{ body.__class__.__mro__ }}", "", data())


def test_a_relation_without_a_record_says_which_link_is_missing() -> None:
    """``{{ person.name }}`` passed the config check (person is a follower-parent table); for a
    recipient whose follower has no person linked, the reason names the missing link, which an
    integrator fixes in the data, not in the template."""
    with pytest.raises(ValueError, match="no person record is linked") as caught:
        render("{{ person.name }}", "", data())
    reason = str(caught.value)
    assert "no person record is linked" in reason
    assert "follower.person is NULL" in reason


def test_a_snippet_in_the_body_is_filled_too() -> None:
    assert render("{{ body }}", "Hello {{ recipient_name }}", data()) == "Hello John &lt;Doe&gt;"
    assert render_text("Hello {{ recipient_name }}", data()) == "Hello John <Doe>"


def test_unknown_codes_are_found_before_sending() -> None:
    assert unknown_codes("{{ body }} {{ reply_info }} {{ ticket.number }}", {"ticket"}) == []
    assert unknown_codes("{{ recipent_name }} {{ deal.x }}", {"ticket"}) == [
        "deal",
        "recipent_name",
    ]
    with pytest.raises(ValueError, match="line 1"):
        unknown_codes("{{ body ", set())


def test_check_config_exits_78_naming_the_template_and_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "support.html"
    template.write_text("<p>{{ body }}</p><p>{{ recipent_name }}</p>")
    config = {
        "database": str(tmp_path / "m.db"),
        "accounts": [
            {
                "name": "support",
                "address": "support@example.test",
                "imap": {"host": "127.0.0.1"},
                "auth": {"username": "u", "password": "p"},
                "template_file": str(template),
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["-c", str(path), "check-config"]) == 78
    err = capsys.readouterr().err
    assert "accounts[0].template_file" in err
    assert str(template) in err
    assert "{{ recipent_name }}" in err
    template.write_text("<p>{{ body }}</p><p>{{ recipient_name }}</p>")
    assert cli_main(["-c", str(path), "check-config"]) == 0


def test_a_template_is_compiled_once_and_rendered_per_message() -> None:
    from mailbridge.core.templates import compiled

    source = "<p>{{ body }}</p><p>{{ recipient_name }} #compiled-once</p>"
    compiled.cache_clear()
    for name in ("Ann", "Bob", "Cy"):
        data = MergeData(
            subject="s", sender_name="Support", sender_address="support@example.test",
            recipient_name=name, recipient_address=f"{name.lower()}@x.example", followers=(),
        )  # fmt: skip
        assert f"<p>{name} #compiled-once</p>" in render(source, "<b>hi</b>", data)
    info = compiled.cache_info()
    assert (info.misses, info.hits) == (1, 2)
