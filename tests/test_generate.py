"""generate(): policies against `none` and against independent step-by-step references."""

import jax
import numpy as np
import pytest
from numpy_reference import numpy_forward_kv, sharp_params

from bicache_jax import POLICIES, PrefixStore, Prompt, SamplerConfig, compile_count, generate
from bicache_jax import config as C
from bicache_jax.generate import compute_prefix_entry

CONFIGS = {
    "llada_mha": C.tiny_llada().replace(attention_impl="reference"),
    "llada_gqa": C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference"),
    "dream": C.tiny_dream().replace(attention_impl="reference"),
}


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, sharp_params(cfg, seed=3)) for name, cfg in CONFIGS.items()}


def _ids(rng, n, cfg):
    return tuple(int(i) for i in rng.integers(0, cfg.mask_token_id - 1, n))


def _requests(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shared = _ids(rng, 21, cfg)
    return [Prompt(prompt=_ids(rng, 5, cfg), prefix=shared),
            Prompt(prompt=_ids(rng, 3, cfg), prefix=shared[:13]),
            Prompt(prompt=_ids(rng, 7, cfg))]


def _run(model, prompts, **kw):
    cfg, params = model
    kw.setdefault("gen_length", 16)
    kw.setdefault("steps", 8)
    kw.setdefault("block_length", 8)
    return generate(params, prompts, kw.pop("cache", None), config=cfg, **kw)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bicache_depth0_refresh1_equals_none(models, name):
    prompts = _requests(models[name][0])
    none = _run(models[name], prompts, policy="none")
    assert len({tuple(t) for t in none.tokens}) > 1, "degenerate model: outputs identical"
    bic = _run(models[name], prompts, policy="bicache", reuse_depth=0, refresh_interval=1)
    np.testing.assert_array_equal(bic.tokens, none.tokens)
    np.testing.assert_array_equal(bic.nfe, none.nfe)


@pytest.mark.parametrize("name", ["llada_mha", "llada_gqa"])
def test_dkv_decode_refresh1_equals_none(models, name):
    prompts = _requests(models[name][0])
    none = _run(models[name], prompts, policy="none")
    dkv = _run(models[name], prompts, policy="dkv_decode", refresh_interval=1)
    np.testing.assert_array_equal(dkv.tokens, none.tokens)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_depth_L_minus_1_equals_naive_prefix(models, name):
    """At a refresh, layer b's prefix K/V are projections of the joined store hidden, so
    b = L - 1 keeps every layer's prefix KV request-independent: the naive cache."""
    cfg = models[name][0]
    prompts = _requests(cfg)
    naive = _run(models[name], prompts, policy="naive_prefix")
    bic = _run(models[name], prompts, policy="bicache", reuse_depth=cfg.n_layers - 1,
               refresh_interval=2)
    np.testing.assert_array_equal(bic.tokens, naive.tokens)
    # b = L (a profiler table may say so): nothing left to refresh, the naive cache again.
    for policy in ("bicache", "bicache_dual"):
        full = _run(models[name], prompts, policy=policy, reuse_depth=cfg.n_layers,
                    refresh_interval=2)
        assert not full.stats["refreshes"].any()
        if policy == "bicache":
            np.testing.assert_array_equal(full.tokens, naive.tokens)


@pytest.mark.parametrize("policy", ["none", "bicache", "fastdllm_dual", "bicache_dual",
                                    "fastdllm_prefix", "dkv_decode", "naive_prefix"])
def test_padded_batch_equals_each_request_alone(models, policy):
    model = models["llada_gqa"]
    prompts = _requests(model[0], seed=5)
    kw = dict(policy=policy, reuse_depth=1 if "bicache" in policy else None)
    batch = _run(model, prompts, **kw)
    for i, p in enumerate(prompts):
        alone_kw = kw
        if not p.prefix and POLICIES[policy].uses_store:
            # A store policy refuses a batch without any prefix; in a mixed batch such a
            # request runs uncached: as `none`, or bicache_dual as its dual block cache
            # without the store (the official schedule: the block start does not decode).
            alone_kw = (dict(policy="fastdllm_dual", decode_on_block_start=False)
                        if POLICIES[policy].block_cache else dict(policy="none"))
        alone = _run(model, [p], **alone_kw)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_array_equal(batch.stats["rows_computed"][i],
                                      alone.stats["rows_computed"][0])


def test_same_key_same_output_and_temperature_zero_is_deterministic(models):
    model = models["llada_mha"]
    prompts = _requests(model[0])
    hot = SamplerConfig(temperature=1.0)
    a = _run(model, prompts, sampler=hot, key=jax.random.key(1))
    b = _run(model, prompts, sampler=hot, key=jax.random.key(1))
    c = _run(model, prompts, sampler=hot, key=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    cold1 = _run(model, prompts, key=jax.random.key(1))
    cold2 = _run(model, prompts, key=jax.random.key(2))
    np.testing.assert_array_equal(cold1.tokens, cold2.tokens)


@pytest.mark.parametrize("remasking", ["random", "maskgit_plus", "topk_margin", "entropy",
                                       "origin"])
def test_every_sampler_runs_and_fills_the_canvas(models, remasking):
    model = models["dream"]
    sampler = SamplerConfig(remasking=remasking, temperature=0.5, top_p=0.9, top_k=20,
                            alg_temp=0.5 if remasking == "entropy" else 0.0)
    out = _run(model, _requests(model[0]), sampler=sampler, block_length=16)
    assert not np.any(out.tokens == model[0].mask_token_id)


def test_no_recompile_for_the_same_shapes(models):
    model = models["llada_mha"]
    prompts = _requests(model[0])
    _run(model, prompts, policy="bicache", reuse_depth=1)
    before = compile_count()
    out = _run(model, prompts, policy="bicache", reuse_depth=1, key=jax.random.key(9))
    assert compile_count() == before
    assert out.stats["compiles"] == 0


def test_store_shallow_kv_is_the_prefix_alone_forward_and_refreshes_are_counted(models):
    cfg, params = models["llada_mha"]
    prompts = _requests(cfg)[:2]
    store = PrefixStore()
    for n in range(3):  # several requests through the same store
        out = _run((cfg, params), prompts, cache=store, policy="bicache", reuse_depth=1,
                   refresh_interval=4, steps=16, key=jax.random.key(n))
        store = out.cache
    assert out.stats["refreshes"].tolist() == [4, 4]  # steps 0, 4, 8, 12
    assert store.stats.misses == 2 and store.stats.hits == 4
    for p in prompts:  # bit-identical to a fresh prefix-alone forward
        entry, fresh = store.find(p.prefix), compute_prefix_entry(params, cfg, p.prefix)
        for name in ("k", "v", "hidden"):
            np.testing.assert_array_equal(getattr(entry, name), getattr(fresh, name))


def test_depth_from_table_and_batch_uses_smallest(models):
    cfg, params = models["llada_mha"]
    prompts = _requests(cfg)[:2]  # prefix ratios 21/(21+5+16)=50%, 13/(13+3+16)=41%
    store = PrefixStore(depth_table={0: 0, 45: 2, 90: 3})
    out = _run((cfg, params), prompts, cache=store, policy="bicache")
    assert out.stats["reuse_depth"].tolist() == [2, 0]
    assert out.stats["batch_reuse_depth"] == 0


def test_request_without_prefix_runs_uncached_in_a_mixed_batch(models):
    model = models["llada_mha"]
    with_prefix, _, p = _requests(model[0])
    out = _run(model, [with_prefix, p], policy="bicache", reuse_depth=2)
    none = _run(model, [p], policy="none")
    np.testing.assert_array_equal(out.tokens[1], none.tokens[0])
    assert len(out.cache) == 1 and out.stats["reuse_depth"].tolist() == [2, 0]


def test_savings_are_reported_in_rows(models):
    model = models["llada_mha"]
    prompts = _requests(model[0])[:2]
    rows = {pol: _run(model, prompts, policy=pol, reuse_depth=1 if pol == "bicache" else None,
                      steps=16).stats["rows_computed"].sum()
            for pol in ["none", "bicache", "naive_prefix", "fastdllm_dual"]}
    assert rows["naive_prefix"] < rows["bicache"] < rows["none"]
    assert rows["fastdllm_dual"] < rows["none"]


# ----------------------------------------------------------------- Fast-dLLM reference


def _fastdllm_reference(params, cfg, prompt, gen_length, steps, block_length, cache,
                        threshold=None):
    """Fast-dLLM's block loop, step by step, on the float64 numpy model: per block one
    full forward (which decodes), then forwards whose K/V outside the computed rows come
    from that forward (dual: everything outside the block; prefix: everything before it)."""
    mask = cfg.mask_token_id
    x = np.array(list(prompt) + [mask] * gen_length)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    start = len(prompt)
    nfe = 0
    for blk in range(n_blocks):
        s0, s1 = start + blk * block_length, start + (blk + 1) * block_length
        m = int(np.sum(x[s0:s1] == mask))
        quota = [m // per_block + (i < m % per_block) for i in range(per_block)]
        logits, k, v = numpy_forward_kv(params, cfg, x)
        cached = np.zeros(len(x), bool)
        if cache == "dual":
            cached[:s0], cached[s1:] = True, True
        elif cache == "prefix":
            cached[:s0] = True
        step = 0
        while True:
            nfe += 1
            cand = x[s0:s1] == mask
            z = logits[s0:s1]
            tok = z.argmax(-1)
            prob = np.exp(z - z.max(-1, keepdims=True))
            conf = (prob / prob.sum(-1, keepdims=True))[np.arange(len(tok)), tok]
            conf = np.where(cand, conf, -np.inf)
            order = np.argsort(-conf, kind="stable")
            if threshold is None:
                chosen = order[:quota[step]]
            else:
                chosen = [order[0]] + [j for j in order[1:] if conf[j] >= threshold]
            x[s0 + np.asarray(chosen, int)] = tok[chosen]
            step += 1
            done = step >= per_block if threshold is None else not np.any(x[s0:s1] == mask)
            if done:
                break
            logits, _, _ = numpy_forward_kv(params, cfg, x, override=(k, v, cached))
    return x[start:], nfe


@pytest.mark.parametrize("name", ["llada_mha", "llada_gqa"])
@pytest.mark.parametrize("cache,threshold", [("dual", None), ("prefix", None),
                                             ("dual", 0.5), ("prefix", 0.5)])
def test_fastdllm_matches_step_by_step_reference(models, name, cache, threshold):
    cfg, params = models[name]
    prompts = _requests(cfg, seed=11)
    out = _run(models[name], prompts, policy=f"fastdllm_{cache}",
               sampler=SamplerConfig(threshold=threshold))
    for i, p in enumerate(prompts):
        want, nfe = _fastdllm_reference(params, cfg, p.prefix + p.prompt, 16, 8, 8, cache,
                                        threshold)
        np.testing.assert_array_equal(out.tokens[i], want)
        assert out.nfe[i] == nfe


def test_threshold_decoding_with_no_cache_matches_reference(models):
    """Threshold decoding with full recomputation = the dual reference with no caching."""
    cfg, params = models["llada_mha"]
    prompts = _requests(cfg, seed=12)
    out = _run(models["llada_mha"], prompts, sampler=SamplerConfig(threshold=0.6))
    for i, p in enumerate(prompts):
        want, nfe = _fastdllm_reference(params, cfg, p.prefix + p.prompt, 16, 8, 8,
                                        "none", 0.6)
        np.testing.assert_array_equal(out.tokens[i], want)
        assert out.nfe[i] == nfe


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=12, block_length=8), "block_length"),
    (dict(steps=7), "divisible"),
    (dict(gen_length=0), "gen_length"),
    (dict(steps=0), "steps"),
    (dict(block_length=-8), "block_length"),
    (dict(gen_length=256, block_length=256), "max_seq_len"),
    (dict(policy="magic"), "unknown policy"),
    (dict(policy="bicache", refresh_interval=0), "refresh_interval"),
    (dict(policy="bicache", reuse_depth=9), "reuse_depth"),
    (dict(policy="bicache"), "reuse depth"),
    (dict(policy="bicache", sampler=SamplerConfig(cfg_scale=1.0), reuse_depth=1),
     "cfg_scale"),
])
def test_bad_arguments_are_clear_errors(models, kw, match):
    model = models["llada_mha"]
    with pytest.raises(ValueError, match=match):
        _run(model, _requests(model[0]), **kw)


@pytest.mark.parametrize("prompts,match", [
    ([], "empty"),
    ([Prompt(prompt=())], "prompt is empty"),
    ([Prompt(prompt=(1, 2, 99))], "token ids"),
    ([Prompt(prompt=(1, -2))], "token ids"),
    ([Prompt(prompt=(1, 63))], "mask token"),
])
def test_bad_prompts_are_clear_errors(models, prompts, match):
    with pytest.raises(ValueError, match=match):
        _run(models["llada_mha"], prompts)


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"),
    (dict(remasking="nope"), "remasking"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(remasking="random", threshold=0.5), "threshold"),
])
def test_bad_sampler_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kw)


def test_cfg_scale_runs_with_none(models):
    model = models["llada_mha"]
    out = _run(model, _requests(model[0]), sampler=SamplerConfig(cfg_scale=1.0))
    plain = _run(model, _requests(model[0]))
    assert not np.any(out.tokens == model[0].mask_token_id)
    assert not np.array_equal(out.tokens, plain.tokens)


def test_dkv_decode_rows_follow_the_published_schedule(models):
    """dKV-Cache spec worked example: LLaDA decode, prompt 24, gen 32, block 8, 16 steps,
    N = 4 -> rows per forward 56,56,30,28, 56,56,22,20, 56,56,14,12, 56,56,6,4."""
    cfg, params = models["llada_mha"]
    rng = np.random.default_rng(0)
    out = _run(models["llada_mha"], [Prompt(prompt=_ids(rng, 24, cfg))], policy="dkv_decode",
               gen_length=32, steps=16, block_length=8, refresh_interval=4)
    per_forward = [56, 56, 30, 28, 56, 56, 22, 20, 56, 56, 14, 12, 56, 56, 6, 4]
    buckets = [8, 16, 32, 56]  # static row counts: 8, 16, 32 (gen_length), or a full forward
    padded = [min(b for b in buckets if b >= n) - n for n in per_forward]
    assert out.stats["rows_computed"][0] == sum(per_forward) * cfg.n_layers
    assert out.stats["rows_padded"][0] == sum(padded) * cfg.n_layers
    assert out.nfe[0] == 16


@pytest.mark.parametrize("name", ["llada_gqa", "dream"])
def test_bicache_dual_depth0_decoding_at_block_start_equals_fastdllm_dual(models, name):
    """With b = 0 and a refresh at every block start (N = steps per block), BiCache's prefix
    KV is the block-start forward's: decoding from that forward gives exactly Fast-dLLM's
    dual cache."""
    prompts = _requests(models[name][0], seed=3)
    fast = _run(models[name], prompts, policy="fastdllm_dual")
    both = _run(models[name], prompts, policy="bicache_dual", reuse_depth=0,
                refresh_interval=4, decode_on_block_start=True)
    np.testing.assert_array_equal(both.tokens, fast.tokens)
    np.testing.assert_array_equal(both.nfe, fast.nfe)
    official = _run(models[name], prompts, policy="bicache_dual", reuse_depth=0,
                    refresh_interval=4)
    assert official.nfe.tolist() == [10, 10, 10]  # 2 blocks x (1 cache forward + 4 steps)
    with pytest.raises(ValueError, match="decode_on_block_start"):
        _run(models[name], prompts, policy="bicache", reuse_depth=0,
             decode_on_block_start=True)


@pytest.mark.parametrize("policy", ["bicache_dual", "dkv_decode"])
def test_generate_stream_yields_each_block_with_generates_result(models, policy):
    """The streaming loop runs the same program a block at a time: every block's canvas
    is a prefix of the final tokens, and the last step carries generate's whole output."""
    from bicache_jax.generate import generate_stream

    cfg, params = models["llada_gqa"]
    prompts = _requests(cfg, seed=5)
    kw = dict(config=cfg, gen_length=16, steps=8, block_length=8, policy=policy)
    if policy == "bicache_dual":
        kw["reuse_depth"] = 1
    whole = generate(params, prompts, **kw)
    steps = list(generate_stream(params, prompts, **kw))
    assert [s.block for s in steps] == [0, 1]
    assert all(s.output is None for s in steps[:-1])
    np.testing.assert_array_equal(steps[0].tokens[:, :8], whole.tokens[:, :8])
    assert np.all(steps[0].tokens[:, 8:] == cfg.mask_token_id)
    last = steps[-1].output
    np.testing.assert_array_equal(steps[-1].tokens, whole.tokens)
    np.testing.assert_array_equal(last.tokens, whole.tokens)
    np.testing.assert_array_equal(last.nfe, whole.nfe)
    np.testing.assert_array_equal(last.stats["rows_computed"], whole.stats["rows_computed"])


@pytest.mark.parametrize("depth", [0, 2])
def test_prefix_cache_bytes_count_the_shared_entry_once(models, depth):
    """Two requests with one prefix hold its store K/V once (layers < b) and BiCache's
    refreshed deep K/V per request; b = 0 holds no store K/V at all."""
    cfg, params = models["llada_mha"]
    shared = _requests(cfg)[0].prefix
    prompts = [Prompt(prompt=(1, 2, 3), prefix=shared), Prompt(prompt=(4, 5), prefix=shared)]
    out = _run((cfg, params), prompts, policy="bicache", reuse_depth=depth)
    p_pad = 32  # 21 prefix tokens padded to PAD_MULTIPLE
    kv_row = p_pad * cfg.n_kv_heads * cfg.head_dim * 4  # float32 bytes per layer and copy
    want = (2 * depth * kv_row + p_pad * cfg.d_model * 4  # one entry: K, V of b layers + hidden
            + 2 * (cfg.n_layers - depth) * 2 * kv_row)  # two requests' deep K and V
    assert out.stats["prefix_cache_bytes"] == want
