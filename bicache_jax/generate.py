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
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .config import ModelConfig
from .model import OwnKV, PrefixKV, encode_prefix, forward_rows, logits_from_hidden
from .policies import Policy, get_policy
from .prefix_store import PrefixStore, StoredPrefix
from .sampling import SamplerConfig, choose_tokens, llada_transfer_counts, select_positions

PAD_MULTIPLE = 16  # prompt and prefix lengths are padded to multiples of this (fewer compiles)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request: its own prompt ids and the shared prefix ids (may be empty)."""

    prompt: tuple[int, ...]
    prefix: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(i) for i in self.prompt))
        object.__setattr__(self, "prefix", tuple(int(i) for i in self.prefix))


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    tokens:  [B, gen_length] the generated canvas.
    nfe:     [B] forwards each request took part in while its current block had masks.
    stats:   per-request arrays (`rows_computed`, `rows_padded`: token-layer rows, i.e.
             rows x layers; `refreshes`; `prefix_len`; `reuse_depth`) and per-call values
             (`batch_reuse_depth`, `store_rows_computed`, `seconds`, `compiles`).
    cache:   the updated prefix store (None for policies that do not use one).
    """

    tokens: np.ndarray
    nfe: np.ndarray
    stats: dict
    cache: PrefixStore | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about a call: one compiled program per distinct plan + shapes."""

    config: ModelConfig
    sampler: SamplerConfig
    policy: Policy
    gen_length: int
    steps: int
    block_length: int
    reuse_depth: int
    refresh_interval: int
    row_buckets: tuple[int, ...]


_TRACE_COUNT = [0]


def compile_count() -> int:
    """How many times the denoise loop has been traced (= compiled) in this process."""
    return _TRACE_COUNT[0]


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
    prev_decoded: Array  # [B, R] non-mask own slots at the start of the previous step


@functools.partial(jax.jit, static_argnames=("plan",))
def _denoise(params, plan: _Plan, own_tokens, own_pos, own_len, prefix_k, prefix_v,
             prefix_hidden, prefix_len, key):
    _TRACE_COUNT[0] += 1
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
    prompt_slot = (slot_ids[None, :] >= g) & (slot_ids[None, :] < own_len[:, None])

    def predictor_slots(slots):
        """Own slot whose output predicts each canvas slot (Dream: the previous one)."""
        slots = jnp.broadcast_to(slots, (batch, slots.shape[-1]))
        if not c.logits_shift:
            return slots
        prev = slots - 1
        return jnp.where(prev < 0, (own_len - 1)[:, None], prev)

    def head(hidden_rows):
        logits = logits_from_hidden(params, hidden_rows)
        if cfg:  # LLaDA's classifier-free guidance: rows [cond; uncond] along the batch
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (s.cfg_scale + 1.0) * (cond - uncond)
        return logits

    def block_active(tokens, slots):
        return jnp.any(tokens[:, slots] == c.mask_token_id, axis=1)

    def count(st, active, rows, padded=0, refreshed=None):
        act = active.astype(jnp.int32)
        return st._replace(
            nfe=st.nfe + act, rows=st.rows + act * rows, padded=st.padded + act * padded,
            refreshes=st.refreshes + (0 if refreshed is None else act * refreshed))

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

        if has_prefix and pol.refreshes:
            due = st.since_refresh >= plan.refresh_interval
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

    def delayed_kv_forward(st, slots):
        """dKV-Cache-Decode cached step: recompute every own slot not decoded before the
        previous step (the still-masked ones plus the one-step-delayed ones)."""
        valid = slot_ids[None, :] < own_len[:, None]
        need = valid & ~st.prev_decoded
        n_valid = jnp.sum(need, axis=1).astype(jnp.int32)
        order = jnp.argsort(~need, axis=1, stable=True).astype(jnp.int32)

        def branch(size):
            def f(st):
                rows = order[:, :size]
                rows = jnp.where(jnp.arange(size)[None, :] < n_valid[:, None], rows, own_size)
                where_row = jnp.full((batch, own_size + 1), 0, jnp.int32)
                where_row = jax.vmap(lambda w, r: w.at[r].set(jnp.arange(size),
                                                              mode="drop"))(where_row, rows)
                pred = jnp.take_along_axis(where_row, predictor_slots(slots), 1)
                return rows_forward(st, slots, rows, n_valid, pred, write_back=True)
            return f

        buckets = jnp.asarray(plan.row_buckets)
        idx = jnp.sum(buckets < jnp.max(n_valid))
        return jax.lax.switch(idx, [branch(sz) for sz in plan.row_buckets], st)

    # -- one decoding update of the current block
    def decode(st, logits, step, quota, slots):
        key, k_tok, k_pos = jax.random.split(st.key, 3)
        block = st.tokens[:, slots]
        candidates = block == c.mask_token_id
        tokens, conf = choose_tokens(logits, k_tok, s)
        chosen = select_positions(conf, candidates, step, steps_per_block, quota, k_pos, s)
        new_block = jnp.where(chosen, tokens, block)
        return st._replace(tokens=st.tokens.at[:, slots].set(new_block), key=key)

    def step_forward(st, step, slots, k):
        if pol.delayed_kv:
            full = (step <= 1) | (step % plan.refresh_interval == 0)

            def full_branch(st):
                st2, logits, own_kv = full_forward(st, slots, want_own_kv=True)
                return st2._replace(own_buf=own_kv), logits

            return jax.lax.cond(full, full_branch, lambda x: delayed_kv_forward(x, slots), st)
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
            decoded_now = st.tokens != c.mask_token_id
            st, logits = step_forward(st, i, slots, k)
            st = decode(st, logits, jnp.minimum(i, steps_per_block - 1), quota, slots)
            if pol.delayed_kv:
                st = st._replace(prev_decoded=decoded_now)
            return st, i + 1

        st, _ = jax.lax.while_loop(cond, body, (st, jnp.int32(first)))
        return st

    zeros = jnp.zeros((batch,), jnp.int32)
    own_buf = None
    if pol.block_cache is not None or pol.delayed_kv:
        shape = (L, batch, own_size, c.n_kv_heads, c.head_dim)
        dtype = params["embed"].dtype
        own_buf = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    state = _State(
        tokens=own_tokens, key=key, nfe=zeros, rows=zeros, padded=zeros, refreshes=zeros,
        since_refresh=jnp.int32(plan.refresh_interval),
        prefix_buf=(prefix_k, prefix_v) if has_prefix else None, own_buf=own_buf,
        prev_decoded=own_tokens != c.mask_token_id)
    state = jax.lax.fori_loop(0, num_blocks, block_body, state)
    return state.tokens[:, :g], state.nfe, state.rows, state.padded, state.refreshes


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


def _as_prompt(item) -> Prompt:
    if isinstance(item, Prompt):
        return item
    if isinstance(item, (str, bytes)):
        raise ValueError("prompts must be token ids (use bicache_jax.tokenizer for text)")
    return Prompt(prompt=tuple(item))


def _validate(config, prompts, gen_length, steps, block_length, policy, sampler,
              refresh_interval, reuse_depth):
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length "
                         f"({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be divisible by the number of blocks "
                         f"({num_blocks} = gen_length / block_length)")
    if refresh_interval < 1:
        raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
    if reuse_depth is not None and not 0 <= reuse_depth <= config.n_layers:
        raise ValueError(f"reuse_depth must be in 0..{config.n_layers}, got {reuse_depth}")
    if sampler.cfg_scale > 0 and policy.name != "none":
        raise ValueError("cfg_scale > 0 is supported with policy='none' only")
    if policy.delayed_kv and config.logits_shift:
        raise ValueError("dkv_decode is implemented for the LLaDA layout only "
                         "(Dream's shifted cache positions are not supported yet)")
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if not p.prompt:
            raise ValueError(f"prompts[{i}]: the prompt is empty (every request needs at "
                             f"least one prompt token)")
        ids = np.asarray(p.prefix + p.prompt)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must be in [0, {config.vocab_size})")
        if np.any(ids == config.mask_token_id):
            raise ValueError(f"prompts[{i}]: contains the mask token id "
                             f"{config.mask_token_id}")
        total = len(ids) + gen_length
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
        if len(ids) > store.budget_tokens:
            raise ValueError(f"prefix of {len(ids)} tokens exceeds the store budget of "
                             f"{store.budget_tokens} tokens")
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


def _row_buckets(gen_length: int) -> tuple[int, ...]:
    sizes, n = [], 8
    while n < gen_length:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (gen_length,)


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
) -> GenerateOutput:
    """Generate `gen_length` tokens for each prompt with the chosen cache policy.

    Args:
      params: the model params pytree.
      prompts: B requests, each a `Prompt(prompt=ids, prefix=ids)` or a plain id sequence
        (no shared prefix). Lengths may differ; padding is exact.
      cache: the prefix store for the BiCache-family policies (`naive_prefix`, `bicache`,
        `bicache_dual`); None starts an empty one. Ignored by the other policies.
      config: the model's `ModelConfig`.
      gen_length, steps, block_length: the canvas length, the total number of denoising
        steps, and the semi-autoregressive block length (default: one block).
      policy: one of `policies.POLICIES`.
      sampler: token choice and remasking (`SamplerConfig`; default LLaDA low-confidence).
      key: PRNG key (default `jax.random.key(0)`).
      reuse_depth: BiCache's b for the whole batch; default: the store's `r -> b` table
        at each request's prefix ratio, and the smallest depth of the batch.
      refresh_interval: N, steps between deep-prefix refreshes (BiCache, default 16) or
        between full refreshes (dKV-Cache, default 8).
      ratio_counts_canvas: count the canvas in the prefix ratio (as the official code).

    Returns:
      `GenerateOutput` (tokens [B, gen_length], nfe [B], stats, updated store).
    """
    start = time.perf_counter()
    pol = get_policy(policy)
    sampler = sampler or SamplerConfig()
    steps = gen_length if steps is None else steps
    block_length = gen_length if block_length is None else block_length
    refresh_interval = (pol.default_refresh_interval if refresh_interval is None
                        else refresh_interval)
    key = jax.random.key(0) if key is None else key
    prompts = [_as_prompt(p) for p in prompts]
    _validate(config, prompts, gen_length, steps, block_length, pol, sampler,
              refresh_interval, reuse_depth)
    L, batch = config.n_layers, len(prompts)

    if pol.uses_store:
        prefixes = [p.prefix for p in prompts]
        owns = [p.prompt for p in prompts]
    else:
        prefixes = [() for _ in prompts]
        owns = [p.prefix + p.prompt for p in prompts]
    p_lens = np.array([len(x) for x in prefixes], np.int32)
    u_lens = np.array([len(x) for x in owns], np.int32)

    store, store_rows, depths = None, 0, np.zeros(batch, np.int32)
    prefix_arrays = (None, None, None, None)
    if pol.uses_store:
        store = cache if cache is not None else PrefixStore()
        store, entries, store_rows = _fill_store(params, config, store, prefixes)
        if pol.refreshes:
            if reuse_depth is None and store.depth_table is None:
                raise ValueError(f"policy {policy!r} needs a reuse depth: pass reuse_depth= "
                                 f"or a store with a profiler depth_table")
            for i in range(batch):
                r = prefix_ratio(p_lens[i], u_lens[i], gen_length, ratio_counts_canvas)
                depths[i] = (reuse_depth if reuse_depth is not None
                             else min(lookup_depth(store.depth_table, r), L))
        else:
            depths[:] = L
        if p_lens.max() > 0:
            prefix_arrays = _batch_prefix(entries, prefixes, int(depths.min()), config,
                                          params["embed"].dtype) + (jnp.asarray(p_lens),)
    batch_depth = int(depths.min()) if pol.uses_store else 0

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
                 refresh_interval=refresh_interval, row_buckets=_row_buckets(gen_length))
    before = compile_count()
    tokens, nfe, rows, padded, refreshes = _denoise(
        params, plan, jnp.asarray(own), jnp.asarray(pos), jnp.asarray(gen_length + u_lens),
        *prefix_arrays, key)
    tokens = np.asarray(tokens)
    stats = {
        "rows_computed": np.asarray(rows), "rows_padded": np.asarray(padded),
        "refreshes": np.asarray(refreshes), "prefix_len": p_lens, "reuse_depth": depths,
        "batch_reuse_depth": batch_depth, "store_rows_computed": store_rows,
        "seconds": time.perf_counter() - start, "compiles": compile_count() - before,
    }
    return GenerateOutput(tokens=tokens, nfe=np.asarray(nfe), stats=stats, cache=store)


__all__ = ["GenerateOutput", "Prompt", "compile_count", "compute_prefix_entry", "generate",
           "lookup_depth", "prefix_ratio"]
