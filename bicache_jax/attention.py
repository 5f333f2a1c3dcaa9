"""The one attention entry point every layer and every cache policy calls.

Queries of the rows being computed attend, without a causal mask, to two KV sources:

* `cached`: KV read from a cache (the shared prefix, or the prefix KV of the last refresh),
  valid for positions `< cached_len` of each batch row;
* `fresh`: the request's own KV (rows computed this step, possibly written into the
  request's KV buffer beside rows carried from earlier steps), valid for `< fresh_len`.

Softmax runs over the union of valid keys. Rows with no valid key return zeros. RoPE has
already been applied to q and k. Implementations: the plain `jnp` reference
(`pallas_kernels/reference.py`, the definition the kernels are tested against), XLA's and
cuDNN's `jax.nn.dot_product_attention`, and the Pallas kernels in `pallas_kernels/`.

The xla/cudnn paths assume finite values at padded key positions (our KV buffers are
zero-initialised and padding rows are computed from real embeddings); the reference and
the Pallas kernels also tolerate NaN there.
"""

from __future__ import annotations

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


def _key_valid(cached_size, cached_len, fresh_size, fresh_len):
    return jnp.concatenate([
        jnp.arange(cached_size)[None, :] < cached_len[:, None],
        jnp.arange(fresh_size)[None, :] < fresh_len[:, None],
    ], axis=1)


def _attention_xla(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len, impl):
    k = jnp.concatenate([cached_k, fresh_k], axis=1)
    v = jnp.concatenate([cached_v, fresh_v], axis=1)
    valid = _key_valid(cached_k.shape[1], cached_len, fresh_k.shape[1], fresh_len)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=valid[:, None, None, :], implementation=impl)
    # dot_product_attention gives a uniform average where every key is masked; we want 0.
    any_valid = jnp.any(valid, axis=1)[:, None, None, None]
    return jnp.where(any_valid, out, 0).astype(q.dtype)


def attention(
    q: Float[Array, "batch q_len heads dim"],
    cached_k: Float[Array, "batch cached_len kv_heads dim"],
    cached_v: Float[Array, "batch cached_len kv_heads dim"],
    cached_len: Int[Array, " batch"],
    fresh_k: Float[Array, "batch fresh_len kv_heads dim"],
    fresh_v: Float[Array, "batch fresh_len kv_heads dim"],
    fresh_len: Int[Array, " batch"],
    impl: str | None = None,
) -> Float[Array, "batch q_len heads dim"]:
    """Bidirectional attention of `q` over [cached KV ; fresh KV] (see module docstring)."""
    impl = impl or default_impl()
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    args = (q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)
    if impl == "reference":
        return attention_reference(*args)
    if impl in ("xla", "cudnn"):
        return _attention_xla(*args, impl=impl)
    mesh = current_mesh()  # set by sharding.generate_sharded (jax.set_mesh)
    if mesh is not None:  # GSPMD cannot split a Pallas call: shard_map it (batch, heads)
        return pallas_attention_sharded(mesh, *args)
    return pallas_attention(*args, interpret=jax.default_backend() == "cpu")
