"""mailbridge: an IMAP/SMTP daemon that turns shared mailboxes into a conversation database."""

__version__ = "0.1.0"


def _import_structlog_without_rich() -> None:
    """Import structlog with ``rich`` hidden, so that only the commands that print tables
    import rich (~0.1 s, ~60 modules): structlog imports it whenever it is installed, for
    pretty console tracebacks mailbridge does not use (log.py renders plain ones, which
    redaction can read). Done here, before any module imports structlog."""
    import sys

    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment] # "import rich" raises ImportError
    try:
        import structlog  # noqa: F401 - imported for its side effect on sys.modules
    except ImportError:  # structlog itself missing: the import that needs it will say so
        pass
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()
