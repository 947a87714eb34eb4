"""mailbridge: an IMAP/SMTP daemon that turns shared mailboxes into a conversation database."""

__version__ = "0.1.0"
