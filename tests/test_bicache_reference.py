"""BiCache's official loops, step by step on the float64 numpy model, against `generate`.

The reference follows the rules of docs/BICACHE.md, "The method" (the official engines): a
global decoding-step counter `t`; every step with `t % N == 0` is a refresh (the prefix
rows are recomputed in layers >= b from the store's hidden state at depth b, attending to
everything the step's rows see, and their K/V replace the cached deep prefix K/V); with
Fast-dLLM's dual cache the block-start forward builds the cache (and is the refresh of
the block's first step when that step is due), then each step computes the block's rows.
"""

import numpy as np
import pytest
from numpy_reference import numpy_forward_rows, sharp_params

from bicache_jax import Prompt, generate
from bicache_jax import config as C

CONFIGS = {
    "llada_mha": C.tiny_llada().replace(attention_impl="reference"),
    "llada_gqa": C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference"),
}


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, sharp_params(cfg, seed=5)) for name, cfg in CONFIGS.items()}


def _confident(logits_rows, cand, quota):
    """LLaDA low-confidence remasking at temperature 0: the `quota` most confident."""
    tok = logits_rows.argmax(-1)
    prob = np.exp(logits_rows - logits_rows.max(-1, keepdims=True))
    conf = (prob / prob.sum(-1, keepdims=True))[np.arange(len(tok)), tok]
    conf = np.where(cand, conf, -np.inf)
    return tok, np.argsort(-conf, kind="stable")[:quota]


def bicache_reference(params, cfg, prefix, prompt, gen_length, steps, block_length, depth,
                      interval, dual, decode_on_block_start=False):
    """Tokens, nfe and refreshes of one request under `bicache` (dual=False: every step a
    forward of the own rows) or `bicache_dual` (dual=True)."""
    L, mask = cfg.n_layers, cfg.mask_token_id
    p, u = len(prefix), len(prompt)
    x = np.array(list(prefix) + list(prompt) + [mask] * gen_length)
    t_len = len(x)
    is_prefix = np.arange(t_len) < p
    # The store entry: one forward of the prefix alone.
    _, sk, sv, sh = numpy_forward_rows(params, cfg, x[:p], np.ones(p, bool))
    pad = np.zeros((L, t_len - p) + sk.shape[2:])
    pk = np.concatenate([sk, pad], 1)  # the prefix K/V every forward reads
    pv = np.concatenate([sv, pad], 1)
    store_hidden = np.concatenate([sh, np.zeros((L, t_len - p, sh.shape[-1]))], 1)
    own_k = np.zeros_like(pk)  # the dual cache of the own rows
    own_v = np.zeros_like(pv)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    state = {"t": 0, "nfe": 0, "refreshes": 0}

    def forward(rows, refresh):
        """rows [T] own rows computed in every layer; on a refresh the prefix rows too in
        layers >= depth. Cached K/V: the prefix from pk/pv, the own rows from the dual
        cache."""
        computed = np.tile(rows, (L, 1))
        if refresh:
            computed[depth:] |= is_prefix
            state["refreshes"] += 1
        cached = (np.where(is_prefix[None, :, None, None], pk, own_k),
                  np.where(is_prefix[None, :, None, None], pv, own_v))
        logits, k, v, _ = numpy_forward_rows(params, cfg, x, computed, cached,
                                             hidden_in=store_hidden)
        if refresh:
            pk[depth:, :p], pv[depth:, :p] = k[depth:, :p], v[depth:, :p]
        state["nfe"] += 1
        return logits, k, v

    def due():
        return depth < L and state["t"] % interval == 0

    own = ~is_prefix
    for blk in range(n_blocks):
        s0 = p + u + blk * block_length
        s1 = s0 + block_length
        block = np.zeros(t_len, bool)
        block[s0:s1] = True
        m = int(np.sum(x[s0:s1] == mask))
        quota = [m // per_block + (i < m % per_block) for i in range(per_block)]
        first = 0
        if dual:  # the block-start forward builds the dual cache (the refresh when due)
            logits, k, v = forward(own, due())
            own_k[:], own_v[:] = k, v
            if decode_on_block_start:
                tok, chosen = _confident(logits[s0:s1], x[s0:s1] == mask, quota[0])
                x[s0 + chosen] = tok[chosen]
                state["t"] += 1
                first = 1
        for i in range(first, per_block):
            if dual:
                logits, _, _ = forward(block, due() and i > 0)
            else:
                logits, _, _ = forward(own, due())
            tok, chosen = _confident(logits[s0:s1], x[s0:s1] == mask, quota[i])
            x[s0 + chosen] = tok[chosen]
            state["t"] += 1
    return x[p + u:], state["nfe"], state["refreshes"]


def _request(cfg, seed):
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, cfg.mask_token_id - 1, 30)]
    return Prompt(prefix=tuple(ids[:23]), prompt=tuple(ids[23:]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("block_length", [8, 32])
@pytest.mark.parametrize("interval", [1, 3, 5])
def test_bicache_dual_official_loop(models, name, block_length, interval):
    cfg, params = models[name]
    req = _request(cfg, seed=interval)
    out = generate(params, [req], config=cfg, policy="bicache_dual", gen_length=32,
                   steps=16, block_length=block_length, reuse_depth=1,
                   refresh_interval=interval)
    want, nfe, refreshes = bicache_reference(params, cfg, req.prefix, req.prompt, 32, 16,
                                             block_length, 1, interval, dual=True)
    np.testing.assert_array_equal(out.tokens[0], want)
    assert out.nfe[0] == nfe
    # every decoding step t with t % N == 0 is one refresh (16 steps)
    assert out.stats["refreshes"][0] == refreshes == len(range(0, 16, interval))


@pytest.mark.parametrize("interval", [1, 3])
def test_bicache_dual_decoding_at_block_start_follows_the_reference(models, interval):
    cfg, params = models["llada_gqa"]
    req = _request(cfg, seed=7)
    out = generate(params, [req], config=cfg, policy="bicache_dual", gen_length=32,
                   steps=16, block_length=8, reuse_depth=2, refresh_interval=interval,
                   decode_on_block_start=True)
    want, nfe, refreshes = bicache_reference(params, cfg, req.prefix, req.prompt, 32, 16, 8,
                                             2, interval, dual=True,
                                             decode_on_block_start=True)
    np.testing.assert_array_equal(out.tokens[0], want)
    assert out.nfe[0] == nfe == 16
    assert out.stats["refreshes"][0] == refreshes == len(range(0, 16, interval))


@pytest.mark.parametrize("block_length,interval", [(32, 3), (8, 5)])
def test_bicache_alone_follows_the_reference(models, block_length, interval):
    cfg, params = models["llada_mha"]
    req = _request(cfg, seed=11)
    out = generate(params, [req], config=cfg, policy="bicache", gen_length=32, steps=16,
                   block_length=block_length, reuse_depth=1, refresh_interval=interval)
    want, nfe, refreshes = bicache_reference(params, cfg, req.prefix, req.prompt, 32, 16,
                                             block_length, 1, interval, dual=False)
    np.testing.assert_array_equal(out.tokens[0], want)
    assert out.nfe[0] == nfe == 16
    assert out.stats["refreshes"][0] == refreshes
