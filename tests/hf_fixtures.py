"""Tiny HF-format checkpoint folders (LLaDA and Dream) and an independent numpy forward.

The folders use the real `config.json` field names and state-dict key names of
GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B, random weights (norm weights
far from one) and tiny dimensions. `hf_forward` computes logits in float64 straight from
the HF tensors (`nn.Linear`: `y = x @ W.T + b`), independent of bicache_jax.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

LLADA_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "d_model": 32, "embedding_dropout": 0.0, "embedding_size": 64, "eos_token_id": 58,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
    "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 59, "max_sequence_length": 128,
    "mlp_hidden_size": 48, "mlp_ratio": 4, "model_type": "llada",
    "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 3,
    "pad_token_id": 58, "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True,
    "rope_full_precision": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
    "scale_logits": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": False, "vocab_size": 60, "weight_tying": False,
}

DREAM_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 60, "eos_token_id": 61, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 48, "mask_token_id": 62,
    "max_position_embeddings": 256, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pad_token_id": 61, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False,
    "use_sliding_window": False, "vocab_size": 64,
}


def llada_state(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 LLaDA state dict (real key names, `[out, in]` Linear weights)."""
    rng = np.random.default_rng(seed)
    d, f, e = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv = cfg["n_kv_heads"] * d // cfg["n_heads"]

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    def norm():
        return (1.0 + 0.5 * rng.standard_normal(d)).astype(np.float32)

    t = "model.transformer."
    state = {t + "wte.weight": w(e, d, scale=1.0), t + "ln_f.weight": norm(),
             t + "ff_out.weight": w(e, d)}
    for i in range(cfg["n_layers"]):
        b = f"{t}blocks.{i}."
        state |= {b + "attn_norm.weight": norm(), b + "ff_norm.weight": norm(),
                  b + "q_proj.weight": w(d, d), b + "k_proj.weight": w(kv, d),
                  b + "v_proj.weight": w(kv, d), b + "attn_out.weight": w(d, d),
                  b + "ff_proj.weight": w(f, d), b + "up_proj.weight": w(f, d),
                  b + "ff_out.weight": w(d, f)}
        if cfg.get("include_qkv_bias"):
            state |= {b + "q_proj.bias": w(d, scale=0.3), b + "k_proj.bias": w(kv, scale=0.3),
                      b + "v_proj.bias": w(kv, scale=0.3)}
    return state


def dream_state(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 Dream (Qwen2 names) state dict, with q/k/v biases."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    def norm():
        return (1.0 + 0.5 * rng.standard_normal(d)).astype(np.float32)

    state = {"model.embed_tokens.weight": w(v, d, scale=1.0), "model.norm.weight": norm(),
             "lm_head.weight": w(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        state |= {b + "input_layernorm.weight": norm(),
                  b + "post_attention_layernorm.weight": norm(),
                  b + "self_attn.q_proj.weight": w(d, d), b + "self_attn.q_proj.bias": w(d),
                  b + "self_attn.k_proj.weight": w(kv, d), b + "self_attn.k_proj.bias": w(kv),
                  b + "self_attn.v_proj.weight": w(kv, d), b + "self_attn.v_proj.bias": w(kv),
                  b + "self_attn.o_proj.weight": w(d, d), b + "mlp.gate_proj.weight": w(f, d),
                  b + "mlp.up_proj.weight": w(f, d), b + "mlp.down_proj.weight": w(d, f)}
    return state


def write_folder(folder: Path, cfg: dict, state: dict[str, np.ndarray], *,
                 shards: int = 1, dtype=None) -> Path:
    """Write `config.json` and the weights: `model.safetensors`, or `shards` shard files
    plus `model.safetensors.index.json` when `shards > 1`. `dtype` casts every tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        return folder
    keys = list(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata=meta)
        weight_map |= dict.fromkeys(part, name)
    total = sum(v.nbytes for v in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def llada_folder(folder: Path, *, shards: int = 1, seed: int = 0, dtype=None,
                 **overrides) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """A tiny LLaDA folder; returns (folder, hf config dict, float32 state dict)."""
    cfg = LLADA_CONFIG | overrides
    state = llada_state(cfg, seed)
    return write_folder(folder, cfg, state, shards=shards, dtype=dtype), cfg, state


def dream_folder(folder: Path, *, shards: int = 1, seed: int = 0, dtype=None,
                 **overrides) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """A tiny Dream folder; returns (folder, hf config dict, float32 state dict)."""
    cfg = DREAM_CONFIG | overrides
    state = dream_state(cfg, seed)
    return write_folder(folder, cfg, state, shards=shards, dtype=dtype), cfg, state


BF16 = ml_dtypes.bfloat16


# ----------------------------------------------------------------------------- reference


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, theta):
    # x: [B, H, T, D]; HF: inv_freq = 1 / theta^(arange(0, D, 2) / D), emb = cat(freqs, freqs)
    dim, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    freqs = np.outer(np.arange(t, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return x * np.cos(emb) + _rotate_half(x) * np.sin(emb)


def hf_forward(state: dict[str, np.ndarray], cfg: dict, tokens: np.ndarray) -> np.ndarray:
    """float64 logits [B, T, V] of the HF model on unpadded `tokens` [B, T]."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    if cfg["model_type"] == "llada":
        d, nh, nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
        n_layers, eps, theta = cfg["n_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        t = "model.transformer."
        embed, final_norm, head = s[t + "wte.weight"], s[t + "ln_f.weight"], s[t + "ff_out.weight"]
        names = dict(pre=t + "blocks.{}.", ln1="attn_norm", ln2="ff_norm", q="q_proj",
                     k="k_proj", v="v_proj", o="attn_out", gate="ff_proj", up="up_proj",
                     down="ff_out")
    else:
        d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        n_layers, eps, theta = cfg["num_hidden_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        embed, final_norm, head = (s["model.embed_tokens.weight"], s["model.norm.weight"],
                                   s["lm_head.weight"])
        names = dict(pre="model.layers.{}.", ln1="input_layernorm",
                     ln2="post_attention_layernorm", q="self_attn.q_proj",
                     k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                     gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    hd = d // nh

    def linear(x, name):
        y = x @ s[name + ".weight"].T
        return y + s[name + ".bias"] if name + ".bias" in s else y

    x = embed[np.asarray(tokens)]
    bsz, tlen = x.shape[:2]
    for i in range(n_layers):
        p = names["pre"].format(i)
        h = _rms(x, s[p + names["ln1"] + ".weight"], eps)
        q = linear(h, p + names["q"]).reshape(bsz, tlen, nh, hd).transpose(0, 2, 1, 3)
        k = linear(h, p + names["k"]).reshape(bsz, tlen, nkv, hd).transpose(0, 2, 1, 3)
        v = linear(h, p + names["v"]).reshape(bsz, tlen, nkv, hd).transpose(0, 2, 1, 3)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # bidirectional: no mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + linear(att.transpose(0, 2, 1, 3).reshape(bsz, tlen, d), p + names["o"])
        h = _rms(x, s[p + names["ln2"] + ".weight"], eps)
        gate = linear(h, p + names["gate"])
        x = x + linear(gate / (1.0 + np.exp(-gate)) * linear(h, p + names["up"]),
                       p + names["down"])
    return _rms(x, final_norm, eps) @ head.T
