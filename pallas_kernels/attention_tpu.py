"""Pallas Mosaic (TPU) kernel: one online-softmax pass over cached and fresh KV.

Grid = (B, Hkv, row blocks, KV steps). As in the GPU kernel, the `G = Hq // Hkv` query heads
of a KV head are folded into the row axis. The last grid axis ("arbitrary") walks the
cached source's blocks and then the fresh source's blocks; the running max `m`, denominator
`l` and unnormalised output `acc` live in VMEM scratch across it, and the output block is
written once, at the last step.

The per-row lengths come in by scalar prefetch (SMEM). They drive both
* the index maps: a source's block index is clamped to the last block holding a valid key
  (and to its first block while the walk is still in the other source), so steps past the
  valid length repeat the previous block index and the pipeline issues no new DMA;
* `pl.when` guards in the body: those steps do no compute either.

K/V layout: with `D % 128 == 0` the cache is read in place, viewed as `[B, S, Hkv * D]`
(a free reshape) with `(block_k, D)` blocks; otherwise it is transposed to
`[B, Hkv, S, D]` so the block's last two dims are `(block_k, D)` with `D` the full dim,
as TPU tiling requires.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from .block_sizes import (
    BlockSizes,
    check_attention_args,
    fold_query_heads,
    pad_axis,
    round_up,
    unfold_query_heads,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_LANES = 128


def _update(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, start, length, scale, precision):
    """Fold one KV block (rows `start ...` of its source) into the running softmax state."""
    q = q_ref[...]
    k = k_ref[...]
    block_q = q.shape[0]
    block_k, head_dim = k.shape
    s = lax.dot_general(q, k, _NT, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    cols = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = jnp.where(cols < length, s, -jnp.inf)  # select: padded keys may be NaN/inf
    m_prev = m_ref[...]  # [block_q, 128], lanes replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_use)
    p = jnp.exp(s - m_use[:, :1])
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    rows = start + lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)
    v = v_ref[...]
    v = jnp.where(rows < length, v, jnp.zeros_like(v))  # 0 * NaN would leak
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, precision=precision,
                         preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv


def _kernel(*refs, num_sources, offsets, nblocks, block_ks, scale, precision):
    n = num_sources
    len_refs = refs[:n]
    q_ref = refs[n]
    kv_refs = refs[n + 1: 3 * n + 1]
    o_ref, m_ref, l_ref, acc_ref = refs[3 * n + 1:]
    b = pl.program_id(0)
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for src in range(n):
        length = len_refs[src][b]
        local = step - offsets[src]
        start = local * block_ks[src]
        active = (local >= 0) & (local < nblocks[src]) & (start < length)

        @pl.when(active)
        def _compute(src=src, start=start, length=length):
            _update(q_ref, kv_refs[2 * src], kv_refs[2 * src + 1], m_ref, l_ref, acc_ref,
                    start=start, length=length, scale=scale, precision=precision)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        denom = l_ref[...][:, :1]
        o_ref[...] = (acc_ref[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def _kv_block_index(src, offset, block_k, flat):
    """Index map of one source's K/V: clamp the step into [0, last valid block]."""

    def index_map(bi, hi, qi, step, *len_refs):
        del qi
        length = len_refs[src][bi]
        # lax.div truncates (== floor here, length >= 0) and lowers without sign fix-ups.
        last = jnp.maximum(lax.div(length + (block_k - 1), block_k) - 1, 0)
        blk = jnp.minimum(jnp.maximum(step - offset, 0), last)
        return (bi, blk, hi) if flat else (bi, hi, blk, 0)

    return index_map


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def attention_tpu(
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
    """Two-source attention with the Mosaic TPU Pallas kernel (see module docstring).

    Semantics are those of `attention_reference`. `interpret=True` runs the kernel in Pallas
    TPU interpret mode (`pltpu.InterpretParams()`: works on CPU, raises on out-of-bounds
    reads, fills scratch with NaN). `block_sizes.num_kv_splits` is ignored.
    """
    b, tq, hq, hkv, d, s_len, f_len = check_attention_args(
        q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)
    dtype = q.dtype
    group = hq // hkv
    sources = [(k, v, ln) for k, v, ln in ((cached_k, cached_v, cached_len),
                                           (fresh_k, fresh_v, fresh_len)) if k.shape[1] > 0]
    if not sources or q.size == 0:
        return jnp.zeros(q.shape, dtype)

    itemsize = jnp.dtype(dtype).itemsize
    if block_sizes is None:
        block_sizes = BlockSizes.default(
            tq, s_len + f_len, d, "tpu", batch=b, num_q_heads=hq, num_kv_heads=hkv,
            itemsize=itemsize)
    block_sizes.validate("tpu")

    rows = group * tq
    block_q = min(block_sizes.block_q, round_up(rows, 16 if itemsize == 2 else 8))
    rows_p = round_up(rows, block_q)
    q_f = pad_axis(fold_query_heads(q, hkv), 2, rows_p)

    flat = d % _LANES == 0
    block_ks, nblocks, offsets, operands_kv, lens, kv_specs = [], [], [], [], [], []
    for src, (k, v, ln) in enumerate(sources):
        size = k.shape[1]
        block_k = min(block_sizes.block_k, round_up(size, _LANES))
        size_p = round_up(size, block_k)
        offsets.append(sum(nblocks))
        index_map = _kv_block_index(src, offsets[-1], block_k, flat)
        for x in (k, v):
            x = pad_axis(x.astype(dtype), 1, size_p)
            if flat:  # [B, S, Hkv * D]: free view, block (block_k, D) at column block h
                x = x.reshape(b, size_p, hkv * d)
                kv_specs.append(pl.BlockSpec((None, block_k, d), index_map))
            else:  # [B, Hkv, S, D]
                x = x.transpose(0, 2, 1, 3)
                kv_specs.append(pl.BlockSpec((None, None, block_k, d), index_map))
            operands_kv.append(x)
        block_ks.append(block_k)
        nblocks.append(size_p // block_k)
        lens.append(jnp.clip(ln.astype(jnp.int32), 0, size))

    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, qi, step, *_: (bi, hi, qi, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(sources),
        grid=(b, hkv, rows_p // block_q, sum(nblocks)),
        in_specs=[q_spec] + kv_specs,
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((block_q, _LANES), jnp.float32),
                        pltpu.VMEM((block_q, _LANES), jnp.float32),
                        pltpu.VMEM((block_q, d), jnp.float32)],
    )
    kernel = functools.partial(
        _kernel, num_sources=len(sources), offsets=tuple(offsets), nblocks=tuple(nblocks),
        block_ks=tuple(block_ks), scale=1.0 / math.sqrt(d),
        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows_p, d), dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="bicache_attention_tpu",
    )(*lens, q_f, *operands_kv)
    return unfold_query_heads(out, tq, group, d)
