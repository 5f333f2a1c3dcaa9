"""`generate`: validate on the host, then the whole denoise loop in one `jax.jit`.

The host side (this module) validates the call, looks the shared prefixes up in the
prefix store (computing misses on the prefix alone), picks BiCache's reuse depth from the
`r -> b` table, pads the batch to static shapes and hands one `denoise.Inputs` pytree to
the jitted loop (`denoise.py`: the layout of a request inside the loop, the policies'
rules). `generate_stream` runs the same loop one block per call and yields each finished
block.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import denoise
from .config import ModelConfig
from .convert.key_maps import check_params
from .denoise import DenoiseLoop, Inputs, PrefixInputs, compile_count, greedy_window
from .mesh import shard_inputs
from .model import encode_prefix
from .policies import POLICIES, Policy, get_policy
from .prefix_store import PrefixStore, StoredPrefix
from .sampling import SamplerConfig

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
             `store_rows_computed`, `seconds`, `compiles`, `prefix_cache_bytes`: the
             batch's prefix KV on the device — each distinct prefix's store entry once,
             plus the per-request deep KV that BiCache's refreshes keep).
    cache:   the prefix store: the updated one for the store policies, the `cache`
             argument unchanged for the others (None when none was passed), so
             `store = out.cache` keeps the store across calls of any policy.
    """

    tokens: np.ndarray
    nfe: np.ndarray
    stats: dict
    cache: PrefixStore | None


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


def prefix_entries(prefixes: Sequence[tuple[int, ...]]) -> int:
    """How many store entries a batch's prefix state holds: one when every request has the
    same prefix (the serving case: held and read once for the batch), else one slot per
    request (the distinct prefixes, then zeros). Two program shapes per batch shape, so
    the entry count never adds more than one compile."""
    return 1 if len(set(prefixes)) == 1 else len(prefixes)


def _batch_prefix(entries, prefixes, depth, config, dtype):
    """The batch's prefix state, `prefix_entries(prefixes)` slots holding the distinct
    prefixes: k, v [b, S, P, Hkv, D] of the layers below `depth` (all layers at depth L),
    hidden at `depth` [S, P, d] (None at L), and index [B] (P padded to PAD_MULTIPLE;
    requests without a prefix read a zero entry with length 0)."""
    L = config.n_layers
    p_max = _round_up(max(len(ids) for ids in prefixes), PAD_MULTIPLE)
    distinct = [ids for ids in dict.fromkeys(prefixes) if ids]
    index = np.array([distinct.index(ids) if ids else len(distinct) for ids in prefixes],
                     np.int32)

    def stack(get, axis, shape):
        padded = [jnp.pad(get(entries[ids]), [(0, 0)] * axis + [(0, p_max - len(ids))]
                          + [(0, 0)] * (len(shape) - axis - 1)) for ids in distinct]
        # zero slots: read by requests without a prefix (index len(distinct)), or padding
        padded += [jnp.zeros(shape, dtype)] * (prefix_entries(prefixes) - len(distinct))
        return jnp.stack(padded, axis=axis)

    kv_shape = (depth, p_max, config.n_kv_heads, config.head_dim)
    k = stack(lambda e: e.k[:depth], 1, kv_shape)
    v = stack(lambda e: e.v[:depth], 1, kv_shape)
    hidden = None
    if depth < L:
        hidden = stack(lambda e: e.hidden[depth], 0, (p_max, config.d_model))
    return k, v, jnp.asarray(index), hidden


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
        logits decode (Fast-dLLM: `steps_per_block` forwards a block; Dream: its first
        position only, see sampling.py) or the forward only builds the cache (the
        official BiCache + Fast-dLLM schedule, `bicache_dual`'s default: one more forward
        per block). None keeps the policy's default.
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
    call = _prepare(params, prompts, cache, config=config, gen_length=gen_length, steps=steps,
                    block_length=block_length, policy=policy, sampler=sampler, key=key,
                    reuse_depth=reuse_depth, refresh_interval=refresh_interval,
                    ratio_counts_canvas=ratio_counts_canvas, window_size=window_size,
                    decode_order=decode_order, decode_on_block_start=decode_on_block_start,
                    mesh=mesh)
    return _finish(call, denoise.run(params, call.loop, call.inputs))


class StreamStep(NamedTuple):
    """One finished block of `generate_stream`.

    block:   the block's index (0-based).
    tokens:  [B, gen_length] the canvas after that block (later blocks hold the mask id).
    output:  the whole call's `GenerateOutput` on the last block, else None.
    """

    block: int
    tokens: np.ndarray
    output: GenerateOutput | None


def generate_stream(params, prompts: Sequence[Prompt | Sequence[int]],
                    cache: PrefixStore | None = None, **kwargs) -> Iterator[StreamStep]:
    """`generate`, one semi-autoregressive block at a time: yields a `StreamStep` as each
    block finishes (the same tokens, nfe and stats as `generate` with the same arguments;
    one compiled program per block shape, reused by every block). Takes `generate`'s
    arguments. Validation and the store fill happen before the first block runs."""
    call = _prepare(params, prompts, cache, **kwargs)
    loop, g = call.loop, call.loop.gen_length
    state = denoise.start(params, loop, call.inputs)
    for k in range(loop.num_blocks):
        state = denoise.run_block(params, loop, call.inputs, state, jnp.int32(k))
        tokens = np.asarray(state.tokens[:, :g])
        last = k == loop.num_blocks - 1
        yield StreamStep(block=k, tokens=tokens,
                         output=_finish(call, loop.outputs(state, g)) if last else None)


class _Call(NamedTuple):
    """A validated call: the static loop, its traced inputs and the host-side facts."""

    loop: DenoiseLoop
    inputs: Inputs
    store: PrefixStore | None
    prefix_len: np.ndarray
    depths: np.ndarray
    store_rows: int
    started: float
    compiles_before: int


def _prepare(params, prompts, cache, *, config, gen_length=32, steps=None, block_length=None,
             policy="none", sampler=None, key=None, reuse_depth=None, refresh_interval=None,
             ratio_counts_canvas=True, window_size=None, decode_order=None,
             decode_on_block_start=None, mesh=None) -> _Call:
    """Everything `generate` does on the host before the loop (see its docstring)."""
    started = time.perf_counter()
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
    prefix = None
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
        prefix = PrefixInputs(*_batch_prefix(entries, prefixes, batch_depth, config,
                                             params["embed"].dtype), jnp.asarray(p_lens))

    u_max = _round_up(int(u_lens.max()), PAD_MULTIPLE)
    own = np.zeros((batch, gen_length + u_max), np.int32)
    pos = np.zeros_like(own)
    own[:, :gen_length] = config.mask_token_id
    for i, ids in enumerate(owns):
        own[i, gen_length:gen_length + len(ids)] = ids
        pos[i, :gen_length] = p_lens[i] + u_lens[i] + np.arange(gen_length)
        pos[i, gen_length:gen_length + len(ids)] = p_lens[i] + np.arange(len(ids))

    loop = DenoiseLoop(config=config, sampler=sampler, policy=pol, gen_length=gen_length,
                       steps=steps, block_length=block_length, reuse_depth=batch_depth,
                       row_buckets=_row_buckets(gen_length + int(config.logits_shift)),
                       fixed_order=fixed_order)
    arrays = (jnp.asarray(own), jnp.asarray(pos), jnp.asarray(gen_length + u_lens))
    if mesh is not None:  # the batch on "data", prefix KV heads on "model" (mesh.py)
        *arrays, pk, pv, pi, ph, pl = shard_inputs(
            mesh, config, *arrays, *(prefix if prefix is not None else (None,) * 5))
        prefix = None if prefix is None else PrefixInputs(pk, pv, pi, ph, pl)
    inputs = Inputs(*arrays, prefix=prefix, key=key, refresh_interval=jnp.int32(refresh_interval),
                    window_size=jnp.int32(window_size or 0), order=order)
    return _Call(loop, inputs, store, p_lens, depths, store_rows, started, compile_count())


def _finish(call: _Call, out: denoise.Outputs) -> GenerateOutput:
    """The host-side result of a finished loop."""
    n_fwd = int(out.forwards)
    prefix = call.inputs.prefix
    deep = 0 if prefix is None or not call.loop.refreshes else (
        2 * (call.loop.config.n_layers - call.loop.reuse_depth) * prefix.length.shape[0]
        * int(np.prod(prefix.k.shape[2:])) * prefix.k.dtype.itemsize)
    stats = {
        # the batch's prefix KV on the device: the store entries (once per distinct
        # prefix) and the per-request deep KV of the last refresh
        "prefix_cache_bytes": deep + (0 if prefix is None else sum(
            int(a.nbytes) for a in (prefix.k, prefix.v, prefix.hidden) if a is not None)),
        "rows_computed": np.asarray(out.rows), "rows_padded": np.asarray(out.padded),
        "rows_per_forward": np.asarray(out.row_log)[:, :n_fwd],
        "padded_per_forward": np.asarray(out.pad_log)[:, :n_fwd],
        "refreshes": np.asarray(out.refreshes), "prefix_len": call.prefix_len,
        "reuse_depth": call.depths, "batch_reuse_depth": call.loop.reuse_depth,
        "store_rows_computed": call.store_rows,
        "seconds": time.perf_counter() - call.started,
        "compiles": compile_count() - call.compiles_before,
    }
    if call.inputs.order is not None:
        stats["decode_order"] = np.asarray(call.inputs.order)
    return GenerateOutput(tokens=np.asarray(out.tokens), nfe=np.asarray(out.nfe), stats=stats,
                          cache=call.store)


__all__ = ["GenerateOutput", "Prompt", "StreamStep", "compile_count", "compute_prefix_entry",
           "generate", "generate_stream", "greedy_window", "lookup_depth", "prefix_entries",
           "prefix_ratio"]
