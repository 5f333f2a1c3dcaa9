"""Explicit HF state-dict key -> params-pytree maps, one per layout.

Every entry names the HF tensor, where it lands in our params pytree (a path of dict keys
plus the layer index for the stacked `layers` arrays), whether it is transposed (HF
`nn.Linear` weights are `[out, in]`; ours are `[in, out]` so that `x @ w`) and the HF shape
it must have.

Verified against the public remote code:

* LLaDA (`modeling_llada.py`, `LLaDAModelLM.model = LLaDAModel`, `block_type "llama"`):
  `model.transformer.wte.weight [E, d]`, `model.transformer.blocks.N.{attn_norm, ff_norm}
  .weight [d]`, `...blocks.N.{q_proj [d, d], k_proj, v_proj [Hkv*D, d]}.weight` (+ `.bias`
  with `include_qkv_bias`), `...blocks.N.attn_out.weight [d, d]`, `...blocks.N.ff_proj.weight
  [F, d]` (the SiLU-activated branch), `...blocks.N.up_proj.weight [F, d]`,
  `...blocks.N.ff_out.weight [d, F]`, `model.transformer.ln_f.weight [d]`,
  `model.transformer.ff_out.weight [E, d]` (untied head).
* Dream (`modeling_dream.py`, Qwen2 names, `DreamModel.model = DreamBaseModel`):
  `model.embed_tokens.weight [V, d]`, `model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}`,
  `model.layers.N.self_attn.o_proj.weight` (no bias), `model.layers.N.mlp.{gate,up,down}_proj
  .weight`, `model.layers.N.{input_layernorm, post_attention_layernorm}.weight`,
  `model.norm.weight`, `lm_head.weight [V, d]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import ModelConfig

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it goes.

    hf_key:    the state-dict key.
    path:      path of dict keys into the params pytree, e.g. `("layers", "wq")`.
    layer:     index along the stacked leading layer axis, or None for unstacked params.
    transpose: whether the 2-D HF tensor is transposed on the way in.
    hf_shape:  the shape the HF tensor must have.
    """

    hf_key: str
    path: ParamPath
    layer: int | None
    transpose: bool
    hf_shape: tuple[int, ...]


# Non-persistent buffers some exports still carry; they hold no weights and are skipped.
IGNORED_KEY_PATTERNS: tuple[re.Pattern[str], ...] = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


def is_ignored_key(key: str) -> bool:
    """Whether an HF key is a known weightless buffer (e.g. `rotary_emb.inv_freq`)."""
    return any(p.fullmatch(key) for p in IGNORED_KEY_PATTERNS)


def param_shapes(config: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of every array of the params pytree, by path (layers stacked on axis 0)."""
    c, L = config, config.n_layers
    shapes: dict[ParamPath, tuple[int, ...]] = {
        ("embed",): (c.vocab_size, c.d_model),
        ("layers", "attn_norm"): (L, c.d_model),
        ("layers", "wq"): (L, c.d_model, c.q_dim),
        ("layers", "wk"): (L, c.d_model, c.kv_dim),
        ("layers", "wv"): (L, c.d_model, c.kv_dim),
        ("layers", "wo"): (L, c.q_dim, c.d_model),
        ("layers", "mlp_norm"): (L, c.d_model),
        ("layers", "w_gate"): (L, c.d_model, c.mlp_dim),
        ("layers", "w_up"): (L, c.d_model, c.mlp_dim),
        ("layers", "w_down"): (L, c.mlp_dim, c.d_model),
        ("final_norm",): (c.d_model,),
        ("lm_head",): (c.d_model, c.vocab_size),
    }
    if c.qkv_bias:
        shapes[("layers", "bq")] = (L, c.q_dim)
        shapes[("layers", "bk")] = (L, c.kv_dim)
        shapes[("layers", "bv")] = (L, c.kv_dim)
    return shapes


def flatten_params(tree: Any, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """Leaves of a nested-dict params tree by path."""
    if isinstance(tree, Mapping):  # dicts, and flax's FrozenDict
        out: dict[ParamPath, Any] = {}
        for key, value in tree.items():
            out |= flatten_params(value, (*prefix, str(key)))
        return out
    return {prefix: tree}


def check_params(params: Any, config: ModelConfig, where: str) -> None:
    """Raise `ValueError` unless `params` has exactly the arrays and shapes of `config`."""
    want = param_shapes(config)
    have = flatten_params(params)
    problems = []
    missing = sorted("/".join(p) for p in want if p not in have)
    extra = sorted("/".join(p) for p in have if p not in want)
    if missing:
        problems.append(f"missing arrays {missing}")
    if extra:
        problems.append(f"unexpected arrays {extra}")
    for path, shape in want.items():
        if path in have and _shape(have[path]) != shape:
            problems.append(f"{'/'.join(path)} has shape {list(_shape(have[path]))}, the "
                            f"config wants {list(shape)}")
    if problems:
        raise ValueError(f"{where}: params do not match the config: " + "; ".join(problems))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


# Per-layer entries: (HF name inside the block, our name, transpose).
_LLADA_LAYER = (
    ("attn_norm.weight", "attn_norm", False),
    ("q_proj.weight", "wq", True),
    ("k_proj.weight", "wk", True),
    ("v_proj.weight", "wv", True),
    ("attn_out.weight", "wo", True),
    ("ff_norm.weight", "mlp_norm", False),
    ("ff_proj.weight", "w_gate", True),
    ("up_proj.weight", "w_up", True),
    ("ff_out.weight", "w_down", True),
)
_LLADA_BIAS = (("q_proj.bias", "bq"), ("k_proj.bias", "bk"), ("v_proj.bias", "bv"))

_DREAM_LAYER = (
    ("input_layernorm.weight", "attn_norm", False),
    ("self_attn.q_proj.weight", "wq", True),
    ("self_attn.k_proj.weight", "wk", True),
    ("self_attn.v_proj.weight", "wv", True),
    ("self_attn.o_proj.weight", "wo", True),
    ("post_attention_layernorm.weight", "mlp_norm", False),
    ("mlp.gate_proj.weight", "w_gate", True),
    ("mlp.up_proj.weight", "w_up", True),
    ("mlp.down_proj.weight", "w_down", True),
)
_DREAM_BIAS = (("self_attn.q_proj.bias", "bq"), ("self_attn.k_proj.bias", "bk"),
               ("self_attn.v_proj.bias", "bv"))

_LAYOUTS = {
    # layout: (embed key, final norm key, head key, per-layer prefix, layer table, biases)
    "llada": ("model.transformer.wte.weight", "model.transformer.ln_f.weight",
              "model.transformer.ff_out.weight", "model.transformer.blocks.{}.",
              _LLADA_LAYER, _LLADA_BIAS),
    "dream": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.{}.", _DREAM_LAYER, _DREAM_BIAS),
}


def key_map(config: ModelConfig) -> list[TensorSpec]:
    """Every HF tensor the checkpoint of `config` must hold, in a stable order.

    Unstacked tensors first, then per layer in layer order, so that filling the stacked
    arrays streams through each shard roughly in file order.
    """
    embed, final_norm, head, prefix, layer_table, biases = _LAYOUTS[config.layout]
    shapes = param_shapes(config)

    def hf_shape(path: ParamPath, transpose: bool) -> tuple[int, ...]:
        shape = shapes[path][1:] if path[0] == "layers" else shapes[path]
        return tuple(reversed(shape)) if transpose else tuple(shape)

    specs = [
        TensorSpec(embed, ("embed",), None, False, hf_shape(("embed",), False)),
        TensorSpec(final_norm, ("final_norm",), None, False, hf_shape(("final_norm",), False)),
        TensorSpec(head, ("lm_head",), None, True, hf_shape(("lm_head",), True)),
    ]
    table = list(layer_table)
    if config.qkv_bias:
        table += [(hf, ours, False) for hf, ours in biases]
    for layer in range(config.n_layers):
        for hf_name, ours, transpose in table:
            path = ("layers", ours)
            specs.append(TensorSpec(prefix.format(layer) + hf_name, path, layer, transpose,
                                    hf_shape(path, transpose)))
    return specs
