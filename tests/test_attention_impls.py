"""The model with every attention implementation gives the reference's tokens."""

import numpy as np
import pytest
from numpy_reference import sharp_params

from bicache_jax import Prompt, generate
from bicache_jax import config as C


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("policy", ["none", "bicache_dual"])
def test_generate_with_impl_matches_reference(impl, policy):
    base = C.tiny_llada(n_kv_heads=2)
    params = sharp_params(base, seed=4)
    rng = np.random.default_rng(0)
    prefix = tuple(rng.integers(0, 60, 11).tolist())
    prompts = [Prompt(prompt=tuple(rng.integers(0, 60, n).tolist()), prefix=prefix)
               for n in (3, 6)]
    out = {}
    for name in ("reference", impl):
        cfg = base.replace(attention_impl=name)
        out[name] = generate(params, prompts, None, config=cfg, gen_length=8, steps=4,
                             block_length=4, policy=policy,
                             reuse_depth=1 if policy == "bicache_dual" else None).tokens
    assert len({tuple(t) for t in out["reference"]}) > 1
    np.testing.assert_array_equal(out[impl], out["reference"])
