"""Test helpers shipped with mailbridge: a throwaway Dovecot IMAP server for tests, demo and bench.

Nothing here is imported by the daemon itself; it exists so the test suite, ``scripts/demo`` and
``scripts/bench`` share one well-tested way of running a real IMAP peer.
"""

from mailbridge.testing.dovecot import Dovecot, DovecotError, DovecotNotInstalledError

__all__ = ["Dovecot", "DovecotError", "DovecotNotInstalledError"]
