"""`goalstream migrate`: apply the numbered plain-SQL files of `sql/` that are not applied yet.

Safe when several processes run it at once (a session advisory lock); refuses to run when a file
that was applied has changed since, because the database would no longer match the files.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from urllib.parse import urlparse

import asyncpg
import structlog

from goalstream import constants
from goalstream.errors import MigrationError

log = structlog.get_logger(__name__)

_LEDGER = """
CREATE TABLE IF NOT EXISTS goalstream_schema_migrations (
    version TEXT PRIMARY KEY,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def sql_dir() -> Path:
    """Where the migration files are: the source tree's `sql/`, or the installed copy."""
    candidates = [
        Path(__file__).resolve().parent.parent / "sql",
        Path(sys.prefix) / "share" / "goalstream" / "sql",
    ]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise MigrationError(f"no migration files found in {', '.join(map(str, candidates))}")


def migration_files(directory: Path | None = None) -> list[tuple[str, str]]:
    """(version, sql) for every file, in order; the version is the file name."""
    directory = directory or sql_dir()
    return [(path.name, path.read_text()) for path in sorted(directory.glob("*.sql"))]


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` if it does not exist yet (a dev-friendly default)."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    admin = await asyncpg.connect(dsn, database="postgres")
    try:
        target = _database_name(dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{target}"')
            log.info("database created", database=target)
        except asyncpg.DuplicateDatabaseError:
            pass
    finally:
        await admin.close()


def _database_name(dsn: str) -> str:
    path = urlparse(dsn).path.lstrip("/")
    if not path or '"' in path:
        raise MigrationError(f"cannot tell the database name from {dsn!r}")
    return path


async def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply unapplied migrations; return the versions applied now."""
    files = migration_files(directory)
    await ensure_database(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", constants.MIGRATION_LOCK_KEY)
        try:
            return await _apply(conn, files)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", constants.MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, files: list[tuple[str, str]]) -> list[str]:
    await conn.execute(_LEDGER)
    applied = {
        row["version"]: row["checksum"]
        for row in await conn.fetch("SELECT version, checksum FROM goalstream_schema_migrations")
    }
    done: list[str] = []
    for version, sql in files:
        digest = checksum(sql)
        if version in applied:
            if applied[version] != digest:
                raise MigrationError(
                    f"migration {version} was changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        async with conn.transaction():
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {version} failed: {exc}") from exc
            await conn.execute(
                "INSERT INTO goalstream_schema_migrations (version, checksum) VALUES ($1, $2)",
                version,
                digest,
            )
        log.info("migration applied", version=version)
        done.append(version)
    return done
