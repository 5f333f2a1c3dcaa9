"""A batching serving engine over `generate`: validate, group, bucket, run, report.

`Engine.serve(requests)` takes any iterable of `Request`s (a list, or an endless
iterator) and yields one `RequestResult` per request as its batch finishes;
`Engine.run(requests)` collects them in input order.

* **Validation per request.** Every request is checked on its own (the checks
  `generate` makes, plus the engine's: ids, policy, sampler, reuse depth, prefix vs store
  budget, chat messages vs tokenizer). A request that fails comes back at once with
  `ok=False` and the error text; it never joins a batch, so the others complete.
* **Grouping.** Requests share a batch only if every static setting of the compiled loop
  agrees: policy, sampler, gen_length, steps, block_length, refresh_interval and, for the
  refreshing BiCache policies, the effective reuse depth (`generate` runs a batch at its
  smallest depth, so mixing depths would change a request's tokens). Each request's depth
  is resolved up front exactly as `generate` would resolve it alone (explicit
  `reuse_depth`, else the store's `r -> b` table at the request's prefix ratio), so a
  batched request decodes exactly as it would alone (temperature 0).
* **Buckets.** A batch of n requests is padded to the smallest bucket >= n (default
  1, 2, 4, 8) with copies of its last request (same prefix: no extra store work), whose
  outputs are dropped. `generate` pads prompt and prefix lengths to multiples of 16, so
  the number of compiled programs is bounded by groups x buckets x padded-length shapes;
  `EngineStats.compiles` counts them (`generate.compile_count()`), and
  `EngineStats.signatures` the distinct static shapes dispatched.
* **Prefix store.** One `PrefixStore` lives across batches (every store policy reads the
  same prefix-alone entries); its token budget bounds its memory (LRU eviction).
* **Streaming.** A batch holding a request with `on_block` runs through
  `generate_stream` (the same tokens as `generate`), and each such request is handed its
  canvas after every finished block; the others in the batch are served as usual.
* **Bounded memory.** At most `max_pending` requests wait (the group holding the oldest
  one is dispatched when the limit is hit, or when that one has waited `max_wait_s`);
  results are yielded, not kept; the store obeys its budget; compiled programs are
  bounded as above. A long-running `serve` loop therefore holds memory flat.

Timing per request (`RequestResult`): `latency_s` from arrival (the engine pulling it from
the iterable) to its batch's completion; `queue_wait_s` from arrival to its batch's
start; `time_to_first_step_s` = queue wait + prefix-store fill + the first forward.
The denoise loop is one compiled call, so the first forward is estimated: the call's
time divided by its forwards when nothing was compiled, else the call's time less the
remaining forwards at the last measured per-forward time of the same shape (or the whole
call when none was measured yet).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from .config import ModelConfig
from .generate import (
    PAD_MULTIPLE,
    GenerateOutput,
    Prompt,
    _validate,
    compile_count,
    generate,
    generate_stream,
    lookup_depth,
    prefix_entries,
    prefix_ratio,
)
from .policies import Policy, get_policy
from .prefix_store import DEFAULT_BUDGET_TOKENS, PrefixStore
from .sampling import SamplerConfig

DEFAULT_BUCKETS = (1, 2, 4, 8)
Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Give either `prompt` (token ids; `prefix` = the shared-prefix ids, may be empty) or
    `messages` (a chat; split with the tokenizer's chat template into prefix = every
    message but the last, prompt = the last user message + generation prompt). Settings
    left None take `generate`'s defaults (steps = gen_length, one block, the policy's
    refresh interval, the store's depth table).

    Attributes:
      prompt: the request's own token ids.
      prefix: the shared-prefix token ids (served from the prefix store by the BiCache
        family; simply prepended to the prompt by the other policies).
      messages: chat messages (`{"role", "content"}` dicts) instead of `prompt`/`prefix`.
      tokenizer: a `bicache_jax.tokenizer.Tokenizer` for `messages` and for decoding the
        output to text (default: the engine's).
      gen_length, steps, block_length, policy, sampler, reuse_depth, refresh_interval:
        as in `generate` (sampler None: generate's default for the policy).
      generate_kwargs: further keyword arguments of `generate` that apply to a whole batch
        (e.g. `window_size`), as a dict of hashable values; part of the grouping key.
      request_id: any caller tag, echoed in the result.
      on_block: called as `on_block(block, tokens)` after each finished semi-autoregressive
        block, with this request's canvas [gen_length] (later blocks still hold the mask
        id); its batch then runs through `generate_stream`. Called on the engine's thread:
        it must be quick and must not raise (it would fail the whole batch).

    At temperature 0 with a confidence-based remasking a request decodes exactly as it
    would alone; samplers that draw from the PRNG key (temperature > 0, random
    remasking) depend on the batch's key and the request's row, so they do not.
    """

    prompt: Sequence[int] | None = None
    prefix: Sequence[int] = ()
    messages: Sequence[Message] | None = None
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
    gen_length: int = 32
    steps: int | None = None
    block_length: int | None = None
    policy: str = "none"
    sampler: SamplerConfig | None = None
    reuse_depth: int | None = None
    refresh_interval: int | None = None
    generate_kwargs: Any = dataclasses.field(default=None, compare=False)
    request_id: Any = None
    on_block: Callable[[int, np.ndarray], None] | None = dataclasses.field(
        default=None, compare=False, repr=False)


@dataclasses.dataclass
class RequestResult:
    """The outcome of one request (`index` = its position in the input).

    ok / error: False and a message (`"ValueError: ..."`) when the request failed
      (validation, or its batch raised); the other fields are then empty/zero.
    tokens: [gen_length] generated ids; text: their decoding when a tokenizer is known.
    nfe: forwards the request took part in. cache_hit: True when its prefix was in the
      store before its batch ran, False when its batch computed it, None when the policy
      has no store or the request no prefix.
    latency_s, queue_wait_s, time_to_first_step_s: see the module docstring.
    batch_size / bucket: real requests in its batch / the padded batch size.
    reuse_depth: the BiCache depth it ran at (None for other policies).
    """

    index: int
    request_id: Any
    ok: bool
    error: str | None = None
    tokens: np.ndarray | None = None
    text: str | None = None
    nfe: int = 0
    cache_hit: bool | None = None
    latency_s: float = 0.0
    queue_wait_s: float = 0.0
    time_to_first_step_s: float = 0.0
    batch_size: int = 0
    bucket: int = 0
    reuse_depth: int | None = None


@dataclasses.dataclass
class EngineStats:
    """Counters of an engine since it was created.

    compiles: denoise-loop compilations during this engine's batches.
    signatures: distinct static shapes dispatched (group, bucket, padded own length,
      padded prefix length, prefix store entries); compiles <= len(signatures) once
      nothing else compiles.
    max_store_tokens: the most prefix tokens the store held after any batch.
    """

    requests: int = 0
    failed: int = 0
    batches: int = 0
    padded_rows: int = 0
    compiles: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    max_store_tokens: int = 0
    signatures: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """Passed to `Engine(on_batch=...)` after every batch."""

    group: tuple
    size: int
    bucket: int
    seconds: float
    compiles: int
    store_tokens: int
    store_entries: int


@dataclasses.dataclass
class _Item:
    index: int
    request: Request
    prompt: tuple[int, ...]
    prefix: tuple[int, ...]
    policy: Policy
    sampler: SamplerConfig
    steps: int
    block_length: int
    refresh_interval: int
    depth: int | None
    extra: dict
    group: tuple
    arrival: float
    tokenizer: Any


_ENGINE_ARGS = ("params", "prompts", "cache", "config", "gen_length", "steps", "block_length",
                "policy", "sampler", "key", "reuse_depth", "refresh_interval",
                "ratio_counts_canvas", "mesh")


def _check_settings(config: ModelConfig, prompt: Prompt, values: dict[str, Any]) -> None:
    """`generate`'s own checks on one request, passing whatever `generate._validate`
    takes by name (a missing setting is None, as in `generate`)."""
    names = list(inspect.signature(_validate).parameters)
    args = {"config": config, "prompts": [prompt], **values}
    try:
        _validate(*[args.get(n) for n in names])
    except ValueError as e:  # one request: drop the "prompts[0]: " of batch messages
        raise ValueError(re.sub(r"^prompts\[0\]: ", "", str(e))) from None


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _as_ids(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be token ids, got text (use `messages` with a "
                         f"tokenizer, or tokenize it first)")
    try:
        ids = tuple(value)
    except TypeError as e:
        raise ValueError(f"{what} must be a sequence of token ids, got "
                         f"{type(value).__name__}") from e
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what} must hold integer token ids, got {i!r}")
        out.append(int(i))
    return tuple(out)


class Engine:
    """Serve `Request`s in batches through `generate` with one shared prefix store.

    Args:
      params, config: the model.
      store: the prefix store to start from (default: a new one with `budget_tokens` and
        `depth_table`).
      budget_tokens, depth_table: for the default store.
      buckets: allowed padded batch sizes (sorted; the largest is the batch cap). With a
        `mesh` each is rounded up to a multiple of its "data" axis.
      tokenizer: default tokenizer for chat requests and text output.
      mesh: a `sharding.make_mesh` mesh: batches run with `sharding.generate_sharded`
        (pass params placed with `sharding.shard_params`).
      key: base PRNG key; batch i uses `fold_in(key, i)`.
      max_pending: most requests waiting to be batched (memory bound of `serve`).
      max_wait_s: dispatch a group once its oldest request has waited this long (checked
        as requests arrive; None = only when full, over `max_pending`, or at the end).
      ratio_counts_canvas: as `generate`'s (used to resolve table depths).
      on_batch: called with a `BatchInfo` after every batch.
      clock: time source (seconds).
    """

    def __init__(self, params, config: ModelConfig, *, store: PrefixStore | None = None,
                 budget_tokens: int = DEFAULT_BUDGET_TOKENS,
                 depth_table: dict[int, int] | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, tokenizer: Any = None,
                 mesh: Any = None, key: jax.Array | None = None, max_pending: int = 256,
                 max_wait_s: float | None = None, ratio_counts_canvas: bool = True,
                 on_batch: Callable[[BatchInfo], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        buckets = sorted({int(b) for b in buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        if mesh is not None:
            data = mesh.shape["data"]
            buckets = sorted({_round_up(b, data) for b in buckets})
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.params = params
        self.config = config
        self.store = store if store is not None else PrefixStore(
            budget_tokens=budget_tokens, depth_table=depth_table)
        self.buckets: tuple[int, ...] = tuple(buckets)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.key = jax.random.key(0) if key is None else key
        self.max_pending = max_pending
        self.max_wait_s = max_wait_s
        self.ratio_counts_canvas = ratio_counts_canvas
        self.on_batch = on_batch
        self.clock = clock
        self.stats = EngineStats()
        self._forward_s: dict[tuple, float] = {}

    @property
    def max_batch(self) -> int:
        """The largest bucket: no batch holds more requests."""
        return self.buckets[-1]

    # ------------------------------------------------------------------------- validation

    def check(self, request: Request) -> None:
        """Raise ValueError if `serve` would reject `request` (the same per-request checks),
        so a front end can refuse it before queueing it."""
        self._prepare(0, request, self.clock())

    def _prepare(self, index: int, req: Request, arrival: float) -> _Item:
        """Resolve and check one request (raises ValueError with a clear message)."""
        if not isinstance(req, Request):
            raise ValueError(f"expected a serving.Request, got {type(req).__name__}")
        tokenizer = req.tokenizer if req.tokenizer is not None else self.tokenizer
        if req.messages is not None:
            if req.prompt is not None or len(req.prefix):
                raise ValueError("give either `messages` or `prompt`/`prefix`, not both")
            if tokenizer is None:
                raise ValueError("a chat request (`messages`) needs a tokenizer (on the "
                                 "request or the engine)")
            prefix, prompt = tokenizer.split_conversation(req.messages)
            prefix, prompt = _as_ids(prefix, "prefix"), _as_ids(prompt, "prompt")
        else:
            if req.prompt is None:
                raise ValueError("a request needs `prompt` ids or chat `messages`")
            prompt, prefix = _as_ids(req.prompt, "prompt"), _as_ids(req.prefix, "prefix")
        policy = get_policy(req.policy)
        sampler = req.sampler
        if sampler is None:  # generate's default: a fixed random order for dKV-Greedy
            sampler = SamplerConfig(remasking="random" if getattr(policy, "fixed_order", False)
                                    else "low_confidence")
        if not isinstance(sampler, SamplerConfig):
            raise ValueError(f"sampler must be a SamplerConfig, got "
                             f"{type(sampler).__name__}")
        for name in ("gen_length", "steps", "block_length", "reuse_depth",
                     "refresh_interval"):
            value = getattr(req, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        gen_length = int(req.gen_length)
        steps = gen_length if req.steps is None else int(req.steps)
        block_length = gen_length if req.block_length is None else int(req.block_length)
        refresh = (policy.default_refresh_interval if req.refresh_interval is None
                   else int(req.refresh_interval))
        extra = dict(req.generate_kwargs or {})
        clash = sorted(set(extra) & set(_ENGINE_ARGS))
        if clash:
            raise ValueError(f"generate_kwargs cannot set {clash}: they are Request fields "
                             f"or engine settings")
        unknown = sorted(set(extra) - set(inspect.signature(generate).parameters))
        if unknown:
            raise ValueError(f"generate_kwargs: generate takes no {unknown}")
        try:
            extra_key = tuple(sorted(extra.items()))
            hash(extra_key)
        except TypeError as e:
            raise ValueError("generate_kwargs values must be hashable (they are part of the "
                             "batch grouping key)") from e
        _check_settings(self.config, Prompt(prompt=prompt, prefix=prefix),
                        dict(gen_length=gen_length, steps=steps, block_length=block_length,
                             policy=policy, sampler=sampler,
                             refresh_interval=req.refresh_interval,
                             reuse_depth=req.reuse_depth, **extra))
        depth = None
        if policy.uses_store:
            if len(prefix) > self.store.budget_tokens:
                raise ValueError(f"prefix of {len(prefix)} tokens exceeds the prefix store "
                                 f"budget of {self.store.budget_tokens} tokens")
            if policy.refreshes:
                if req.reuse_depth is not None:
                    depth = int(req.reuse_depth)
                elif self.store.depth_table is not None:
                    r = prefix_ratio(len(prefix), len(prompt), gen_length,
                                     self.ratio_counts_canvas)
                    depth = min(lookup_depth(self.store.depth_table, r),
                                self.config.n_layers)
                else:
                    raise ValueError(f"policy {policy.name!r} needs a reuse depth: set "
                                     f"reuse_depth or give the engine a depth_table")
        if req.on_block is not None and self.mesh is not None:
            raise ValueError("streaming (on_block) is not supported with a mesh")
        group = (policy.name, sampler, gen_length, steps, block_length, refresh, depth,
                 extra_key)
        return _Item(index, req, prompt, prefix, policy, sampler, steps, block_length, refresh,
                     depth, extra, group, arrival, tokenizer)

    # ------------------------------------------------------------------------- batches

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _signature(self, items: list[_Item], bucket: int) -> tuple:
        pol = items[0].policy
        entries = 0
        if pol.uses_store:
            own = max(len(it.prompt) for it in items)
            pre = max(len(it.prefix) for it in items)
            pre = _round_up(pre, PAD_MULTIPLE) if pre else 0
            # the batch is padded with copies of its last request (see _run_batch)
            entries = prefix_entries([it.prefix for it in items]
                                     + [items[-1].prefix] * (bucket - len(items)))
        else:
            own, pre = max(len(it.prefix) + len(it.prompt) for it in items), 0
        return items[0].group + (bucket, _round_up(own, PAD_MULTIPLE), pre, entries)

    def _run_batch(self, items: list[_Item]) -> list[RequestResult]:
        first = items[0]
        pol, n = first.policy, len(items)
        bucket = self._bucket(n)
        prompts = [Prompt(prompt=it.prompt, prefix=it.prefix) for it in items]
        prompts += [prompts[-1]] * (bucket - n)
        hits = [None if not (pol.uses_store and it.prefix)
                else self.store.find(it.prefix) is not None for it in items]
        signature = self._signature(items, bucket)
        key = jax.random.fold_in(self.key, self.stats.batches)
        kwargs = dict(config=self.config, gen_length=first.request.gen_length,
                      steps=first.steps, block_length=first.block_length, policy=pol.name,
                      sampler=first.sampler, key=key, reuse_depth=first.depth,
                      refresh_interval=first.request.refresh_interval,  # None: default
                      ratio_counts_canvas=self.ratio_counts_canvas, **first.extra)
        cache = self.store if pol.uses_store else None
        before = compile_count()
        start = self.clock()
        try:
            streams = [it.request.on_block for it in items]
            if any(streams):
                out = self._stream_batch(prompts, cache, streams, kwargs)
            elif self.mesh is not None:
                from .sharding import generate_sharded

                out = generate_sharded(self.params, prompts, cache, mesh=self.mesh, **kwargs)
            else:
                out = generate(self.params, prompts, cache, **kwargs)
        except Exception as e:  # the whole batch fails, the engine goes on
            end = self.clock()
            self.stats.batches += 1
            self.stats.failed += n
            self.stats.requests += n
            msg = f"{type(e).__name__}: {e}"
            return [RequestResult(index=it.index, request_id=it.request.request_id, ok=False,
                                  error=msg, latency_s=end - it.arrival,
                                  queue_wait_s=start - it.arrival) for it in items]
        end = self.clock()
        compiles = compile_count() - before
        if pol.uses_store:
            self.store = out.cache
        st = self.stats
        st.batches += 1
        st.requests += n
        st.padded_rows += bucket - n
        st.compiles += compiles
        st.signatures.add(signature)
        st.cache_hits += sum(h is True for h in hits)
        st.cache_misses += sum(h is False for h in hits)
        st.max_store_tokens = max(st.max_store_tokens, self.store.tokens_held)

        seconds = end - start
        forwards = max(1, int(np.max(out.nfe[:n])))
        if compiles == 0:
            per_forward = seconds / forwards
            self._forward_s[signature] = per_forward
            first_step = per_forward
        else:
            per_forward = self._forward_s.get(signature)
            first_step = (seconds if per_forward is None
                          else max(seconds - (forwards - 1) * per_forward, 0.0))
        results = []
        for i, it in enumerate(items):
            tokens = np.asarray(out.tokens[i])
            text = None
            if it.tokenizer is not None:
                text = it.tokenizer.decode(tokens.tolist())
            results.append(RequestResult(
                index=it.index, request_id=it.request.request_id, ok=True, tokens=tokens,
                text=text, nfe=int(out.nfe[i]), cache_hit=hits[i],
                latency_s=end - it.arrival, queue_wait_s=start - it.arrival,
                time_to_first_step_s=start - it.arrival + first_step, batch_size=n,
                bucket=bucket, reuse_depth=it.depth))
        if self.on_batch is not None:
            self.on_batch(BatchInfo(group=first.group, size=n, bucket=bucket,
                                    seconds=seconds, compiles=compiles,
                                    store_tokens=self.store.tokens_held,
                                    store_entries=len(self.store)))
        return results

    def _stream_batch(self, prompts: list[Prompt], cache: PrefixStore | None,
                      streams: list[Callable[[int, np.ndarray], None] | None],
                      kwargs: dict) -> GenerateOutput:
        """Run a batch block by block, handing each streaming request its canvas after
        every finished block; the last step's output is the batch's output."""
        out = None
        for step in generate_stream(self.params, prompts, cache, **kwargs):
            tokens = np.asarray(step.tokens)
            for i, on_block in enumerate(streams):
                if on_block is not None:
                    on_block(step.block, tokens[i])
            out = step.output
        return out

    def _dispatch(self, items: list[_Item]) -> Iterator[RequestResult]:
        for start in range(0, len(items), self.max_batch):
            yield from self._run_batch(items[start:start + self.max_batch])

    # ------------------------------------------------------------------------- serving

    def serve(self, requests: Iterable[Request]) -> Iterator[RequestResult]:
        """Yield a `RequestResult` for every request, as batches complete.

        Failed validations are yielded at once; valid requests wait in per-group queues
        until a queue fills the largest bucket, `max_pending` requests are waiting (the
        group of the oldest one is dispatched), the oldest has waited `max_wait_s`, or
        the input ends (every queue is flushed, oldest first).
        """
        pending: collections.OrderedDict[tuple, list[_Item]] = collections.OrderedDict()
        waiting = 0

        def oldest_group() -> tuple:
            return min(pending, key=lambda g: pending[g][0].arrival)

        for index, req in enumerate(requests):
            arrival = self.clock()
            try:
                item = self._prepare(index, req, arrival)
            except Exception as e:
                self.stats.requests += 1
                self.stats.failed += 1
                yield RequestResult(index=index, request_id=getattr(req, "request_id", None),
                                    ok=False, error=f"{type(e).__name__}: {e}")
                continue
            queue = pending.setdefault(item.group, [])
            queue.append(item)
            waiting += 1
            if len(queue) >= self.max_batch:
                del pending[item.group]
                waiting -= len(queue)
                yield from self._dispatch(queue)
            while pending and (waiting > self.max_pending or (
                    self.max_wait_s is not None
                    and self.clock() - pending[oldest_group()][0].arrival >= self.max_wait_s)):
                queue = pending.pop(oldest_group())
                waiting -= len(queue)
                yield from self._dispatch(queue)
        while pending:
            queue = pending.pop(oldest_group())
            yield from self._dispatch(queue)

    def run(self, requests: Iterable[Request]) -> list[RequestResult]:
        """Serve every request; the results in input order."""
        return sorted(self.serve(requests), key=lambda r: r.index)

    def summary(self) -> dict:
        """Engine counters and the prefix store's summary, JSON-ready."""
        st = self.stats
        return {"requests": st.requests, "failed": st.failed, "batches": st.batches,
                "padded_rows": st.padded_rows, "compiles": st.compiles,
                "signatures": len(st.signatures), "cache_hits": st.cache_hits,
                "cache_misses": st.cache_misses, "max_store_tokens": st.max_store_tokens,
                "buckets": list(self.buckets), "store": self.store.summary()}


__all__ = ["BatchInfo", "DEFAULT_BUCKETS", "Engine", "EngineStats", "Request",
           "RequestResult"]
