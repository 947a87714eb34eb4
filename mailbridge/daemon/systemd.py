"""systemd service notifications (sd_notify) with the standard library only.

Protocol, as documented in sd_notify(3) and systemd.service(5):

* The service manager passes ``$NOTIFY_SOCKET``: the address of an ``AF_UNIX`` ``SOCK_DGRAM``
  socket. An absolute path is a file-system socket; a leading ``@`` means the Linux abstract
  namespace (the ``@`` stands for a leading NUL byte). Newer systemd also documents
  ``vsock:CID:PORT`` for VMs; mailbridge runs on the host, so that form is ignored (with a log).
* Each notification is one datagram of newline-separated ``KEY=VALUE`` assignments, e.g.
  ``READY=1``, ``STATUS=Watching 3 accounts``, ``STOPPING=1``, ``WATCHDOG=1``.
* ``Type=notify-reload`` (systemd >= 253): on SIGHUP the service sends ``RELOADING=1`` together
  with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC in microseconds, decimal) so the manager can tell
  this reload apart from an earlier one, and sends ``READY=1`` again once the reload is done.
* ``WatchdogSec=``: the manager sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``; if that is set
  and not our PID the watchdog is meant for another process). sd_watchdog_enabled(3) advises
  sending ``WATCHDOG=1`` at about half the interval; without ``$WATCHDOG_USEC`` (or with another
  process's ``$WATCHDOG_PID``) none is sent at all. The supervisor sends them from its own loop,
  so a loop that hangs stops them and systemd restarts the service.
* With ``$NOTIFY_SOCKET`` unset (started by hand, in tests, under another supervisor) every call is
  a silent no-op.

Sending never raises: a lost notification must not take the daemon down. The first failure is
logged (once, to keep a broken socket from flooding the journal); later ones are counted quietly.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from mailbridge.log import get_logger

log = get_logger(__name__)

# sd_notify(3) blocks on a full socket buffer; mailbridge calls this from the event loop, so bound
# the wait instead: a manager that cannot take a datagram within a second is wedged anyway.
_SEND_TIMEOUT_SECONDS = 1.0


def _socket_address(value: str) -> str | bytes | None:
    """Translate $NOTIFY_SOCKET into an address for socket.sendto, or None if unusable."""
    if value.startswith("@"):
        # Abstract namespace: the name is the bytes after a NUL, with no terminator.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:..., relative paths: not something a host service is given


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of WatchdogSec=), or None if not asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog belongs to another process (sd_watchdog_enabled(3))
        except ValueError:
            return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return micros / 1_000_000 / 2


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when not run by systemd.

    The environment is read once at construction (the daemon creates one Notifier at start-up).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ = dict(env)
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        self._failures = 0
        if raw and self._address is None:
            log.warning("notify_socket_unsupported", notify_socket=raw)

    @property
    def enabled(self) -> bool:
        """True when $NOTIFY_SOCKET names a socket we can send to."""
        return self._address is not None

    @property
    def failures(self) -> int:
        """How many notifications could not be delivered (for status output and tests)."""
        return self._failures

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram.

        True if the datagram was sent; False when notification is disabled or sending failed.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(_SEND_TIMEOUT_SECONDS)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning(
                    "sd_notify_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    message=assignments[0].split("=", 1)[0],
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``, optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status(status))

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``: ``STATUS=...``."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping: ``WATCHDOG=1``. Call every :meth:`watchdog_interval` seconds.

        Sent as asked, so call it only when :meth:`watchdog_interval` is not None: a ping
        systemd did not ask for (``$WATCHDOG_PID`` another process's) is noise at best.
        """
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun: ``RELOADING=1`` + ``MONOTONIC_USEC`` (systemd >= 253).

        Send :meth:`ready` when the reload is complete.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings for this process, or None without WatchdogSec=."""
        return watchdog_interval(self._environ)


def _status(text: str) -> str:
    # A newline would start a new assignment inside the datagram (e.g. a forged READY=1 from a
    # server's error text in the status); keep the status on one line.
    return "STATUS=" + " ".join(text.splitlines())
