"""Socket options shared by the IMAP and SMTP connections.

A connection silently dropped by a NAT or a firewall (no FIN, no RST) looks alive to both ends
for as long as neither sends: Linux's default TCP keepalive starts probing only after two hours
(``net.ipv4.tcp_keepalive_time``). Every mailbridge socket therefore turns keepalive on with its
own short timers, so the kernel reports such a connection dead after about
``KEEPIDLE + KEEPINTVL * KEEPCNT`` seconds of silence (2 min + 4 * 15 s = 3 minutes) and the
blocked read fails with ``ETIMEDOUT``. It only detects a peer that stopped answering at the TCP
level; a server that keeps the TCP connection but stops answering IMAP is caught by the command
timeout and the IDLE re-issue interval (see :meth:`mailbridge.mail.imap.ImapSession.wait_for_mail`).
"""

from __future__ import annotations

import socket
from typing import Any, Final

KEEPIDLE_SECONDS: Final = 120  # silence before the first probe (tcp(7) TCP_KEEPIDLE)
KEEPINTVL_SECONDS: Final = 15  # between probes (TCP_KEEPINTVL)
KEEPCNT: Final = 4  # unanswered probes before the connection is dropped (TCP_KEEPCNT)


def enable_keepalive(sock: Any) -> bool:
    """Turn on TCP keepalive with mailbridge's timers on ``sock`` (a ``socket.socket`` or the
    ``TransportSocket`` asyncio hands out). Returns False when there is no TCP socket (e.g. a
    Unix socket in a test); options a platform lacks (TCP_KEEPIDLE on macOS) are skipped."""
    if sock is None or getattr(sock, "type", None) != socket.SOCK_STREAM:
        return False
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPIDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPINTVL_SECONDS),
        ("TCP_KEEPCNT", KEEPCNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True
