"""The model against a float64 numpy reference, and exactness of the cached forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import numpy_forward, rel_err

from bicache_jax import config as C
from bicache_jax.model import (
    OwnKV,
    PrefixKV,
    encode_prefix,
    forward,
    forward_rows,
    init_params,
    logits_from_hidden,
)

CONFIGS = {
    "llada_mha": C.tiny_llada(),
    "llada_gqa": C.tiny_llada(n_kv_heads=2),
    "dream": C.tiny_dream(),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    cfg = CONFIGS[request.param].replace(attention_impl="reference")
    return cfg, init_params(cfg, jax.random.key(7))


def test_forward_matches_numpy_reference(model):
    cfg, params = model
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size))
    lengths = np.array([11, 6])
    logits = np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths)))
    for b in range(2):
        ref = numpy_forward(params, cfg, tokens[b], lengths[b])
        n = lengths[b]
        assert rel_err(logits[b, :n], ref[:n]) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_training_forward_matches_numpy_reference(impl):
    # The trainer's forward: layers unrolled, XLA's attention (a full forward: no cache).
    cfg = C.tiny_llada(n_kv_heads=2).replace(attention_impl=impl)
    params = init_params(cfg, jax.random.key(3))
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 13), 0, cfg.vocab_size))
    lengths = np.array([13, 7])
    logits = np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths),
                                unroll_layers=True))
    for b in range(2):
        ref = numpy_forward(params, cfg, tokens[b], lengths[b])
        assert rel_err(logits[b, :lengths[b]], ref[:lengths[b]]) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_padding_does_not_change_valid_rows(impl):
    cfg = C.tiny_llada(n_kv_heads=2).replace(attention_impl=impl)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
    alone = forward(params, cfg, tokens[:, :6])
    padded = forward(params, cfg, tokens, jnp.array([6]))
    np.testing.assert_allclose(padded[:, :6], alone, rtol=1e-5, atol=1e-6)




@pytest.mark.parametrize("depth_offset", [0, 1, 2, 3])
def test_cached_forward_equals_full_forward_at_every_depth(model, depth_offset):
    """With the prefix KV and hidden of a full forward of the same sequence, the cached
    forward equals the full forward on the own rows, for every reuse depth 0..L."""
    cfg, params = model
    b = depth_offset  # tiny configs have L = 3, so 0..3 covers 0..L
    p, t = 7, 6
    tokens = jax.random.randint(jax.random.key(3), (2, p + t), 0, cfg.vocab_size)
    full_logits = forward(params, cfg, tokens)
    # K, V and layer inputs of the whole sequence, taken at the prefix rows.
    full = encode_prefix(params, cfg, tokens, jnp.array([p + t, p + t]))
    prefix = PrefixKV(full.k[:, :, :p], full.v[:, :, :p], None, None, None,
                      None if b == cfg.n_layers else full.hidden[b, :, :p],
                      jnp.array([p, p]))
    cached = forward(params, cfg, tokens[:, p:], prefix=prefix, reuse_depth=b)
    assert rel_err(cached, full_logits[:, p:]) <= 1e-5
    # The same KV split into a shared part (layers < 1) and per-request deep layers.
    if b >= 1:
        split = PrefixKV(full.k[:1, :, :p], full.v[:1, :, :p], None, full.k[1:, :, :p],
                         full.v[1:, :, :p], prefix.hidden, prefix.length)
        got = forward(params, cfg, tokens[:, p:], prefix=split, reuse_depth=b)
        assert rel_err(got, full_logits[:, p:]) <= 1e-5


@pytest.mark.parametrize("depth", [0, 2, 3])
def test_one_shared_prefix_entry_equals_one_copy_per_request(model, depth):
    """A prefix the batch shares, held once (`index`), gives the per-request copies'
    logits exactly."""
    cfg, params = model
    p = 6
    prefix_ids = jax.random.randint(jax.random.key(6), (1, p), 0, cfg.vocab_size)
    own = jax.random.randint(jax.random.key(7), (3, 5), 0, cfg.vocab_size)
    entry = encode_prefix(params, cfg, prefix_ids, jnp.array([p]))
    hidden = None if depth == cfg.n_layers else entry.hidden[depth]
    lengths = jnp.array([p, p, p])
    once = PrefixKV(entry.k, entry.v, jnp.zeros((3,), jnp.int32), None, None, hidden,
                    lengths)
    tile = lambda a: None if a is None else jnp.repeat(a, 3, axis=-4 if a.ndim == 5 else 0)  # noqa: E731
    copies = PrefixKV(tile(entry.k), tile(entry.v), None, None, None, tile(hidden), lengths)
    a = forward(params, cfg, own, prefix=once, reuse_depth=depth)
    b = forward(params, cfg, own, prefix=copies, reuse_depth=depth)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_rows_with_all_layer_cache_equal_full_forward(model):
    """Computing only a block of rows, every other position's KV from the cache."""
    cfg, params = model
    t = 12
    tokens = jax.random.randint(jax.random.key(4), (2, t), 0, cfg.vocab_size)
    lengths = jnp.array([12, 10])
    full_logits = forward(params, cfg, tokens, lengths)
    full = encode_prefix(params, cfg, tokens, lengths)
    # Poison the block's slots in the buffer: they must be overwritten by fresh rows.
    rows = jnp.array([[4, 5, 6, 7], [2, 3, 8, 9]])
    poison = lambda a: a.at[:, jnp.arange(2)[:, None], rows].set(jnp.nan)  # noqa: E731
    buf = OwnKV(poison(full.k), poison(full.v))
    pos = rows.astype(jnp.int32)
    out = forward_rows(params, cfg, jnp.take_along_axis(tokens, rows, 1), pos, lengths,
                       own_kv=buf, own_rows=rows, return_own_kv=True)
    got = logits_from_hidden(params, out.hidden)
    want = jnp.take_along_axis(full_logits, rows[:, :, None], 1)
    assert rel_err(got, want) <= 1e-5
    # The returned buffer holds the fresh rows' K/V where the poison was.
    assert rel_err(out.own_kv.k, full.k) <= 1e-5


def test_prefix_entry_reuse_depth_zero_and_L_limits(model):
    """b = L with a prefix-alone entry is the naive prefix cache; b = 0 with the prefix
    tokens' embeddings is the full forward of [prefix | own]."""
    cfg, params = model
    p, t = 5, 4
    tokens = jax.random.randint(jax.random.key(5), (1, p + t), 0, cfg.vocab_size)
    entry = encode_prefix(params, cfg, tokens[:, :p], jnp.array([p]))
    prefix0 = PrefixKV(entry.k, entry.v, None, None, None, entry.hidden[0], jnp.array([p]))
    full_logits = forward(params, cfg, tokens)
    got = forward(params, cfg, tokens[:, p:], prefix=prefix0, reuse_depth=0)
    assert rel_err(got, full_logits[:, p:]) <= 1e-5
    naive = forward(params, cfg, tokens[:, p:],
                    prefix=PrefixKV(entry.k, entry.v, None, None, None, None, jnp.array([p])))
    assert np.all(np.isfinite(naive))
    # Stale prefix KV visibly changes the result (well above float32 noise of ~1e-7).
    assert rel_err(naive, full_logits[:, p:]) > 1e-5


def test_reuse_depth_out_of_range_is_an_error(model):
    cfg, params = model
    tokens = jnp.zeros((1, 3), jnp.int32) + 1
    entry = encode_prefix(params, cfg, tokens, jnp.array([3]))
    prefix = PrefixKV(entry.k, entry.v, None, None, None, entry.hidden[0], jnp.array([3]))
    with pytest.raises(ValueError, match="reuse_depth"):
        forward(params, cfg, tokens, prefix=prefix, reuse_depth=cfg.n_layers + 1)
