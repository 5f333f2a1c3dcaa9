"""Pallas kernels for BiCache's two-source attention (cached prefix KV + fresh KV).

`attention` dispatches to the Triton-lowered GPU kernel (`attention_gpu`) or the Mosaic TPU
kernel (`attention_tpu`); `attention_reference` is the plain `jnp` definition they match.
"""

from __future__ import annotations

from typing import Literal

import jax
from jaxtyping import Array, Float, Int

from .attention_gpu import attention_gpu
from .attention_tpu import attention_tpu
from .block_sizes import BlockSizes
from .reference import attention_reference

__all__ = ["BlockSizes", "attention", "attention_gpu", "attention_reference", "attention_tpu"]


def attention(
    q: Float[Array, "batch q_len heads dim"],
    cached_k: Float[Array, "batch cached_size kv_heads dim"],
    cached_v: Float[Array, "batch cached_size kv_heads dim"],
    cached_len: Int[Array, " batch"],
    fresh_k: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_v: Float[Array, "batch fresh_size kv_heads dim"],
    fresh_len: Int[Array, " batch"],
    *,
    backend: Literal["gpu", "tpu"] | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "batch q_len heads dim"]:
    """Attention of `q` over the valid keys of two KV sources, in one online-softmax pass.

    Args:
      q: queries `[B, Tq, Hq, D]`, RoPE applied.
      cached_k, cached_v: `[B, S, Hkv, D]`; key `j` is valid iff `j < cached_len[b]`.
      cached_len: int32 `[B]`.
      fresh_k, fresh_v: `[B, Tf, Hkv, D]`; key `j` is valid iff `j < fresh_len[b]`.
      fresh_len: int32 `[B]`.
      backend: "gpu" (Triton kernel) or "tpu" (Mosaic kernel). `None` picks by
        `jax.default_backend()`; on CPU it runs the GPU kernel in interpret mode.
      interpret: run the kernel in Pallas interpret mode (TPU interpret mode for "tpu").
      block_sizes: tiling; `None` picks `BlockSizes.default` for the shape.

    Returns:
      `[B, Tq, Hq, D]` in `q.dtype`: softmax over the union of valid keys of
      `q.k / sqrt(D)` times v, no causal mask, query head `h` using KV head
      `h // (Hq // Hkv)`, float32 accumulation. Rows with no valid key are zeros. `S` or
      `Tf` may be 0; any sizes are padded internally.
    """
    if backend is None:
        platform = jax.default_backend()
        if platform == "tpu":
            backend = "tpu"
        else:
            backend = "gpu"
            interpret = interpret or platform != "gpu"
    if backend == "gpu":
        impl = attention_gpu
    elif backend == "tpu":
        impl = attention_tpu
    else:
        raise ValueError(f"backend must be None, 'gpu' or 'tpu', got {backend!r}")
    return impl(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len,
                block_sizes=block_sizes, interpret=interpret)
