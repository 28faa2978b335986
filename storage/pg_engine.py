"""Tortoise's asyncpg engine, able to reach a multi-host PostgreSQL (CONTRACT §10).

``postgres://u:p@h1:p1,h2:p2/db?target_session_attrs=read-write`` names a primary and its
standbys; asyncpg tries the hosts in order and keeps the first that matches
``target_session_attrs``. Tortoise itself cannot carry the list (its client keeps one host and
``int(port)``), so ``storage.db`` hands the lists over as ``hosts``/``ports`` and this client gives
them to asyncpg. Every new pool connection tries the list again: once a standby is promoted, the
pool's replacements for the connections the dead primary broke reach the new primary.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from tortoise.backends.asyncpg.client import AsyncpgDBClient


class MultiHostClient(AsyncpgDBClient):
    def __init__(self, hosts: list[str], ports: list[int], **kwargs: Any) -> None:
        super().__init__(host=hosts[0], port=ports[0], **kwargs)
        self.hosts, self.ports = hosts, ports

    async def create_pool(self, **kwargs: Any) -> asyncpg.Pool:
        kwargs.update(host=self.hosts, port=self.ports)
        return await asyncpg.create_pool(None, **kwargs)


client_class = MultiHostClient
