"""Cache policies as data: what each one computes and reuses at a step.

The denoise loop in `generate.py` is one loop for every policy; a `Policy` only answers
the questions the loop asks. Every policy, what it computes and what it caches:

* `none`: computes every position, caches nothing.
* `naive_prefix`: computes the request's own rows; reads the shared prefix's KV at every
  depth from the prefix store (computed on the prefix alone).
* `bicache`: own rows, and in layers >= b the prefix rows every `refresh_interval` steps;
  reads the prefix KV of layers < b from the store, of layers >= b from the last refresh.
* `fastdllm_prefix`: computes the current block and everything after it; reads everything
  before the block from the block-start forward.
* `fastdllm_dual`: computes the current block; reads everything outside it from the
  block-start forward.
  On Dream checkpoints both run Fast-dLLM's Dream block loop (`sampling.FASTDLLM_DREAM`:
  the block-start forward decodes the block's first position only, then the public
  schedule or threshold rule), computing the block (prefix: and what follows) without
  the first position's predictor row, as the public code.
* `bicache_dual`: as `fastdllm_dual` (its block-start forward only builds the cache), the
  prefix as `bicache`.
* `dkv_decode` (dKV-Cache-Decode): computes the still-masked positions and the tokens
  decoded one step ago, everything every `refresh_interval` steps; reads the tokens
  decoded two or more steps ago.
* `dkv_greedy` (dKV-Cache-Greedy): computes the tokens to decode next, those decoded one
  step ago and `window_size` masked neighbours of each, everything every
  `refresh_interval` steps; reads every other position at the value its last forward left.
* `dkv_prefill` (dKV-Cache-Prefill): computes everything at the first step, then all but
  the prompt; reads the prompt's KV from the first forward, never refreshed.
* `dkv_pd` (dKV-Cache-PD): the prompt as `dkv_prefill`, the rest as `dkv_decode`, except
  that a refresh recomputes everything but the prompt.

Fields:

* `uses_store`: the shared prefix is its own segment, served from the prefix store
  (BiCache family); otherwise the prefix is just part of the request's prompt.
* `refreshes`: the deep prefix KV (layers >= b) is recomputed every `refresh_interval`
  steps (BiCache); `naive_prefix` never does and reads the store at every depth.
* `block_cache`: "dual" (Fast-dLLM dual cache: at a block start one forward fills the KV
  of every own position, then only the block's rows are computed), "prefix" (Fast-dLLM
  prefix cache: the block and everything after it are computed), or None.
* `decode_on_block_start`: whether the block-start forward's logits are used to decode
  (Fast-dLLM) or the forward only builds the cache (the official BiCache + Fast-dLLM).
* `dkv`: the dKV-Cache variant (arXiv 2505.15781), or None. All four keep one KV buffer
  per request and a per-request "cached set" of positions; a cached step computes only the
  rows outside the set (gathered, padded to a few static row counts) against the buffer,
  and writes their fresh K/V back. The variants differ in which steps are full forwards
  and which set a step reads:

  - "decode": a token decoded at step t is recomputed once more at t+1 and read from the
    cache from t+2 on (the one-step delay). LLaDA: the step index counts within a block,
    steps 0 and 1 of every block and steps `i % N == 0` are full (the cache is reset per
    block). Dream: the step index is global, steps `i % N == 0` are full, and the cached
    set is shifted ("un"): row p is cached once token p+1 is decoded, the last canvas
    position from step 1 on while still masked (the public code's quirk, kept because it
    changes the tokens; see generate.py).
  - "greedy": the decoding order is fixed per block (drawn from the key, or the caller's
    `decode_order`); at step i+1 only W = S_{i+1} (to decode) + S_i (just decoded) +
    `window_size` nearest still-masked neighbours of each position of S_{i+1} are
    computed, every other position's K/V is whatever forward last computed it (masked ones
    included); steps `i % N == 0` (block-local i) are full.
  - "prefill": the first step is full; from then on the prompt's K/V (Dream: shifted, so
    the last prompt token is recomputed) are read from it, never refreshed.
  - "pd": "prefill" for the prompt + "decode" for the rest; a refresh step recomputes
    everything but the prompt.

  The public code has Decode for LLaDA and Dream, Greedy for LLaDA, Prefill and PD for
  Dream. Ours also runs Greedy on Dream (rows: the predictors of S_{i+1}, i.e. the
  positions before them, + S_i + the window) and Prefill/PD on LLaDA (the prompt is the
  prefill set; PD's refreshes are decode's full steps, i.e. steps 0, 1 and `i % N == 0`
  of each block after the very first step). Where we differ from the public code: GQA runs
  natively (the public LLaDA cache models fail on n_kv_heads < n_heads); Greedy's order is
  drawn from the JAX key (reproducible, per request; `decode_order` replays it), not from
  an unseeded `torch.rand`; a batch may mix prompt lengths and cached-set sizes (each
  request keeps its own set, the rows are padded to the batch's largest count; the public
  code assumes equal counts).
* `default_refresh_interval`: N when the caller gives none (BiCache: deep-prefix refresh;
  dKV: full forwards; `dkv_prefill` ignores it).
"""

from __future__ import annotations

import dataclasses

DKV_VARIANTS = ("decode", "greedy", "prefill", "pd")


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    uses_store: bool = False
    refreshes: bool = False
    block_cache: str | None = None
    decode_on_block_start: bool = True
    dkv: str | None = None
    default_refresh_interval: int = 1

    def __post_init__(self):
        if self.dkv is not None and self.dkv not in DKV_VARIANTS:
            raise ValueError(f"dkv must be one of {DKV_VARIANTS} or None, got {self.dkv!r}")

    @property
    def takes_reuse_depth(self) -> bool:
        """BiCache's depth b applies: the policies that refresh the deep prefix KV."""
        return self.refreshes

    @property
    def takes_refresh_interval(self) -> bool:
        """N applies: BiCache's deep-prefix refresh or dKV-Cache's full forwards
        (`dkv_prefill` never refreshes)."""
        return self.refreshes or self.dkv in ("decode", "greedy", "pd")

    @property
    def fixed_order(self) -> bool:
        """Decodes each block in a fixed order drawn once per block (dKV-Cache-Greedy)."""
        return self.dkv == "greedy"


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
        Policy("dkv_decode", dkv="decode", default_refresh_interval=8),
        Policy("dkv_greedy", dkv="greedy", default_refresh_interval=2),
        Policy("dkv_prefill", dkv="prefill"),
        Policy("dkv_pd", dkv="pd", default_refresh_interval=8),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]
