"""Opening the configured database: a SQLite file (``database: PATH``) or PostgreSQL
(``database: postgresql://...``), for the daemon, the operator's commands and ``doctor``.

The backends are imported only when used, so a SQLite install never loads psycopg.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mailbridge.errors import StoreError
from mailbridge.store.asyncrepo import AsyncRepository

if TYPE_CHECKING:
    from mailbridge.config import PostgresUrl, Settings
    from mailbridge.store.base import Repository


def _is_postgres(database: object) -> bool:
    from mailbridge.config import PostgresUrl

    return isinstance(database, PostgresUrl)


def connector(
    database: str | os.PathLike[str] | PostgresUrl, password: str | None = None
) -> Callable[[], Repository]:
    """A function that opens a repository on ``database`` (called on the thread that will use
    it: a SQLite connection stays on the thread that made it)."""
    from mailbridge.config import PostgresUrl

    if isinstance(database, PostgresUrl):
        from mailbridge.store.postgres import PostgresRepository

        url = database
        return lambda: PostgresRepository(url, password=password)
    from mailbridge.store.sqlite import SqliteRepository

    path = Path(database)
    return lambda: SqliteRepository(path)


def open_store(settings: Settings, *, write: bool = False) -> Repository | None:
    """The repository for one of the operator's commands, or None when ``database`` is a SQLite
    file that does not exist yet (nothing to show).

    The schema is migrated only when it is behind (a current one costs a read, not a write
    transaction beside the daemon). With ``write`` the configured parent tables are prepared
    (created or checked); without, they are only known by name, for reading links back.
    Raises StoreError, or ConfigError for an unreadable database password.
    """
    path = settings.sqlite_path
    try:
        if path is not None and not path.exists():
            return None
    except OSError as exc:  # a directory on the way the user may not enter
        raise StoreError(
            f"cannot reach {path}: {exc.strerror or exc}", code="database_error"
        ) from exc
    repo = connector(settings.database, settings.database_password())()
    try:
        repo.migrate()
        if write:
            repo.prepare(settings.follower_parents, settings.conversation_parents)
        else:
            repo.use_parents(settings.follower_parents, settings.conversation_parents)
    except BaseException:
        repo.close()
        raise
    return repo


async def open_repository(
    database: str | os.PathLike[str] | PostgresUrl, settings: Settings | None = None
) -> AsyncRepository:
    """Open (creating if needed) and migrate the database for importing (the daemon, ``sync``,
    ``failed retry``); with ``settings``, also prepare (create or check) the configured parent
    tables, so a config that does not fit the database stops the start with a ConfigError.
    A PostgreSQL database's password comes from ``settings`` (ConfigError when unreadable).
    """
    password = settings.database_password() if settings is not None else None
    repo = AsyncRepository(connector(database, password))
    try:
        await repo.migrate()
        if settings is not None:
            await repo.prepare(settings.follower_parents, settings.conversation_parents)
    except BaseException:
        await repo.aclose()
        raise
    return repo


def check_database(settings: Settings) -> str:
    """Whether the daemon could write the database, changing nothing: a line saying what was
    checked. Raises StoreError (or ConfigError for the password) saying why not."""
    path = settings.sqlite_path
    if path is not None:
        from mailbridge.store.sqlite import check_writable

        return check_writable(path)
    from mailbridge.store.postgres import PostgresRepository

    assert settings.postgres is not None  # not a SQLite path
    repo = PostgresRepository(settings.postgres, password=settings.database_password())
    try:
        return repo.check_writable()
    finally:
        repo.close()
