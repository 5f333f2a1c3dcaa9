"""The bidirectional DLM (LLaDA and Dream layouts) as pure functions over a params pytree.

Params are a plain nested dict whose per-layer weights are stacked on a leading layer
axis, so the layers run under `lax.scan` (one compiled layer body, however deep the model):

    {"embed": [V, d],
     "layers": {"attn_norm": [L, d], "wq": [L, d, Hq*D], "wk": [L, d, Hkv*D],
                "wv": [L, d, Hkv*D], ("bq", "bk", "bv": [L, *] when qkv_bias),
                "wo": [L, Hq*D, d], "mlp_norm": [L, d],
                "w_gate": [L, d, F], "w_up": [L, d, F], "w_down": [L, F, d]},
     "final_norm": [d], "lm_head": [d, V]}

A request is laid out in two segments (positions are the true token indices; bidirectional
attention does not care in which order rows are stored, RoPE carries the position):

* the **prefix** segment: the shared prefix P, `prefix_len` valid rows, served from the
  prefix store (`PrefixKV`) or computed;
* the **own** segment: the request's own rows, `own_len` valid rows (U and the canvas G).

`forward_rows` is the single cached forward every cache policy uses. With reuse depth `b`
(static), layers `< b` compute only own rows and read the prefix K/V from `prefix_kv`;
layers `>= b` also compute the prefix rows, starting from the prefix hidden state at depth
`b`. `b = L` means "every layer reads the prefix KV from the cache". Optionally only a
subset of the own rows is computed (`own_rows`), the other own positions' K/V coming from
a per-request KV buffer: Fast-dLLM's dual cache and dKV-Cache.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .attention import attention
from .config import ModelConfig

Params = dict


class PrefixKV(NamedTuple):
    """Prefix state handed to `forward_rows` (a pytree; layers stacked).

    The store's K/V are shared by the requests that have the same prefix: `k`, `v` hold one
    entry per distinct prefix of the batch and `index` says which one each request reads,
    so a prefix that the whole batch shares is held and read once, not once per request.

    k, v:     [Ls, S, P, Hkv, D] K (after RoPE) and V of the first Ls layers of the S
              distinct prefixes (Ls is static: the array's length).
    index:    [B] the entry each request reads (None: S == B, entry b for request b).
    deep_k, deep_v: [L - Ls, B, P, Hkv, D] per-request K/V of layers Ls..L-1 (BiCache:
              the last refresh's), or None when Ls == L.
    hidden:   [S, P, d] the prefix hidden state entering layer `reuse_depth` (indexed like
              `k`), or None when `reuse_depth == L`.
    length:   [B] valid prefix rows per request.
    """

    k: Float[Array, "layers distinct prefix kv_heads dim"]
    v: Float[Array, "layers distinct prefix kv_heads dim"]
    index: Int[Array, " batch"] | None
    deep_k: Float[Array, "deep_layers batch prefix kv_heads dim"] | None
    deep_v: Float[Array, "deep_layers batch prefix kv_heads dim"] | None
    hidden: Float[Array, "distinct prefix d_model"] | None
    length: Int[Array, " batch"]


class OwnKV(NamedTuple):
    """A per-request KV buffer of the own segment, all layers: [L, B, R, Hkv, D] each."""

    k: Float[Array, "layers batch own kv_heads dim"]
    v: Float[Array, "layers batch own kv_heads dim"]


class ForwardOut(NamedTuple):
    """Outputs of `forward_rows`.

    hidden:     [B, T, d] final-normed hidden states of the computed own rows.
    prefix_kv:  (k, v) [L - b, B, P, Hkv, D] prefix K/V computed in layers >= b, or None.
    own_kv:     OwnKV of all layers (the updated buffer, or the computed rows' K/V), or None.
    """

    hidden: Float[Array, "batch rows d_model"]
    prefix_kv: tuple[Array, Array] | None
    own_kv: OwnKV | None


# ----------------------------------------------------------------------------- pieces


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: Float[Array, "batch seq heads dim"], positions: Int[Array, "batch seq"],
               theta: float) -> Array:
    """Rotary embedding with the half-split rotation used by LLaDA and Qwen2."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _dense(x: Float[Array, "... d_in"], w: Float[Array, "d_in d_out"]) -> Array:
    """x @ w as one 2-D matmul over the flattened leading dims: XLA CPU's backward of a
    3-D dot transposes its operands through slow copies (measured 2x on a training step)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _qkv(lp: Params, config: ModelConfig, x: Array, positions: Array):
    """Project normed rows to q, k (both after RoPE) and v, split into heads."""
    b, t, _ = x.shape
    q, k, v = _dense(x, lp["wq"]), _dense(x, lp["wk"]), _dense(x, lp["wv"])
    if config.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(b, t, config.n_heads, config.head_dim)
    k = k.reshape(b, t, config.n_kv_heads, config.head_dim)
    v = v.reshape(b, t, config.n_kv_heads, config.head_dim)
    return (apply_rope(q, positions, config.rope_theta),
            apply_rope(k, positions, config.rope_theta), v)


def _mlp(lp: Params, config: ModelConfig, x: Array) -> Array:
    h = rms_norm(x, lp["mlp_norm"], config.norm_eps)
    return _dense(jax.nn.silu(_dense(h, lp["w_gate"])) * _dense(h, lp["w_up"]), lp["w_down"])


def _write_rows(buffer: Array, rows: Array, slots: Int[Array, "batch rows"]) -> Array:
    """buffer[b, slots[b, i]] = rows[b, i] (out-of-range slots, used for padding, drop)."""
    return jax.vmap(lambda buf, r, s: buf.at[s].set(r, mode="drop"))(buffer, rows, slots)


def _layer(lp: Params, x_prefix: Array | None, x_own: Array, *, config: ModelConfig,
           prefix_pos, prefix_kv_l, prefix_len, own_pos, own_buffer_l, own_rows, own_len,
           prefix_index=None):
    """One transformer block over (optionally) the prefix rows and the computed own rows.
    `prefix_index` [B]: the row of `prefix_kv_l` each request reads (shared entries)."""
    h_own = rms_norm(x_own, lp["attn_norm"], config.norm_eps)
    q, k, v = _qkv(lp, config, h_own, own_pos)
    if x_prefix is None:
        pk, pv = prefix_kv_l
    else:
        h_pre = rms_norm(x_prefix, lp["attn_norm"], config.norm_eps)
        pq, pk, pv = _qkv(lp, config, h_pre, prefix_pos)
        prefix_index = None  # computed rows: one per request
    if own_buffer_l is None:
        fk, fv = k, v
    else:
        fk = _write_rows(own_buffer_l[0], k, own_rows)
        fv = _write_rows(own_buffer_l[1], v, own_rows)

    # The prefix rows and the own rows stay separate tensors through the block (the same
    # keys for both; no concatenated copy of rows, queries or scores per layer).
    def block(x, queries):
        out = attention(queries, pk, pv, prefix_len, fk, fv, own_len,
                        impl=config.attention_impl, cached_index=prefix_index)
        x = x + _dense(out.reshape(*out.shape[:2], config.q_dim), lp["wo"]).astype(x.dtype)
        return x + _mlp(lp, config, x).astype(x.dtype)

    new_prefix = None if x_prefix is None else block(x_prefix, pq)
    return new_prefix, block(x_own, q), (pk, pv), (fk, fv)


def _layer_at(tree, i: Int[Array, ""]):
    """Layer `i` of a layer-stacked pytree, read inside the layer loop. (Slicing the stacks
    to a layer range before a loop copies every weight of the range on every call: measured
    as the largest cost of a BiCache block step.)"""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


# ----------------------------------------------------------------------------- forward


def embed(params: Params, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq d"]:
    return jnp.take(params["embed"], tokens, axis=0)


@functools.partial(jax.jit, static_argnames=("config", "reuse_depth", "return_prefix_kv",
                                             "return_own_kv", "unroll_layers"))
def forward_rows(
    params: Params,
    config: ModelConfig,
    own_tokens: Int[Array, "batch rows"],
    own_pos: Int[Array, "batch rows"],
    own_len: Int[Array, " batch"],
    *,
    prefix: PrefixKV | None = None,
    prefix_pos: Int[Array, "batch prefix"] | None = None,
    reuse_depth: int = 0,
    own_kv: OwnKV | None = None,
    own_rows: Int[Array, "batch rows"] | None = None,
    return_prefix_kv: bool = False,
    return_own_kv: bool = False,
    unroll_layers: bool = False,
) -> ForwardOut:
    """Run the model on the computed own rows, reading cached KV where the policy says.

    Args:
      own_tokens, own_pos: tokens and true positions of the own rows being computed.
      own_len: valid own positions per request (keys `>= own_len` are masked). When
        `own_kv` is given this indexes the buffer; otherwise the computed rows themselves.
      prefix: the prefix state (see `PrefixKV`), or None for a request with no prefix
        segment. Layers `< reuse_depth` read the cached prefix K/V (the shared store's in
        layers `< Ls`, the per-request `deep_k/v` above); layers `>= reuse_depth`
        recompute the prefix rows from `prefix.hidden` at positions `prefix_pos`.
      reuse_depth: static b in 0..L.
      own_kv: per-request buffer of own K/V (all layers). The computed rows' K/V are written
        at slots `own_rows` before attention; other slots keep their cached values.
      own_rows: [B, T] buffer slot of each computed row (out-of-range = padding row).
      return_prefix_kv: also return the prefix K/V computed in layers >= b.
      return_own_kv: also return the own K/V of every layer.
      unroll_layers: unroll the layer scans (training: XLA CPU's backward of a scan stacks
        every residual, measured 1.4x slower; serving keeps the loop, which compiles once
        for any depth).
    """
    L = config.n_layers
    if not 0 <= reuse_depth <= L:
        raise ValueError(f"reuse_depth must be in 0..{L}, got {reuse_depth}")
    if (own_kv is None) != (own_rows is None):
        raise ValueError("own_kv and own_rows must be given together")
    batch = own_tokens.shape[0]
    x_own = embed(params, own_tokens)
    if prefix is None:
        empty = jnp.zeros((L, batch, 0, config.n_kv_heads, config.head_dim), x_own.dtype)
        prefix = PrefixKV(empty, empty, None, None, None, None, jnp.zeros((batch,), jnp.int32))
        reuse_depth = L
    b, shared = reuse_depth, prefix.k.shape[0]
    if b < L and (prefix.hidden is None or prefix_pos is None):
        raise ValueError("reuse_depth < L needs prefix.hidden and prefix_pos")
    if b > shared and prefix.deep_k is None:
        raise ValueError(f"reuse_depth {b} reads layers {shared}..{b - 1} of the prefix: "
                         f"it needs prefix.deep_k/deep_v")
    layer_fn = functools.partial(_layer, config=config, prefix_pos=prefix_pos,
                                 prefix_len=prefix.length, own_pos=own_pos,
                                 own_rows=own_rows, own_len=own_len)
    buffers = None if own_kv is None else (own_kv.k, own_kv.v)

    def layer_inputs(i):
        return (_layer_at(params["layers"], i),
                None if buffers is None else _layer_at(buffers, i))

    def reading(k, v, first, index):
        """Layers reading prefix K/V from the stacks `k`, `v` (whose entry 0 is layer
        `first`)."""
        def body(x, i):
            lp, buf = layer_inputs(i)
            kv = _layer_at((k, v), i - first)
            _, x, _, fkv = layer_fn(lp, None, x, prefix_kv_l=kv, own_buffer_l=buf,
                                    prefix_index=index)
            return x, fkv
        return body

    def computing(carry, i):
        lp, buf = layer_inputs(i)
        xp, x = carry
        xp, x, pkv, fkv = layer_fn(lp, xp, x, prefix_kv_l=None, own_buffer_l=buf)
        return (xp, x), (pkv, fkv)

    def layers(start, stop):
        return jnp.arange(start, stop, dtype=jnp.int32)

    # Layers [0, min(b, Ls)) read the shared store, [Ls, b) the per-request deep K/V,
    # [b, L) compute the prefix rows.
    own_out = []
    n_shared = min(b, shared)
    scan = functools.partial(jax.lax.scan, unroll=unroll_layers)
    if n_shared:
        x_own, fkv = scan(reading(prefix.k, prefix.v, 0, prefix.index), x_own,
                          layers(0, n_shared))
        own_out.append(fkv)
    if b > shared:
        x_own, fkv = scan(reading(prefix.deep_k, prefix.deep_v, shared, None), x_own,
                          layers(shared, b))
        own_out.append(fkv)
    prefix_kv_out = None
    if b < L:
        hidden = prefix.hidden
        if prefix.index is not None:  # the prefix rows diverge per request from here on
            hidden = jnp.take(hidden, prefix.index, axis=0)
        (_, x_own), (pkv, fkv) = scan(computing, (hidden, x_own), layers(b, L))
        own_out.append(fkv)
        prefix_kv_out = pkv
    hidden = rms_norm(x_own, params["final_norm"], config.norm_eps)
    own_kv_out = None
    if return_own_kv:
        own_kv_out = OwnKV(*(jnp.concatenate(parts, axis=0) for parts in zip(*own_out,
                                                                              strict=True)))
    return ForwardOut(hidden, prefix_kv_out if return_prefix_kv else None, own_kv_out)


def logits_from_hidden(params: Params, hidden: Float[Array, "batch rows d"]) -> Array:
    """Vocabulary head on final-normed hidden rows, float32 logits [B, rows, V]."""
    return jnp.einsum("btd,dv->btv", hidden, params["lm_head"],
                      preferred_element_type=jnp.float32)


def forward(
    params: Params,
    config: ModelConfig,
    tokens: Int[Array, "batch seq"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    prefix: PrefixKV | None = None,
    reuse_depth: int | None = None,
    unroll_layers: bool = False,
) -> Float[Array, "batch seq vocab"]:
    """Logits of every row of `tokens` (positions after the prefix), float32 [B, T, V].

    Without `prefix` this is the plain full bidirectional forward: positions `0..T-1`, keys
    at positions `>= lengths[b]` masked. With `prefix` (see `PrefixKV`), `tokens` are the
    rows that follow each request's prefix (positions `prefix.length[b] + i`) and
    `reuse_depth` (static, default L: every layer reads the cached prefix KV) picks how
    many leading layers read the cached prefix KV instead of recomputing it.

    Logits at row i are the raw head output of row i; Dream's one-position shift is the
    sampler's business. `unroll_layers`: see `forward_rows` (the trainer sets it).
    """
    batch, t = tokens.shape
    lengths = jnp.full((batch,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    start = jnp.zeros((batch,), jnp.int32) if prefix is None else prefix.length
    own_pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    prefix_pos = None
    if prefix is not None:
        reuse_depth = config.n_layers if reuse_depth is None else reuse_depth
        prefix_pos = jnp.broadcast_to(jnp.arange(prefix.k.shape[2], dtype=jnp.int32),
                                      (batch, prefix.k.shape[2]))
    out = forward_rows(params, config, tokens, own_pos, lengths, prefix=prefix,
                       prefix_pos=prefix_pos, reuse_depth=reuse_depth or 0,
                       unroll_layers=unroll_layers)
    return logits_from_hidden(params, out.hidden)


# ----------------------------------------------------------------------------- params


class DLM(nn.Module):
    """Flax module owning the parameters; `__call__` is `forward`.

    `DLM(config).init(key, tokens)["params"]` gives the params pytree described in the
    module docstring; every computation lives in the pure functions above, so the module
    is only the parameter declaration (initialisers, shapes, dtype).
    """

    config: ModelConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, lengths=None):
        c, L = self.config, self.config.n_layers
        dense = nn.initializers.normal(stddev=0.02)

        def norm_init(key, shape, dtype):  # ones plus noise: tests must see the weights
            return (1.0 + 0.1 * jax.random.normal(key, shape)).astype(dtype)

        def p(name, shape, init):
            return self.param(name, init, shape, self.param_dtype)

        layer_shapes = {
            "attn_norm": ((L, c.d_model), norm_init),
            "wq": ((L, c.d_model, c.q_dim), dense),
            "wk": ((L, c.d_model, c.kv_dim), dense),
            "wv": ((L, c.d_model, c.kv_dim), dense),
            "wo": ((L, c.q_dim, c.d_model), dense),
            "mlp_norm": ((L, c.d_model), norm_init),
            "w_gate": ((L, c.d_model, c.mlp_dim), dense),
            "w_up": ((L, c.d_model, c.mlp_dim), dense),
            "w_down": ((L, c.mlp_dim, c.d_model), dense),
        }
        if c.qkv_bias:
            layer_shapes |= {"bq": ((L, c.q_dim), dense), "bk": ((L, c.kv_dim), dense),
                             "bv": ((L, c.kv_dim), dense)}
        params = {
            "embed": p("embed", (c.vocab_size, c.d_model), nn.initializers.normal(1.0)),
            "layers": _Layers(layer_shapes, self.param_dtype, name="layers")(),
            "final_norm": p("final_norm", (c.d_model,), norm_init),
            "lm_head": p("lm_head", (c.d_model, c.vocab_size), dense),
        }
        return forward(params, c, tokens, lengths)


class _Layers(nn.Module):
    shapes: dict
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        return {n: self.param(n, init, shape, self.param_dtype)
                for n, (shape, init) in self.shapes.items()}


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal(0.02) matrices, norms near one) as a plain dict."""
    variables = DLM(config, dtype).init(key, jnp.zeros((1, 1), jnp.int32))
    return flax.core.unfreeze(variables["params"])


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> Params:
    """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda k: init_params(config, k, dtype), jax.random.key(0))


class PrefixEntry(NamedTuple):
    """Everything a prefix store entry holds, from one forward of the prefix alone.

    k, v:    [L, B, P, Hkv, D] K (after RoPE) and V of every layer.
    hidden:  [L, B, P, d] the hidden state entering every layer (index b is the state
             joined in front at reuse depth b; the output of the last layer is never reused).
    """

    k: Float[Array, "layers batch prefix kv_heads dim"]
    v: Float[Array, "layers batch prefix kv_heads dim"]
    hidden: Float[Array, "layers batch prefix d_model"]


@functools.partial(jax.jit, static_argnames=("config",))
def encode_prefix(params: Params, config: ModelConfig, tokens: Int[Array, "batch prefix"],
                  lengths: Int[Array, " batch"]) -> PrefixEntry:
    """Per-layer K, V and layer-input hidden states of prefixes computed on their own."""
    batch, p = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
    empty = jnp.zeros((batch, 0, config.n_kv_heads, config.head_dim), params["embed"].dtype)
    zero = jnp.zeros((batch,), jnp.int32)

    def body(x, lp):
        _, x_next, _, (k, v) = _layer(lp, None, x, config=config, prefix_pos=None,
                                      prefix_kv_l=(empty, empty), prefix_len=zero,
                                      own_pos=pos, own_buffer_l=None, own_rows=None,
                                      own_len=lengths)
        return x_next, (k, v, x)

    _, (k, v, hidden) = jax.lax.scan(body, embed(params, tokens), params["layers"])
    return PrefixEntry(k, v, hidden)


__all__ = ["DLM", "ForwardOut", "OwnKV", "PrefixEntry", "PrefixKV", "apply_rope", "embed",
           "encode_prefix", "forward", "forward_rows", "init_params", "logits_from_hidden",
           "param_shapes", "rms_norm"]
