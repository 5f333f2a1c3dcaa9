"""generate() refuses misuse with one-line errors naming the argument, and never falls back
silently (store policies without a prefix, settings a policy does not use, the store)."""

import jax
import numpy as np
import pytest

from bicache_jax import POLICIES, PrefixStore, Prompt, generate, init_params
from bicache_jax import config as C

CFG = C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference")
GEN = dict(gen_length=8, steps=4, block_length=8)
STORE_POLICIES = sorted(n for n, p in POLICIES.items() if p.uses_store)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _prompts():
    shared = tuple(range(1, 22))
    return [Prompt(prompt=(30, 31, 32, 33, 34), prefix=shared),
            Prompt(prompt=(35, 36, 37), prefix=shared[:13]),
            Prompt(prompt=(40, 41, 42, 43, 44, 45, 46))]


def _error(params, exc=ValueError, prompts=None, cache=None, **kw):
    with pytest.raises(exc) as info:
        generate(params, _prompts() if prompts is None else prompts, cache,
                 config=kw.pop("config", CFG), **{**GEN, **kw})
    message = str(info.value)
    assert "\n" not in message, message  # one line
    return message


@pytest.mark.parametrize("policy", STORE_POLICIES)
def test_store_policy_without_any_prefix_raises(params, policy):
    plain = [[1, 2, 3], Prompt(prompt=(4, 5))]
    msg = _error(params, prompts=plain, policy=policy,
                 reuse_depth=1 if POLICIES[policy].takes_reuse_depth else None)
    assert "Prompt(prefix=" in msg and repr(policy) in msg


def test_request_without_prefix_reports_depth_0_and_keeps_the_batch_depth(params):
    # Ratios (canvas counted): 21/34 = 62% and 13/24 = 54% map to b = 2; the request with
    # no prefix (ratio 0 -> b = 0) runs uncached and must not pull the batch down to 0.
    store = PrefixStore(depth_table={0: 0, 10: 2})
    out = generate(params, _prompts(), store, config=CFG, policy="bicache", **GEN)
    np.testing.assert_array_equal(out.stats["reuse_depth"], [2, 2, 0])
    assert out.stats["batch_reuse_depth"] == 2
    naive = generate(params, _prompts(), None, config=CFG, policy="naive_prefix", **GEN)
    np.testing.assert_array_equal(naive.stats["reuse_depth"], [CFG.n_layers] * 2 + [0])


@pytest.mark.parametrize("policy", sorted(n for n, p in POLICIES.items()
                                          if not p.takes_reuse_depth))
def test_reuse_depth_for_a_policy_without_one_raises(params, policy):
    msg = _error(params, policy=policy, reuse_depth=1)
    assert msg.startswith("reuse_depth is a setting of bicache, bicache_dual;")
    assert repr(policy) in msg


@pytest.mark.parametrize("policy", ["none", "naive_prefix", "fastdllm_prefix",
                                    "fastdllm_dual", "dkv_prefill"])
def test_refresh_interval_for_a_policy_without_one_raises(params, policy):
    msg = _error(params, policy=policy, refresh_interval=4)
    assert msg.startswith("refresh_interval is a setting of ") and repr(policy) in msg
    assert "dkv_prefill," not in msg


@pytest.mark.parametrize("policy", ["none", "fastdllm_dual", "dkv_decode"])
def test_policies_without_a_store_return_the_store_passed_in(params, policy):
    store = PrefixStore(depth_table={0: 1})
    out = generate(params, _prompts(), store, config=CFG, policy=policy, **GEN)
    assert out.cache is store
    assert generate(params, _prompts(), None, config=CFG, policy=policy, **GEN).cache is None


def test_float_ids_are_refused_not_truncated(params):
    with pytest.raises(ValueError, match=r"^Prompt.prompt must hold integer token ids"):
        Prompt(prompt=[1.5, 2.7])
    with pytest.raises(ValueError, match=r"^Prompt.prefix must hold integer token ids"):
        Prompt(prompt=[1], prefix=np.array([3.0]))
    msg = _error(params, prompts=[[1, 2], [1.5, 2.7]])
    assert msg.startswith("prompts[1]: Prompt.prompt must hold integer token ids")


@pytest.mark.parametrize("kw,exc,start", [
    (dict(prompts=[1, 2, 3]), ValueError, "prompts must be a list of requests, got a flat"),
    (dict(prompts=Prompt(prompt=(1, 2))), TypeError, "prompts must be a list of requests"),
    (dict(cache={}), TypeError, "cache must be a PrefixStore or None, got dict"),
    (dict(key=0), TypeError, "key must be one PRNG key, e.g. jax.random.key(0), got int"),
    (dict(gen_length=16.0), ValueError, "gen_length must be an integer, got 16.0"),
    (dict(steps=4.0), ValueError, "steps must be an integer"),
    (dict(policy="bicache", reuse_depth=1.0), ValueError, "reuse_depth must be an integer"),
    (dict(config=C.tiny_dream()), ValueError,  # LLaDA params, a Dream config (qkv biases)
     "params: params do not match the config: missing arrays ['layers/bk', 'layers/bq', "
     "'layers/bv']"),
])
def test_bad_arguments_name_themselves(params, kw, exc, start):
    assert _error(params, exc, **kw).startswith(start)
