"""Prefix KV a batch holds when its requests share one prefix: one copy, not one per request.

    python benchmarks/prefix_memory.py        # seconds on 2 CPU cores

Runs `generate` at batch 16 with one shared 1024-token prefix (issue 14's d384 x 6 layer
model, random float32 weights, 64-token questions) for `naive_prefix`, `bicache` and
`bicache_dual` at reuse depth 3 of 6, and records `stats["prefix_cache_bytes"]` (the store
entry once, plus the per-request deep K/V that BiCache's refreshes keep) beside the bytes
of the earlier layout, which gathered the store entry into every request's row: K and V of
every layer `[L, B, P, Hkv, D]` plus the hidden state `[B, P, d]`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jax
import numpy as np

from bicache_jax.bench import device_info, git_commit, model_config
from bicache_jax.generate import Prompt, generate
from bicache_jax.model import init_params
from bicache_jax.prefix_store import PrefixStore

BATCH, PREFIX, QUESTION, DEPTH = 16, 1024, 64, 3


def per_request_layout_bytes(config, batch: int, prefix: int, itemsize: int) -> int:
    """The earlier layout: the whole store entry gathered per request."""
    kv = 2 * config.n_layers * batch * prefix * config.n_kv_heads * config.head_dim
    return (kv + batch * prefix * config.d_model) * itemsize


def main() -> None:
    config = model_config("cpu_d384")
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    shared = tuple(rng.integers(0, config.mask_token_id, PREFIX).tolist())
    prompts = [Prompt(prefix=shared,
                      prompt=tuple(rng.integers(0, config.mask_token_id, QUESTION).tolist()))
               for _ in range(BATCH)]
    store = PrefixStore(budget_tokens=2 * PREFIX)
    rows = []
    for policy in ("naive_prefix", "bicache", "bicache_dual"):
        kw = {} if policy == "naive_prefix" else {"reuse_depth": DEPTH}
        out = generate(params, prompts, store, config=config, policy=policy, gen_length=32,
                       steps=2, block_length=32, **kw)
        store = out.cache
        rows.append({"policy": policy, "reuse_depth": int(out.stats["batch_reuse_depth"]),
                     "prefix_cache_bytes": int(out.stats["prefix_cache_bytes"]),
                     "per_request_layout_bytes": per_request_layout_bytes(
                         config, BATCH, PREFIX, 4)})
        print(f"{policy:>13}: {rows[-1]['prefix_cache_bytes'] / 2**20:7.1f} MiB "
              f"(one copy per request: {rows[-1]['per_request_layout_bytes'] / 2**20:.1f} MiB)")
    result = {"machine": {"node": platform.node(), "python": platform.python_version()},
              "device": device_info(), "jax_version": jax.__version__,
              "git_commit": git_commit(), "batch": BATCH, "prefix_len": PREFIX,
              "question_len": QUESTION, "model": "cpu_d384", "dtype": "float32",
              "results": rows}
    out = Path(__file__).parent / "results" / "prefix_memory_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
