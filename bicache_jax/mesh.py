"""The ("data", "model") mesh primitives that the model and the denoise loop need.

The lowest layer of the sharding code: the axis names, the placement of `generate`'s
per-call inputs (`shard_inputs`, called by `generate(mesh=...)`), and the Pallas attention
under `jax.shard_map` that `attention.attention` calls when a mesh is set
(`current_mesh`). It imports nothing of the model, so `attention` -> `mesh` and
`generate` -> `mesh` run one way; `sharding` builds meshes, shards params and wraps
`generate` on top of it (see sharding.py for the param layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from .config import ModelConfig

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def check_mesh(mesh: Mesh) -> None:
    """Raise ValueError unless `mesh` has the axes ("data", "model")."""
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"expected a mesh with axes {AXES}, got {tuple(mesh.axis_names)} "
                         f"(use sharding.make_mesh)")


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
    check_mesh(mesh)
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


__all__ = ["AXES", "DATA", "MODEL", "batch_spec", "check_mesh", "current_mesh",
           "pallas_attention_sharded", "shard_inputs"]
