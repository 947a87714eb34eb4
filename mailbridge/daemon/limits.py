"""The process's open-files limit against the number of accounts (RLIMIT_NOFILE).

Each account holds about ``FDS_PER_ACCOUNT`` file descriptors: its IDLE connection and the
recovery sweep's connection while it runs; the database, the event loop and the rest of the
process are ``FDS_RESERVE``. Linux starts
services with a soft limit of 1024 (systemd's default ``LimitNOFILE=1024:524288``), which a
fleet of a few hundred accounts exhausts: every further connect failed with EMFILE and backed off
as ``connection_lost``. At start-up the daemon raises its soft limit to the hard limit (allowed
for an unprivileged process, getrlimit(2)/setrlimit(2)), and when even the hard limit is too low
it says so once, with code ``fd_limit`` and its remedy, instead of failing connection by
connection.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import structlog

from mailbridge.errors import describe

log = structlog.get_logger("mailbridge.limits")

FDS_PER_ACCOUNT = 2
# Standard streams, the database and its WAL/SHM files, the notify socket, parse workers' pipes,
# the metrics listener: what the process holds besides its accounts.
FDS_RESERVE = 64


@dataclass(frozen=True, slots=True)
class FdLimit:
    """The open-files limit after :func:`raise_fd_limit`: soft, hard, and what is needed."""

    soft: int
    hard: int
    needed: int

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed


def fds_needed(accounts: int) -> int:
    """File descriptors ``accounts`` accounts need, with the process's own reserve."""
    return FDS_PER_ACCOUNT * accounts + FDS_RESERVE


def raise_fd_limit(accounts: int) -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log ``fd_limit`` if it is still too low.

    Returns the limits in force afterwards. Never raises: a limit that cannot be changed is
    reported, and the daemon runs with what it has.
    """
    needed = fds_needed(accounts)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        # An unlimited hard limit still has the kernel's nr_open ceiling: ask for what is
        # needed (at least 65536) rather than "infinity", which setrlimit refuses.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(exc))
        else:
            soft = target
    limit = FdLimit(soft=_finite(soft), hard=_finite(hard), needed=needed)
    if not limit.enough:
        log.error(
            "fd_limit",
            code="fd_limit",
            accounts=accounts,
            open_files_limit=limit.soft,
            hard_limit=limit.hard,
            needed=needed,
            error=f"{accounts} accounts need about {needed} open files, allowed {limit.soft}",
            remedy=describe("fd_limit").remedy,
        )
    return limit


def _finite(value: int) -> int:
    return 2**62 if value == resource.RLIM_INFINITY else value
