"""What the admin API's handlers share: connections, the stats cache and limiter, metrics."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from litestar.datastructures import State

from goalstream.admin.observe import HttpMetrics
from goalstream.admin.stats import RateLimiter, StatsCache
from goalstream.settings import Settings


@dataclass
class AdminContext:
    """Built by the app's lifespan, kept on `app.state.admin`."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    stats_cache: StatsCache
    limiter: RateLimiter
    metrics: HttpMetrics


def admin_context(state: State) -> AdminContext:
    """The context (a dependency of the handlers)."""
    context: AdminContext = state.admin
    return context
