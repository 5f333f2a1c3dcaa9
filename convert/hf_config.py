"""Hugging Face `config.json` -> `ModelConfig`, for LLaDA (`model_type "llada"`) and Dream
(`model_type "Dream"`).

Field names follow the public remote-code configs (GSAI-ML/LLaDA-8B-Instruct
`configuration_llada.py`, Dream-org/Dream-v0-Instruct-7B `configuration_dream.py`). A field
missing from `config.json` takes the default of that HF config class, because that is what
the HF model would be built with; every option our model does not implement is refused
with an error naming the file and the field.

LLaDA's `embedding_size` (rows of `wte` and of the output head `ff_out`) may exceed
`vocab_size` (padding to a multiple of 128). The HF model embeds and scores all
`embedding_size` rows, so our `vocab_size` is `embedding_size`: the logits have the padded
width, exactly as HF's. Padding rows are never produced by the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ModelConfig

CONFIG_FILE = "config.json"

# Defaults of LLaDA's remote-code `ModelConfig` dataclass for the fields we read.
_LLADA_DEFAULTS: dict[str, Any] = {
    "n_kv_heads": None, "mlp_ratio": 4, "mlp_hidden_size": None, "activation_type": "swiglu",
    "block_type": "sequential", "block_group_size": 1, "alibi": False, "rope": False,
    "multi_query_attention": None, "attention_layer_norm": False, "input_emb_norm": False,
    "layer_norm_type": "default", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
    "max_sequence_length": 1024, "rope_theta": 10000.0, "include_qkv_bias": False,
    "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False,
    "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True,
    "mask_token_id": 50256,
}

# Defaults of Dream's `DreamConfig.__init__` for the fields we read.
_DREAM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "use_sliding_window": False, "mask_token_id": 151666,
}


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """Read `folder/config.json` as a dict; errors name the file."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in this folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def layout_of(hf: dict[str, Any], source: str = CONFIG_FILE) -> str:
    """Our layout name (`"llada"` or `"dream"`) for an HF config dict's `model_type`."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{source}: no 'model_type' string (supported: 'llada', 'Dream')")
    layout = {"llada": "llada", "dream": "dream"}.get(model_type.lower())
    if layout is None:
        raise ValueError(
            f"{source}: unknown model_type {model_type!r} (supported: 'llada', 'Dream')")
    return layout


def hf_to_model_config(hf: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """Translate an HF config dict to our `ModelConfig`.

    `source` names the file in error messages. Raises `ValueError` on an unknown
    `model_type`, a missing or malformed field, or an option our model does not implement.
    """
    layout = layout_of(hf, source)
    if layout == "llada":
        return _llada(hf, source)
    return _dream(hf, source)


def load_model_config(folder: str | Path) -> ModelConfig:
    """`ModelConfig` of an HF checkpoint folder (reads `folder/config.json`)."""
    path = Path(folder) / CONFIG_FILE
    return hf_to_model_config(read_hf_config(folder), source=str(path))


# ----------------------------------------------------------------------------- helpers


class _Fields:
    """Typed access to an HF config dict with per-layout defaults and named errors."""

    def __init__(self, hf: dict[str, Any], defaults: dict[str, Any], source: str):
        self.hf, self.defaults, self.source = hf, defaults, source

    def get(self, name: str) -> Any:
        if name in self.hf:
            return self.hf[name]
        if name in self.defaults:
            return self.defaults[name]
        raise ValueError(f"{self.source}: required field {name!r} is missing")

    def pos_int(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{self.source}: {name} must be a positive integer, got {value!r}")
        return value

    def pos_float(self, name: str) -> float:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{self.source}: {name} must be a positive number, got {value!r}")
        return float(value)

    def require(self, name: str, ok: bool, wanted: str) -> None:
        if not ok:
            raise ValueError(
                f"{self.source}: unsupported {name}={self.get(name)!r} (bicache_jax supports "
                f"{wanted} only)")


def _heads(f: _Fields, d_model: int, n_heads: int, n_kv_heads: int) -> int:
    if d_model % n_heads:
        raise ValueError(
            f"{f.source}: hidden size {d_model} is not a multiple of the {n_heads} heads")
    if n_heads % n_kv_heads:
        raise ValueError(
            f"{f.source}: {n_heads} attention heads are not a multiple of the {n_kv_heads} "
            "key/value heads")
    return d_model // n_heads


def _mask_token(f: _Fields, vocab: int) -> int:
    value = f.get("mask_token_id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(
            f"{f.source}: mask_token_id must be a token id below {vocab}, got {value!r}")
    return value


def _build(source: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _llada(hf: dict[str, Any], source: str) -> ModelConfig:
    f = _Fields(hf, _LLADA_DEFAULTS, source)
    f.require("block_type", f.get("block_type") == "llama", "'llama' (separate q/k/v/up)")
    f.require("activation_type", f.get("activation_type") == "silu",
              "'silu' (SwiGLU with a separate up_proj)")
    f.require("layer_norm_type", f.get("layer_norm_type") == "rms", "'rms'")
    f.require("layer_norm_with_affine", f.get("layer_norm_with_affine") is True, "true")
    f.require("bias_for_layer_norm", not f.get("bias_for_layer_norm"), "false")
    f.require("include_bias", f.get("include_bias") is False, "false")
    f.require("rope", f.get("rope") is True, "true")
    f.require("alibi", f.get("alibi") is False, "false")
    f.require("attention_layer_norm", f.get("attention_layer_norm") is False, "false")
    f.require("input_emb_norm", f.get("input_emb_norm") is False, "false")
    f.require("scale_logits", f.get("scale_logits") is False, "false")
    f.require("weight_tying", f.get("weight_tying") is False, "false (an untied ff_out)")
    f.require("block_group_size", f.get("block_group_size") == 1, "1")
    if hf.get("yarn") or hf.get("rope_scaling"):
        raise ValueError(f"{source}: rope scaling (yarn / rope_scaling) is not supported")

    d_model, n_heads, n_layers = f.pos_int("d_model"), f.pos_int("n_heads"), f.pos_int("n_layers")
    mqa = f.get("multi_query_attention")
    n_kv = f.get("n_kv_heads")
    if n_kv is None:
        n_kv = 1 if mqa is True else n_heads
    elif mqa is not None and n_kv != (1 if mqa else n_heads):
        raise ValueError(f"{source}: n_kv_heads={n_kv} contradicts multi_query_attention={mqa}")
    if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv <= 0:
        raise ValueError(f"{source}: n_kv_heads must be a positive integer, got {n_kv!r}")
    head_dim = _heads(f, d_model, n_heads, n_kv)
    mlp = f.get("mlp_hidden_size")
    mlp_dim = f.pos_int("mlp_hidden_size") if mlp is not None else f.pos_int("mlp_ratio") * d_model

    vocab = f.pos_int("vocab_size")
    emb = f.get("embedding_size")
    if emb is not None:
        emb = f.pos_int("embedding_size")
        if emb < vocab:
            raise ValueError(
                f"{source}: embedding_size {emb} is smaller than vocab_size {vocab}")
        vocab = emb
    return _build(
        source, layout="llada", vocab_size=vocab, d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, mlp_dim=mlp_dim,
        rope_theta=f.pos_float("rope_theta"), norm_eps=f.pos_float("rms_norm_eps"),
        qkv_bias=bool(f.get("include_qkv_bias")), logits_shift=False,
        mask_token_id=_mask_token(f, vocab), max_seq_len=f.pos_int("max_sequence_length"))


def _dream(hf: dict[str, Any], source: str) -> ModelConfig:
    f = _Fields(hf, _DREAM_DEFAULTS, source)
    f.require("hidden_act", f.get("hidden_act") == "silu", "'silu'")
    f.require("tie_word_embeddings", f.get("tie_word_embeddings") is False,
              "false (a separate lm_head)")
    f.require("rope_scaling", f.get("rope_scaling") is None, "null")
    f.require("use_sliding_window", not f.get("use_sliding_window"), "false")

    d_model, n_heads = f.pos_int("hidden_size"), f.pos_int("num_attention_heads")
    # DreamConfig: a missing field takes its default (32), an explicit null means MHA.
    n_kv = n_heads if f.get("num_key_value_heads") is None else f.pos_int("num_key_value_heads")
    # Dream's code derives head_dim = hidden_size // num_attention_heads (it reads no
    # head_dim field) and hard-codes biases on q/k/v, none on o_proj or the MLP, whatever
    # attention_bias / mlp_bias say; a checkpoint with other biases fails the key check.
    head_dim = _heads(f, d_model, n_heads, n_kv)
    vocab = f.pos_int("vocab_size")
    return _build(
        source, layout="dream", vocab_size=vocab, d_model=d_model,
        n_layers=f.pos_int("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, mlp_dim=f.pos_int("intermediate_size"),
        rope_theta=f.pos_float("rope_theta"), norm_eps=f.pos_float("rms_norm_eps"), qkv_bias=True,
        logits_shift=True, mask_token_id=_mask_token(f, vocab),
        max_seq_len=f.pos_int("max_position_embeddings"))
