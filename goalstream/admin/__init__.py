"""The admin HTTP API (CONTRACT 5): goals per workflow, stats, API keys, tenant isolation."""

from goalstream.admin.app import create_app, serve

__all__ = ["create_app", "serve"]
