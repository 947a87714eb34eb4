"""A throwaway Dovecot: a real IMAP server for tests, ``scripts/demo`` and ``scripts/bench``.

Usage::

    with Dovecot(tmp_path, tls=True) as dovecot:
        login = dovecot.add_user("alice", "secret")
        dovecot.append(login, "secret", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        ... connect to dovecot.host / dovecot.port (plain or STARTTLS) or dovecot.tls_port ...

The instance is isolated from any system Dovecot: its own ``base_dir``, ``state_dir``, log file
and ``instance_name`` inside ``workdir``, listening on free loopback ports. The settings follow
``/work/shared/notes/dovecot-for-tests.md`` (running as root with a ``mail``-owned mail store,
no chroot, fast wrong-password answers). Users live in a passwd-file that Dovecot re-reads on
its own when it changes, so adding users or changing passwords needs no reload.

Loading and inspecting mail uses the standard library's synchronous :mod:`imaplib`: it is fast,
independent of the code under test (aioimaplib), and usable from sync fixtures.
"""

from __future__ import annotations

import contextlib
import getpass
import imaplib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mailbridge.config import AccountSettings

HOST = "127.0.0.1"

# Debian installs the binaries in sbin, which is not on PATH for non-root shells.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)


class DovecotError(RuntimeError):
    """The test Dovecot could not be started, stopped or used. The message quotes its log."""


class DovecotNotInstalledError(DovecotError):
    """The dovecot binaries are not installed."""


def find_binaries() -> tuple[str, str]:
    """Paths of ``dovecot`` and ``doveadm``; DovecotNotInstalledError names the fix."""
    dovecot = shutil.which("dovecot", path=_SEARCH_PATH)
    doveadm = shutil.which("doveadm", path=_SEARCH_PATH)
    if dovecot is None or doveadm is None:
        raise DovecotNotInstalledError(
            "Dovecot is not installed (need the dovecot and doveadm binaries from Debian's "
            "dovecot-imapd). Run scripts/test, which apt-installs it, or "
            "'apt-get install dovecot-imapd'."
        )
    return dovecot, doveadm


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _quote(name: str) -> str:
    """An IMAP quoted string (RFC 3501 section 4.3) for stdlib imaplib arguments."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Dovecot:
    """One isolated Dovecot process tree, configured for tests. Use as a context manager.

    ``port`` is the plain IMAP listener (which also offers STARTTLS when ``tls=True``);
    ``tls_port`` is the implicit-TLS listener (only with ``tls=True``) and ``ca_file`` the PEM of
    the throwaway CA that signed the server certificate (SAN ``IP:127.0.0.1`` and ``localhost``).
    """

    host: str = HOST

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        max_user_connections: int = 50,
        process_limit: int = 1024,
        oauth2_introspection_url: str | None = None,
        hibernate_seconds: float | None = None,
        client_limit: int | None = None,
    ) -> None:
        """``process_limit``: most ``imap`` processes at once (one per session not parked).
        ``hibernate_seconds``: park a session that has been in IDLE this long in the one
        ``imap-hibernate`` process (``imap_hibernate_timeout``), as a fleet server would; its
        ``client_limit`` (default ``process_limit``) bounds the parked sessions, and the
        connections anvil, auth and the login processes track."""
        self.workdir = Path(workdir)
        self.tls = tls
        # XOAUTH2/OAUTHBEARER logins checked by this RFC 7662 introspection endpoint
        # (mailbridge.testing.oauth); users need no passwd-file entry for them.
        self.oauth2_introspection_url = oauth2_introspection_url
        self.max_user_connections = max_user_connections
        self.process_limit = process_limit
        self.hibernate_seconds = hibernate_seconds
        self.client_limit = client_limit if client_limit is not None else process_limit
        self.port = free_port()
        self._tls_port = free_port() if tls else 0
        self.config_path = self.workdir / "dovecot.conf"
        self.log_path = self.workdir / "dovecot.log"
        self.users_dir = self.workdir / "users"
        self.mail_root = self.workdir / "mail"
        self._ca_file: Path | None = None
        self._users: dict[str, str] = {}
        self._running = False
        self._instance = f"mailbridge-test-{uuid.uuid4().hex[:12]}"
        self._dovecot, self._doveadm = find_binaries()
        self._configured = False

    # -- properties -------------------------------------------------------------------------

    @property
    def tls_port(self) -> int:
        """The implicit TLS (imaps) port; only with ``tls=True``."""
        if not self.tls:
            raise DovecotError("this Dovecot was started without tls=True: no imaps port")
        return self._tls_port

    @property
    def ca_file(self) -> Path:
        """PEM file of the test CA that signed the server certificate; only with ``tls=True``."""
        if self._ca_file is None:
            raise DovecotError("this Dovecot was started without tls=True: no CA file")
        return self._ca_file

    @property
    def running(self) -> bool:
        return self._running

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config (first time only) and start Dovecot; returns once the port answers."""
        if self._running:
            return
        if not self._configured:
            self._configure()
        # A previous instance's master may still be releasing the port after a restart.
        self._wait_port(self.port, open_=False, timeout=10)
        # The master daemonizes and keeps inherited descriptors: never hand it a pipe (run()
        # would wait for EOF forever); send its early stderr to a file instead.
        errors = self.workdir / "dovecot-start.err"
        with errors.open("wb") as err:
            result = subprocess.run(
                [self._dovecot, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                check=False,
                timeout=30,
            )
        if result.returncode != 0:
            raise DovecotError(
                f"dovecot failed to start (exit {result.returncode}): "
                f"{errors.read_text(errors='replace').strip()}\n{self.log_text()}"
            )
        self._running = True
        try:
            self._wait_port(self.port, open_=True, timeout=15)
            if self.tls:
                self._wait_port(self._tls_port, open_=True, timeout=15)
        except DovecotError:
            self.stop()
            raise

    def stop(self, *, wait: bool = True) -> None:
        """Stop Dovecot (SIGTERM to its master, as ``doveadm stop`` does).

        With ``wait`` (the default) return once the master has exited, which takes Dovecot
        about 2.5 s; ``wait=False`` returns at once (the processes finish on their own), which
        lets a test session stop several instances in parallel.
        """
        if not self._running:
            return
        self._running = False
        pid = self._master_pid()
        if pid is None:
            subprocess.run(
                [self._doveadm, "-c", str(self.config_path), "stop"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                timeout=30,
            )
            return
        # Mail processes (one per logged-in client) outlive their master on this Dovecot build,
        # so clients would keep talking to the old server across restart(): stop them too.
        # They are found as the master's children, i.e. exactly this instance's processes.
        pids = [pid, *_children(pid)]
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGTERM)
        if not wait:
            return
        deadline = time.monotonic() + 15
        while any(_pid_alive(each) for each in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for each in pids:
            if _pid_alive(each):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same ports: open client connections are dropped."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Dovecot's log so far (for failing-test diagnostics); empty if there is none yet."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # -- users ------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> str:
        """Create (or replace) a user; returns the login name. Takes effect immediately."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,100}", name):
            raise ValueError("test user names are letters, digits and . _ @ + - only")
        if re.search(r"[:\r\n\x00]", password):
            raise ValueError("password must not contain ':', CR, LF or NUL (passwd-file)")
        self._users[name] = password
        self._write_user(name, password)
        return name

    def set_password(self, name: str, password: str) -> None:
        """Change a user's password; returns once Dovecot accepts the new one."""
        if name not in self._users:
            raise KeyError(f"no such test user {name!r}")
        self.add_user(name, password)
        if not self._running:
            return
        # Dovecot stats a passwd-file at most once per second, so a change right after a login
        # can go unnoticed for up to a second: wait until the new password is accepted.
        deadline = time.monotonic() + 5
        while True:
            try:
                with self.client(name, password):
                    return
            except imaplib.IMAP4.error:
                if time.monotonic() > deadline:
                    raise DovecotError(
                        f"Dovecot did not pick up the new password of {name}"
                    ) from None
                time.sleep(0.05)

    def account(
        self,
        login: str,
        password: str,
        *,
        name: str = "test",
        address: str | None = None,
        tls: Literal["implicit", "starttls", "none"] = "none",
        verify_certificate: bool = True,
        ca_file: Path | None = None,
        timeout_seconds: float = 10.0,
    ) -> AccountSettings:
        """AccountSettings pointing at this server (the port follows ``tls``)."""
        from mailbridge.config import AccountSettings  # config pulls pydantic; import lazily

        port = self._tls_port if tls == "implicit" else self.port
        if tls != "none" and ca_file is None and self.tls and verify_certificate:
            ca_file = self.ca_file
        return AccountSettings.model_validate(
            {
                "name": name,
                "address": address or f"{login}@example.test",
                "imap": {
                    "host": self.host,
                    "port": port,
                    "tls": tls,
                    "verify_certificate": verify_certificate,
                    "ca_file": ca_file,
                    "timeout_seconds": timeout_seconds,
                },
                "auth": {"username": login, "password": password},
            }
        )

    # -- loading and inspecting mail (stdlib imaplib, synchronous) --------------------------

    @contextlib.contextmanager
    def client(self, user: str, password: str) -> Iterator[imaplib.IMAP4]:
        """A logged-in stdlib IMAP client on the plain port, logged out afterwards."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=30)
        try:
            conn.login(user, password)
            yield conn
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

    def append(
        self,
        user: str,
        password: str,
        raw: bytes,
        folder: str = "INBOX",
        flags: Sequence[str] = (),
        date: datetime | None = None,
    ) -> None:
        """APPEND one message (creating ``folder`` if needed)."""
        self.append_many(user, password, [raw], folder=folder, flags=flags, date=date)

    def append_many(
        self,
        user: str,
        password: str,
        raws: Iterable[bytes],
        folder: str = "INBOX",
        flags: Sequence[str] = (),
        date: datetime | None = None,
    ) -> int:
        """APPEND many messages over one connection; returns how many were appended."""
        flag_arg = "(" + " ".join(flags) + ")" if flags else None
        count = 0
        with self.client(user, password) as conn:
            self._create_if_missing(conn, folder)
            for raw in raws:
                typ, data = conn.append(_quote(folder), flag_arg, date, raw)
                if typ != "OK":
                    raise DovecotError(f"APPEND to {folder!r} failed: {data!r}")
                count += 1
        return count

    def create_folder(self, user: str, password: str, folder: str) -> None:
        with self.client(user, password) as conn:
            self._create_if_missing(conn, folder)

    def folder_uids(self, user: str, password: str, folder: str = "INBOX") -> list[int]:
        """All UIDs in ``folder``, ascending."""
        return self._uid_search(user, password, folder, "ALL")

    def unseen(self, user: str, password: str, folder: str = "INBOX") -> list[int]:
        """UIDs without ``\\Seen`` in ``folder``, ascending."""
        return self._uid_search(user, password, folder, "UNSEEN")

    def folder_messages(self, user: str, password: str, folder: str = "INBOX") -> list[bytes]:
        """The raw bytes of every message in ``folder`` in UID order (does not set \\Seen)."""
        return [raw for _uid, raw, _flags in self._fetch_all(user, password, folder)]

    def folder_flags(self, user: str, password: str, folder: str = "INBOX") -> dict[int, set[str]]:
        """{uid: flags} for every message in ``folder``."""
        return {uid: flags for uid, _raw, flags in self._fetch_all(user, password, folder)}

    def folders(self, user: str, password: str) -> list[str]:
        """Every folder name of the user (as LIST reports it, unquoted)."""
        with self.client(user, password) as conn:
            typ, data = conn.list()
        if typ != "OK":
            raise DovecotError(f"LIST failed: {data!r}")
        names = []
        for item in data:
            if not isinstance(item, bytes):
                continue
            match = re.match(rb'\([^)]*\) (?:"[^"]*"|NIL) (.*)$', item)
            if match:
                name = match.group(1).decode()
                if name.startswith('"'):
                    name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                names.append(name)
        return names

    # -- internals ------------------------------------------------------------------------

    def _uid_search(self, user: str, password: str, folder: str, criterion: str) -> list[int]:
        with self.client(user, password) as conn:
            typ, data = conn.select(_quote(folder), readonly=True)
            if typ != "OK":
                raise DovecotError(f"SELECT {folder!r} failed: {data!r}")
            typ, data = conn.uid("SEARCH", criterion)
        if typ != "OK" or not data or not isinstance(data[0], bytes):
            raise DovecotError(f"UID SEARCH failed: {data!r}")
        return sorted(int(x) for x in data[0].split())

    def _fetch_all(
        self, user: str, password: str, folder: str
    ) -> list[tuple[int, bytes, set[str]]]:
        with self.client(user, password) as conn:
            typ, data = conn.select(_quote(folder), readonly=True)
            if typ != "OK":
                raise DovecotError(f"SELECT {folder!r} failed: {data!r}")
            if int((data[0] or b"0").decode()) == 0:
                return []
            typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        if typ != "OK":
            raise DovecotError(f"UID FETCH failed: {data!r}")
        out: list[tuple[int, bytes, set[str]]] = []
        for item in data:
            # imaplib yields (b'1 FETCH (UID 5 FLAGS (\\Seen) BODY[] {123}', raw) then b')'.
            if isinstance(item, tuple):
                head = item[0].decode()
                uid_match = re.search(r"UID (\d+)", head)
                flags_match = re.search(r"FLAGS \(([^)]*)\)", head)
                if uid_match is None:
                    continue
                flags = set(flags_match.group(1).split()) if flags_match else set()
                out.append((int(uid_match.group(1)), item[1], flags))
        return sorted(out, key=lambda entry: entry[0])

    @staticmethod
    def _create_if_missing(conn: imaplib.IMAP4, folder: str) -> None:
        if folder.upper() == "INBOX":
            return
        typ, data = conn.list('""', _quote(folder))
        if typ == "OK" and data and data[0] is not None:
            return
        typ, data = conn.create(_quote(folder))
        if typ != "OK":
            raise DovecotError(f"CREATE {folder!r} failed: {data!r}")

    def _write_user(self, name: str, password: str) -> None:
        # One passwd-file per user (the passdb path contains %u): Dovecot opens a file it has
        # not seen before at once, whereas a shared file is re-checked only once per second,
        # which would make a user added right after another test's login invisible.
        self.users_dir.mkdir(exist_ok=True)
        self.users_dir.chmod(0o755)
        path = self.users_dir / name
        tmp = self.users_dir / f".{name}.tmp"
        tmp.write_text(f"{name}:{password}::::::\n", encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, path)

    def server_processes(self) -> dict[str, int]:
        """How many of this instance's processes run under each name (``imap``,
        ``imap-hibernate``, ``imap-login`` ...): shows whether idle sessions were parked."""
        pid = self._master_pid()
        counts: dict[str, int] = {}
        if pid is None:
            return counts
        for child in _children(pid):
            try:
                name = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            counts[name] = counts.get(name, 0) + 1
        return counts

    def parked_sessions(self) -> int:
        """How many client connections the ``imap-hibernate`` process(es) hold: the IDLE
        sessions parked there (TCP sockets among their open files; Linux /proc)."""
        pid = self._master_pid()
        if pid is None:
            return 0
        tcp: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9:
                        tcp.add(fields[9])  # the socket's inode
        parked = 0
        for child in _children(pid):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() != "imap-hibernate":
                    continue
                links = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
            except OSError:
                continue
            parked += sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in tcp)
        return parked

    def _master_pid(self) -> int | None:
        try:
            return int((self.workdir / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_port(self, port: int, *, open_: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _port_open(port) != open_:
            if time.monotonic() > deadline:
                state = "answer" if open_ else "close"
                raise DovecotError(
                    f"port {port} did not {state} within {timeout:.0f}s\n{self.log_text()}"
                )
            time.sleep(0.02)

    def _configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The auth process (user 'dovecot') and the mail processes (user 'mail') must traverse
        # to the users files and the mail store.
        self.workdir.chmod(0o755)
        _make_traversable(self.workdir.resolve().parent)
        for sub in ("run", "state"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.mail_root.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # Mail processes must not run as root (Dovecot refuses uid 0): use 'mail'.
            mail_user = "mail"
            shutil.chown(self.mail_root, "mail", "mail")
            service_users = ""
        else:
            # Unprivileged: everything runs as the invoking user.
            mail_user = getpass.getuser()
            service_users = (
                f"default_internal_user = {mail_user}\n"
                f"default_login_user = {mail_user}\n"
                "first_valid_uid = 0\n"
            )
        self.mail_root.chmod(0o700)
        self.users_dir.mkdir(exist_ok=True)
        self.users_dir.chmod(0o755)
        ssl_lines = "ssl = no\n"
        mechanisms = "plain login"
        oauth2_passdb = ""
        if self.oauth2_introspection_url is not None:
            # passdb oauth2 first, for the token mechanisms only (dovecot-for-tests.md).
            mechanisms += " xoauth2 oauthbearer"
            oauth2_conf = self.workdir / "dovecot-oauth2.conf.ext"
            oauth2_conf.write_text(
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n",
                encoding="utf-8",
            )
            oauth2_conf.chmod(0o644)
            oauth2_passdb = (
                f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {oauth2_conf}\n}}\n"
            )
        if self.tls:
            cert, key = self._make_certificates()
            ssl_lines = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"
        conf = f"""# Generated by mailbridge.testing.dovecot - a throwaway test instance.
instance_name = {self._instance}
base_dir = {self.workdir / "run"}
state_dir = {self.workdir / "state"}
log_path = {self.log_path}
protocols = imap
listen = {self.host}
{ssl_lines}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
auth_cache_size = 0
first_valid_uid = 1
{service_users}
mail_location = maildir:{self.mail_root}/%u:LAYOUT=fs
namespace inbox {{
  inbox = yes
  separator = /
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_user} home={self.mail_root}/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self._tls_port}
  }}
}}
service anvil {{
  chroot =
  # Without this listener anvil cannot record failures, so wrong passwords are answered at
  # once instead of after the 2-15 s auth penalty.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap {{
  process_limit = {self.process_limit}
}}
protocol imap {{
  mail_max_userip_connections = {self.max_user_connections}
  # IDLE learns of new mail through inotify; where the machine has no inotify instance left
  # (many Dovecots and benchmarks side by side), Dovecot falls back to checking the mailbox
  # every mailbox_idle_check_interval (30 s by default): 1 s keeps a push within 1 s there too.
  mailbox_idle_check_interval = 1 secs
}}
"""
        if self.hibernate_seconds is not None:
            conf += _hibernation(self.hibernate_seconds, self.client_limit)
        self.config_path.write_text(conf, encoding="utf-8")
        self._configured = True

    def _make_certificates(self) -> tuple[Path, Path]:
        """Write CA, server cert and key; return (cert_path, key_path). trustme, else openssl."""
        cert = self.workdir / "server-cert.pem"
        key = self.workdir / "server-key.pem"
        ca = self.workdir / "ca.pem"
        try:
            import trustme
        except ImportError:
            self._openssl_certificates(ca, cert, key)
        else:
            authority = trustme.CA()
            issued = authority.issue_cert("127.0.0.1", "localhost")
            authority.cert_pem.write_to_path(str(ca))
            issued.private_key_pem.write_to_path(str(key))
            with cert.open("wb") as out:
                for blob in issued.cert_chain_pems:
                    out.write(blob.bytes())
        key.chmod(0o600)
        self._ca_file = ca
        return cert, key

    def _openssl_certificates(self, ca: Path, cert: Path, key: Path) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise DovecotError("tls=True needs the trustme package or the openssl command")
        ca_key = self.workdir / "ca-key.pem"
        csr = self.workdir / "server.csr"
        ext = self.workdir / "server.ext"
        ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n", encoding="utf-8")
        commands = [
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-subj", "/CN=mailbridge test CA", "-keyout", str(ca_key), "-out", str(ca)),
            ],
            [
                *(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"),
                *("-keyout", str(key), "-out", str(csr)),
            ],
            [
                *(openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
                *("-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)),
            ],
        ]
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise DovecotError(f"openssl failed: {result.stderr.strip()}")


def _hibernation(seconds: float, clients: int) -> str:
    """Settings that park IDLE sessions in one ``imap-hibernate`` process (Dovecot 2.3).

    Both unix listeners are opened to the mail processes (they run as another user than the
    master's children expect in a throwaway instance); the client limits cover every parked
    session plus the ones being set up, and anvil, which tracks every connection.
    """
    limit = clients + 1000
    return f"""
imap_hibernate_timeout = {max(1, round(seconds))}s
# Cache passdb/userdb answers (auth_cache_size): a reconnecting fleet logs in again without
# a passwd-file read per login. Tests that change passwords run without hibernation.
auth_cache_size = 10M
default_client_limit = {limit}
service imap-hibernate {{
  process_limit = 4
  client_limit = {limit}
  unix_listener imap-hibernate {{
    mode = 0666
  }}
}}
service imap {{
  # Process reuse (Dovecot 2.3 performance tuning): an imap process serves up to 100
  # sessions in turn instead of one fork + exec + config read per login; a parked session
  # frees its process for the next login. client_limit stays 1, as Dovecot recommends for
  # mail processes (they block on disk I/O and locks). All users share one uid here (the
  # static userdb), which reuse needs.
  service_count = 100
  client_limit = 1
  process_min_avail = 2
  unix_listener imap-master {{
    mode = 0666
  }}
}}
service imap-login {{
  # High-performance mode: login processes are reused instead of one fork per connection.
  service_count = 0
  process_min_avail = 2
  client_limit = {limit}
}}
service anvil {{
  client_limit = {limit}
}}
service auth {{
  client_limit = {limit}
}}
"""


def _make_traversable(directory: Path) -> None:
    """Give others search (x) permission on ``directory`` and its parents where we own them.

    pytest's base temp dir is ``/tmp/pytest-of-USER`` with mode 0700, which would lock
    Dovecot's unprivileged processes out. Adding only o+x (no listing) is the least change that
    lets them reach the instance dir; pytest resets the mode at its next session.
    """
    if os.geteuid() != 0:
        return  # everything runs as the invoking user: nothing to open up
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        if path.stat().st_uid != os.geteuid():
            raise DovecotError(
                f"{path} is not searchable by other users, so Dovecot's processes cannot reach "
                "the test directory; use a work directory under /tmp"
            )
        path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; empty where /proc is unavailable)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Field 4 is the parent PID; the command name (field 2) may contain spaces.
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
