"""Bearer-key authentication of `/api/...`: the key names the tenant every query runs as."""

from __future__ import annotations

import uuid

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from goalstream.admin.context import AdminContext
from goalstream.apikeys import tenant_of_key

# Sent with every 401, as RFC 6750 asks.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="goalstream"'}


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    if not header:
        return None
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class ApiKeyAuthentication(AbstractAuthenticationMiddleware):
    """Runs before body and parameter parsing, so a caller without a key learns nothing."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        key = bearer_key(connection.headers.get("authorization"))
        if key is None:
            raise NotAuthorizedException(
                "an `Authorization: Bearer <key>` header is required", headers=CHALLENGE
            )
        context: AdminContext = connection.app.state.admin
        tenant_id = await tenant_of_key(context.pool, key)
        if tenant_id is None:
            raise NotAuthorizedException("unknown or revoked API key", headers=CHALLENGE)
        return AuthenticationResult(user=tenant_id, auth=key)


def tenant_of(request: Request) -> uuid.UUID:  # type: ignore[type-arg]
    """The authenticated caller's tenant (a dependency of every `/api` handler)."""
    tenant_id: uuid.UUID = request.user
    return tenant_id
