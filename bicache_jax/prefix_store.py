"""The shared prefix store: exact prefix token ids -> prefix-alone KV of every layer.

Host-side and immutable: every operation returns a new `PrefixStore` (entries are shared
device arrays, so a new store costs a dict copy, not a KV copy). `generate` returns the
updated store beside its outputs; inside the jit only arrays travel.

Lookup hashes the ids to find a bucket and accepts an entry only if its ids are equal, so
a hash collision can never serve another prefix's KV. Eviction is least-recently-used
under a budget counted in prefix tokens (default 5000, as in the BiCache paper).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

DEFAULT_BUDGET_TOKENS = 5000


def prefix_hash(ids: Sequence[int]) -> str:
    """Content hash of a token-id sequence (the store's lookup key)."""
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StoredPrefix:
    """One entry: the ids it was computed from and the per-layer arrays (no batch axis).

    k, v: [L, P, Hkv, D]; hidden: [L, P, d] (the input of every layer).
    """

    ids: tuple[int, ...]
    k: jax.Array
    v: jax.Array
    hidden: jax.Array

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.k, self.v, self.hidden))


@dataclasses.dataclass(frozen=True)
class StoreStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclasses.dataclass(frozen=True)
class PrefixStore:
    """Exact-key LRU store of prefix KV under a token budget.

    Attributes:
      budget_tokens: the most prefix tokens held at once.
      depth_table: the profiler's `r -> b` table (percent -> reuse depth), or None.
      hash_fn: ids -> key; replaceable in tests to force collisions.
    """

    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    depth_table: dict[int, int] | None = None
    hash_fn: Callable[[Sequence[int]], str] = prefix_hash
    # hash -> entries with that hash (a list, so colliding prefixes coexist); LRU order is
    # the order of `_lru` (oldest first), holding (hash, ids).
    _buckets: dict = dataclasses.field(default_factory=dict)
    _lru: tuple = ()
    stats: StoreStats = StoreStats()

    def __post_init__(self):
        if self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1, got {self.budget_tokens}")

    # -- queries
    def __len__(self) -> int:
        return len(self._lru)

    @property
    def tokens_held(self) -> int:
        return sum(len(ids) for _, ids in self._lru)

    @property
    def bytes_held(self) -> int:
        return sum(e.nbytes for bucket in self._buckets.values() for e in bucket)

    def find(self, ids: Sequence[int]) -> StoredPrefix | None:
        """The entry computed from exactly `ids`, or None (no side effects)."""
        ids = tuple(int(i) for i in ids)
        for entry in self._buckets.get(self.hash_fn(ids), ()):
            if entry.ids == ids:
                return entry
        return None

    def summary(self) -> dict:
        return {"entries": len(self), "tokens_held": self.tokens_held,
                "bytes_held": self.bytes_held, "budget_tokens": self.budget_tokens,
                **dataclasses.asdict(self.stats)}

    def check_fits(self, n_tokens: int) -> None:
        """Raise if a prefix of `n_tokens` can never fit (checked before computing it)."""
        if n_tokens > self.budget_tokens:
            raise ValueError(
                f"prefix of {n_tokens} tokens exceeds the store budget of "
                f"{self.budget_tokens} tokens; raise budget_tokens or shorten the prefix")

    # -- updates (each returns a new store)
    def touch(self, ids: Sequence[int]) -> PrefixStore:
        """Record a hit: move the entry to the most-recently-used end."""
        ids = tuple(int(i) for i in ids)
        key = (self.hash_fn(ids), ids)
        if key not in self._lru:
            raise KeyError("touch() of a prefix the store does not hold")
        lru = tuple(x for x in self._lru if x != key) + (key,)
        return dataclasses.replace(self, _lru=lru, stats=dataclasses.replace(
            self.stats, hits=self.stats.hits + 1))

    def insert(self, entry: StoredPrefix) -> PrefixStore:
        """Add an entry (a miss), evicting least-recently-used ones to fit the budget."""
        n = len(entry.ids)
        self.check_fits(n)
        if self.find(entry.ids) is not None:
            return self.touch(entry.ids)
        buckets = {h: list(b) for h, b in self._buckets.items()}
        lru = list(self._lru)
        evictions = 0
        while sum(len(ids) for _, ids in lru) + n > self.budget_tokens:
            h, ids = lru.pop(0)
            buckets[h] = [e for e in buckets[h] if e.ids != ids]
            if not buckets[h]:
                del buckets[h]
            evictions += 1
        h = self.hash_fn(entry.ids)
        buckets.setdefault(h, []).append(entry)
        lru.append((h, entry.ids))
        stats = dataclasses.replace(self.stats, misses=self.stats.misses + 1,
                                    evictions=self.stats.evictions + evictions)
        return dataclasses.replace(self, _buckets=buckets, _lru=tuple(lru), stats=stats)
