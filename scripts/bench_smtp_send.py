"""Micro-benchmark of :meth:`mailbridge.mail.smtp.SmtpSender.send` alone: N messages (composed
once, as bytes) over one logged-in connection to the SMTP sink in its own process (as
``scripts/bench_sending.py`` starts it), so that the client's CPU time is the sender's.

Reports CPU milliseconds per message (``time.process_time()`` of this process, which is the
client only) and messages per second (wall clock). ``--sender-module FILE`` loads
``SmtpSender`` from another copy of ``smtp.py`` (``git show REV:mailbridge/mail/smtp.py``), and
the two take turns (``--rounds``), so that other load on the machine weighs on both alike::

    git show HEAD~1:mailbridge/mail/smtp.py > /tmp/smtp_before.py
    .venv/bin/python scripts/bench_smtp_send.py --messages 2000 --sender-module /tmp/smtp_before.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sending import _BODY, _settings, _sink_process

from mailbridge.core.identify import new_conversation_key
from mailbridge.core.outbox import build_message
from mailbridge.mail import smtp


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("smtp_other", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _run(module: Any, settings: Any, raws: list[bytes], recipients: list[list[str]]) -> Any:
    account = settings.accounts[0]
    sender = await module.SmtpSender.open(account)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for raw, to in zip(raws, recipients, strict=True):
            refused = await sender.send(raw, account.address, to)
            assert not refused
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await sender.close()


async def measure(count: int, per_message: int, rounds: int, other: str | None) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="mailbridge-bench-smtp-") as tmp,
        _sink_process(Path(tmp)) as sink,
    ):
        settings = _settings(Path(tmp), sink)
        recipients = [
            [f"customer{n}.{k}@example.org" for k in range(per_message)] for n in range(count)
        ]
        raws = [
            build_message(
                address="support@example.test",
                display_name="Support",
                identification="message_id",
                conversation_key=new_conversation_key(),
                subject=f"Bench {n}",
                to=to,
                text=_BODY,
            ).as_bytes()
            for n, to in enumerate(recipients)
        ]
        modules = {"current": smtp} | ({"other": _load(other)} if other else {})
        totals = {name: [0.0, 0.0] for name in modules}
        share = -(-count // rounds)
        await _run(smtp, settings, raws[:50], recipients[:50])  # warm up
        for start in range(0, count, share):
            part = slice(start, min(start + share, count))
            for name, module in modules.items():
                cpu, wall = await _run(module, settings, raws[part], recipients[part])
                totals[name][0] += cpu
                totals[name][1] += wall
    return {
        name: {
            "messages": count,
            "recipients_per_message": per_message,
            "cpu_ms_per_message": round(cpu * 1000 / count, 4),
            "msgs_per_s": round(count / wall, 1),
        }
        for name, (cpu, wall) in totals.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=1, help="RCPT TO per message")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sender-module", help="another smtp.py to compare with")
    args = parser.parse_args()
    result = asyncio.run(measure(args.messages, args.recipients, args.rounds, args.sender_module))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
