"""dKV-Cache (arXiv 2505.15781; spec: shared/DKV.md): Decode, Greedy, Prefill, PD.

Every variant against `none` where the spec says they coincide, and against an independent
step-by-step reference: plain Python loops over the float64 numpy forward, in the true
token order [prompt | canvas], with K/V substituted at the cached positions (the
fixed-shape form of a cached forward). The reference keeps the cache only at the positions
the spec's tables name (NaN elsewhere) and asserts that a step reads nothing else and that
every logit it uses comes from a computed row.
"""

import jax
import numpy as np
import pytest
from numpy_reference import numpy_forward_kv, sharp_params

from bicache_jax import POLICIES, Prompt, SamplerConfig, compile_count, generate
from bicache_jax import config as C
from bicache_jax.generate import greedy_window

CONFIGS = {
    "llada_mha": C.tiny_llada().replace(attention_impl="reference"),
    "llada_gqa": C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference"),
    "dream": C.tiny_dream().replace(attention_impl="reference"),
}
LOW_CONF = SamplerConfig()
RANDOM = SamplerConfig(remasking="random")
MASKGIT = SamplerConfig(remasking="maskgit_plus")
# (gen_length, steps, prompt lengths): LLaDA as the spec's LLaDA example (prompt 24, gen
# 32, 16 steps), Dream as its Dream example (prompt 20, 24 new, 12 steps); the second
# request of each batch is shorter, so the batch is padded.
SHAPES = {"llada": (32, 16, (24, 19)), "dream": (24, 12, (20, 13))}


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, sharp_params(cfg, seed=3)) for name, cfg in CONFIGS.items()}


def _prompts(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lengths = SHAPES[cfg.layout][2]
    return [Prompt(prompt=tuple(int(i) for i in rng.integers(0, cfg.vocab_size - 2, n)))
            for n in lengths]


def _run(model, policy, block_length, sampler, **kw):
    cfg, params = model
    gen, steps, _ = SHAPES[cfg.layout]
    return generate(params, kw.pop("prompts", None) or _prompts(cfg), config=cfg,
                    gen_length=gen, steps=steps, block_length=block_length, policy=policy,
                    sampler=sampler, **kw)


# ----------------------------------------------------------------------------- reference


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dkv_reference(model, prompt, variant, *, gen, steps, block, n, sampler, window=0,
                  order=None):
    """One request, step by step, per shared/DKV.md. variant: decode, greedy, prefill, pd
    or none. Returns (canvas tokens, rows fed to each forward)."""
    cfg, params = model
    mask, shift = cfg.mask_token_id, cfg.logits_shift
    p_len = len(prompt)
    x = np.array(list(prompt) + [mask] * gen)
    seq = len(x)
    n_blocks = gen // block
    per_block = steps // n_blocks

    def shifted(decoded, initial):
        """The cacheable set ("un" shift for Dream): E = cat(decoded[1:], X)."""
        if not shift:
            return decoded.copy()
        return np.append(decoded[1:], decoded[-1] if initial else decoded[0])

    prefill = shifted(x != mask, True)  # E_{-1}
    e_after = {-1: prefill}  # Dream: global step t -> E_t
    cache, rows_log, t = None, [], 0
    everything = np.ones(seq, bool)
    for k in range(n_blocks):
        blk = np.arange(p_len + k * block, p_len + (k + 1) * block)
        m = int(np.sum(x[blk] == mask))
        quota = [m // per_block + (j < m % per_block) for j in range(per_block)]
        d_after = {-1: x != mask}  # LLaDA: block step i -> D_i
        if variant == "greedy" or (variant == "decode" and not shift):
            cache = None  # reset at every block start
        if order is not None:
            pi = p_len + np.asarray(order[k])
            starts = np.concatenate([[0], np.cumsum(quota)])
        rows_next = None
        for i in range(per_block):
            # -- which forward, which cached set, what the cache holds afterwards
            cached, keep = None, None
            if variant == "none":
                pass
            elif variant == "decode" and not shift:  # LLaDA: per-block step index
                if not (i % n == 0 or i <= 1):
                    cached = d_after[i - 2]
                keep = d_after[i - 1] if i > 0 else None
            elif variant == "decode":  # Dream: global step index
                if t % n != 0:
                    cached = e_after[t - 2] if t >= 2 else e_after[-1]
                keep = e_after[t - 1]
            elif variant == "prefill":
                cached = prefill if t > 0 else None
                keep = prefill
            elif variant == "pd":
                refresh = (t % n == 0) if shift else (i % n == 0 or i <= 1)
                if t > 0:
                    cached = prefill if refresh else (
                        (e_after[t - 2] if t >= 2 else e_after[-1]) if shift
                        else d_after[i - 2])
                keep = e_after[t - 1] if shift else d_after[i - 1]
            elif variant == "greedy":
                if i % n != 0:
                    cached = ~rows_next
                keep = everything  # the cache is overwritten in place at the rows
            if cached is None:
                logits, kk, vv = numpy_forward_kv(params, cfg, x)
                rows_log.append(seq)
            else:
                assert cache is not None and not np.isnan(cache[0][:, cached]).any(), \
                    "a cached step reads a position the spec does not cache"
                logits, kk, vv = numpy_forward_kv(params, cfg, x,
                                                  override=(cache[0], cache[1], cached))
                rows_log.append(int(seq - cached.sum()))
            if keep is not None:
                hold = keep[None, :, None, None]
                cache = (np.where(hold, kk, np.nan), np.where(hold, vv, np.nan))
            # -- sampling (LLaDA low_confidence / fixed order; Dream maskgit_plus), T = 0
            cand = x[blk] == mask
            source = blk - 1 if shift else blk  # Dream: row p-1 predicts p
            z = logits[source]
            tok = z.argmax(-1)
            if order is not None:
                chosen_pos = pi[starts[i]:starts[i + 1]]
                used = source[np.isin(blk, chosen_pos)]
            else:
                conf = np.where(cand, _softmax(z).max(-1), -np.inf)
                if sampler.remasking == "maskgit_plus":
                    ts = np.linspace(1, sampler.eps, per_block + 1)
                    cnt = int(cand.sum()) if i == per_block - 1 else int(
                        cand.sum() * (1 - ts[i + 1] / ts[i]))
                else:
                    cnt = quota[i]
                chosen_pos = blk[np.argsort(-conf, kind="stable")[:cnt]]
                used = source[cand]
            if cached is not None:
                assert not cached[used].any(), "a used logit comes from a cached position"
            before_mask = x == mask
            x[chosen_pos] = tok[chosen_pos - blk[0]]
            d_after[i] = x != mask
            e_after[t] = shifted(x != mask, False)
            if variant == "greedy" and i < per_block - 1:  # W_{i+1}, by the pointer walk
                s_next = pi[starts[i + 1]:starts[i + 2]]
                rows_next = np.zeros(seq, bool)
                rows_next[chosen_pos] = True  # S_i: the one-step delay
                rows_next[s_next - 1 if shift else s_next] = True
                for p in s_next:  # find_window_tokens
                    left, right, count, go_left = p - 1, p + 1, 0, True
                    while count < window and not (left < 0 and right > seq):
                        if go_left:
                            if left >= 0 and not rows_next[left] and before_mask[left]:
                                rows_next[left], count = True, count + 1
                            left -= 1
                        else:
                            if right < seq and not rows_next[right] and before_mask[right]:
                                rows_next[right], count = True, count + 1
                            right += 1
                        go_left = not go_left
            t += 1
    return x[p_len:], rows_log


def _check_against_reference(model, policy, block_length, sampler, n, window=None):
    cfg = model[0]
    gen, steps, _ = SHAPES[cfg.layout]
    kw = {} if window is None else dict(window_size=window)
    if POLICIES[policy].takes_refresh_interval:  # dkv_prefill never refreshes: it takes no N
        kw["refresh_interval"] = n
    out = _run(model, policy, block_length, sampler, **kw)
    assert not np.any(out.tokens == cfg.mask_token_id)
    order = out.stats.get("decode_order")
    for r, p in enumerate(_prompts(cfg)):
        want, rows = dkv_reference(model, p.prompt, policy.removeprefix("dkv_"), gen=gen,
                                   steps=steps, block=block_length, n=n, sampler=sampler,
                                   window=window or 0,
                                   order=None if order is None else order[r])
        np.testing.assert_array_equal(out.tokens[r], want)
        assert (out.stats["rows_per_forward"][r] // cfg.n_layers).tolist() == rows
    return out


VARIANTS = [  # (model, policy, block_length, sampler, N, window)
    ("llada_mha", "dkv_decode", 8, LOW_CONF, 3, None),
    ("llada_gqa", "dkv_decode", 32, LOW_CONF, 5, None),
    ("llada_mha", "dkv_greedy", 8, RANDOM, 3, 2),
    ("llada_gqa", "dkv_greedy", 32, RANDOM, 4, 3),
    ("llada_gqa", "dkv_prefill", 8, LOW_CONF, 1, None),  # ours on LLaDA
    ("llada_gqa", "dkv_pd", 8, LOW_CONF, 3, None),  # ours on LLaDA
    ("dream", "dkv_decode", 24, MASKGIT, 3, None),
    ("dream", "dkv_decode", 8, MASKGIT, 2, None),
    ("dream", "dkv_prefill", 24, MASKGIT, 1, None),
    ("dream", "dkv_pd", 24, MASKGIT, 5, None),
    ("dream", "dkv_greedy", 8, RANDOM, 3, 2),  # ours on Dream
]


@pytest.mark.parametrize("name,policy,block_length,sampler,n,window", VARIANTS)
def test_matches_step_by_step_reference(models, name, policy, block_length, sampler, n,
                                        window):
    _check_against_reference(models[name], policy, block_length, sampler, n, window)


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("name,block_length,sampler", [
    ("llada_mha", 8, LOW_CONF), ("llada_gqa", 32, LOW_CONF), ("dream", 24, MASKGIT)])
def test_decode_refresh1_equals_none(models, name, block_length, sampler):
    none = _run(models[name], "none", block_length, sampler)
    assert len({tuple(t) for t in none.tokens}) > 1, "degenerate model: outputs identical"
    dkv = _run(models[name], "dkv_decode", block_length, sampler, refresh_interval=1)
    np.testing.assert_array_equal(dkv.tokens, none.tokens)
    np.testing.assert_array_equal(dkv.nfe, none.nfe)


@pytest.mark.parametrize("name,block_length,sampler", [
    ("dream", 24, MASKGIT), ("llada_gqa", 8, LOW_CONF)])
def test_pd_refresh1_equals_prefill(models, name, block_length, sampler):
    prefill = _run(models[name], "dkv_prefill", block_length, sampler)
    pd = _run(models[name], "dkv_pd", block_length, sampler, refresh_interval=1)
    np.testing.assert_array_equal(pd.tokens, prefill.tokens)
    np.testing.assert_array_equal(pd.stats["rows_per_forward"],
                                  prefill.stats["rows_per_forward"])


def test_greedy_refresh1_equals_full_recompute_with_the_same_order(models):
    model = models["llada_mha"]
    greedy = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=1, window_size=2,
                  key=jax.random.key(5))
    order = greedy.stats["decode_order"]
    full = _run(model, "none", 8, RANDOM, decode_order=order, key=jax.random.key(5))
    np.testing.assert_array_equal(greedy.tokens, full.tokens)
    cfg = model[0]
    for r, p in enumerate(_prompts(cfg)):  # and both equal the reference's full loop
        want, rows = dkv_reference(model, p.prompt, "none", gen=32, steps=16, block=8, n=1,
                                   sampler=RANDOM, order=order[r])
        np.testing.assert_array_equal(full.tokens[r], want)


def test_greedy_order_is_drawn_from_the_key_and_replayable(models):
    model = models["llada_mha"]
    a = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=3, key=jax.random.key(1))
    b = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=3, key=jax.random.key(2))
    order = a.stats["decode_order"]
    assert order.shape == (2, 4, 8)
    assert not np.array_equal(order, b.stats["decode_order"])
    assert not np.array_equal(order[0], order[1])  # one order per request
    np.testing.assert_array_equal(np.sort(order, -1), np.broadcast_to(
        np.arange(32).reshape(4, 8), order.shape))
    replay = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=3, key=jax.random.key(2),
                  decode_order=order)
    np.testing.assert_array_equal(replay.tokens, a.tokens)
    shared = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=3,
                  decode_order=order[1])  # [num_blocks, block_length]: every request
    np.testing.assert_array_equal(shared.stats["decode_order"][0], order[1])
    np.testing.assert_array_equal(shared.tokens[1], a.tokens[1])


@pytest.mark.parametrize("window", [1, 2, 3, 6])
def test_greedy_window_is_the_pointer_walk(window):
    """The window rule on random masks against the public code's pointer walk (alternate
    sides, left first, skip positions already taken)."""
    rng = np.random.default_rng(window)
    batch, g, bl = 24, 32, 8
    rows = np.zeros((batch, g), bool)
    masked = rng.random((batch, g)) < 0.5
    targets = np.zeros((batch, g), bool)
    order = np.zeros((batch, bl), np.int32)
    want = np.zeros((batch, g), bool)
    for b in range(batch):
        k = rng.integers(g // bl)
        order[b] = k * bl + rng.permutation(bl)
        nxt = order[b][rng.integers(bl):][:rng.integers(1, 4)]
        masked[b, nxt] = True
        targets[b, nxt] = True
        rows[b, nxt] = True
        rows[b, rng.integers(0, g, 2)] = True
        w = rows[b].copy()
        for p in nxt:
            left, right, count, go_left = p - 1, p + 1, 0, True
            while count < window and not (left < 0 and right > g):
                if go_left:
                    if left >= 0 and not w[left] and masked[b, left]:
                        w[left], count = True, count + 1
                    left -= 1
                else:
                    if right < g and not w[right] and masked[b, right]:
                        w[right], count = True, count + 1
                    right += 1
                go_left = not go_left
        want[b] = w
    got = greedy_window(jax.numpy.asarray(rows), jax.numpy.asarray(masked),
                        jax.numpy.asarray(targets), jax.numpy.asarray(order),
                        jax.numpy.int32(window))
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- row counts


def _token_rows(out, cfg):
    return (out.stats["rows_per_forward"] // cfg.n_layers).tolist()


def test_rows_per_forward_follow_the_spec_examples(models):
    """shared/DKV.md's worked examples. The first request has the examples' prompt length
    (LLaDA 24, Dream 20); the second is 5 (LLaDA) / 7 (Dream) tokens shorter, which only
    changes the full forwards. Padding: to 8, 16 or the canvas (Dream: + 1 row)."""
    cfg, _ = models["llada_mha"]
    out = _run(models["llada_mha"], "dkv_decode", 8, LOW_CONF, refresh_interval=4)
    want = [56, 56, 30, 28, 56, 56, 22, 20, 56, 56, 14, 12, 56, 56, 6, 4]
    assert _token_rows(out, cfg) == [want, [51 if r == 56 else r for r in want]]
    pad = [0, 0, 2, 4, 0, 0, 10, 12, 0, 0, 2, 4, 0, 0, 2, 4]  # buckets 8, 16, 32
    assert (out.stats["padded_per_forward"][0] // cfg.n_layers).tolist() == pad
    assert out.stats["rows_computed"][0] == sum(want) * cfg.n_layers
    assert out.stats["rows_padded"][0] == sum(pad) * cfg.n_layers
    for n, w, want in [(2, 0, [56, 4] * 8),
                       (4, 4, [56, 12, 12, 12] * 3 + [56, 8, 6, 4])]:
        out = _run(models["llada_mha"], "dkv_greedy", 8, RANDOM, refresh_interval=n,
                   window_size=w)
        assert _token_rows(out, cfg)[0] == want

    cfg, _ = models["dream"]
    for policy, want in [
            ("dkv_decode", [44, 25, 23, 21, 44, 17, 15, 13, 44, 9, 7, 5]),
            ("dkv_pd", [44, 25, 23, 21, 25, 17, 15, 13, 25, 9, 7, 5]),
            ("dkv_prefill", [44] + [25] * 11)]:
        out = _run(models["dream"], policy, 24, MASKGIT,
                   refresh_interval=None if policy == "dkv_prefill" else 4)
        rows = _token_rows(out, cfg)
        assert rows[0] == want, policy
        assert rows[1] == [37 if r == 44 else r for r in want], policy
        assert out.nfe.tolist() == [12, 12]


# ----------------------------------------------------------------------------- compiles


def test_repeated_calls_do_not_recompile(models):
    model = models["llada_mha"]
    _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=2)
    before = compile_count()
    for n, w in [(2, 0), (3, 1), (1, 4)]:  # N and the window are traced
        out = _run(model, "dkv_greedy", 8, RANDOM, refresh_interval=n, window_size=w,
                   key=jax.random.key(n))
        assert out.stats["compiles"] == 0
    out = _run(model, "dkv_decode", 8, LOW_CONF, refresh_interval=2)
    out = _run(model, "dkv_decode", 8, LOW_CONF, refresh_interval=7)
    assert out.stats["compiles"] == 0
    assert compile_count() - before <= 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("policy,sampler,kw,match", [
    ("dkv_greedy", LOW_CONF, {}, "remasking='random'"),
    ("dkv_greedy", RANDOM, dict(window_size=-1), "window_size must be >= 0"),
    ("dkv_greedy", RANDOM, dict(window_size=1.5), "window_size must be an integer"),
    ("dkv_decode", LOW_CONF, dict(window_size=2), "window_size is a setting of dkv_greedy"),
    ("dkv_greedy", RANDOM, dict(refresh_interval=0), "refresh_interval must be >= 1"),
    ("dkv_decode", LOW_CONF, dict(refresh_interval=-2), "refresh_interval must be >= 1"),
    ("dkv_pd", LOW_CONF, dict(refresh_interval=2.5), "refresh_interval must be an integer"),
    ("dkv_greedy", RANDOM, dict(decode_order=np.zeros((4, 8), int)), "permutation"),
    ("dkv_greedy", RANDOM, dict(decode_order=np.arange(32).reshape(4, 8)[::-1]),
     "block 0 .* permutation of the canvas positions 0..7"),
    ("dkv_greedy", RANDOM, dict(decode_order=np.arange(32).reshape(8, 4)), "shape"),
    ("dkv_greedy", RANDOM, dict(decode_order=np.arange(32.0).reshape(4, 8)), "integer"),
    ("none", LOW_CONF, dict(decode_order=np.arange(32).reshape(4, 8)), "remasking='random'"),
])
def test_bad_arguments_are_clear_errors(models, policy, sampler, kw, match):
    with pytest.raises(ValueError, match=match):
        _run(models["llada_mha"], policy, 8, sampler, **kw)


def test_bad_order_for_one_request_names_it(models):
    order = np.broadcast_to(np.arange(32).reshape(4, 8), (2, 4, 8)).copy()
    order[1, 2, 3] = 0
    with pytest.raises(ValueError, match=r"block 2 \(request 1\)"):
        _run(models["llada_mha"], "dkv_greedy", 8, RANDOM, decode_order=order)
