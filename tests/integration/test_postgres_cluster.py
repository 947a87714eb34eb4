"""The throwaway PostgreSQL cluster the PostgreSQL tests run against (mailbridge.testing)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from mailbridge.errors import StoreError
from mailbridge.store.base import AccountState
from mailbridge.store.postgres import PostgresRepository
from mailbridge.testing.postgres import PostgresCluster, find_bindir
from tests.conftest import PostgresDatabase

pytestmark = pytest.mark.postgres


def test_debian_binaries_are_preferred_to_path() -> None:
    bindir = find_bindir()
    # Debian's layout when the package is installed (scripts/test installs it).
    assert bindir.parts[:4] == ("/", "usr", "lib", "postgresql")


def test_each_test_gets_its_own_empty_database(postgres_database: PostgresDatabase) -> None:
    with psycopg.connect(postgres_database.url, password=postgres_database.password) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        name = conn.execute("SELECT current_database()").fetchone()
    assert tables == (0,)
    assert name == (postgres_database.name,)


def test_the_cluster_is_not_the_system_one_and_needs_its_password(
    postgres: PostgresCluster,
) -> None:
    assert postgres.port != 5432
    assert postgres.host == "127.0.0.1"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(postgres.url(), password="wrong", connect_timeout=10).close()
    with psycopg.connect(postgres.url(), password=postgres.password) as conn:
        directory = conn.execute("SHOW data_directory").fetchone()
    assert directory == (str(postgres.data_dir),)


def test_a_restarted_server_is_a_transient_error_then_works_again() -> None:
    # A cluster of its own: the session's one must not go down under other tests.
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-pg-restart-", dir="/tmp"))
    cluster = PostgresCluster(workdir)
    cluster.start()
    try:
        url = cluster.create_database("restart")
        repo = PostgresRepository(url, password=cluster.password, connect_timeout=5)
        try:
            repo.migrate()
            repo.set_account_state(AccountState(account="support", state="idle"))
            cluster.stop(mode="immediate")  # a crash of the database server
            with pytest.raises(StoreError) as info:
                repo.account_states()
            assert info.value.code == "database_unavailable"
            assert info.value.transient
            cluster.start()
            # The pool replaces the dead connections: the next call just works.
            [state] = repo.account_states()
            assert state.state == "idle"
        finally:
            repo.close()
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
