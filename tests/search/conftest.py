"""A real PostgreSQL server for the worker tests: started once per session in a fresh
folder under /tmp on a free port, stopped and removed afterwards. Skipped (with the reason)
only where the server programs are not installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from voxfit.search._postgres import PostgresMissing, PostgresServer, find_postgres, local_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        find_postgres()
    except PostgresMissing as e:
        pytest.skip(str(e))
    with local_postgres() as server:
        yield server
