"""The in-process API fixtures of the API tests, reused: security tests attack the real app."""

from __future__ import annotations

from tests.api.conftest import api, api_factory

__all__ = ["api", "api_factory"]
