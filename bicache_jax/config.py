"""Model configuration: one frozen dataclass for both supported layouts, plus presets.

`ModelConfig` is hashable, so it is passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Literal

import numpy as np

Layout = Literal["llada", "dream"]
AttentionImpl = Literal["reference", "xla", "cudnn", "pallas"]
ATTENTION_IMPLS = ("reference", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a bidirectional DLM.

    Both layouts are pre-norm transformers with RMSNorm, rotary embeddings (half-split
    rotation), a SwiGLU MLP and an untied output head. They differ in:

    * `llada`: multi-head attention, no biases; logits at position i predict token i.
    * `dream` (Qwen2): grouped-query attention, biases on q/k/v; logits at position i-1
      predict token i (`logits_shift=True`).
    """

    layout: Layout
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    logits_shift: bool
    mask_token_id: int
    max_seq_len: int
    # None picks per backend: "pallas" on GPU/TPU, "xla" on CPU (see attention.py).
    attention_impl: AttentionImpl | None = None

    def __post_init__(self):
        if self.layout not in ("llada", "dream"):
            raise ValueError(f"layout must be 'llada' or 'dream', got {self.layout!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "mlp_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"(size {self.vocab_size})")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS} or None, "
                f"got {self.attention_impl!r}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def check_ids(self, ids: Sequence[int], where: str) -> None:
        """Raise ValueError naming `where` unless every id is in [0, vocab_size) and none
        is the mask token (what the model can be given as input)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{where}: token ids must be in [0, {self.vocab_size})")
        if np.any(ids == self.mask_token_id):
            raise ValueError(f"{where}: contains the mask token id {self.mask_token_id}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))

    def param_count(self) -> int:
        """Number of parameters (embedding and head included)."""
        d, L = self.d_model, self.n_layers
        per_layer = (d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
                     + 3 * d * self.mlp_dim + 2 * d)
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return L * per_layer + 2 * self.vocab_size * d + d


def llada_8b() -> ModelConfig:
    """LLaDA-8B (Base, Instruct, 1.5)."""
    return ModelConfig(
        layout="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=32, head_dim=128, mlp_dim=12288, rope_theta=500000.0, norm_eps=1e-5,
        qkv_bias=False, logits_shift=False, mask_token_id=126336, max_seq_len=4096)


def dream_7b() -> ModelConfig:
    """Dream-v0-7B (Base, Instruct): the Qwen2.5-7B layout."""
    return ModelConfig(
        layout="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
        n_kv_heads=4, head_dim=128, mlp_dim=18944, rope_theta=1000000.0, norm_eps=1e-6,
        qkv_bias=True, logits_shift=True, mask_token_id=151666, max_seq_len=32768)


def tiny_llada(n_kv_heads: int = 4) -> ModelConfig:
    """A tiny LLaDA-layout model for tests (MHA by default; pass n_kv_heads=2 for GQA)."""
    return ModelConfig(
        layout="llada", vocab_size=64, d_model=32, n_layers=3, n_heads=4,
        n_kv_heads=n_kv_heads, head_dim=8, mlp_dim=48, rope_theta=500000.0, norm_eps=1e-5,
        qkv_bias=False, logits_shift=False, mask_token_id=63, max_seq_len=256)


def tiny_dream() -> ModelConfig:
    """A tiny Dream-layout (Qwen2, GQA, biases, shifted logits) model for tests."""
    return ModelConfig(
        layout="dream", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=8, mlp_dim=48, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
        logits_shift=True, mask_token_id=62, max_seq_len=256)


PRESETS = {
    "llada_8b": llada_8b,
    "dream_7b": dream_7b,
    "tiny_llada": tiny_llada,
    "tiny_dream": tiny_dream,
}


def preset(name: str) -> ModelConfig:
    """Look a preset up by name (`llada_8b`, `dream_7b`, `tiny_llada`, `tiny_dream`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
