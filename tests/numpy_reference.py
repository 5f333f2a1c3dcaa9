"""An independent float64 numpy forward of the LLaDA / Dream architectures (tests only)."""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    # x: [T, H, D]; half-split rotation
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-np.arange(half) / half)
    ang = pos[:, None] * freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def numpy_forward(params, config, tokens, length=None):
    """Logits [T, V] (float64) of one sequence whose keys beyond `length` are padding."""
    return numpy_forward_kv(params, config, tokens, length=length)[0]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def numpy_forward_kv(params, config, tokens, override=None, length=None):
    """Logits [T, V] (float64) of one sequence plus per-layer K (after RoPE) and V.

    Keys at positions `>= length` are masked (padding). `override = (K, V, positions)`
    substitutes cached K/V at those positions in every layer (the fixed-shape form of a
    cached forward)."""
    p = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    tokens = np.asarray(tokens)
    t = len(tokens)
    valid = np.arange(t) < (t if length is None else length)
    x = np.asarray(params["embed"], np.float64)[tokens]
    pos = np.arange(t, dtype=np.float64)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    ks, vs = [], []
    for layer in range(config.n_layers):
        h = _rms(x, p["attn_norm"][layer], config.norm_eps)
        q, k, v = h @ p["wq"][layer], h @ p["wk"][layer], h @ p["wv"][layer]
        if config.qkv_bias:
            q, k, v = q + p["bq"][layer], k + p["bk"][layer], v + p["bv"][layer]
        q = _rope(q.reshape(t, hq, d), pos, config.rope_theta)
        k = _rope(k.reshape(t, hkv, d), pos, config.rope_theta)
        v = v.reshape(t, hkv, d)
        if override is not None:
            ck, cv, where = override
            k[where], v[where] = ck[layer][where], cv[layer][where]
        ks.append(k)
        vs.append(v)
        out = np.zeros((t, hq, d))
        for head in range(hq):
            kh = head // (hq // hkv)
            s = np.where(valid[None, :], q[:, head] @ k[:, kh].T / np.sqrt(d), -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            out[:, head] = (s / s.sum(axis=-1, keepdims=True)) @ np.where(
                valid[:, None], v[:, kh], 0)
        x = x + out.reshape(t, hq * d) @ p["wo"][layer]
        h = _rms(x, p["mlp_norm"][layer], config.norm_eps)
        gate = h @ p["w_gate"][layer]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p["w_up"][layer])) @ p["w_down"][layer]
    x = _rms(x, np.asarray(params["final_norm"], np.float64), config.norm_eps)
    return x @ np.asarray(params["lm_head"], np.float64), np.stack(ks), np.stack(vs)


def sharp_params(config, seed=0):
    """Random params scaled so a tiny model's predictions depend on its input (the default
    init gives near-uniform logits, which would make token-equality tests vacuous)."""
    import jax

    from bicache_jax.model import init_params

    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.asarray(a)
        fan_in = a.shape[-2] if a.ndim >= 2 and "embed" not in name else 1
        scale = 3.0 if "lm_head" in name else 1.0
        return (scale * rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def numpy_forward_rows(params, config, tokens, computed, cached_kv=None, hidden_in=None,
                       length=None):
    """A float64 forward that computes, at each layer l, only the rows `computed[l]` [T];
    every other row's K/V at layer l is `cached_kv[l]` (K, V [T, Hkv, D], K after RoPE).
    A row computed at layer l but not at l - 1 enters layer l with `hidden_in[l][row]` (the
    state a cache holds for it). Positions are the row indices; keys `>= length` masked.

    Returns (logits [T, V] of the rows computed at the last layer (others zero), K [L, T,
    Hkv, D] and V with the fresh values at computed rows and the cached ones elsewhere,
    and the hidden state entering every layer [L, T, d] at computed rows)."""
    p = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    tokens = np.asarray(tokens)
    t, n_layers = len(tokens), config.n_layers
    computed = np.broadcast_to(np.asarray(computed, bool), (n_layers, t))
    valid = np.arange(t) < (t if length is None else length)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    x = np.asarray(params["embed"], np.float64)[tokens]
    pos = np.arange(t, dtype=np.float64)
    ks = np.zeros((n_layers, t, hkv, d))
    vs = np.zeros((n_layers, t, hkv, d))
    hidden = np.zeros((n_layers, t, x.shape[-1]))
    for layer in range(n_layers):
        rows = computed[layer]
        enter = rows & ~computed[layer - 1] if layer > 0 else np.zeros(t, bool)
        if enter.any():
            x[enter] = np.asarray(hidden_in[layer], np.float64)[enter]
        hidden[layer][rows] = x[rows]
        h = _rms(x, p["attn_norm"][layer], config.norm_eps)
        q, k, v = h @ p["wq"][layer], h @ p["wk"][layer], h @ p["wv"][layer]
        if config.qkv_bias:
            q, k, v = q + p["bq"][layer], k + p["bk"][layer], v + p["bv"][layer]
        q = _rope(q.reshape(t, hq, d), pos, config.rope_theta)
        k = _rope(k.reshape(t, hkv, d), pos, config.rope_theta)
        v = v.reshape(t, hkv, d)
        if cached_kv is not None:
            k[~rows], v[~rows] = cached_kv[0][layer][~rows], cached_kv[1][layer][~rows]
        ks[layer], vs[layer] = k, v
        out = np.zeros((t, hq, d))
        for head in range(hq):
            kh = head // (hq // hkv)
            s = np.where(valid[None, :], q[:, head] @ k[:, kh].T / np.sqrt(d), -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            out[:, head] = (s / s.sum(axis=-1, keepdims=True)) @ np.where(
                valid[:, None], v[:, kh], 0)
        x_new = x + out.reshape(t, hq * d) @ p["wo"][layer]
        h = _rms(x_new, p["mlp_norm"][layer], config.norm_eps)
        gate = h @ p["w_gate"][layer]
        x_new = x_new + (gate / (1 + np.exp(-gate)) * (h @ p["w_up"][layer])) @ p["w_down"][layer]
        x = np.where(rows[:, None], x_new, x)
    x = _rms(x, np.asarray(params["final_norm"], np.float64), config.norm_eps)
    logits = np.where(computed[-1][:, None], x @ np.asarray(params["lm_head"], np.float64), 0)
    return logits, ks, vs, hidden
