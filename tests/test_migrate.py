"""`goalstream migrate`: applied once, in order, safely in parallel, refusing edited files."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from goalstream.errors import MigrationError
from goalstream.migrate import migrate, migration_files, sql_dir
from tests.servers import drop_database, with_database


@pytest.fixture
async def empty_db(pg_url: str) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet (migrate creates it)."""
    name = f"gs_m_{uuid.uuid4().hex[:12]}"
    yield with_database(pg_url, name)
    await drop_database(pg_url, name)


async def test_migrate_creates_database_and_applies_each_file_once(empty_db: str) -> None:
    """A first run creates the database and applies every file; a second applies nothing."""
    files = [version for version, _ in migration_files()]
    assert await migrate(empty_db) == files
    assert await migrate(empty_db) == []
    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch("SELECT version FROM goalstream_schema_migrations ORDER BY 1")
        assert [r["version"] for r in rows] == files
        assert await conn.fetchval("SELECT to_regclass('workflow_goal_achievements')") is not None
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(empty_db: str) -> None:
    """Several processes migrating at once apply each file exactly once, without errors."""
    await migrate(empty_db, directory=None)  # create the database first
    conn = await asyncpg.connect(empty_db)
    await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    await conn.close()
    results = await asyncio.gather(*(migrate(empty_db) for _ in range(4)))
    applied = [v for result in results for v in result]
    assert sorted(applied) == [v for v, _ in migration_files()]


async def test_edited_migration_is_refused(empty_db: str, tmp_path: Path) -> None:
    """A migration changed after it was applied stops `migrate` with a clear error."""
    directory = tmp_path / "sql"
    shutil.copytree(sql_dir(), directory)
    await migrate(empty_db, directory)
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_db, directory)


def test_cli_migrate_exits_zero(empty_db: str) -> None:
    """`goalstream migrate` applies the migrations and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "goalstream.cli", "migrate", "--database-url", empty_db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "applied" in done.stdout
