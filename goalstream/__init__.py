"""goalstream: watch what contacts do, record each workflow goal they meet exactly once."""

__version__ = "0.1.0"
