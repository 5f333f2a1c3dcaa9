"""Pallas (Triton lowering) kernel: one online-softmax pass over cached and fresh KV.

Work split. The `G = Hq // Hkv` query heads sharing a KV head are folded into the row axis,
so a program owns `block_q` rows of `G * Tq` for one (batch, KV head) and reads each K/V
block once for all of them. Each source's KV range is cut into `num_kv_splits` contiguous
chunks ("flash decoding"): grid = (B, Hkv, row blocks, splits). A program walks its cached
chunk then its fresh chunk, block by block, carrying the running max `m`, denominator `l`
and the unnormalised output `acc` in registers; loops stop at the row's valid length, so
blocks past it are never read. With one split the program normalises and writes the output;
with several, each writes `(acc, m, l)` and `_merge_splits` combines them by log-sum-exp.

K/V are read in place from their `[B, S, Hkv, D]` layout (no transpose of the cache): the
kernel's ref is one (batch, KV head) slice with row stride `Hkv * D`. The wrapper only pads
a sequence axis to a multiple of the block when it is not one already.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from .block_sizes import (
    BlockSizes,
    check_attention_args,
    fold_query_heads,
    next_power_of_2,
    pad_axis,
    round_up,
    unfold_query_heads,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _kernel(*refs, num_sources, block_ks, blocks_per_split, scale, precision, split_output):
    n = num_sources
    len_refs = refs[:n]
    q_ref = refs[n]
    kv_refs = refs[n + 1: 3 * n + 1]
    out_refs = refs[3 * n + 1:]
    split = pl.program_id(3)

    q = q_ref[...]
    block_q, head_dim = q.shape
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    denom = jnp.zeros((block_q,), jnp.float32)
    acc = jnp.zeros((block_q, head_dim), jnp.float32)

    for src in range(n):
        k_ref, v_ref = kv_refs[2 * src], kv_refs[2 * src + 1]
        block_k = block_ks[src]
        length = len_refs[src][()]
        first = split * blocks_per_split[src]
        stop = jnp.minimum(first + blocks_per_split[src], pl.cdiv(length, block_k))

        def body(j, carry, k_ref=k_ref, v_ref=v_ref, block_k=block_k, length=length):
            m_prev, l_prev, acc_prev = carry
            start = pl.multiple_of(j * block_k, block_k)
            k = k_ref[pl.ds(start, block_k), :]
            v = v_ref[pl.ds(start, block_k), :]
            valid = start + jnp.arange(block_k, dtype=jnp.int32) < length
            s = lax.dot_general(q, k, _NT, precision=precision,
                                preferred_element_type=jnp.float32) * scale
            # Select, never multiply: keys past `length` may be NaN/inf.
            s = jnp.where(valid[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all-masked rows so far
            alpha = jnp.exp(m_prev - m_use)
            p = jnp.exp(s - m_use[:, None])
            l_new = alpha * l_prev + jnp.sum(p, axis=1)
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0 * NaN would leak
            pv = lax.dot_general(p.astype(v.dtype), v, _NN, precision=precision,
                                 preferred_element_type=jnp.float32)
            return m_new, l_new, acc_prev * alpha[:, None] + pv

        m, denom, acc = lax.fori_loop(first, stop, body, (m, denom, acc))

    if split_output:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = denom
    else:
        (o_ref,) = out_refs
        o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)


def _merge_splits(acc, m, denom):
    """Combine per-split `(acc, m, denom)` ([splits, ...]) by log-sum-exp; empty rows -> 0."""
    m_all = jnp.max(m, axis=0)
    m_all = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.exp(m - m_all[None])  # 0 for splits that saw no valid key (m = -inf)
    l_all = jnp.sum(w * denom, axis=0)
    acc_all = jnp.sum(w[..., None] * acc, axis=0)
    return acc_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def attention_gpu(
    q: Float[Array, "batch q_len heads dim"],
    cached_k: Float[Array, "batch cached_size kv_heads dim"],
    cached_v: Float[Array, "batch cached_size kv_heads dim"],
    cached_len: Int[Array, " batch"],
    fresh_k: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_v: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_len: Int[Array, " batch"],
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "batch q_len heads dim"]:
    """Two-source attention with the Triton-lowered Pallas kernel (see module docstring).

    Semantics are those of `attention_reference`. `interpret=True` runs the kernel with the
    generic Pallas interpreter (any backend, e.g. CPU). `block_sizes=None` picks
    `BlockSizes.default(...)` for this shape.
    """
    b, tq, hq, hkv, d, s_len, f_len = check_attention_args(
        q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)
    dtype = q.dtype
    group = hq // hkv
    sources = [(k, v, ln) for k, v, ln in ((cached_k, cached_v, cached_len),
                                           (fresh_k, fresh_v, fresh_len)) if k.shape[1] > 0]
    if not sources or q.size == 0:
        return jnp.zeros(q.shape, dtype)

    if block_sizes is None:
        block_sizes = BlockSizes.default(
            tq, s_len + f_len, d, "gpu", batch=b, num_q_heads=hq, num_kv_heads=hkv,
            itemsize=jnp.dtype(dtype).itemsize)
    block_sizes.validate("gpu")

    rows = group * tq
    block_q = min(block_sizes.block_q, max(16, next_power_of_2(rows)))
    rows_p = round_up(rows, block_q)
    d_p = max(16, next_power_of_2(d))  # Triton tiles are powers of two
    q_f = pad_axis(pad_axis(fold_query_heads(q, hkv), 2, rows_p), 3, d_p)

    block_ks, nblocks, operands_kv, lens = [], [], [], []
    for k, v, ln in sources:
        size = k.shape[1]
        block_k = min(block_sizes.block_k, max(16, next_power_of_2(size)))
        size_p = round_up(size, block_k)
        k = pad_axis(pad_axis(k.astype(dtype), 1, size_p), 3, d_p)
        v = pad_axis(pad_axis(v.astype(dtype), 1, size_p), 3, d_p)
        block_ks.append(block_k)
        nblocks.append(size_p // block_k)
        operands_kv += [k, v]
        lens.append(jnp.clip(ln.astype(jnp.int32), 0, size))
    splits = max(1, min(block_sizes.num_kv_splits, max(nblocks)))
    blocks_per_split = [math.ceil(nb / splits) for nb in nblocks]

    n_q_blocks = rows_p // block_q
    grid = (b, hkv, n_q_blocks, splits)
    len_spec = pl.BlockSpec((None,), lambda bi, hi, qi, si: (bi,))
    q_spec = pl.BlockSpec((None, None, block_q, d_p), lambda bi, hi, qi, si: (bi, hi, qi, 0))
    kv_specs = [pl.BlockSpec((None, x.shape[1], None, d_p), lambda bi, hi, qi, si: (bi, 0, hi, 0))
                for x in operands_kv]
    split_output = splits > 1
    if split_output:
        out_shape = (jax.ShapeDtypeStruct((splits, b, hkv, rows_p, d_p), jnp.float32),
                     jax.ShapeDtypeStruct((splits, b, hkv, rows_p), jnp.float32),
                     jax.ShapeDtypeStruct((splits, b, hkv, rows_p), jnp.float32))
        out_specs = (
            pl.BlockSpec((None, None, None, block_q, d_p),
                         lambda bi, hi, qi, si: (si, bi, hi, qi, 0)),
            pl.BlockSpec((None, None, None, block_q), lambda bi, hi, qi, si: (si, bi, hi, qi)),
            pl.BlockSpec((None, None, None, block_q), lambda bi, hi, qi, si: (si, bi, hi, qi)),
        )
    else:
        out_shape = jax.ShapeDtypeStruct((b, hkv, rows_p, d_p), dtype)
        out_specs = q_spec

    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, num_sources=len(sources), block_ks=tuple(block_ks),
        blocks_per_split=tuple(blocks_per_split), scale=1.0 / math.sqrt(d),
        precision=precision, split_output=split_output)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[len_spec] * len(sources) + [q_spec] + kv_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="bicache_attention_gpu",
    )(*lens, q_f, *operands_kv)
    if split_output:
        out = _merge_splits(*out)
    return unfold_query_heads(out, tq, group, d).astype(dtype)
