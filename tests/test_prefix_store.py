"""The prefix store: exact keys, LRU under a token budget, stats."""

import jax.numpy as jnp
import pytest

from bicache_jax.prefix_store import PrefixStore, StoredPrefix, prefix_hash


def entry(ids, value=0.0):
    n = len(ids)
    return StoredPrefix(ids=tuple(ids), k=jnp.full((2, n, 1, 4), value),
                        v=jnp.full((2, n, 1, 4), value), hidden=jnp.full((2, n, 8), value))


def test_lookup_is_exact_and_lru_evicts_oldest_under_budget():
    store = PrefixStore(budget_tokens=10)
    store = store.insert(entry([1, 2, 3]))
    store = store.insert(entry([4, 5, 6]))
    assert store.find([1, 2]) is None and store.find([1, 2, 3, 4]) is None
    store = store.touch([1, 2, 3])  # now [4,5,6] is the oldest
    store = store.insert(entry([7, 8, 9, 10, 11]))
    assert store.find([4, 5, 6]) is None
    assert store.find([1, 2, 3]) is not None and store.find([7, 8, 9, 10, 11]) is not None
    assert store.tokens_held == 8 <= store.budget_tokens
    assert (store.stats.hits, store.stats.misses, store.stats.evictions) == (1, 3, 1)
    assert store.summary()["bytes_held"] == sum(
        store.find(ids).nbytes for ids in ([1, 2, 3], [7, 8, 9, 10, 11]))


def test_budget_is_never_exceeded_over_many_inserts():
    store = PrefixStore(budget_tokens=20)
    for i in range(50):
        store = store.insert(entry(range(i, i + 1 + i % 7)))
        assert store.tokens_held <= 20


def test_forced_hash_collisions_never_serve_the_wrong_entry():
    store = PrefixStore(budget_tokens=100, hash_fn=lambda ids: "same")
    store = store.insert(entry([1, 2], value=1.0))
    store = store.insert(entry([3, 4], value=2.0))
    assert float(store.find([1, 2]).k[0, 0, 0, 0]) == 1.0
    assert float(store.find([3, 4]).k[0, 0, 0, 0]) == 2.0
    assert store.find([5, 6]) is None
    store = store.insert(entry([5, 6, 7] * 33, value=3.0))  # evicts both colliders
    assert store.find([1, 2]) is None and store.find([3, 4]) is None


def test_over_budget_prefix_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds the store budget"):
        PrefixStore(budget_tokens=4).insert(entry([1, 2, 3, 4, 5]))


def test_store_is_immutable():
    empty = PrefixStore()
    full = empty.insert(entry([1, 2, 3]))
    assert len(empty) == 0 and len(full) == 1


def test_hash_depends_on_ids():
    assert prefix_hash([1, 2]) != prefix_hash([2, 1])
    assert prefix_hash([1, 2]) == prefix_hash((1, 2))
