"""Every script's keys in one slot (Redis Cluster runs a script only then), for any user id."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_key_slot

from storage.keys import CLUSTER, SHARDS, SINGLE, SLOTS, key_slot, shard_tags, user_key
from storage.redis_conn import startup_nodes

# Braces are what could break a hash tag: generate plenty of them.
user_ids = st.text(alphabet=st.sampled_from("ab1:{}-_é"), min_size=1, max_size=40)


@settings(deadline=None)  # the first example builds the slot-tag table (~0.1 s)
@given(user_ids)
def test_a_users_keys_share_the_slot_of_user_key(user_id: str) -> None:
    # Given any user id, when the cluster layout names its keys
    keys = [user_key(user_id), CLUSTER.version(user_id), CLUSTER.gone(user_id),
            CLUSTER.blocked(user_id)]  # fmt: skip
    # Then Redis itself hashes them all to one slot, and the seed's name is untouched
    assert {redis_key_slot(k.encode()) for k in keys} == {redis_key_slot(keys[0].encode())}
    assert {key_slot(k) for k in keys} == {redis_key_slot(keys[0].encode())}
    assert keys[0] == f"user:{user_id}"
    # and the gone mark names its user again (the reconciler's SCAN reads ids from it)
    assert CLUSTER.gone_user_id(CLUSTER.gone(user_id)) == user_id
    assert SINGLE.gone_user_id(SINGLE.gone(user_id)) == user_id


def test_the_plain_form_and_the_single_redis_names() -> None:
    assert CLUSTER.version("42") == "uver:{user:42}"
    assert CLUSTER.gone("42") == "gone:{user:42}"
    assert CLUSTER.blocked("42") == "blocked:{user:42}"
    assert (SINGLE.version("42"), SINGLE.gone("42"), SINGLE.blocked("42")) == (
        "uver:42", "gone:42", "blocked:42")  # fmt: skip
    assert SINGLE.activity_keys == ("activity",)
    assert SINGLE.reconcile_marks == ("sessiond:reconcile:mark",)


def test_shards_spread_evenly_over_the_slots_and_each_script_stays_in_one() -> None:
    slots = [key_slot(k) for k in CLUSTER.activity_keys]
    assert slots == [i * SLOTS // SHARDS for i in range(SHARDS)]
    assert len(set(shard_tags())) == SHARDS
    for shard in CLUSTER.access_shards:  # one script appends to the list, bytes and overflow
        assert len({key_slot(shard.entries), key_slot(shard.nbytes), key_slot(shard.overflow)}) == 1
    assert sorted(key_slot(m) for m in CLUSTER.reconcile_marks) == slots


@given(user_ids)
def test_a_users_activity_goes_to_one_shard(user_id: str) -> None:
    assert CLUSTER.activity_key(user_id) in CLUSTER.activity_keys
    assert SINGLE.activity_key(user_id) == "activity"


def test_startup_nodes_from_the_url() -> None:
    assert startup_nodes("redis://127.0.0.1:7000,redis://127.0.0.1:7001") == [
        ("127.0.0.1", 7000), ("127.0.0.1", 7001)]  # fmt: skip
    assert startup_nodes("redis://h1:1, h2:2") == [("h1", 1), ("h2", 2)]
    assert startup_nodes("redis://only") == [("only", 6379)]
