"""Plain `jnp` reference of the two-source attention the Pallas kernels compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def attention_reference(
    q: Float[Array, "batch q_len heads dim"],
    cached_k: Float[Array, "batch cached_size kv_heads dim"],
    cached_v: Float[Array, "batch cached_size kv_heads dim"],
    cached_len: Int[Array, " batch"],
    fresh_k: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_v: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_len: Int[Array, " batch"],
) -> Float[Array, "batch q_len heads dim"]:
    """Attention of `q` over the valid keys of [cached ; fresh], softmax in float32.

    Key `j` of the cached source is valid iff `j < cached_len[b]`, of the fresh source iff
    `j < fresh_len[b]`. No causal mask. Query head `h` reads KV head `h // (Hq // Hkv)`.
    Scores are `q.k / sqrt(D)`. Invalid positions may hold NaN/inf: they are selected away
    (never multiplied by zero). Rows of a batch element with no valid key return zeros.
    Returns an array of `q`'s shape and dtype.
    """
    b, t, hq, d = q.shape
    hkv = cached_k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    k = jnp.concatenate([cached_k, fresh_k], axis=1)
    v = jnp.concatenate([cached_v, fresh_v], axis=1)
    valid = jnp.concatenate([
        jnp.arange(cached_k.shape[1])[None, :] < cached_len[:, None],
        jnp.arange(fresh_k.shape[1])[None, :] < fresh_len[:, None],
    ], axis=1)  # [B, S + Tf]
    k = jnp.where(valid[:, :, None, None], k, 0).astype(jnp.float32)
    v = jnp.where(valid[:, :, None, None], v, 0).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=hi) * (d ** -0.5)
    scores = jnp.where(valid[:, None, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)  # exp(-inf) = 0 at invalid keys
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v, precision=hi)
    return out.reshape(b, t, hq, d).astype(q.dtype)
