"""The throwaway PostgreSQL cluster the PostgreSQL tests run against (mailbridge.testing)."""

from __future__ import annotations

import psycopg
import pytest

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
