"""`generate`: validate on the host, then the whole denoise loop in one `jax.jit`.

Layout of a request inside the loop (see model.py): the **prefix** segment (the shared
prefix, BiCache-family policies only, served from the prefix store) and the **own**
segment `[canvas G (gen_length slots) | prompt U | padding]`. The canvas sits at slots
`0..gen_length-1` for every request, so blocks are static slices; RoPE positions carry the
true order `[P | U | G]`.

One loop serves every policy (`policies.py`): a `lax.fori_loop` over blocks, a
`lax.while_loop` over the steps of a block; at each step the policy picks one of three
forwards — all own rows, a static-size subset of own rows against the request's KV
buffer, or (BiCache) a refresh of the deep prefix KV — and the sampler unmasks tokens of
the current block.

dKV-Cache (all four variants) is one mechanism in that loop: the state holds a per-request
"cached set" [B, R] of own slots; a step is either a full forward (which refills the KV
buffer) or computes exactly the valid slots outside the set — gathered in slot order and
padded to the smallest static row count (8, 16, 32, ..., the canvas; Dream: + 1) that holds
the batch's largest count, chosen by `lax.switch` — against the buffer, writing their fresh
K/V back (so every slot holds the value of the last forward that computed it). After the
step the variant sets the next step's set: Decode/PD the shifted decoded set of the step
before (the one-step delay), Greedy the complement of its next rows. The cache holds K
after RoPE (the public code caches it before and rotates at each use, at the same
position: the same values). Dream's "un" shift marks slot p cacheable once its successor
in the true order is decoded; the last canvas position gets the public code's value
(`decoded[:, :1]`, True from step 1 on, while it is still masked): this changes tokens, so
we keep it. Per-forward rows are logged (`stats["rows_per_forward"]`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .config import ModelConfig
from .convert.key_maps import check_params
from .mesh import shard_inputs
from .model import OwnKV, PrefixKV, encode_prefix, forward_rows, logits_from_hidden
from .policies import POLICIES, Policy, get_policy
from .prefix_store import PrefixStore, StoredPrefix
from .sampling import (
    SamplerConfig,
    choose_tokens,
    llada_transfer_counts,
    select_positions,
    select_top,
)

PAD_MULTIPLE = 16  # prompt and prefix lengths are padded to multiples of this (fewer compiles)


def _token_ids(value, field: str) -> tuple[int, ...]:
    """`value` (a flat sequence of integer ids) as a tuple of ints; a one-line ValueError
    naming `Prompt.<field>` otherwise (float ids are refused, never truncated)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"Prompt.{field} must be token ids, got text (tokenize it first: "
                         f"bicache_jax.Tokenizer)")
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Prompt.{field} must be a flat sequence of token ids: {e}") from None
    if ids.ndim != 1:
        raise ValueError(f"Prompt.{field} must be a flat sequence of token ids, got shape "
                         f"{list(ids.shape)}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):  # bool is not an integer here
        raise ValueError(f"Prompt.{field} must hold integer token ids, got dtype {ids.dtype} "
                         f"({ids.tolist()[:4]}...)")
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request: its own prompt ids and the shared prefix ids (may be empty).

    Both are flat sequences of integer token ids (lists, tuples, 1-D integer arrays);
    anything else raises ValueError naming the field.
    """

    prompt: tuple[int, ...]
    prefix: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "prompt", _token_ids(self.prompt, "prompt"))
        object.__setattr__(self, "prefix", _token_ids(self.prefix, "prefix"))


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    tokens:  [B, gen_length] the generated canvas.
    nfe:     [B] forwards each request took part in while its current block had masks.
    stats:   per-request arrays (`rows_computed`, `rows_padded`: token-layer rows, i.e.
             rows x layers; `rows_per_forward`, `padded_per_forward` [B, forwards]: the
             same per forward, 0 where the request's block was already done (divide by
             n_layers for token rows, except on BiCache refreshes); `refreshes`;
             `prefix_len`; `reuse_depth`; `decode_order` [B, num_blocks, block_length]
             when a fixed order was used) and per-call values (`batch_reuse_depth`,
             `store_rows_computed`, `seconds`, `compiles`).
    cache:   the prefix store: the updated one for the store policies, the `cache`
             argument unchanged for the others (None when none was passed), so
             `store = out.cache` keeps the store across calls of any policy.
    """

    tokens: np.ndarray
    nfe: np.ndarray
    stats: dict
    cache: PrefixStore | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about a call: one compiled program per distinct plan + shapes.
    (The refresh interval and Greedy's window size are traced: sweeping them reuses the
    program.)"""

    config: ModelConfig
    sampler: SamplerConfig
    policy: Policy
    gen_length: int
    steps: int
    block_length: int
    reuse_depth: int
    row_buckets: tuple[int, ...]
    fixed_order: bool  # decode each block in the order of the `order` argument


_TRACE_COUNT = [0]


def compile_count() -> int:
    """How many times the denoise loop has been traced (= compiled) in this process."""
    return _TRACE_COUNT[0]


def _max_forwards(plan: _Plan) -> int:
    """Upper bound on the forwards of one call (the length of the per-forward logs)."""
    num_blocks = plan.gen_length // plan.block_length
    per_block = (plan.block_length + 1 if plan.sampler.threshold is not None
                 else plan.steps // num_blocks)
    return num_blocks * (per_block + int(plan.policy.block_cache is not None))


def greedy_window(rows: Array, masked: Array, targets: Array, block_order: Array,
                  window_size: Array) -> Array:
    """dKV-Cache-Greedy's window (`find_window_tokens`) over the canvas, batched.

    rows [B, g]: positions already computed next step; masked [B, g]: still-masked
    positions; targets [B, g]: the positions to decode next; block_order [B, bl]: the
    block's decoding order (canvas positions). For each target, in decoding order, add up
    to `window_size` positions that are masked and not yet in `rows`, nearest first and,
    at equal distance, left before right (the public pointer walk p-1, p+1, p-2, ...);
    positions added for one target are not counted for the next. Returns the new rows.
    """
    batch, g = rows.shape
    q = jnp.arange(g, dtype=jnp.int32)[None, :]
    count = jnp.broadcast_to(window_size, (batch,))

    def add(j, rows):
        p = block_order[:, j][:, None]
        on = jnp.take_along_axis(targets, p, axis=1)
        dist = 2 * jnp.abs(q - p) - (q < p).astype(jnp.int32)  # p-1: 1, p+1: 2, p-2: 3
        return rows | select_top(-dist.astype(jnp.float32), masked & ~rows & on, count)

    return jax.lax.cond(window_size > 0,
                        lambda r: jax.lax.fori_loop(0, block_order.shape[1], add, r),
                        lambda r: r, rows)


# ----------------------------------------------------------------------------- the loop


class _State(NamedTuple):
    tokens: Array  # [B, R] own tokens (canvas slots updated in place)
    key: Array
    nfe: Array  # [B]
    rows: Array  # [B] token-layer rows computed
    padded: Array  # [B] token-layer rows padded
    refreshes: Array  # [B]
    since_refresh: Array  # scalar: forwards since the last deep-prefix refresh
    prefix_buf: tuple | None  # (k, v) [L, B, P, Hkv, D]: store (< b) + last refresh (>= b)
    own_buf: tuple | None  # (k, v) [L, B, R, Hkv, D]: the request's own KV (block caches)
    cache_set: Array  # [B, R] dKV: own slots the next cached step reads from own_buf
    step: Array  # scalar: decoding steps taken so far (all blocks)
    fwd: Array  # scalar: forwards run so far
    row_log: Array  # [B, F] token-layer rows computed per forward
    pad_log: Array  # [B, F] token-layer rows padded per forward


class _Controls(NamedTuple):
    """Traced per-call inputs of the loop (one pytree, the loop's last argument)."""

    key: Array
    refresh_interval: Array  # int32 scalar: N
    window_size: Array  # int32 scalar: Greedy's window
    order: Array | None  # [B, num_blocks, block_length] canvas slots (fixed-order decoding)


@functools.partial(jax.jit, static_argnames=("plan",))
def _denoise(params, plan: _Plan, own_tokens, own_pos, own_len, prefix_k, prefix_v,
             prefix_hidden, prefix_len, controls: _Controls):
    _TRACE_COUNT[0] += 1
    key, refresh_interval, window_size, order = controls
    c, pol, s = plan.config, plan.policy, plan.sampler
    L, g, bl = c.n_layers, plan.gen_length, plan.block_length
    num_blocks = g // bl
    steps_per_block = plan.steps // num_blocks
    batch, own_size = own_tokens.shape
    b = plan.reuse_depth
    has_prefix = prefix_k is not None
    prefix_pos = None
    if has_prefix:
        prefix_pos = jnp.broadcast_to(jnp.arange(prefix_k.shape[2], dtype=jnp.int32),
                                      (batch, prefix_k.shape[2]))
    cfg = s.cfg_scale > 0
    slot_ids = jnp.arange(own_size, dtype=jnp.int32)
    own_valid = slot_ids[None, :] < own_len[:, None]
    prompt_slot = (slot_ids[None, :] >= g) & own_valid
    rank = None
    if plan.fixed_order:  # rank[b, c]: when canvas slot c is decoded within its block
        rank = jax.vmap(lambda o: jnp.zeros((g,), jnp.int32).at[o.reshape(-1)].set(
            jnp.tile(jnp.arange(bl, dtype=jnp.int32), num_blocks)))(order)

    def predictor_slots(slots):
        """Own slot whose output predicts each canvas slot (Dream: the previous one)."""
        slots = jnp.broadcast_to(slots, (batch, slots.shape[-1]))
        if not c.logits_shift:
            return slots
        prev = slots - 1
        return jnp.where(prev < 0, (own_len - 1)[:, None], prev)

    def shifted(decoded, x_last):
        """dKV's cacheable set from the decoded set. LLaDA: the decoded set. Dream ("un"
        shift): slot p once its successor in the true order [prompt | canvas] is decoded
        (its output is no longer needed); the last canvas slot gets `x_last`."""
        if not c.logits_shift:
            return decoded
        succ = jnp.where(slot_ids[None, :] == (own_len - 1)[:, None], 0, slot_ids[None, :] + 1)
        e = jnp.take_along_axis(decoded, jnp.minimum(succ, own_size - 1), axis=1)
        return jnp.where(slot_ids[None, :] == g - 1, x_last, e)

    # dKV-Cache-Prefill's set (E_{-1}): the prompt (Dream: but its last token).
    prefill_set = shifted(own_tokens != c.mask_token_id, jnp.bool_(False)) & own_valid

    def head(hidden_rows):
        logits = logits_from_hidden(params, hidden_rows)
        if cfg:  # LLaDA's classifier-free guidance: rows [cond; uncond] along the batch
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (s.cfg_scale + 1.0) * (cond - uncond)
        return logits

    def block_active(tokens, slots):
        return jnp.any(tokens[:, slots] == c.mask_token_id, axis=1)

    def count(st, active, rows, padded=0, refreshed=None):
        """Book one forward: rows / padded are token-layer rows per request."""
        act = active.astype(jnp.int32)
        rows, padded = act * rows, act * padded
        return st._replace(
            nfe=st.nfe + act, rows=st.rows + rows, padded=st.padded + padded,
            refreshes=st.refreshes + (0 if refreshed is None else act * refreshed),
            row_log=st.row_log.at[:, st.fwd].set(rows, mode="drop"),
            pad_log=st.pad_log.at[:, st.fwd].set(padded, mode="drop"), fwd=st.fwd + 1)

    # -- forward over all own rows (and the prefix rows in layers >= b on refresh)
    def full_forward(st, slots, want_own_kv, decodes=True):
        active = block_active(st.tokens, slots)

        def run(st, refresh):
            tokens, pos, lens = st.tokens, own_pos, own_len
            if cfg:
                tokens = jnp.concatenate(
                    [tokens, jnp.where(prompt_slot, c.mask_token_id, tokens)])
                pos, lens = jnp.concatenate([pos, pos]), jnp.concatenate([lens, lens])
            prefix, depth = None, 0
            if has_prefix:
                hidden = prefix_hidden if refresh else None
                prefix = PrefixKV(*st.prefix_buf, hidden, prefix_len)
                depth = b if refresh else L
            out = forward_rows(params, c, tokens, pos, lens, prefix=prefix,
                               prefix_pos=prefix_pos, reuse_depth=depth,
                               return_prefix_kv=refresh, return_own_kv=want_own_kv)
            rows = own_len * L
            if refresh:
                pk, pv = st.prefix_buf
                st = st._replace(prefix_buf=(pk.at[b:].set(out.prefix_kv[0]),
                                             pv.at[b:].set(out.prefix_kv[1])),
                                 since_refresh=jnp.zeros((), jnp.int32))
                rows = rows + prefix_len * (L - b)
            # The refresh counter counts decoding steps (a cache-only forward is not one).
            st = st._replace(since_refresh=st.since_refresh + int(decodes))
            st = count(st, active, rows, refreshed=jnp.int32(refresh))
            hid = jnp.take_along_axis(
                out.hidden, jnp.tile(predictor_slots(slots), (2 if cfg else 1, 1))[..., None],
                axis=1)
            own_kv = None if out.own_kv is None else tuple(out.own_kv)
            return st, head(hid), own_kv

        if has_prefix and pol.refreshes and b < L:  # at b = L no layer is left to refresh
            due = st.since_refresh >= refresh_interval
            return jax.lax.cond(due, lambda x: run(x, True), lambda x: run(x, False), st)
        return run(st, False)

    # -- forward over a static-size subset of own rows, the rest of the KV from own_buf
    def rows_forward(st, slots, rows, n_valid, pred_index, write_back):
        """rows: [B, T] own slots (>= own_size: padding); pred_index: [B, bl] row index
        of each block slot's predictor among `rows`."""
        active = block_active(st.tokens, slots)
        safe = jnp.minimum(rows, own_size - 1)
        prefix = None if not has_prefix else PrefixKV(*st.prefix_buf, None, prefix_len)
        out = forward_rows(
            params, c, jnp.take_along_axis(st.tokens, safe, 1),
            jnp.take_along_axis(own_pos, safe, 1), own_len, prefix=prefix,
            prefix_pos=prefix_pos, reuse_depth=L, own_kv=OwnKV(*st.own_buf), own_rows=rows,
            return_own_kv=write_back)
        st = count(st, active, n_valid * L, (rows.shape[1] - n_valid) * L)
        st = st._replace(since_refresh=st.since_refresh + 1)
        if write_back:
            st = st._replace(own_buf=tuple(out.own_kv))
        hid = jnp.take_along_axis(out.hidden, pred_index[..., None], axis=1)
        return st, head(hid)

    def block_rows(slots):
        """Rows of a block forward: the block (and, for Dream, its first slot's predictor)."""
        rows = jnp.broadcast_to(slots, (batch, slots.shape[-1]))
        if c.logits_shift:
            rows = jnp.concatenate([predictor_slots(slots)[:, :1], rows], axis=1)
        return rows, jnp.broadcast_to(jnp.arange(bl), (batch, bl))

    def prefix_cache_forward(st, k, slots):
        """Fast-dLLM prefix cache: the block and everything after it, exact row count."""
        def branch(kk):
            def f(st):
                rows, pred = block_rows(kk * bl + jnp.arange(g - kk * bl, dtype=jnp.int32))
                n = jnp.full((batch,), rows.shape[1], jnp.int32)
                return rows_forward(st, slots, rows, n, pred, write_back=False)
            return f
        return jax.lax.switch(k, [branch(kk) for kk in range(num_blocks)], st)

    def subset_forward(st, slots, need):
        """dKV cached step: compute the own slots in `need` [B, R] (gathered in slot order,
        padded to the smallest static bucket that holds the batch's largest count), every
        other slot's K/V read from own_buf; the rows' fresh K/V are written back."""
        n_valid = jnp.sum(need, axis=1).astype(jnp.int32)
        order_ = jnp.argsort(~need, axis=1, stable=True).astype(jnp.int32)

        def branch(size):
            def f(st):
                rows = order_[:, :size]
                rows = jnp.where(jnp.arange(size)[None, :] < n_valid[:, None], rows, own_size)
                where_row = jnp.full((batch, own_size + 1), 0, jnp.int32)
                where_row = jax.vmap(lambda w, r: w.at[r].set(jnp.arange(size),
                                                              mode="drop"))(where_row, rows)
                pred = jnp.take_along_axis(where_row, predictor_slots(slots), 1)
                return rows_forward(st, slots, rows, n_valid, pred, write_back=True)
            return f

        # Never more than the canvas (+ Dream's first predictor): every variant caches the
        # prompt but (Dream) its last token; the largest bucket is exactly that.
        buckets = jnp.asarray(plan.row_buckets)
        idx = jnp.sum(buckets < jnp.max(n_valid))
        return jax.lax.switch(idx, [branch(sz) for sz in plan.row_buckets], st)

    def dkv_forward(st, i, slots):
        """One dKV step: a full forward (which refills own_buf) or a cached one."""
        n = refresh_interval
        # LLaDA (and Greedy everywhere) counts steps per block, Dream over the whole canvas.
        idx = i if (pol.dkv == "greedy" or not c.logits_shift) else st.step
        reset = idx % n == 0
        if pol.dkv in ("decode", "pd") and not c.logits_shift:
            reset = reset | (idx <= 1)  # LLaDA: steps 0 and 1 of a block (cache reset)
        if pol.dkv in ("decode", "greedy"):
            full, cached = reset, st.cache_set
        elif pol.dkv == "prefill":
            full, cached = st.step == 0, prefill_set
        else:  # pd: a refresh recomputes all but the prefill set
            full, cached = st.step == 0, jnp.where(reset, prefill_set, st.cache_set)
        need = own_valid & ~cached

        def full_branch(st):
            st2, logits, own_kv = full_forward(st, slots, want_own_kv=True)
            return st2._replace(own_buf=own_kv), logits

        return jax.lax.cond(full, full_branch, lambda x: subset_forward(x, slots, need), st)

    def greedy_rows(before, after, i, quota, slots, k):
        """dKV-Cache-Greedy's rows for step i + 1: W = S_{i+1} (Dream: their predictors)
        + S_i + up to `window_size` still-masked canvas neighbours of each p in S_{i+1},
        taken in the block order, nearest first, left before right."""
        masked = after[:, :g] == c.mask_token_id
        just = (before[:, :g] == c.mask_token_id) & ~masked  # S_i
        nxt_blk = select_top(-rank[:, slots].astype(jnp.float32), masked[:, slots],
                             quota[:, jnp.minimum(i + 1, steps_per_block - 1)])
        nxt = jnp.zeros((batch, g), bool).at[:, slots].set(nxt_blk)  # S_{i+1}
        w = jnp.zeros((batch, own_size), bool).at[:, :g].set(just)
        targets = predictor_slots(jnp.arange(g, dtype=jnp.int32))
        targets = jnp.where(nxt, targets, own_size)
        w = jax.vmap(lambda x, t: x.at[t].set(True, mode="drop"))(w, targets)
        w = w.at[:, :g].set(greedy_window(w[:, :g], masked, nxt, order[:, k], window_size))
        return w & own_valid

    # -- one decoding update of the current block
    def decode(st, logits, step, quota, slots):
        key, k_tok, k_pos = jax.random.split(st.key, 3)
        block = st.tokens[:, slots]
        candidates = block == c.mask_token_id
        tokens, conf = choose_tokens(logits, k_tok, s)
        if plan.fixed_order:
            chosen = select_top(-rank[:, slots].astype(jnp.float32), candidates,
                                quota[:, step])
        else:
            chosen = select_positions(conf, candidates, step, steps_per_block, quota, k_pos,
                                      s)
        new_block = jnp.where(chosen, tokens, block)
        return st._replace(tokens=st.tokens.at[:, slots].set(new_block), key=key)

    def step_forward(st, step, slots, k):
        if pol.dkv is not None:
            return dkv_forward(st, step, slots)
        if pol.block_cache == "dual":
            rows, pred = block_rows(slots)
            n = jnp.full((batch,), rows.shape[1], jnp.int32)
            return rows_forward(st, slots, rows, n, pred, write_back=False)
        if pol.block_cache == "prefix":
            return prefix_cache_forward(st, k, slots)
        st, logits, _ = full_forward(st, slots, want_own_kv=False)
        return st, logits

    def block_body(k, st):
        slots = k * bl + jnp.arange(bl, dtype=jnp.int32)
        masked = jnp.sum(st.tokens[:, slots] == c.mask_token_id, axis=1)
        quota = llada_transfer_counts(masked, steps_per_block)
        first = 0
        if pol.block_cache is not None:
            st, logits, own_kv = full_forward(st, slots, want_own_kv=True,
                                              decodes=pol.decode_on_block_start)
            st = st._replace(own_buf=own_kv)
            if pol.decode_on_block_start:
                st = decode(st, logits, jnp.int32(0), quota, slots)
                first = 1

        def cond(carry):
            st, i = carry
            if s.threshold is None:
                return i < steps_per_block
            return jnp.any(block_active(st.tokens, slots)) & (i < bl + 1)

        def body(carry):
            st, i = carry
            before = st.tokens
            st, logits = step_forward(st, i, slots, k)
            st = decode(st, logits, jnp.minimum(i, steps_per_block - 1), quota, slots)
            if pol.dkv in ("decode", "pd"):  # the one-step delay: E_{t-1} is read at t + 1
                st = st._replace(cache_set=shifted(before != c.mask_token_id, st.step > 0))
            elif pol.dkv == "greedy":
                st = st._replace(cache_set=~greedy_rows(before, st.tokens, i, quota, slots, k))
            return st._replace(step=st.step + 1), i + 1

        st, _ = jax.lax.while_loop(cond, body, (st, jnp.int32(first)))
        return st

    zeros = jnp.zeros((batch,), jnp.int32)
    own_buf = None
    if pol.block_cache is not None or pol.dkv is not None:
        shape = (L, batch, own_size, c.n_kv_heads, c.head_dim)
        dtype = params["embed"].dtype
        own_buf = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    log = jnp.zeros((batch, _max_forwards(plan)), jnp.int32)
    state = _State(
        tokens=own_tokens, key=key, nfe=zeros, rows=zeros, padded=zeros, refreshes=zeros,
        since_refresh=refresh_interval, prefix_buf=(prefix_k, prefix_v) if has_prefix else None,
        own_buf=own_buf, cache_set=prefill_set, step=jnp.int32(0), fwd=jnp.int32(0),
        row_log=log, pad_log=log)
    state = jax.lax.fori_loop(0, num_blocks, block_body, state)
    return (state.tokens[:, :g], state.nfe, state.rows, state.padded, state.refreshes,
            state.row_log, state.pad_log, state.fwd)


# ----------------------------------------------------------------------------- host side


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def lookup_depth(table: dict[int, int], ratio_percent: int) -> int:
    """`b = table[max key <= r]` (0 when r is below every key)."""
    keys = [k for k in table if k <= ratio_percent]
    return table[max(keys)] if keys else 0


def prefix_ratio(p: int, u: int, g: int, count_canvas: bool = True) -> int:
    """`round(100 * p / (p + u + g))` (the official runtime ratio counts the canvas)."""
    denom = p + u + (g if count_canvas else 0)
    return int(round(100 * p / denom)) if denom else 0


def _as_prompts(prompts) -> list[Prompt]:
    """`generate`'s `prompts` as a list of `Prompt`s, or a one-line error naming it."""
    if isinstance(prompts, (Prompt, str, bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a list of requests (each a Prompt or a sequence "
                        f"of token ids), got {type(prompts).__name__}")
    out = []
    for i, item in enumerate(prompts):
        if isinstance(item, Prompt):
            out.append(item)
            continue
        if isinstance(item, (int, np.integer)):
            raise ValueError("prompts must be a list of requests, got a flat list of token "
                             "ids: wrap one request as [ids] or [Prompt(prompt=ids)]")
        try:
            out.append(Prompt(prompt=item))
        except ValueError as e:
            raise ValueError(f"prompts[{i}]: {e}") from None
    return out


def _check_call(params, config, cache, key) -> None:
    """The arguments `_validate` does not see (the engine checks requests without them)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_params(params, config, "params")  # e.g. LLaDA params with a Dream config
    if cache is not None and not isinstance(cache, PrefixStore):
        raise TypeError(f"cache must be a PrefixStore or None, got {type(cache).__name__}")
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not legacy:
        raise TypeError(f"key must be one PRNG key, e.g. jax.random.key(0), got "
                        f"{type(key).__name__} {getattr(key, 'shape', '')}".rstrip())


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_policy_settings(policy: Policy, reuse_depth: int | None,
                          refresh_interval: int | None, window_size: int | None) -> None:
    """Raise ValueError when a setting is given (not None) to a policy that does not use
    it: `reuse_depth` (BiCache's b), `refresh_interval` (BiCache, dKV-Cache but Prefill),
    `window_size` (dKV-Cache-Greedy)."""
    for name, value, applies in (
            ("reuse_depth", reuse_depth, lambda p: p.takes_reuse_depth),
            ("refresh_interval", refresh_interval, lambda p: p.takes_refresh_interval),
            ("window_size", window_size, lambda p: p.fixed_order)):
        if value is not None and not applies(policy):
            users = ", ".join(n for n, p in POLICIES.items() if applies(p))
            raise ValueError(f"{name} is a setting of {users}; policy {policy.name!r} does "
                             f"not use it")


def _validate(config, prompts, gen_length, steps, block_length, policy, sampler,
              refresh_interval, reuse_depth, window_size):
    """Everything `generate` checks from its settings and prompts (the engine calls this
    on each request). `refresh_interval` is the caller's value (None: the default)."""
    if not isinstance(sampler, SamplerConfig):
        raise TypeError(f"sampler must be a SamplerConfig, got {type(sampler).__name__}")
    _check_int("gen_length", gen_length, minimum=1)
    _check_int("steps", steps, minimum=1)
    _check_int("block_length", block_length, minimum=1)
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length "
                         f"({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be divisible by the number of blocks "
                         f"({num_blocks} = gen_length / block_length)")
    check_policy_settings(policy, reuse_depth, refresh_interval, window_size)
    if refresh_interval is not None:
        _check_int("refresh_interval", refresh_interval, minimum=1)
    if reuse_depth is not None:
        _check_int("reuse_depth", reuse_depth, minimum=0)
        if reuse_depth > config.n_layers:
            raise ValueError(f"reuse_depth must be in 0..{config.n_layers}, got {reuse_depth}")
    if sampler.cfg_scale > 0 and policy.name != "none":
        raise ValueError("cfg_scale > 0 is supported with policy='none' only")
    if policy.fixed_order and sampler.remasking != "random":
        raise ValueError(f"{policy.name} decodes each block in a fixed random order: it needs "
                         f"SamplerConfig(remasking='random'), got {sampler.remasking!r} (the "
                         f"public dKV-Cache-Greedy has no confidence-based remasking)")
    if window_size is not None:
        _check_int("window_size", window_size, minimum=0)
    if not prompts:
        raise ValueError("prompts is empty")
    if policy.uses_store and not any(p.prefix for p in prompts):
        raise ValueError(f"policy {policy.name!r} serves a shared prefix from the prefix "
                         f"store, but no request has one: give requests as "
                         f"Prompt(prefix=..., prompt=...) (or use policy='none')")
    for i, p in enumerate(prompts):
        if not p.prompt:
            raise ValueError(f"prompts[{i}]: the prompt is empty (every request needs at "
                             f"least one prompt token)")
        config.check_ids(p.prefix + p.prompt, f"prompts[{i}]")
        total = len(p.prefix) + len(p.prompt) + gen_length
        if total > config.max_seq_len:
            raise ValueError(f"prompts[{i}]: prompt + gen_length = {total} exceeds the "
                             f"model's max_seq_len {config.max_seq_len}")


def compute_prefix_entry(params, config: ModelConfig, ids: Sequence[int]) -> StoredPrefix:
    """The store entry of a prefix: one forward of the prefix alone (padded to a multiple
    of PAD_MULTIPLE so that few prefix lengths share one compiled program)."""
    ids = tuple(int(i) for i in ids)
    toks = np.zeros((1, _round_up(len(ids), PAD_MULTIPLE)), np.int32)
    toks[0, :len(ids)] = ids
    out = encode_prefix(params, config, jnp.asarray(toks), jnp.asarray([len(ids)]))
    n = len(ids)
    return StoredPrefix(ids=ids, k=out.k[:, 0, :n], v=out.v[:, 0, :n],
                        hidden=out.hidden[:, 0, :n])


def _fill_store(params, config, store: PrefixStore, prefixes):
    """Look every distinct prefix up; compute misses one at a time on the prefix alone."""
    entries, computed_rows = {}, 0
    for ids in dict.fromkeys(prefixes):
        if not ids:
            continue
        hit = store.find(ids)
        if hit is not None:
            store = store.touch(ids)
            entries[ids] = hit
            continue
        store.check_fits(len(ids))  # before paying for the forward
        entry = compute_prefix_entry(params, config, ids)
        computed_rows += len(ids) * config.n_layers
        store = store.insert(entry)
        entries[ids] = entry
    return store, entries, computed_rows


def _batch_prefix(entries, prefixes, depth, config, dtype):
    """Stack the store entries of a batch: k, v [L, B, P, Hkv, D], hidden at `depth`
    [B, P, d] (P padded to PAD_MULTIPLE). One pad per distinct prefix, then one gather."""
    L = config.n_layers
    p_max = _round_up(max(len(ids) for ids in prefixes), PAD_MULTIPLE)
    distinct = [ids for ids in dict.fromkeys(prefixes) if ids]
    index = np.array([distinct.index(ids) if ids else len(distinct) for ids in prefixes])

    def stack(get, axis, shape):
        padded = [jnp.pad(get(entries[ids]), [(0, 0)] * axis + [(0, p_max - len(ids))]
                          + [(0, 0)] * (len(shape) - axis - 1)) for ids in distinct]
        padded.append(jnp.zeros(shape, dtype))  # requests without a prefix
        return jnp.stack(padded, axis=axis)

    kv_shape = (L, p_max, config.n_kv_heads, config.head_dim)
    k = stack(lambda e: e.k, 1, kv_shape)[:, index]
    v = stack(lambda e: e.v, 1, kv_shape)[:, index]
    if depth < L:
        hidden = stack(lambda e: e.hidden[depth], 0, (p_max, config.d_model))[index]
    else:
        hidden = jnp.zeros((len(prefixes), p_max, config.d_model), dtype)
    return k, v, hidden


def _row_buckets(max_rows: int) -> tuple[int, ...]:
    """Static row counts of a dKV cached forward: 8, 16, 32, ... below `max_rows`, and
    `max_rows` itself (the canvas; Dream: + the last prompt token, the canvas' first
    predictor)."""
    sizes, n = [], 8
    while n < max_rows:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (max_rows,)


_ORDER_STREAM = 0x6F72  # folded into the key for Greedy's order (the loop keeps `key`)


@functools.partial(jax.jit, static_argnames=("batch", "num_blocks", "block_length"))
def _draw_order(key, batch: int, num_blocks: int, block_length: int):
    """Greedy's decoding order: per request and block, positions by descending uniform
    noise (the public code's `torch.rand` + sort), as canvas positions."""
    noise = jax.random.uniform(jax.random.fold_in(key, _ORDER_STREAM),
                               (batch, num_blocks, block_length))
    start = jnp.arange(num_blocks, dtype=jnp.int32)[:, None] * block_length
    return jnp.argsort(-noise, axis=-1).astype(jnp.int32) + start


def _check_order(decode_order, batch: int, gen_length: int, block_length: int) -> np.ndarray:
    """`decode_order` as [B, num_blocks, block_length] int32, or a clear ValueError."""
    num_blocks = gen_length // block_length
    order = np.asarray(decode_order)
    if order.dtype == bool or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"decode_order must hold integer canvas positions, got dtype "
                         f"{order.dtype}")
    if order.shape == (num_blocks, block_length):
        order = np.broadcast_to(order, (batch, num_blocks, block_length))
    if order.shape != (batch, num_blocks, block_length):
        raise ValueError(f"decode_order must have shape [num_blocks, block_length] = "
                         f"[{num_blocks}, {block_length}] or [batch, num_blocks, "
                         f"block_length] = [{batch}, {num_blocks}, {block_length}], got "
                         f"{list(order.shape)}")
    want = np.arange(gen_length).reshape(num_blocks, block_length)
    bad = np.argwhere(np.any(np.sort(order, axis=-1) != want, axis=-1))
    if len(bad):
        r, k = (int(x) for x in bad[0])
        raise ValueError(f"decode_order: block {k} (request {r}) must be a permutation of "
                         f"the canvas positions {k * block_length}..{(k + 1) * block_length - 1}"
                         f" (positions count from the canvas start), got "
                         f"{order[r, k].tolist()}")
    return order.astype(np.int32)


def generate(
    params,
    prompts: Sequence[Prompt | Sequence[int]],
    cache: PrefixStore | None = None,
    *,
    config: ModelConfig,
    gen_length: int = 32,
    steps: int | None = None,
    block_length: int | None = None,
    policy: str = "none",
    sampler: SamplerConfig | None = None,
    key: jax.Array | None = None,
    reuse_depth: int | None = None,
    refresh_interval: int | None = None,
    ratio_counts_canvas: bool = True,
    window_size: int | None = None,
    decode_order=None,
    decode_on_block_start: bool | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerateOutput:
    """Generate `gen_length` tokens for each prompt with the chosen cache policy.

    Args:
      params: the model params pytree.
      prompts: a list of B requests, each a `Prompt(prompt=ids, prefix=ids)` or a plain
        id sequence (no shared prefix); ids are integers. Lengths may differ; padding is
        exact. The store policies (`naive_prefix`, `bicache`, `bicache_dual`) need a
        prefix on at least one request; a request without one runs uncached (its
        `stats["reuse_depth"]` is 0).
      cache: the `PrefixStore` of the store policies; None starts an empty one. The other
        policies leave it untouched and return it as `out.cache`.
      config: the model's `ModelConfig`.
      gen_length, steps, block_length: the canvas length, the total number of denoising
        steps, and the semi-autoregressive block length (default: one block).
      policy: one of `policies.POLICIES`.
      sampler: token choice and remasking (`SamplerConfig`; default LLaDA low-confidence,
        or `random` for `dkv_greedy`).
      key: one PRNG key, `jax.random.key(seed)` (default `jax.random.key(0)`).
      reuse_depth: BiCache's b for the whole batch (`bicache`, `bicache_dual` only);
        default: the store's `r -> b` table at each request's prefix ratio, and the
        smallest depth of the batch's requests with a prefix.
      refresh_interval: N, steps between deep-prefix refreshes (BiCache, default 16) or
        between full forwards (dKV-Cache: the public `cache_reloading_step` /
        `cache_steps`; default 8 for `dkv_decode` and `dkv_pd`, 2 for `dkv_greedy`;
        `dkv_prefill` never refreshes and takes none). Traced: changing it does not
        recompile.
      ratio_counts_canvas: count the canvas in the prefix ratio (as the official code).
      window_size: `dkv_greedy` only (default 0): how many still-masked neighbours of each
        position decoded next are recomputed with it. Traced.
      decode_order: a fixed per-block decoding order, for `dkv_greedy` or any policy with
        `SamplerConfig(remasking="random")` (it then replaces the per-step random ranking,
        so a `none` run with the order of a `dkv_greedy` run recomputes it exactly). Shape
        [num_blocks, block_length] (the same for every request) or [B, num_blocks,
        block_length]; entries are canvas positions counted from the canvas start
        (0..gen_length-1), block k's row a permutation of k*block_length ..
        (k+1)*block_length-1, earliest-decoded first. Step i of a block unmasks the next
        `quota[i]` positions of its row. Default for `dkv_greedy`: drawn per request and
        block from `key` (returned as `stats["decode_order"]`, so a run can be replayed).
      decode_on_block_start: block-cache policies only: whether the block-start forward's
        logits decode (Fast-dLLM: `steps_per_block` forwards a block) or the forward only
        builds the cache (the official BiCache + Fast-dLLM schedule, `bicache_dual`'s
        default: one more forward per block). None keeps the policy's default.
      mesh: a ("data", "model") mesh (`sharding.make_mesh`): the loop's batch inputs are
        placed with the batch on "data" (`mesh.shard_inputs`; a batch that is not a
        multiple of the data axis stays replicated) and jit propagates the shardings.
        Give params placed with `sharding.shard_params`; `sharding.generate_sharded` pads
        the batch and calls this.

    Returns:
      `GenerateOutput` (tokens [B, gen_length], nfe [B], stats, the store).

    Raises:
      ValueError: on bad input, naming the argument: shapes, non-integer or out-of-range
        ids, non-integer lengths, unknown policy, a setting (`reuse_depth`,
        `refresh_interval`, `window_size`, `decode_on_block_start`) given to a policy
        that does not use it, a store policy with no prefix in the batch, params that
        do not match `config`, `dkv_greedy` without random remasking, a `decode_order`
        that is not a permutation of each block.
      TypeError: `prompts` not a list, `cache` not a `PrefixStore`, `key` not one PRNG
        key, `config` not a `ModelConfig`, `sampler` not a `SamplerConfig`.
    """
    start = time.perf_counter()
    pol = get_policy(policy)
    if decode_on_block_start is not None:
        if pol.block_cache is None:
            raise ValueError(f"decode_on_block_start applies to block-cache policies "
                             f"(fastdllm_prefix, fastdllm_dual, bicache_dual), not {policy!r}")
        pol = dataclasses.replace(pol, decode_on_block_start=bool(decode_on_block_start))
    # dKV-Cache-Greedy decodes in a fixed random order: its default sampler is `random`.
    sampler = sampler or SamplerConfig(remasking="random" if pol.fixed_order
                                       else "low_confidence")
    steps = gen_length if steps is None else steps
    block_length = gen_length if block_length is None else block_length
    key = jax.random.key(0) if key is None else key
    _check_call(params, config, cache, key)
    prompts = _as_prompts(prompts)
    _validate(config, prompts, gen_length, steps, block_length, pol, sampler,
              refresh_interval, reuse_depth, window_size)
    refresh_interval = (pol.default_refresh_interval if refresh_interval is None
                        else refresh_interval)
    L, batch = config.n_layers, len(prompts)
    fixed_order = pol.fixed_order or decode_order is not None
    order = None
    if decode_order is not None:
        if sampler.remasking != "random":
            raise ValueError(f"decode_order replaces random remasking: it needs "
                             f"SamplerConfig(remasking='random'), got {sampler.remasking!r}")
        order = jnp.asarray(_check_order(decode_order, batch, gen_length, block_length))
    elif fixed_order:
        order = _draw_order(key, batch, gen_length // block_length, block_length)

    if pol.uses_store:
        prefixes = [p.prefix for p in prompts]
        owns = [p.prompt for p in prompts]
    else:
        prefixes = [() for _ in prompts]
        owns = [p.prefix + p.prompt for p in prompts]
    p_lens = np.array([len(x) for x in prefixes], np.int32)
    u_lens = np.array([len(x) for x in owns], np.int32)

    # The store policies: requests without a prefix run uncached, at depth 0 in the stats,
    # and do not lower the batch's depth (validated: at least one request has a prefix).
    store, store_rows, depths, batch_depth = cache, 0, np.zeros(batch, np.int32), 0
    prefix_arrays = (None, None, None, None)
    if pol.uses_store:
        store = cache if cache is not None else PrefixStore()
        store, entries, store_rows = _fill_store(params, config, store, prefixes)
        cached = p_lens > 0
        if pol.refreshes:
            if reuse_depth is None and store.depth_table is None:
                raise ValueError(f"policy {policy!r} needs a reuse depth: pass reuse_depth= "
                                 f"or a store with a profiler depth_table (bicache-jax "
                                 f"profile)")
            for i in np.flatnonzero(cached):
                r = prefix_ratio(p_lens[i], u_lens[i], gen_length, ratio_counts_canvas)
                depths[i] = (reuse_depth if reuse_depth is not None
                             else min(lookup_depth(store.depth_table, r), L))
        else:
            depths[cached] = L
        batch_depth = int(depths[cached].min())
        prefix_arrays = _batch_prefix(entries, prefixes, batch_depth, config,
                                      params["embed"].dtype) + (jnp.asarray(p_lens),)

    u_max = _round_up(int(u_lens.max()), PAD_MULTIPLE)
    own = np.zeros((batch, gen_length + u_max), np.int32)
    pos = np.zeros_like(own)
    own[:, :gen_length] = config.mask_token_id
    for i, ids in enumerate(owns):
        own[i, gen_length:gen_length + len(ids)] = ids
        pos[i, :gen_length] = p_lens[i] + u_lens[i] + np.arange(gen_length)
        pos[i, gen_length:gen_length + len(ids)] = p_lens[i] + np.arange(len(ids))

    plan = _Plan(config=config, sampler=sampler, policy=pol, gen_length=gen_length,
                 steps=steps, block_length=block_length, reuse_depth=batch_depth,
                 row_buckets=_row_buckets(gen_length + int(config.logits_shift)),
                 fixed_order=fixed_order)
    before = compile_count()
    inputs = (jnp.asarray(own), jnp.asarray(pos), jnp.asarray(gen_length + u_lens),
              *prefix_arrays)
    if mesh is not None:  # the batch on "data", prefix KV heads on "model" (mesh.py)
        inputs = shard_inputs(mesh, config, *inputs)
    tokens, nfe, rows, padded, refreshes, row_log, pad_log, n_fwd = _denoise(
        params, plan, *inputs,
        _Controls(key, jnp.int32(refresh_interval), jnp.int32(window_size or 0), order))
    tokens, n_fwd = np.asarray(tokens), int(n_fwd)
    stats = {
        "rows_computed": np.asarray(rows), "rows_padded": np.asarray(padded),
        "rows_per_forward": np.asarray(row_log)[:, :n_fwd],
        "padded_per_forward": np.asarray(pad_log)[:, :n_fwd],
        "refreshes": np.asarray(refreshes), "prefix_len": p_lens, "reuse_depth": depths,
        "batch_reuse_depth": batch_depth, "store_rows_computed": store_rows,
        "seconds": time.perf_counter() - start, "compiles": compile_count() - before,
    }
    if order is not None:
        stats["decode_order"] = np.asarray(order)
    return GenerateOutput(tokens=tokens, nfe=np.asarray(nfe), stats=stats, cache=store)


__all__ = ["GenerateOutput", "Prompt", "compile_count", "compute_prefix_entry", "generate",
           "greedy_window", "lookup_depth", "prefix_ratio"]
