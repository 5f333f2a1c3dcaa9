"""Numerics of the Pallas attention kernels (interpret mode on CPU) vs a float64 numpy oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bicache_jax.pallas_kernels import BlockSizes, attention, attention_reference
from bicache_jax.pallas_kernels.attention_gpu import attention_gpu
from bicache_jax.pallas_kernels.attention_tpu import attention_tpu


def numpy_attention(q, ck, cv, cl, fk, fv, fl):
    """float64 oracle: explicit per-(batch, head) softmax over the gathered valid keys."""
    q, ck, cv, fk, fv = (np.asarray(x, np.float64) for x in (q, ck, cv, fk, fv))
    b, t, hq, d = q.shape
    group = hq // ck.shape[2]
    out = np.zeros((b, t, hq, d))
    for bi in range(b):
        for h in range(hq):
            kh = h // group
            k = np.concatenate([ck[bi, : cl[bi], kh], fk[bi, : fl[bi], kh]], axis=0)
            v = np.concatenate([cv[bi, : cl[bi], kh], fv[bi, : fl[bi], kh]], axis=0)
            if k.shape[0] == 0:
                continue
            s = q[bi, :, h] @ k.T / np.sqrt(d)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[bi, :, h] = (p / p.sum(axis=1, keepdims=True)) @ v
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    cached: int
    fresh: int
    cached_len: tuple[int, ...]
    fresh_len: tuple[int, ...]
    dtype: str = "float32"


CASES = [
    # GQA, odd sizes; row 1: fresh empty; row 2: cached empty; row 3: no key at all.
    Case("gqa_d64", 4, 13, 4, 2, 64, 37, 13, (37, 20, 0, 0), (13, 0, 7, 0)),
    # MHA, head dim 128, Tq != Tf.
    Case("mha_d128_tq_ne_tf", 2, 5, 2, 2, 128, 37, 13, (37, 9), (4, 13)),
    Case("gqa_d64_bf16", 3, 13, 4, 2, 64, 37, 13, (37, 1, 0), (13, 13, 0), "bfloat16"),
    Case("mha_d128_bf16", 2, 7, 2, 2, 128, 40, 9, (17, 40), (9, 3), "bfloat16"),
    # Zero-size sources.
    Case("no_cached_source", 2, 6, 4, 2, 64, 0, 11, (0, 0), (11, 3)),
    Case("no_fresh_source", 2, 6, 2, 1, 64, 21, 0, (21, 0), (0, 0)),
    # Several KV blocks per source (and several splits on GPU with the small blocks below).
    Case("multi_block", 2, 9, 4, 1, 64, 300, 40, (300, 170), (40, 0)),
]

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def make_inputs(case: Case, seed: int = 0):
    """Random inputs; every K/V position past its row's length is NaN (must not leak)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    c = case
    q = normal(c.batch, c.q_len, c.heads, c.head_dim)
    ck, cv = (normal(c.batch, c.cached, c.kv_heads, c.head_dim) for _ in range(2))
    fk, fv = (normal(c.batch, c.fresh, c.kv_heads, c.head_dim) for _ in range(2))
    cl = np.asarray(c.cached_len, np.int32)
    fl = np.asarray(c.fresh_len, np.int32)
    dtype = jnp.dtype(c.dtype)
    # Round to the test dtype first so the oracle sees exactly the kernel's inputs.
    q, ck, cv, fk, fv = (np.array(jnp.asarray(x, dtype).astype(jnp.float32))
                         for x in (q, ck, cv, fk, fv))
    for bi in range(c.batch):
        ck[bi, cl[bi]:] = np.nan
        cv[bi, cl[bi]:] = np.nan
        fk[bi, fl[bi]:] = np.nan
        fv[bi, fl[bi]:] = np.inf
    args = tuple(jnp.asarray(x, dtype) for x in (q, ck, cv)) + (jnp.asarray(cl),) + tuple(
        jnp.asarray(x, dtype) for x in (fk, fv)) + (jnp.asarray(fl),)
    return args, numpy_attention(q, ck, cv, cl, fk, fv, fl)


def assert_close(out, expected, dtype: str):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert out.shape == expected.shape
    assert np.all(np.isfinite(out)), "NaN/inf leaked into the output"
    err = np.max(np.abs(out - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]}"


def _impl(name: str, case: Case):
    if name == "reference":
        return attention_reference
    if name == "gpu":
        sizes = BlockSizes(16, 32, num_kv_splits=3) if case.name == "multi_block" else None
        return lambda *a: attention_gpu(*a, interpret=True, block_sizes=sizes)
    if name == "tpu":
        sizes = BlockSizes(16, 128) if case.name == "multi_block" else None
        return lambda *a: attention_tpu(*a, interpret=True, block_sizes=sizes)
    raise ValueError(name)


@pytest.mark.parametrize("impl", ["reference", "gpu", "tpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_numpy_oracle(impl, case):
    args, expected = make_inputs(case)
    out = _impl(impl, case)(*args)
    assert out.dtype == jnp.dtype(case.dtype)
    assert_close(out, expected, case.dtype)
    empty_rows = [b for b in range(case.batch)
                  if case.cached_len[b] == 0 and case.fresh_len[b] == 0]
    for b in empty_rows:
        assert np.all(np.asarray(out[b], np.float32) == 0.0)


def test_both_sources_empty_gives_zeros():
    case = Case("empty", 2, 5, 2, 2, 64, 0, 0, (0, 0), (0, 0))
    args, _ = make_inputs(case)
    for impl in ("reference", "gpu", "tpu"):
        out = _impl(impl, case)(*args)
        assert out.shape == (2, 5, 2, 64)
        assert np.all(np.asarray(out) == 0.0)


def test_gpu_split_counts_agree():
    """Any number of KV splits (1 = no merge) gives the same result."""
    case = CASES[-1]
    args, expected = make_inputs(case, seed=1)
    for splits in (1, 2, 5):
        out = attention_gpu(*args, interpret=True,
                            block_sizes=BlockSizes(16, 16, num_kv_splits=splits))
        assert_close(out, expected, case.dtype)


def test_dispatch_default_backend_on_cpu():
    """`attention(backend=None)` picks the interpreted GPU kernel on CPU (and works jitted)."""
    case = CASES[0]
    args, expected = make_inputs(case, seed=2)
    out = jax.jit(attention)(*args)
    assert_close(out, expected, case.dtype)
    with pytest.raises(ValueError, match="backend"):
        attention(*args, backend="cuda")


def test_block_sizes_defaults_and_validation():
    gpu = BlockSizes.default(32, 512 + 32, 128, "gpu", batch=1, num_q_heads=32)
    for v in (gpu.block_q, gpu.block_k):
        assert v >= 16 and v & (v - 1) == 0
    long_kv = BlockSizes.default(32, 8192 + 32, 128, "gpu", batch=1, num_q_heads=32)
    big_batch = BlockSizes.default(1024, 8192 + 1024, 128, "gpu", batch=32, num_q_heads=32)
    assert long_kv.num_kv_splits > 1  # few programs, long KV: split it
    assert big_batch.num_kv_splits == 1  # grid already large
    tpu = BlockSizes.default(13, 50, 64, "tpu", num_q_heads=4, num_kv_heads=2, itemsize=4)
    assert tpu.block_q % 8 == 0 and tpu.block_k % 128 == 0
    with pytest.raises(ValueError):
        BlockSizes(24, 32).validate("gpu")
    with pytest.raises(ValueError):
        BlockSizes(12, 128).validate("tpu")
    with pytest.raises(ValueError):
        BlockSizes(0, 128)


def test_bad_shapes_raise():
    args, _ = make_inputs(CASES[0])
    q = args[0]
    bad_q = jnp.zeros(q.shape[:2] + (3,) + q.shape[3:], q.dtype)  # 3 heads vs 2 KV heads
    with pytest.raises(ValueError, match="multiple"):
        attention_gpu(bad_q, *args[1:], interpret=True)


LLADA_LIKE = Case("llada_like", 2, 32, 8, 8, 128, 512, 32, (512, 300), (32, 17), "bfloat16")
GQA_F32 = Case("gqa_f32", 2, 13, 8, 2, 64, 1000, 13, (1000, 3), (13, 0))


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a GPU: runs the compiled Triton kernel")
@pytest.mark.parametrize("case", [LLADA_LIKE, GQA_F32], ids=lambda c: c.name)
def test_compiled_gpu_kernel(case):
    args, expected = make_inputs(case)
    assert_close(attention(*args, backend="gpu"), expected, case.dtype)
    assert_close(attention_reference(*args), expected, case.dtype)


@pytest.mark.skipif(jax.default_backend() != "tpu",
                    reason="needs a TPU: runs the compiled Mosaic kernel")
@pytest.mark.parametrize("case", [LLADA_LIKE, GQA_F32], ids=lambda c: c.name)
def test_compiled_tpu_kernel(case):
    args, expected = make_inputs(case)
    assert_close(attention(*args, backend="tpu"), expected, case.dtype)
    assert_close(attention_reference(*args), expected, case.dtype)
