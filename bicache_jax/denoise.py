"""The denoise loop: one jitted program for every cache policy, a block at a time.

Layout of a request inside the loop (see model.py): the **prefix** segment (the shared
prefix, BiCache-family policies only, served from the prefix store) and the **own**
segment `[canvas G (gen_length slots) | prompt U | padding]`. The canvas sits at slots
`0..gen_length-1` for every request, so blocks are static slices; RoPE positions carry the
true order `[P | U | G]`.

`DenoiseLoop` holds everything static about a call (config, sampler, policy, lengths,
reuse depth); its methods are the loop's pieces and `block` runs one semi-autoregressive
block: the block-start forward (block caches), then a `lax.while_loop` over the block's
steps. At each step the policy picks one of three forwards — all own rows, a static-size
subset of own rows against the request's KV buffer, or either of them as a BiCache refresh
of the deep prefix KV — and the sampler unmasks tokens of the current block. Three jitted
entry points share these pieces: `run` (every block, in a `lax.fori_loop`: what `generate`
calls), and `start` + `run_block` (one block per call: what `generate_stream` calls, so a
finished block can be handed back before the next one runs; the same tokens).

BiCache refreshes (`bicache`, `bicache_dual`) follow the official engines: the decoding
step counter `t` runs over the whole request, and every step with `t % N == 0` is a
refresh: its forward recomputes the prefix rows in layers `>= b` from the store's hidden
state at depth `b` (attending to the prefix, the request's cached own KV and the rows
being computed), and the deep prefix K/V it computed replace the cached ones. With
`bicache_dual`'s official schedule the block-start forward (which only builds the dual
cache) is the refresh of the block's first step when that step is due; later steps of a
block refresh in their block-row forward.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .config import ModelConfig
from .model import OwnKV, PrefixKV, forward_rows, logits_from_hidden
from .policies import Policy
from .sampling import (
    FASTDLLM_DREAM,
    SamplerConfig,
    choose_tokens,
    llada_transfer_counts,
    loop_sampler,
    public_dream_loop,
    select_positions,
    select_top,
)

_TRACE_COUNT = [0]


def compile_count() -> int:
    """How many times the denoise loop has been traced (= compiled) in this process."""
    return _TRACE_COUNT[0]


class PrefixInputs(NamedTuple):
    """The batch's shared-prefix state from the store (see `generate._batch_prefix`): one
    entry per distinct prefix of the batch, read by every request that has it.

    k, v:    [b, S, P, Hkv, D] K (after RoPE) and V of the layers below the reuse depth b
             (all L layers for `naive_prefix`).
    index:   [B] the entry each request reads.
    hidden:  [S, P, d] the store's hidden state entering layer b (None when b = L).
    length:  [B] valid prefix rows.
    """

    k: Float[Array, "layers distinct prefix kv_heads dim"]
    v: Float[Array, "layers distinct prefix kv_heads dim"]
    index: Int[Array, " batch"]
    hidden: Float[Array, "distinct prefix d_model"] | None
    length: Int[Array, " batch"]


class Inputs(NamedTuple):
    """Traced per-call inputs of the loop (one pytree)."""

    own_tokens: Int[Array, "batch own"]  # canvas (mask ids) | prompt | padding
    own_pos: Int[Array, "batch own"]  # true positions of the own slots
    own_len: Int[Array, " batch"]  # valid own slots
    prefix: PrefixInputs | None
    key: Array
    refresh_interval: Int[Array, ""]  # N
    window_size: Int[Array, ""]  # Greedy's window
    order: Int[Array, "batch blocks block"] | None  # canvas slots (fixed-order decoding)


class State(NamedTuple):
    """The loop's carry."""

    tokens: Int[Array, "batch own"]  # own tokens (canvas slots updated in place)
    key: Array
    nfe: Int[Array, " batch"]
    rows: Int[Array, " batch"]  # token-layer rows computed
    padded: Int[Array, " batch"]  # token-layer rows padded
    refreshes: Int[Array, " batch"]
    deep_prefix: tuple | None  # (k, v) [L - b, B, P, Hkv, D]: the last refresh's prefix KV
    own_buf: tuple | None  # (k, v) [L, B, R, Hkv, D]: the request's own KV (block caches)
    cache_set: Bool[Array, "batch own"]  # dKV: own slots the next cached step reads
    step: Int[Array, ""]  # decoding steps taken so far (all blocks): BiCache's t
    fwd: Int[Array, ""]  # forwards run so far
    row_log: Int[Array, "batch forwards"]  # token-layer rows computed per forward
    pad_log: Int[Array, "batch forwards"]  # token-layer rows padded per forward


class Outputs(NamedTuple):
    tokens: Int[Array, "batch gen"]
    nfe: Int[Array, " batch"]
    rows: Int[Array, " batch"]
    padded: Int[Array, " batch"]
    refreshes: Int[Array, " batch"]
    row_log: Int[Array, "batch forwards"]
    pad_log: Int[Array, "batch forwards"]
    forwards: Int[Array, ""]


class _Ctx(NamedTuple):
    """Arrays every piece of a block reads: the inputs and what is derived from them."""

    inp: Inputs
    own_valid: Array  # [B, R]
    prompt_slot: Array  # [B, R]
    prefill_set: Array  # [B, R] dKV-Cache-Prefill's set
    prefix_pos: Array | None  # [B, P]
    rank: Array | None  # [B, g]: when each canvas slot is decoded within its block


@dataclasses.dataclass(frozen=True)
class DenoiseLoop:
    """Everything static about a call: one compiled program per distinct loop + shapes.
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
    fixed_order: bool  # decode each block in the order of `Inputs.order`

    # -- static shape facts
    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_forwards(self) -> int:
        """Upper bound on the forwards of one call (the length of the per-forward logs)."""
        per_block = (self.block_length + 1 if self.sampler.threshold is not None
                     else self.steps_per_block)
        return self.num_blocks * (per_block + int(self.policy.block_cache is not None))

    @property
    def dream_loop(self) -> str | None:
        """The public Dream loop whose rules apply, if any (sampling.py)."""
        return public_dream_loop(self.sampler, self.config.logits_shift,
                                 self.policy.block_cache is not None,
                                 self.policy.decode_on_block_start)

    @property
    def decode_sampler(self) -> SamplerConfig:
        """The sampler a decoding step uses: a public Dream loop ranks positions by its
        own confidence."""
        return loop_sampler(self.sampler, self.dream_loop)

    @property
    def refreshes(self) -> bool:
        """The deep prefix KV is refreshed (BiCache with a layer left to recompute)."""
        return self.policy.refreshes and self.reuse_depth < self.config.n_layers

    # -- set-up
    def context(self, inp: Inputs) -> _Ctx:
        c, g, bl = self.config, self.gen_length, self.block_length
        batch, own_size = inp.own_tokens.shape
        slot_ids = jnp.arange(own_size, dtype=jnp.int32)
        own_valid = slot_ids[None, :] < inp.own_len[:, None]
        prompt_slot = (slot_ids[None, :] >= g) & own_valid
        prefix_pos = rank = None
        if inp.prefix is not None:
            p = inp.prefix.k.shape[2]
            prefix_pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
        if self.fixed_order:
            rank = jax.vmap(lambda o: jnp.zeros((g,), jnp.int32).at[o.reshape(-1)].set(
                jnp.tile(jnp.arange(bl, dtype=jnp.int32), self.num_blocks)))(inp.order)
        ctx = _Ctx(inp, own_valid, prompt_slot, own_valid, prefix_pos, rank)
        # dKV-Cache-Prefill's set (E_{-1}): the prompt (Dream: but its last token).
        prefill = self._shifted(ctx, inp.own_tokens != c.mask_token_id, jnp.bool_(False))
        return ctx._replace(prefill_set=prefill & own_valid)

    def init(self, params, ctx: _Ctx) -> State:
        c, inp = self.config, ctx.inp
        batch, own_size = inp.own_tokens.shape
        zeros = jnp.zeros((batch,), jnp.int32)
        own_buf = None
        if self.policy.block_cache is not None or self.policy.dkv is not None:
            shape = (c.n_layers, batch, own_size, c.n_kv_heads, c.head_dim)
            dtype = params["embed"].dtype
            own_buf = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        log = jnp.zeros((batch, self.max_forwards), jnp.int32)
        deep = None
        if self.refreshes and inp.prefix is not None:
            # Never read before it is written: step 0 (t = 0) is always a refresh.
            shape = (c.n_layers - self.reuse_depth, batch, inp.prefix.k.shape[2],
                     c.n_kv_heads, c.head_dim)
            deep = (jnp.zeros(shape, inp.prefix.k.dtype), jnp.zeros(shape, inp.prefix.k.dtype))
        return State(tokens=inp.own_tokens, key=inp.key, nfe=zeros, rows=zeros, padded=zeros,
                     refreshes=zeros, deep_prefix=deep, own_buf=own_buf,
                     cache_set=ctx.prefill_set, step=jnp.int32(0), fwd=jnp.int32(0),
                     row_log=log, pad_log=log)

    @staticmethod
    def outputs(st: State, gen_length: int) -> Outputs:
        return Outputs(st.tokens[:, :gen_length], st.nfe, st.rows, st.padded, st.refreshes,
                       st.row_log, st.pad_log, st.fwd)

    # -- small helpers
    def _batch(self, ctx: _Ctx) -> int:
        return ctx.inp.own_tokens.shape[0]

    def _predictor_slots(self, ctx: _Ctx, slots: Array) -> Array:
        """Own slot whose output predicts each canvas slot (Dream: the previous one)."""
        slots = jnp.broadcast_to(slots, (self._batch(ctx), slots.shape[-1]))
        if not self.config.logits_shift:
            return slots
        prev = slots - 1
        return jnp.where(prev < 0, (ctx.inp.own_len - 1)[:, None], prev)

    def _shifted(self, ctx: _Ctx, decoded: Array, x_last) -> Array:
        """dKV's cacheable set from the decoded set. LLaDA: the decoded set. Dream ("un"
        shift): slot p once its successor in the true order [prompt | canvas] is decoded
        (its output is no longer needed); the last canvas slot gets `x_last`."""
        if not self.config.logits_shift:
            return decoded
        own_size = decoded.shape[1]
        slot_ids = jnp.arange(own_size, dtype=jnp.int32)[None, :]
        succ = jnp.where(slot_ids == (ctx.inp.own_len - 1)[:, None], 0, slot_ids + 1)
        e = jnp.take_along_axis(decoded, jnp.minimum(succ, own_size - 1), axis=1)
        return jnp.where(slot_ids == self.gen_length - 1, x_last, e)

    def _head(self, params, hidden_rows: Array) -> Array:
        logits = logits_from_hidden(params, hidden_rows)
        if self.sampler.cfg_scale > 0:  # LLaDA's classifier-free guidance: [cond; uncond]
            batch = logits.shape[0] // 2
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (self.sampler.cfg_scale + 1.0) * (cond - uncond)
        return logits

    def _block_active(self, tokens: Array, slots: Array) -> Array:
        return jnp.any(tokens[:, slots] == self.config.mask_token_id, axis=1)

    @staticmethod
    def _count(st: State, active, rows, padded=0, refreshed=None) -> State:
        """Book one forward: rows / padded are token-layer rows per request."""
        act = active.astype(jnp.int32)
        rows, padded = act * rows, act * padded
        return st._replace(
            nfe=st.nfe + act, rows=st.rows + rows, padded=st.padded + padded,
            refreshes=st.refreshes + (0 if refreshed is None else act * refreshed),
            row_log=st.row_log.at[:, st.fwd].set(rows, mode="drop"),
            pad_log=st.pad_log.at[:, st.fwd].set(padded, mode="drop"), fwd=st.fwd + 1)

    def _prefix(self, ctx: _Ctx, st: State, refresh: bool) -> tuple[PrefixKV | None, int]:
        """The prefix state and reuse depth of a forward (a refresh reads the store's
        hidden state at depth b; otherwise every layer reads the cached prefix KV)."""
        pre = ctx.inp.prefix
        if pre is None:
            return None, 0
        if refresh:
            return (PrefixKV(pre.k, pre.v, pre.index, None, None, pre.hidden, pre.length),
                    self.reuse_depth)
        deep = st.deep_prefix or (None, None)
        return PrefixKV(pre.k, pre.v, pre.index, *deep, None, pre.length), self.config.n_layers

    def _keep_refresh(self, ctx: _Ctx, st: State, prefix_kv, refresh: bool):
        """Book a forward's refresh: its deep prefix K/V replace the cached ones. Returns
        the state and the prefix token-layer rows it computed."""
        if not refresh:
            return st, 0
        st = st._replace(deep_prefix=tuple(prefix_kv))
        return st, ctx.inp.prefix.length * (self.config.n_layers - self.reuse_depth)

    def _refreshing(self, ctx: _Ctx) -> bool:
        return self.refreshes and ctx.inp.prefix is not None

    def _maybe_refresh(self, ctx: _Ctx, st: State, forward, refresh: bool | None):
        """Run `forward(st, refresh)`: a refresh or not (static), or, with None, a refresh
        when one is due (BiCache: decoding step `t % N == 0`)."""
        if not self._refreshing(ctx):
            return forward(st, False)
        if refresh is not None:
            return forward(st, refresh)
        due = st.step % ctx.inp.refresh_interval == 0
        return jax.lax.cond(due, lambda x: forward(x, True), lambda x: forward(x, False), st)

    # -- forwards
    def _full_forward(self, params, ctx: _Ctx, st: State, slots, want_own_kv: bool,
                      refresh: bool | None = False):
        """All own rows (and the prefix rows in layers >= b on a refresh: see
        `_maybe_refresh`); returns the state, the logits of the block's predictors and the
        own K/V of every layer."""
        c, inp = self.config, ctx.inp
        active = self._block_active(st.tokens, slots)
        cfg = self.sampler.cfg_scale > 0

        def run(st, refresh):
            tokens, pos, lens = st.tokens, inp.own_pos, inp.own_len
            if cfg:
                tokens = jnp.concatenate(
                    [tokens, jnp.where(ctx.prompt_slot, c.mask_token_id, tokens)])
                pos, lens = jnp.concatenate([pos, pos]), jnp.concatenate([lens, lens])
            prefix, depth = self._prefix(ctx, st, refresh)
            out = forward_rows(params, c, tokens, pos, lens, prefix=prefix,
                               prefix_pos=ctx.prefix_pos, reuse_depth=depth,
                               return_prefix_kv=refresh, return_own_kv=want_own_kv)
            st, prefix_rows = self._keep_refresh(ctx, st, out.prefix_kv, refresh)
            st = self._count(st, active, inp.own_len * c.n_layers + prefix_rows,
                             refreshed=jnp.int32(refresh))
            pred = jnp.tile(self._predictor_slots(ctx, slots), (2 if cfg else 1, 1))
            hid = jnp.take_along_axis(out.hidden, pred[..., None], axis=1)
            own_kv = None if out.own_kv is None else tuple(out.own_kv)
            return st, self._head(params, hid), own_kv

        return self._maybe_refresh(ctx, st, run, refresh)

    def _rows_forward(self, params, ctx: _Ctx, st: State, slots, rows, n_valid, pred_index,
                      write_back: bool, refresh: bool = False):
        """A static-size subset of own rows, the other own slots' K/V from own_buf.
        rows: [B, T] own slots (>= own_size: padding); pred_index: [B, bl] row index of
        each block slot's predictor among `rows`. With `refresh` (static) it also recomputes
        the deep prefix rows (BiCache's refresh steps)."""
        c, inp = self.config, ctx.inp
        active = self._block_active(st.tokens, slots)
        own_size = st.tokens.shape[1]
        safe = jnp.minimum(rows, own_size - 1)

        def run(st, refresh):
            prefix, depth = self._prefix(ctx, st, refresh)
            out = forward_rows(
                params, c, jnp.take_along_axis(st.tokens, safe, 1),
                jnp.take_along_axis(inp.own_pos, safe, 1), inp.own_len, prefix=prefix,
                prefix_pos=ctx.prefix_pos, reuse_depth=depth, own_kv=OwnKV(*st.own_buf),
                own_rows=rows, return_prefix_kv=refresh, return_own_kv=write_back)
            st, prefix_rows = self._keep_refresh(ctx, st, out.prefix_kv, refresh)
            st = self._count(st, active, n_valid * c.n_layers + prefix_rows,
                             (rows.shape[1] - n_valid) * c.n_layers,
                             refreshed=jnp.int32(refresh))
            if write_back:
                st = st._replace(own_buf=tuple(out.own_kv))
            hid = jnp.take_along_axis(out.hidden, pred_index[..., None], axis=1)
            return st, self._head(params, hid)

        return self._maybe_refresh(ctx, st, run, refresh)

    def _block_rows(self, ctx: _Ctx, slots):
        """Rows of a block forward: the block (and, for Dream but in Fast-dLLM's Dream
        loop, its first slot's predictor)."""
        rows = jnp.broadcast_to(slots, (self._batch(ctx), slots.shape[-1]))
        pred = jnp.arange(self.block_length)
        if self.dream_loop == FASTDLLM_DREAM:
            # Fast-dLLM's Dream window: the first slot was decoded at the block start, so
            # no predictor row (the public code reads its K/V from the cache); slot j
            # reads row j - 1, slot 0 its own row (never a candidate), as the public shift.
            pred = jnp.maximum(pred - 1, 0)
        elif self.config.logits_shift:
            rows = jnp.concatenate([self._predictor_slots(ctx, slots)[:, :1], rows], axis=1)
        return rows, jnp.broadcast_to(pred, (self._batch(ctx), self.block_length))

    def _prefix_cache_forward(self, params, ctx: _Ctx, st: State, k, slots):
        """Fast-dLLM prefix cache: the block and everything after it, exact row count."""
        g, bl, batch = self.gen_length, self.block_length, self._batch(ctx)

        def branch(kk):
            def f(st):
                rows, pred = self._block_rows(ctx, kk * bl + jnp.arange(g - kk * bl,
                                                                        dtype=jnp.int32))
                n = jnp.full((batch,), rows.shape[1], jnp.int32)
                return self._rows_forward(params, ctx, st, slots, rows, n, pred,
                                          write_back=False)
            return f
        return jax.lax.switch(k, [branch(kk) for kk in range(self.num_blocks)], st)

    def _subset_forward(self, params, ctx: _Ctx, st: State, slots, need):
        """dKV cached step: compute the own slots in `need` [B, R] (gathered in slot order,
        padded to the smallest static bucket that holds the batch's largest count), every
        other slot's K/V read from own_buf; the rows' fresh K/V are written back."""
        batch, own_size = st.tokens.shape
        n_valid = jnp.sum(need, axis=1).astype(jnp.int32)
        order_ = jnp.argsort(~need, axis=1, stable=True).astype(jnp.int32)

        def branch(size):
            def f(st):
                rows = order_[:, :size]
                rows = jnp.where(jnp.arange(size)[None, :] < n_valid[:, None], rows, own_size)
                where_row = jnp.full((batch, own_size + 1), 0, jnp.int32)
                where_row = jax.vmap(lambda w, r: w.at[r].set(jnp.arange(size),
                                                              mode="drop"))(where_row, rows)
                pred = jnp.take_along_axis(where_row, self._predictor_slots(ctx, slots), 1)
                return self._rows_forward(params, ctx, st, slots, rows, n_valid, pred,
                                          write_back=True)
            return f

        # Never more than the canvas (+ Dream's first predictor): every variant caches the
        # prompt but (Dream) its last token; the largest bucket is exactly that.
        buckets = jnp.asarray(self.row_buckets)
        idx = jnp.sum(buckets < jnp.max(n_valid))
        return jax.lax.switch(idx, [branch(sz) for sz in self.row_buckets], st)

    def _dkv_forward(self, params, ctx: _Ctx, st: State, i, slots):
        """One dKV step: a full forward (which refills own_buf) or a cached one."""
        pol, c = self.policy, self.config
        n = ctx.inp.refresh_interval
        # LLaDA (and Greedy everywhere) counts steps per block, Dream over the whole canvas.
        idx = i if (pol.dkv == "greedy" or not c.logits_shift) else st.step
        reset = idx % n == 0
        if pol.dkv in ("decode", "pd") and not c.logits_shift:
            reset = reset | (idx <= 1)  # LLaDA: steps 0 and 1 of a block (cache reset)
        if pol.dkv in ("decode", "greedy"):
            full, cached = reset, st.cache_set
        elif pol.dkv == "prefill":
            full, cached = st.step == 0, ctx.prefill_set
        else:  # pd: a refresh recomputes all but the prefill set
            full, cached = st.step == 0, jnp.where(reset, ctx.prefill_set, st.cache_set)
        need = ctx.own_valid & ~cached

        def full_branch(st):
            st2, logits, own_kv = self._full_forward(params, ctx, st, slots, want_own_kv=True)
            return st2._replace(own_buf=own_kv), logits

        return jax.lax.cond(full, full_branch,
                            lambda x: self._subset_forward(params, ctx, x, slots, need), st)

    def _greedy_rows(self, ctx: _Ctx, before, after, i, quota, slots, k):
        """dKV-Cache-Greedy's rows for step i + 1: W = S_{i+1} (Dream: their predictors)
        + S_i + up to `window_size` still-masked canvas neighbours of each p in S_{i+1},
        taken in the block order, nearest first, left before right."""
        c, g = self.config, self.gen_length
        batch, own_size = after.shape
        masked = after[:, :g] == c.mask_token_id
        just = (before[:, :g] == c.mask_token_id) & ~masked  # S_i
        nxt_blk = select_top(-ctx.rank[:, slots].astype(jnp.float32), masked[:, slots],
                             quota[:, jnp.minimum(i + 1, self.steps_per_block - 1)])
        nxt = jnp.zeros((batch, g), bool).at[:, slots].set(nxt_blk)  # S_{i+1}
        w = jnp.zeros((batch, own_size), bool).at[:, :g].set(just)
        targets = self._predictor_slots(ctx, jnp.arange(g, dtype=jnp.int32))
        targets = jnp.where(nxt, targets, own_size)
        w = jax.vmap(lambda x, t: x.at[t].set(True, mode="drop"))(w, targets)
        w = w.at[:, :g].set(greedy_window(w[:, :g], masked, nxt, ctx.inp.order[:, k],
                                          ctx.inp.window_size))
        return w & ctx.own_valid

    def _decode(self, ctx: _Ctx, st: State, logits, step, quota, slots) -> State:
        """One decoding update of the current block."""
        key, k_tok, k_pos = jax.random.split(st.key, 3)
        block = st.tokens[:, slots]
        candidates = block == self.config.mask_token_id
        # A public Dream loop ranks by its own confidence and counts by its own rule.
        tokens, conf = choose_tokens(logits, k_tok, self.decode_sampler)
        if self.fixed_order:
            chosen = select_top(-ctx.rank[:, slots].astype(jnp.float32), candidates,
                                quota[:, step])
        else:
            chosen = select_positions(conf, candidates, step, self.steps_per_block, quota,
                                      k_pos, self.decode_sampler, self.dream_loop)
        new_block = jnp.where(chosen, tokens, block)
        return st._replace(tokens=st.tokens.at[:, slots].set(new_block), key=key)

    def _step_forward(self, params, ctx: _Ctx, st: State, i, slots, k, refresh: bool):
        pol = self.policy
        if pol.dkv is not None:
            return self._dkv_forward(params, ctx, st, i, slots)
        if pol.block_cache == "dual":
            rows, pred = self._block_rows(ctx, slots)
            n = jnp.full((self._batch(ctx),), rows.shape[1], jnp.int32)
            return self._rows_forward(params, ctx, st, slots, rows, n, pred, write_back=False,
                                      refresh=refresh)
        if pol.block_cache == "prefix":
            return self._prefix_cache_forward(params, ctx, st, k, slots)
        st, logits, _ = self._full_forward(params, ctx, st, slots, want_own_kv=False,
                                           refresh=refresh)
        return st, logits

    # -- one block
    def block(self, params, ctx: _Ctx, st: State, k) -> State:
        """Run semi-autoregressive block `k` to its end (all its steps, or until no mask
        is left with a threshold)."""
        pol, s, c, bl = self.policy, self.sampler, self.config, self.block_length
        slots = k * bl + jnp.arange(bl, dtype=jnp.int32)
        masked = jnp.sum(st.tokens[:, slots] == c.mask_token_id, axis=1)
        quota = llada_transfer_counts(masked, self.steps_per_block)
        first = 0
        if pol.block_cache is not None:
            # The block-start forward is the refresh of the block's first step when due.
            st, logits, own_kv = self._full_forward(params, ctx, st, slots, want_own_kv=True,
                                                    refresh=None)
            st = st._replace(own_buf=own_kv)
            if pol.decode_on_block_start:
                st = self._decode(ctx, st, logits, jnp.int32(0), quota, slots)
                st = st._replace(step=st.step + 1)
                first = 1

        def cond(carry):
            st, i = carry
            if s.threshold is None:
                return i < self.steps_per_block
            return jnp.any(self._block_active(st.tokens, slots)) & (i < bl + 1)

        def step(refresh: bool):
            def body(carry):
                st, i = carry
                before = st.tokens
                st, logits = self._step_forward(params, ctx, st, i, slots, k, refresh)
                st = self._decode(ctx, st, logits, jnp.minimum(i, self.steps_per_block - 1),
                                  quota, slots)
                if pol.dkv in ("decode", "pd"):  # the one-step delay: E_{t-1} is read at t + 1
                    st = st._replace(cache_set=self._shifted(ctx, before != c.mask_token_id,
                                                             st.step > 0))
                elif pol.dkv == "greedy":
                    st = st._replace(cache_set=~self._greedy_rows(ctx, before, st.tokens, i,
                                                                  quota, slots, k))
                return st._replace(step=st.step + 1), i + 1
            return body

        carry = (st, jnp.int32(first))
        if not self._refreshing(ctx):
            return jax.lax.while_loop(cond, step(False), carry)[0]

        # BiCache: the steps between two refreshes run in a loop of their own, with no
        # lax.cond around their forward (on XLA CPU a forward under a cond ran 25-40%
        # slower: measured); each segment starts with the refresh step when one is due.
        def due(carry):
            st, i = carry
            is_due = st.step % ctx.inp.refresh_interval == 0
            # Dual cache: step 0 of a block was refreshed, when due, at the block start.
            return is_due & (i > 0) if pol.block_cache == "dual" else is_due

        def segment(carry):
            carry = jax.lax.cond(due(carry), step(True), lambda c: c, carry)
            return jax.lax.while_loop(lambda c: cond(c) & ~due(c), step(False), carry)

        return jax.lax.while_loop(cond, segment, carry)[0]


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


# ----------------------------------------------------------------------------- entry points


@functools.partial(jax.jit, static_argnames=("loop",))
def run(params, loop: DenoiseLoop, inp: Inputs) -> Outputs:
    """Every block of the call in one program."""
    _TRACE_COUNT[0] += 1
    ctx = loop.context(inp)
    st = jax.lax.fori_loop(0, loop.num_blocks, lambda k, st: loop.block(params, ctx, st, k),
                           loop.init(params, ctx))
    return loop.outputs(st, loop.gen_length)


@functools.partial(jax.jit, static_argnames=("loop",))
def start(params, loop: DenoiseLoop, inp: Inputs) -> State:
    """The loop's initial state (`run_block` then runs one block at a time)."""
    return loop.init(params, loop.context(inp))


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("st",))
def run_block(params, loop: DenoiseLoop, inp: Inputs, st: State, k: Int[Array, ""]) -> State:
    """Block `k` of the call: the same computation as one iteration of `run`'s loop."""
    _TRACE_COUNT[0] += 1
    return loop.block(params, loop.context(inp), st, k)


__all__ = ["DenoiseLoop", "Inputs", "Outputs", "PrefixInputs", "State", "compile_count",
           "greedy_window", "run", "run_block", "start"]
