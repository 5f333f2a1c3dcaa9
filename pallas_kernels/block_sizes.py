"""Tiling parameters of the Pallas attention kernels and their per-shape defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

Backend = Literal["gpu", "tpu"]

# Programs we want in flight on a GPU before splitting the KV range further: about two waves
# on an H100 (132 SMs). More splits than that only add merge traffic.
_GPU_TARGET_PROGRAMS = 256
# A split should cover at least this many KV blocks, or its fixed cost (loading q, writing
# the partial result) dominates.
_GPU_MIN_BLOCKS_PER_SPLIT = 4
_GPU_MAX_SPLITS = 32


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= `x` (1 for `x <= 1`)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def round_up(x: int, m: int) -> int:
    """Smallest multiple of `m` that is >= `x`."""
    return -(-int(x) // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """How the attention kernels tile their work.

    Attributes:
      block_q: query rows per program. The kernels fold the `Hq // Hkv` query heads that share
        a KV head into the row axis, so rows = `(Hq // Hkv) * Tq`. GPU: a power of two >= 16.
        TPU: a multiple of 8 (of 16 for bfloat16 is best).
      block_k: keys per inner step (an upper bound: a short source uses a smaller block).
        GPU: a power of two >= 16. TPU: a multiple of 128 is best, a multiple of 8 is required.
      num_kv_splits: GPU only: number of chunks the KV range of each source is split into,
        processed by parallel programs whose partial results are merged by log-sum-exp
        ("flash decoding"). Ignored by the TPU kernel (it walks the KV range sequentially).
      num_warps: GPU only: Triton warps per program.
      num_stages: GPU only: Triton software pipelining stages.
    """

    block_q: int
    block_k: int
    num_kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "num_kv_splits", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    def validate(self, backend: Backend) -> None:
        """Raise `ValueError` if these sizes cannot tile a kernel for `backend`."""
        if backend == "gpu":
            for name in ("block_q", "block_k"):
                value = getattr(self, name)
                if value < 16 or value != next_power_of_2(value):
                    raise ValueError(
                        f"GPU (Triton) BlockSizes.{name} must be a power of two >= 16, "
                        f"got {value}")
        elif backend == "tpu":
            for name in ("block_q", "block_k"):
                value = getattr(self, name)
                if value % 8:
                    raise ValueError(
                        f"TPU BlockSizes.{name} must be a multiple of 8, got {value}")
        else:
            raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")

    @staticmethod
    def default(
        q_len: int,
        kv_len: int,
        head_dim: int,
        backend: Backend,
        *,
        batch: int = 1,
        num_q_heads: int = 1,
        num_kv_heads: int | None = None,
        itemsize: int = 2,
    ) -> BlockSizes:
        """Sensible sizes for one call shape.

        Args:
          q_len: query positions `Tq`.
          kv_len: keys of both sources together, `S + Tf` (capacity, not valid length).
          head_dim: `D`.
          backend: "gpu" or "tpu".
          batch, num_q_heads, num_kv_heads: the rest of the shape; the GPU split count
            depends on how many programs the grid already has.
          itemsize: bytes per element of q/k/v (2 for bfloat16, 4 for float32).
        """
        num_kv_heads = num_kv_heads or num_q_heads
        rows = max(1, (num_q_heads // num_kv_heads) * q_len)
        kv_len = max(1, kv_len)
        if backend == "gpu":
            block_q = min(64, max(16, next_power_of_2(rows)))
            block_k = 64 if head_dim > 64 else 128
            if itemsize > 2 and head_dim > 64:
                block_k = 32  # float32 tiles take twice the registers / shared memory
            block_k = min(block_k, max(16, next_power_of_2(kv_len)))
            num_warps = 8 if block_q * head_dim >= 128 * 128 else 4
            programs = batch * num_kv_heads * math.ceil(rows / block_q)
            kv_blocks = math.ceil(kv_len / block_k)
            splits = math.ceil(_GPU_TARGET_PROGRAMS / programs)
            splits = max(1, min(splits, kv_blocks // _GPU_MIN_BLOCKS_PER_SPLIT, _GPU_MAX_SPLITS))
            return BlockSizes(block_q=block_q, block_k=block_k, num_kv_splits=splits,
                              num_warps=num_warps, num_stages=2)
        if backend == "tpu":
            sublane = 16 if itemsize == 2 else 8
            block_q = min(256, round_up(rows, sublane))
            block_k = min(512, round_up(kv_len, 128))
            return BlockSizes(block_q=block_q, block_k=block_k)
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")


# ----------------------------------------------------------------------------------------
# Layout helpers shared by the kernels' wrappers.


def pad_axis(x, axis: int, size: int):
    """Zero-pad `x` along `axis` up to `size` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def fold_query_heads(q, num_kv_heads: int):
    """[B, Tq, Hq, D] -> [B, Hkv, G * Tq, D], G = Hq // Hkv (row r = g * Tq + t)."""
    b, t, hq, d = q.shape
    g = hq // num_kv_heads
    q = q.reshape(b, t, num_kv_heads, g, d).transpose(0, 2, 3, 1, 4)
    return q.reshape(b, num_kv_heads, g * t, d)


def unfold_query_heads(o, q_len: int, group: int, head_dim: int):
    """Inverse of `fold_query_heads`: [B, Hkv, >= G*Tq, >= D] -> [B, Tq, Hkv*G, D].

    Padded rows and padded head-dim columns are dropped first.
    """
    b, hkv = o.shape[:2]
    o = o[:, :, : group * q_len, :head_dim]
    o = o.reshape(b, hkv, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return o.reshape(b, q_len, hkv * group, head_dim)


def check_attention_args(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len):
    """Validate the shapes of the attention arguments; return (B, Tq, Hq, Hkv, D, S, Tf)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Tq, Hq, D], got shape {q.shape}")
    b, tq, hq, d = q.shape
    for name, x in (("cached_k", cached_k), ("cached_v", cached_v),
                    ("fresh_k", fresh_k), ("fresh_v", fresh_v)):
        if x.ndim != 4 or x.shape[0] != b or x.shape[3] != d:
            raise ValueError(f"{name} must be [B={b}, T, Hkv, D={d}], got shape {x.shape}")
    if cached_k.shape != cached_v.shape or fresh_k.shape != fresh_v.shape:
        raise ValueError("k and v of a source must have the same shape, got "
                         f"{cached_k.shape}/{cached_v.shape} and {fresh_k.shape}/{fresh_v.shape}")
    hkv = cached_k.shape[2]
    if fresh_k.shape[2] != hkv:
        raise ValueError(f"cached and fresh KV heads differ: {hkv} vs {fresh_k.shape[2]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    for name, x in (("cached_len", cached_len), ("fresh_len", fresh_len)):
        if x.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},), got {x.shape}")
    return b, tq, hq, hkv, d, cached_k.shape[1], fresh_k.shape[1]
