"""The PostgreSQL row of ``scripts/bench``: a throwaway local cluster for ``mailbridge run
--once`` to import the same messages into, beside the SQLite import of the same run.

The cluster (:class:`mailbridge.testing.postgres.PostgresCluster`) runs with ``fsync=on``, as a
production server does, so the figure compares with SQLite's ``synchronous=FULL``; it talks TCP
on loopback with a password, as a fleet's daemons would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mailbridge.testing.postgres import PostgresCluster, PostgresNotInstalledError


@contextlib.contextmanager
def throwaway_database(workdir: Path) -> Iterator[dict[str, str] | None]:
    """The config keys (``database``, ``database_password_file``) of a new database on a
    cluster in ``workdir/postgresql``, stopped afterwards; None when PostgreSQL is not
    installed."""
    try:
        cluster = PostgresCluster(workdir / "postgresql", fsync=True)
    except PostgresNotInstalledError:
        yield None
        return
    with cluster:
        url = cluster.create_database("bench")
        secret = workdir / "postgresql.pw"
        secret.write_text(cluster.password + "\n", encoding="utf-8")
        secret.chmod(0o600)
        yield {"database": url, "database_password_file": str(secret)}
