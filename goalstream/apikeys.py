"""Admin API keys: made here, stored only as a SHA-256 hash, looked up per request, revoked.

A key is `gs_` and 43 URL-safe characters (256 random bits), so a fast unsalted hash is enough:
nobody can guess their way to a preimage, and the lookup stays one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import TypeAlias

import asyncpg

from goalstream.errors import ConfigError

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool

KEY_PREFIX = "gs_"


def new_key() -> str:
    """A fresh random key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key: what `api_keys.key_hash` holds."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(conn: Conn, tenant_id: uuid.UUID) -> str:
    """Store the hash of a new key for an existing tenant and return the key (shown once)."""
    exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", tenant_id)
    if not exists:
        raise ConfigError(f"no tenant {tenant_id}")
    key = new_key()
    await conn.execute(
        "INSERT INTO api_keys (tenant_id, key_hash) VALUES ($1, $2)", tenant_id, hash_key(key)
    )
    return key


async def revoke_api_key(conn: Conn, key: str) -> bool:
    """Revoke a key from now on; False if no such live key exists."""
    revoked = await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL"
        " RETURNING id",
        hash_key(key),
    )
    return revoked is not None


async def tenant_of_key(conn: Conn, key: str) -> uuid.UUID | None:
    """The tenant a live key acts for, or None for an unknown or revoked key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(key),
    )


async def create_api_key_command(database_url: str, tenant: str) -> str:
    """`goalstream create-api-key --tenant UUID`: the new key, for the caller to print."""
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        raise ConfigError(f"--tenant {tenant!r} is not a UUID") from None
    conn = await asyncpg.connect(database_url)
    try:
        return await create_api_key(conn, tenant_id)
    finally:
        await conn.close()


async def revoke_api_key_command(database_url: str, key: str) -> bool:
    """Revoke a key given on the command line."""
    conn = await asyncpg.connect(database_url)
    try:
        return await revoke_api_key(conn, key)
    finally:
        await conn.close()
