"""Samplers on hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np

from bicache_jax.sampling import (
    SamplerConfig,
    choose_tokens,
    dream_transfer_count,
    llada_transfer_counts,
    select_capped_threshold,
    select_fastdllm_dream,
    select_positions,
    select_threshold,
    select_top,
)


def test_llada_schedule_puts_remainder_on_earliest_steps():
    counts = llada_transfer_counts(jnp.array([10, 8, 3]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [2, 2, 2, 2], [1, 1, 1, 0]]


def test_dream_schedule_is_linspace_and_finishes():
    # linspace(1, 0.001, 5) = 1, .75025, .5005, .25075, .001
    ts = np.linspace(1, 1e-3, 5)
    masked = jnp.array([8])
    want = [int(8 * (1 - ts[i + 1] / ts[i])) for i in range(3)] + [8]
    got = [int(dream_transfer_count(masked, jnp.int32(i), 4, 1e-3)[0]) for i in range(4)]
    assert got == want == [1, 2, 3, 8]  # int(8 * (1 - .25075 / .5005)) = int(3.99)


def test_low_confidence_picks_most_confident_candidates():
    conf = jnp.array([[0.1, 0.9, 0.5, 0.95, 0.7]])
    cand = jnp.array([[True, True, True, False, True]])  # 0.95 is already decoded
    assert select_top(conf, cand, jnp.array([2])).tolist() == [[False, True, False, False,
                                                                True]]


def test_threshold_rule_keeps_top_one_and_everything_above():
    conf = jnp.array([[0.3, 0.2, 0.1], [0.95, 0.91, 0.2]])
    cand = jnp.ones((2, 3), bool)
    got = select_threshold(conf, cand, 0.9)
    assert got.tolist() == [[True, False, False], [True, True, False]]


def test_capped_threshold_carries_what_a_step_left():
    conf = jnp.array([[0.9, 0.8, 0.7, 0.2]])
    cand = jnp.ones((1, 4), bool)
    start = jnp.array([4])  # 4 masked over 2 steps: cap 2 at step 0
    got = select_capped_threshold(conf, cand, jnp.int32(0), 2, start, 0.75)
    assert got.tolist() == [[True, True, False, False]]  # 0.7 passes but is over the cap
    got = select_capped_threshold(conf, cand, jnp.int32(0), 2, start, 0.85)
    assert got.tolist() == [[True, False, False, False]]
    # Step 1 (the last): cap 2 + the 1 left over = all 3 left; the threshold still rules.
    left = jnp.array([[False, True, True, True]])
    got = select_capped_threshold(conf, left, jnp.int32(1), 2, start, 0.75)
    assert got.tolist() == [[False, True, False, False]]


def test_fastdllm_dream_block_start_takes_the_first_position_only():
    conf = jnp.array([[-3.0, -0.1, -0.2, -2.0]])  # negative entropies: slot 0 least sure
    cand = jnp.ones((1, 4), bool)
    s = SamplerConfig(remasking="entropy")
    start = select_fastdllm_dream(conf, cand, jnp.int32(0), 4, jax.random.key(0), s)
    assert start.tolist() == [[True, False, False, False]]
    # Step 1 of S = 2 is the last: everything left.
    later = select_fastdllm_dream(conf, cand.at[0, 0].set(False), jnp.int32(1), 2,
                                  jax.random.key(0), s)
    assert later.tolist() == [[False, True, True, True]]
    hot = SamplerConfig(remasking="maskgit_plus", threshold=0.9)
    start = select_fastdllm_dream(conf, cand, jnp.int32(0), 1, jax.random.key(0), hot)
    assert start.tolist() == [[True, False, False, False]]  # no step limit: still one


def test_confidence_is_softmax_probability_of_argmax_token():
    logits = jnp.array([[[2.0, 1.0, 0.0]]])
    tok, conf = choose_tokens(logits, jax.random.key(0), SamplerConfig())
    p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    assert int(tok[0, 0]) == 0
    np.testing.assert_allclose(float(conf[0, 0]), p[0], rtol=1e-6)


def test_margin_and_entropy_confidences():
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    _, margin = choose_tokens(logits, jax.random.key(0), SamplerConfig(remasking="topk_margin"))
    _, negent = choose_tokens(logits, jax.random.key(0), SamplerConfig(remasking="entropy"))
    np.testing.assert_allclose(float(margin[0, 0]), 0.2, rtol=1e-5)
    p = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(float(negent[0, 0]), np.sum(p * np.log(p)), rtol=1e-4)


def test_gumbel_sampling_follows_the_softmax_distribution():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))[None, None, :].repeat(20000, axis=1)
    tok, _ = choose_tokens(logits, jax.random.key(3), SamplerConfig(temperature=1.0))
    freq = np.bincount(np.asarray(tok[0]), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))[None, None, :].repeat(4000, axis=1)
    k1, k2 = jax.random.split(jax.random.key(0))
    tok, _ = choose_tokens(logits, k1, SamplerConfig(remasking="maskgit_plus",
                                                     temperature=1.0, top_k=2))
    assert set(np.asarray(tok).ravel()) == {0, 1}
    tok, _ = choose_tokens(logits, k2, SamplerConfig(remasking="maskgit_plus",
                                                     temperature=1.0, top_p=0.8))
    assert set(np.asarray(tok).ravel()) == {0, 1}  # 0.5 + 0.3 reaches 0.8


def test_random_remasking_uses_the_quota():
    cand = jnp.ones((1, 6), bool)
    quota = jnp.array([[2, 2, 2]])
    chosen = select_positions(jnp.zeros((1, 6)), cand, jnp.int32(1), 3, quota,
                              jax.random.key(0), SamplerConfig(remasking="random"))
    assert int(chosen.sum()) == 2


def test_float32_confidence_matches_float64_reference():
    """LLaDA computes softmax confidences in float64; ours are float32. Measured here on
    random logits of LLaDA's scale: the difference stays below 1e-6 (absolute)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4, 32, 1000))
    tok, conf = choose_tokens(jnp.asarray(logits, jnp.float32), jax.random.key(0),
                              SamplerConfig())
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))
    assert np.max(np.abs(np.asarray(conf) - p.max(-1))) < 1e-6
