"""The admin API's database sessions: every request's queries run as the caller's tenant, under RLS.

`tenant_transaction` is the only way API code reaches tenant data. It opens a transaction, takes
the `goalstream_api` role (not the tables' owner, so row-level security applies) and sets
`app.tenant_id`, both for this transaction only, so a pooled connection goes back clean.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

# The role the policies of sql/004 apply to.
API_ROLE = "goalstream_api"

# One round trip: set_config(..., true) is SET LOCAL, undone at the end of the transaction.
_ENTER = "SELECT set_config('role', $1, true), set_config('app.tenant_id', $2, true)"


@asynccontextmanager
async def tenant_transaction(
    pool: asyncpg.Pool, tenant_id: uuid.UUID
) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction that sees and changes only `tenant_id`'s rows."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_ENTER, API_ROLE, str(tenant_id))
        yield conn


async def create_pool(database_url: str, *, max_size: int = 10) -> asyncpg.Pool:
    """The API's pool, connected as the tables' owner (API code only uses it via the above).

    It connects on demand (min_size 0), so the API starts, and says it is not ready on /readyz,
    while PostgreSQL is down.
    """
    return await asyncpg.create_pool(database_url, min_size=0, max_size=max_size)
