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

The xla path computes the scores of each source separately and never concatenates K/V (a
copy of every key per layer and step otherwise); with a single shared entry it reads that
entry once for the whole batch. The xla/cudnn paths assume finite values at padded key
positions (our KV buffers are zero-initialised and padding rows are computed from real
embeddings); the reference and the Pallas kernels also tolerate NaN there. The reference,
cudnn and Pallas paths gather a shared source per batch row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .config import ATTENTION_IMPLS
from .pallas_kernels import attention as pallas_attention
from .pallas_kernels import attention_reference


def default_impl() -> str:
    """`pallas` on GPU and TPU, `xla` on CPU."""
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def _key_valid(cached_size, cached_len, fresh_size, fresh_len):
    return jnp.concatenate([
        jnp.arange(cached_size)[None, :] < cached_len[:, None],
        jnp.arange(fresh_size)[None, :] < fresh_len[:, None],
    ], axis=1)


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
    scores = jnp.concatenate([
        jnp.einsum(f"btkgd,{c_spec}->bkgts", qg, ck, preferred_element_type=f32),
        jnp.einsum("btkgd,bskd->bkgts", qg, fresh_k, preferred_element_type=f32),
    ], axis=-1) * (d ** -0.5)
    valid = _key_valid(cached_k.shape[1], cached_len, fresh_k.shape[1], fresh_len)
    scores = jnp.where(valid[:, None, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # rows with no valid key: zeros
    n_c = cached_k.shape[1]
    out = (jnp.einsum(f"bkgts,{c_spec}->btkgd", p[..., :n_c].astype(cv.dtype), cv,
                      preferred_element_type=f32)
           + jnp.einsum("bkgts,bskd->btkgd", p[..., n_c:].astype(fresh_v.dtype), fresh_v,
                        preferred_element_type=f32))
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
    from .sharding import current_mesh, pallas_attention_sharded

    mesh = current_mesh()  # set by sharding.generate_sharded (jax.set_mesh)
    if mesh is not None:  # GSPMD cannot split a Pallas call: shard_map it (batch, heads)
        return pallas_attention_sharded(mesh, *args)
    return pallas_attention(*args, interpret=jax.default_backend() == "cpu")
