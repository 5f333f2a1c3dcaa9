"""Run the model on a ("data", "model") device mesh: batch on "data", heads and MLP on "model".

Everything goes through JAX's own machinery: a `jax.sharding.Mesh` with `Auto` axes,
`NamedSharding` placements of the params and of the per-call inputs, and jit's sharding
propagation (GSPMD) for the rest of the computation; the Pallas attention kernel, which
GSPMD cannot partition, is wrapped in `jax.shard_map` (`pallas_attention_sharded`).

Param layout (`param_specs`; L is the stacked layer axis, never split):

==============  ==================  ======================================================
param           spec                split when
==============  ==================  ======================================================
wq, bq          columns on "model"  n_heads % model == 0 (whole query heads per device)
wk, wv, bk, bv  columns on "model"  n_kv_heads % model == 0 (else replicated: GQA models
                                    such as Dream-7B with 4 KV heads on 8 devices)
wo              rows on "model"     n_heads % model == 0
w_gate, w_up    columns on "model"  mlp_dim % model == 0
w_down          rows on "model"     mlp_dim % model == 0
embed [V, d]    columns (d_model)   d_model % model == 0: a row lookup stays local to each
                                    device; only the hidden columns are gathered after it
lm_head [d, V]  columns (vocab)     vocab_size % model == 0: vocab-parallel logits; the
                                    sampler's softmax / argmax reduce over "model"
norms           replicated          (tiny)
==============  ==================  ======================================================

Whatever cannot be split evenly is replicated (correct, just not partitioned). Params are
replicated over "data".

Per-call inputs (`shard_inputs`): every batch-major array of `generate`'s denoise loop has
its batch axis on "data" (when the batch is a multiple of the data size; `generate_sharded`
pads the batch to one), the prefix K/V's KV-head axis on "model" like `wk`/`wv`.

`generate_sharded` runs `bicache_jax.generate.generate` on a mesh through its `mesh=`
argument (which calls `shard_inputs`). Outputs are identical to the single-device run up to
floating-point summation order of the sharded contractions.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from .config import ModelConfig
from .generate import GenerateOutput, Prompt
from .policies import get_policy
from .prefix_store import PrefixStore

# The module, not the function `bicache_jax.generate` (the package re-exports the function
# under the module's name).
_gen = importlib.import_module(".generate", __package__)

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

Params = dict


# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data x model` mesh with axes ("data", "model") over the first `data * model`
    devices (default `jax.devices()`), both axes `AxisType.Auto` (GSPMD propagation).

    Raises ValueError when there are fewer devices than `data * model`.
    """
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < data * model:
        raise ValueError(f"a {data}x{model} mesh needs {data * model} devices, only "
                         f"{len(devices)} available (on CPU, set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count=N before importing jax)")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:data * model])


def _check_mesh(mesh: Mesh) -> None:
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"expected a mesh with axes {AXES}, got {tuple(mesh.axis_names)} "
                         f"(use sharding.make_mesh)")


def _axis_if(divisible: bool) -> str | None:
    return MODEL if divisible else None


# ----------------------------------------------------------------------------- params


def param_specs(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """The `PartitionSpec` of every param (same tree as `params`; see the module table).

    Unknown leaves are replicated.
    """
    _check_mesh(mesh)
    m = mesh.shape[MODEL]
    heads = _axis_if(config.n_heads % m == 0)
    kv = _axis_if(config.n_kv_heads % m == 0)
    mlp = _axis_if(config.mlp_dim % m == 0)
    layer_specs = {
        "wq": P(None, None, heads), "bq": P(None, heads),
        "wk": P(None, None, kv), "wv": P(None, None, kv), "bk": P(None, kv), "bv": P(None, kv),
        "wo": P(None, heads, None),
        "w_gate": P(None, None, mlp), "w_up": P(None, None, mlp), "w_down": P(None, mlp, None),
    }
    top_specs = {
        "embed": P(None, _axis_if(config.d_model % m == 0)),
        "lm_head": P(None, _axis_if(config.vocab_size % m == 0)),
    }

    def spec(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = names[-1] if names else None
        if len(names) == 2 and names[0] == "layers":
            return layer_specs.get(name, P())
        return top_specs.get(name, P())

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """`NamedSharding`s of every param on `mesh` (see `param_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, config, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """Place `params` on `mesh`: heads and MLP columns on "model", replicated on "data".

    Returns a new params pytree of globally sharded `jax.Array`s (the input is not
    modified); pass it to `generate` / `generate_sharded` as usual.
    """
    return jax.device_put(params, param_shardings(params, config, mesh))


# ----------------------------------------------------------------------------- inputs


def batch_spec(mesh: Mesh, batch: int, ndim: int, batch_axis: int = 0,
               heads_axis: int | None = None, heads: int | None = None) -> P:
    """Spec of a batch-major array: batch on "data" when `batch % data == 0`, and
    optionally a heads axis on "model" when `heads % model == 0`."""
    spec: list[str | None] = [None] * ndim
    if batch % mesh.shape[DATA] == 0:
        spec[batch_axis] = DATA
    if heads_axis is not None and heads is not None and heads % mesh.shape[MODEL] == 0:
        spec[heads_axis] = MODEL
    return P(*spec)


def shard_inputs(mesh: Mesh, config: ModelConfig, own_tokens: ArrayLike, own_pos: ArrayLike,
                 own_len: ArrayLike, prefix_k: ArrayLike | None = None,
                 prefix_v: ArrayLike | None = None, prefix_index: ArrayLike | None = None,
                 prefix_hidden: ArrayLike | None = None,
                 prefix_len: ArrayLike | None = None) -> tuple[jax.Array | None, ...]:
    """Place the denoise loop's per-call inputs on `mesh` (batch on "data").

    own_tokens, own_pos: [B, R]; own_len, prefix_index, prefix_len: [B] (batch on
    "data"); prefix_k, prefix_v: [b, S, P, Hkv, D], one entry per distinct prefix, read by
    every request that has it: replicated over "data", KV heads on "model" when they
    divide it; prefix_hidden: [S, P, d] replicated. None entries stay None. This is the
    body of generate's `mesh=` hook.
    """
    _check_mesh(mesh)
    batch = int(np.shape(own_tokens)[0])

    def put(x, ndim_spec):
        if x is None:
            return None
        return jax.device_put(x, NamedSharding(mesh, ndim_spec))

    rows = batch_spec(mesh, batch, 2)
    vec = batch_spec(mesh, batch, 1)
    heads = MODEL if config.n_kv_heads % mesh.shape[MODEL] == 0 else None
    kv = P(None, None, None, heads, None)
    return (put(own_tokens, rows), put(own_pos, rows), put(own_len, vec),
            put(prefix_k, kv), put(prefix_v, kv), put(prefix_index, vec),
            put(prefix_hidden, P()), put(prefix_len, vec))


# ----------------------------------------------------------------------------- attention


def current_mesh() -> AbstractMesh | None:
    """The ("data", "model") mesh set with `jax.set_mesh` (an `AbstractMesh` while tracing),
    or None when no such mesh is in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != AXES:
        return None
    return mesh


def pallas_attention_sharded(mesh: Mesh | AbstractMesh, q: jax.Array, cached_k: jax.Array,
                             cached_v: jax.Array, cached_len: jax.Array, fresh_k: jax.Array,
                             fresh_v: jax.Array, fresh_len: jax.Array, *,
                             interpret: bool | None = None) -> jax.Array:
    """The Pallas two-source attention under `jax.shard_map` on a ("data", "model") mesh.

    GSPMD cannot partition a Pallas custom call (it would gather every operand to every
    device), so each device runs the kernel on its own block: the batch on "data" and the
    query heads on "model". When the KV heads do not divide the model axis (GQA with few
    KV heads) they are first repeated to one KV head per query head, so every device
    holds exactly the KV heads its query heads read. Axes that do not divide evenly are
    not split. `mesh` may be a `Mesh` or the `AbstractMesh` of `current_mesh()`.
    Arguments and result as `pallas_kernels.attention`.
    """
    from .pallas_kernels import attention as pallas_attention

    batch, hq, hkv = q.shape[0], q.shape[2], cached_k.shape[2]
    data_ok = batch % mesh.shape[DATA] == 0
    heads_ok = hq % mesh.shape[MODEL] == 0
    if heads_ok and hkv % mesh.shape[MODEL]:
        group = hq // hkv
        cached_k, cached_v, fresh_k, fresh_v = (
            jnp.repeat(x, group, axis=2) for x in (cached_k, cached_v, fresh_k, fresh_v))
    b = DATA if data_ok else None
    h = MODEL if heads_ok else None
    heads_spec, len_spec = P(b, None, h, None), P(b)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"

    def body(q, ck, cv, cl, fk, fv, fl):
        return pallas_attention(q, ck, cv, cl, fk, fv, fl, interpret=interpret)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec,
                                                  len_spec, heads_spec, heads_spec,
                                                  len_spec),
                       out_specs=heads_spec, check_vma=False)
    return fn(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)


# ----------------------------------------------------------------------------- generate


def _take_rows(value, n: int):
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        return value[:n]
    return value


def _pad_decode_order(kwargs: dict, n: int, pad: int) -> dict:
    """Keep a fixed decoding order (dKV-Cache-Greedy) what it is for the unpadded batch:
    generate draws one order per batch row from the key, so padding the batch would draw
    different ones. Draw (or take) the n real rows' orders and repeat the last for the
    padding rows."""
    order = kwargs.get("decode_order")
    if order is None:
        policy = get_policy(kwargs.get("policy", "none"))
        if not policy.fixed_order:
            return kwargs
        gen_length = kwargs.get("gen_length") or 32  # generate's defaults
        block_length = kwargs.get("block_length") or gen_length
        if gen_length % block_length:
            return kwargs  # generate raises its own clear error
        key = kwargs.get("key")
        order = _gen._draw_order(jax.random.key(0) if key is None else key, n,
                     gen_length // block_length, block_length)
    order = np.asarray(order)
    if order.ndim != 3 or order.shape[0] != n:
        return kwargs  # one order for every request (or a bad one generate will reject)
    return {**kwargs, "decode_order": np.concatenate([order, np.repeat(order[-1:], pad, 0)])}


def generate_sharded(
    params: Params,
    prompts: Sequence[Prompt | Sequence[int]],
    cache: PrefixStore | None = None,
    *,
    mesh: Mesh,
    config: ModelConfig,
    **kwargs: Any,
) -> GenerateOutput:
    """`generate` on a ("data", "model") mesh: the batch on "data", the model on "model".

    `params` should be placed with `shard_params` (unsharded params still work: jit then
    moves them). The batch is padded to a multiple of the data axis with copies of the
    last request (same prefix, so no extra store work); the copies are dropped from the
    result (a dKV-Cache-Greedy order is drawn for the real rows, as unpadded; other
    sampling that draws from the key per row, temperature > 0 or random remasking, sees a
    different batch shape and so different draws). `jax.set_mesh(mesh)` is active during
    the call, so an attention hook can find the mesh with `current_mesh()`. Other
    arguments and the result: as `generate`.
    """
    _check_mesh(mesh)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    n = len(prompts)
    pad = (-n) % mesh.shape[DATA]
    padded = prompts + [prompts[-1]] * pad
    if pad:
        kwargs = _pad_decode_order(kwargs, n, pad)
    with jax.set_mesh(mesh):
        out = _gen.generate(params, padded, cache, config=config, mesh=mesh, **kwargs)
    if len(padded) == n:
        return out
    stats = {k: _take_rows(v, n) for k, v in out.stats.items()}
    return GenerateOutput(tokens=out.tokens[:n], nfe=out.nfe[:n], stats=stats, cache=out.cache)


__all__ = ["AXES", "DATA", "MODEL", "batch_spec", "current_mesh",
           "generate_sharded", "make_mesh", "pallas_attention_sharded", "param_shardings",
           "param_specs", "shard_inputs", "shard_params"]
