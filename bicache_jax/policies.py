"""Cache policies as data: what each one computes and reuses at a step.

The denoise loop in `generate.py` is one loop for every policy; a `Policy` only answers
the questions the loop asks:

* `uses_store`: the shared prefix is its own segment, served from the prefix store
  (BiCache family); otherwise the prefix is just part of the request's prompt.
* `refreshes`: the deep prefix KV (layers >= b) is recomputed every `refresh_interval`
  steps (BiCache); `naive_prefix` never does and reads the store at every depth.
* `block_cache`: "dual" (Fast-dLLM dual cache: at a block start one forward fills the KV
  of every own position, then only the block's rows are computed), "prefix" (Fast-dLLM
  prefix cache: the block and everything after it are computed), or None.
* `decode_on_block_start`: whether the block-start forward's logits are used to decode
  (Fast-dLLM) or the forward only builds the cache (the official BiCache + Fast-dLLM).
* `delayed_kv`: dKV-Cache-Decode: a decoded token's KV is cached one step after decoding;
  every still-masked position (and the tokens decoded one step ago) is recomputed.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    uses_store: bool = False
    refreshes: bool = False
    block_cache: str | None = None
    decode_on_block_start: bool = True
    delayed_kv: bool = False
    default_refresh_interval: int = 1


POLICIES = {
    p.name: p
    for p in (
        Policy("none"),
        Policy("naive_prefix", uses_store=True),
        Policy("bicache", uses_store=True, refreshes=True, default_refresh_interval=16),
        Policy("fastdllm_prefix", block_cache="prefix"),
        Policy("fastdllm_dual", block_cache="dual"),
        Policy("bicache_dual", uses_store=True, refreshes=True, block_cache="dual",
               decode_on_block_start=False, default_refresh_interval=16),
        Policy("dkv_decode", delayed_kv=True, default_refresh_interval=8),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]
