"""The reconciler's Redis scripts against a plain model, on the real Redis (hypothesis).

Whatever Redis holds for a user (an entry or not, a gone mark or not, any remembered version,
older, equal or newer than the row) and whatever the row says, after one settle (``_RECONCILE``,
then ``_RESET`` for the entries found newer) the cache can grant only what the row grants: an
entry exists only if the row is connected and at the row's version; and any entry whose version
differed from the row's is gone.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from sessiond.config import Settings
from storage import cache as cache_mod
from storage import redis_conn
from storage.cache import RowState, UserSnapshot, gone_key, user_key, version_key

pytestmark = pytest.mark.integration

_ids = itertools.count()

versions = st.none() | st.integers(min_value=0, max_value=6)


async def settle_one(
    settings_: Settings, version: int | None, entry: bool, gone: bool, row: RowState
) -> None:
    cache = cache_mod.Cache(redis_conn.connect(settings_), ttl_s=60)
    uid = row.user_id
    client = cache.client
    try:
        # Given Redis holding that state for the user
        if entry:
            snap = UserSnapshot(uid, "connected", version if version is not None else 0)
            await client.set(user_key(uid), snap.to_json())
        if gone:
            await client.set(gone_key(uid), "0")
        if version is not None:
            await client.set(version_key(uid), version)

        # When the reconciler settles it against the row (no concurrent writer: the fresh read
        # is the same row)
        _, ahead = await cache.reconcile([row])
        if ahead:
            assert [a.cached for a in ahead] == [version]
            await cache.reset([(a, row) for a in ahead if row.version < a.cached])

        # Then an entry is left only for a connected row at exactly the row's version
        left = await client.get(user_key(uid))
        remembered = await client.get(version_key(uid))
        if left is not None:
            assert row.connected
            assert remembered is not None and int(remembered) == row.version
        cur = -1 if version is None else version
        if cur != row.version and row.version >= 0:
            assert left is None
            assert remembered is not None and int(remembered) == row.version
            assert bool(await client.exists(gone_key(uid))) == (not row.connected)
        if row.version == -1 and cur > -1:
            assert await client.exists(user_key(uid), version_key(uid), gone_key(uid)) == 0
    finally:
        await client.delete(user_key(uid), version_key(uid), gone_key(uid))
        await cache.close()


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    version=versions,
    entry=st.booleans(),
    gone=st.booleans(),
    row_version=st.integers(min_value=-1, max_value=6),
    connected=st.booleans(),
)
def test_a_settled_entry_never_grants_more_than_its_row(
    settings: Settings,
    version: int | None,
    entry: bool,
    gone: bool,
    row_version: int,
    connected: bool,
) -> None:
    row = RowState(f"prop-{next(_ids)}", row_version, connected and row_version >= 0)
    asyncio.run(settle_one(settings, version, entry, gone, row))
