"""The demo behind ``scripts/demo``: a throwaway Dovecot, a handful of mails, one mailbridge pass.

It shows a newcomer the whole path: mail lands in an IMAP Inbox, ``mailbridge run --once`` turns
it into conversations in SQLite, moves it to the Processed folder, and sends the one mail it could
not import (too large) to the Failed folder with the reason recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from mailbridge.testing.dovecot import Dovecot

# The throwaway mailbox's password: public on purpose, the server lives only for the demo.
DEMO_PASSWORD = "demo-password"  # noqa: S105

# A 1x1 transparent PNG, for the inline image.
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def sample_mails(address: str) -> list[tuple[str, bytes]]:
    """A thread of three, an attachment, an inline image, and one over the size limit."""
    start = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    mails: list[tuple[str, bytes]] = []

    def mail(subject: str, sender: str, body: str, minutes: int, **headers: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = address
        msg["Subject"] = subject
        msg["Date"] = format_datetime(start + timedelta(minutes=minutes))
        msg["Message-ID"] = make_msgid(domain="customer.example")
        for name, value in headers.items():
            msg[name.replace("_", "-")] = value
        msg.set_content(body)
        return msg

    first = mail(
        "Order 1042 arrived damaged",
        "John Doe <john@customer.example>",
        "Hello, my order 1042 arrived with a broken lid. Jane is in copy.",
        0,
        Cc="Jane Doe <jane@customer.example>",
    )
    second = mail(
        "Re: Order 1042 arrived damaged",
        "Jane Doe <jane@customer.example>",
        "Adding: the box was also wet.",
        5,
        In_Reply_To=first["Message-ID"],
        References=first["Message-ID"],
    )
    third = mail(
        "Re: Order 1042 arrived damaged",
        "John Doe <john@customer.example>",
        "Any news? Thanks.",
        30,
        In_Reply_To=second["Message-ID"],
        References=f"{first['Message-ID']} {second['Message-ID']}",
    )
    mails += [("thread, 1 of 3", first.as_bytes()), ("thread, 2 of 3", second.as_bytes())]
    mails.append(("thread, 3 of 3", third.as_bytes()))

    invoice = mail("Invoice question", "Ann Smith <ann@shop.example>", "See the attached.", 60)
    invoice.add_attachment(
        b"%PDF-1.4\n% demo invoice\n",
        maintype="application",
        subtype="pdf",
        filename="invoice-77.pdf",
    )
    mails.append(("with an attachment", invoice.as_bytes()))

    photo = mail("Photo of the problem", "Bob <bob@customer.example>", "Photo inline.", 90)
    cid = make_msgid(domain="customer.example")
    photo.add_alternative(
        f'<p>Here it is: <img src="cid:{cid[1:-1]}" alt="photo"> '
        '<b style="color:#c00">urgent</b><script>alert(1)</script></p>',
        subtype="html",
    )
    html_part = photo.get_payload()[1]  # type: ignore[index]
    html_part.add_related(PIXEL, maintype="image", subtype="png", cid=cid, filename="photo.png")
    mails.append(("with an inline image", photo.as_bytes()))

    big = mail("Huge scan", "Carl <carl@customer.example>", "A scan that is too large.", 120)
    big.add_attachment(
        bytes(2 * 1024 * 1024),
        maintype="application",
        subtype="octet-stream",
        filename="scan.bin",
    )
    mails.append(("too large (2 MB, limit 1 MB)", big.as_bytes()))
    return mails


def mailbridge(config: Path, *args: str) -> int:
    """Run the real command line, as an operator would."""
    command = [
        sys.executable,
        "-m",
        "mailbridge",
        "-c",
        str(config),
        "--log-format",
        "console",
        "--log-level",
        "warning",
        *args,
    ]
    print(f"\n$ mailbridge -c {config.name} {' '.join(args)}", flush=True)
    # A wide table even when the output is piped (rich falls back to 80 columns).
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "140")}
    return subprocess.run(command, check=False, env=env).returncode


def conversations_to_show(database: Path) -> list[str]:
    """The longest thread and the conversation with an inline image: the two worth reading."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute(
            "SELECT conversation FROM conversationmessage GROUP BY conversation "
            "ORDER BY count(*) DESC, conversation LIMIT 1"
        ).fetchall()
        rows += conn.execute(
            "SELECT DISTINCT m.conversation FROM embeddedfile e "
            "JOIN conversationmessage m ON m.id = e.conversationmessage LIMIT 1"
        ).fetchall()
    return list(dict.fromkeys(str(row[0]) for row in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and database")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-demo-"))
    workdir.chmod(0o755)  # Dovecot's auth process must be able to read its users file
    with Dovecot(workdir / "dovecot") as dovecot:
        login = dovecot.add_user("support", DEMO_PASSWORD)
        address = "support@example.com"
        print(f"Started a throwaway Dovecot on {dovecot.host}:{dovecot.port} (user {login})")
        for label, raw in sample_mails(address):
            dovecot.append(login, DEMO_PASSWORD, raw)
            print(f"  delivered: {label} ({len(raw):,} bytes)")

        secret = workdir / "support.pw"
        secret.write_text(DEMO_PASSWORD + "\n")
        secret.chmod(0o600)
        config = workdir / "config.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                database: {workdir / "mailbridge.db"}
                limits: {{attachment_max_size_mb: 1}}
                accounts:
                  - name: support
                    address: {address}
                    imap: {{host: {dovecot.host}, port: {dovecot.port}, tls: none}}
                    auth: {{method: password, username: {login}, password_file: {secret}}}
                    mode: poll
                """
            )
        )
        config.chmod(0o600)
        print(f"\nConfig written to {config} (plain IMAP: this Dovecot is on loopback only)")

        status = mailbridge(config, "run", "--once")
        if status != 0:
            print(f"\nmailbridge run --once failed with exit status {status}", file=sys.stderr)
            return status
        mailbridge(config, "conversations")
        for conversation in conversations_to_show(workdir / "mailbridge.db"):
            mailbridge(config, "conversation", "show", conversation)
        mailbridge(config, "failed")
        mailbridge(config, "status")

        password = DEMO_PASSWORD
        print("\nOn the server afterwards:")
        for folder in ("INBOX", "Mailbridge Processed", "Mailbridge Failed"):
            count = len(dovecot.folder_uids(login, password, folder))
            print(f"  {folder:<22} {count} message(s)")
    if args.keep:
        print(f"\nKept {workdir} (database: {workdir / 'mailbridge.db'})")
    else:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
