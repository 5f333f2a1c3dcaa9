"""The one attention entry point every layer and every cache policy calls.

Queries of the rows being computed attend, without a causal mask, to two KV sources:

* `cached`: KV read from a cache (the shared prefix, or the prefix KV of the last refresh),
  valid for positions `< cached_len` of each batch row;
* `fresh`: the request's own KV (rows computed this step, possibly written into the
  request's KV buffer beside rows carried from earlier steps), valid for `< fresh_len`.

Softmax runs over the union of valid keys. Rows with no valid key return zeros. RoPE has
already been applied to q and k. The cached source may be shared by several batch rows
(`cached_index`: one entry per distinct prefix, read by every request that has it).
Implementations: the plain `jnp` reference
(`pallas_kernels/reference.py`, the definition the kernels are tested against), XLA's and
cuDNN's `jax.nn.dot_product_attention`, and the Pallas kernels in `pallas_kernels/`.

The xla path scores each source separately and concatenates neither K/V nor scores (a copy
of every key, or of every score, per layer and step otherwise): the softmax merges the
sources' row maxima and sums. With a single shared entry it reads that entry once for the
whole batch. The xla/cudnn paths assume finite values at padded key
positions (our KV buffers are zero-initialised and padding rows are computed from real
embeddings); the reference and the Pallas kernels also tolerate NaN there. The reference,
cudnn and Pallas paths gather a shared source per batch row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .config import ATTENTION_IMPLS
from .mesh import current_mesh, pallas_attention_sharded
from .pallas_kernels import attention as pallas_attention
from .pallas_kernels import attention_reference


def default_impl() -> str:
    """`pallas` on GPU and TPU, `xla` on CPU."""
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def _valid(size, length):
    """[B, size]: key positions below each row's valid length."""
    return jnp.arange(size)[None, :] < length[:, None]


def _key_valid(cached_size, cached_len, fresh_size, fresh_len):
    return jnp.concatenate([_valid(cached_size, cached_len), _valid(fresh_size, fresh_len)],
                           axis=1)


def _attention_xla(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len,
                   cached_index):
    b, t, hq, d = q.shape
    hkv = fresh_k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    f32 = jnp.float32
    shared = cached_index is not None and cached_k.shape[0] == 1
    if cached_index is not None and not shared:
        cached_k, cached_v = (jnp.take(a, cached_index, axis=0) for a in (cached_k, cached_v))
    c_spec = "skd" if shared else "bskd"
    ck, cv = (cached_k[0], cached_v[0]) if shared else (cached_k, cached_v)
    # (einsum spec, K, V, valid keys) per source; an empty cache (a plain full forward) is
    # left out. The softmax merges the sources' maxima and sums: no concatenated scores.
    sources = [("bskd", fresh_k, fresh_v, _valid(fresh_k.shape[1], fresh_len))]
    if cached_k.shape[1]:
        sources.insert(0, (c_spec, ck, cv, _valid(cached_k.shape[1], cached_len)))
    scores = [jnp.where(valid[:, None, None, None, :],
                        jnp.einsum(f"btkgd,{spec}->bkgts", qg, k, preferred_element_type=f32)
                        * d ** -0.5, -jnp.inf)
              for spec, k, _, valid in sources]
    row_max = functools.reduce(jnp.maximum, [
        jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf) for s in scores])
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exps = [jnp.exp(s - row_max) for s in scores]
    denom = functools.reduce(jnp.add, [jnp.sum(e, axis=-1, keepdims=True) for e in exps])
    denom = jnp.where(denom > 0, denom, 1.0)  # rows with no valid key: zeros
    out = functools.reduce(jnp.add, [
        jnp.einsum(f"bkgts,{spec}->btkgd", (e / denom).astype(v.dtype), v,
                   preferred_element_type=f32)
        for e, (spec, _, v, _) in zip(exps, sources, strict=True)])
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _attention_cudnn(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len):
    k = jnp.concatenate([cached_k, fresh_k], axis=1)
    v = jnp.concatenate([cached_v, fresh_v], axis=1)
    valid = _key_valid(cached_k.shape[1], cached_len, fresh_k.shape[1], fresh_len)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=valid[:, None, None, :], implementation="cudnn")
    # dot_product_attention gives a uniform average where every key is masked; we want 0.
    any_valid = jnp.any(valid, axis=1)[:, None, None, None]
    return jnp.where(any_valid, out, 0).astype(q.dtype)


def attention(
    q: Float[Array, "batch q_len heads dim"],
    cached_k: Float[Array, "batch_or_distinct cached_len kv_heads dim"],
    cached_v: Float[Array, "batch_or_distinct cached_len kv_heads dim"],
    cached_len: Int[Array, " batch"],
    fresh_k: Float[Array, "batch fresh_len kv_heads dim"],
    fresh_v: Float[Array, "batch fresh_len kv_heads dim"],
    fresh_len: Int[Array, " batch"],
    impl: str | None = None,
    cached_index: Int[Array, " batch"] | None = None,
) -> Float[Array, "batch q_len heads dim"]:
    """Bidirectional attention of `q` over [cached KV ; fresh KV] (see module docstring).

    With `cached_index` [B], `cached_k`/`cached_v` are [S, Tc, Hkv, D] (S distinct entries)
    and batch row b reads entry `cached_index[b]`; otherwise they are [B, Tc, Hkv, D]."""
    impl = impl or default_impl()
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "xla":
        return _attention_xla(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len,
                              cached_index)
    if cached_index is not None:
        cached_k, cached_v = (jnp.take(a, cached_index, axis=0) for a in (cached_k, cached_v))
    args = (q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)
    if impl == "reference":
        return attention_reference(*args)
    if impl == "cudnn":
        return _attention_cudnn(*args)
    mesh = current_mesh()  # set by sharding.generate_sharded (jax.set_mesh)
    if mesh is not None:  # GSPMD cannot split a Pallas call: shard_map it (batch, heads)
        return pallas_attention_sharded(mesh, *args)
    return pallas_attention(*args, interpret=jax.default_backend() == "cpu")
