"""`bicache-jax serve`: an OpenAI-compatible HTTP server over the batching `Engine`.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI request and
response shapes, plus our fields `policy`, `steps`, `block_length`, `threshold`,
`remasking`, and for completions `prefix`), `GET /health`, `GET /v1/models`,
`GET /metrics` (Prometheus text).

Caching: the chat template splits each conversation into the shared prefix (every
message but the last) and the prompt (`Tokenizer.split_conversation`), so every request
with the same system prompt (and the same history) is served from the one prefix store
the engine keeps across batches. `usage.cached_prefix_tokens` says how many prefix
tokens a request read from the store, `usage.reuse_depth` at which BiCache depth.

Design:

* **One engine thread.** Every request is parsed and checked on the event loop
  (`Engine.check`, the engine's own per-request validation), so a bad one gets its 400
  before it is queued, then handed to a `Batcher`: a bounded queue (past `max_queue`
  waiting requests: 429) drained by one worker thread that runs the `Engine`. The worker
  waits `batch_window_s` after the first request of a round for others to arrive (or
  until `max_batch` are waiting), then serves everything waiting in one `Engine.serve`
  call (its grouping and buckets); each result resolves its request's future as its
  batch finishes. JAX runs only on that thread: the event loop never blocks on it.
* **Failures stay local.** A batch that raises fails its own requests with a 500 (the
  engine catches it); the worker and the server go on.
* **Streaming** (`stream: true`): the request's `on_block` hook receives the canvas after
  each finished semi-autoregressive block (`generate_stream`), and the server sends one
  SSE event per block with the new text, then `data: [DONE]`.
* **Shutdown.** On SIGTERM / SIGINT uvicorn stops accepting connections and waits for the
  open ones (in flight, queued or streaming) to finish; then the worker drains and the
  process exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .config import ModelConfig
from .policies import POLICIES, get_policy
from .prefix_store import DEFAULT_BUDGET_TOKENS
from .sampling import DREAM_REMASKING, REMASKING, SamplerConfig
from .serving import Engine, Request, RequestResult
from .tokenizer import Tokenizer

# Used when the model's tokenizer has no chat template (the project's default model ships
# a bare tokenizer.json): the task suite's own "role : content" turn format.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}")
ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4  # as OpenAI


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model ready to serve: params, config, profiler table, tokenizer and its EOS."""

    params: Any
    config: ModelConfig
    depth_table: dict[int, int] | None
    tokenizer: Tokenizer
    name: str
    eos_token_id: int | None


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Server-wide defaults and limits.

    policy: the cache policy of requests that name none.
    max_batch: the largest batch (buckets are the powers of two below it, and it).
    store_budget: the prefix store's budget in tokens.
    max_tokens: the default `max_tokens`; max_tokens_limit: the most a request may ask.
    block_length: the default semi-autoregressive block length (capped at max_tokens).
    reuse_depth: BiCache's depth when the model has no profiler table (None: half the
      layers).
    batch_window_s: how long the worker waits for more requests after the first.
    max_queue: the most requests waiting for the worker; past it, 429.
    seed: the engine's base PRNG key.
    """

    policy: str = "bicache_dual"
    max_batch: int = 8
    store_budget: int = DEFAULT_BUDGET_TOKENS
    max_tokens: int = 32
    max_tokens_limit: int = 1024
    block_length: int = 32
    reuse_depth: int | None = None
    batch_window_s: float = 0.01
    max_queue: int = 256
    seed: int = 0

    def __post_init__(self):
        for name in ("max_batch", "store_budget", "max_tokens", "max_tokens_limit",
                     "block_length", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens ({self.max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {self.batch_window_s}")


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 404: "invalid_request_error",
                              429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ----------------------------------------------------------------------------- model


def _eos_id(tokenizer: Tokenizer) -> int | None:
    """The tokenizer config's EOS, else the task suite's `<eos>` token when present."""
    eos = tokenizer.eos_token_id
    return eos if eos is not None else tokenizer.token_to_id("<eos>")


def load_served_model(path: str | Path) -> ServedModel:
    """A checkpoint or HF folder with its `tokenizer.json` (ValueError without one)."""
    from .checkpoint import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path} has no tokenizer.json: the server needs a tokenizer "
                         f"(copy the HF folder's tokenizer files next to the checkpoint)")
    params, config, table = load(path)
    tokenizer = Tokenizer.from_folder(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return ServedModel(params, config, table, tokenizer, path.name, _eos_id(tokenizer))


def random_model(seed: int = 0) -> ServedModel:
    """What `bicache-jax serve` runs until a trained default model ships (as the demo
    does): a small random-weight LLaDA-layout model on the task suite's tokenizer."""
    from . import tasks
    from .model import init_params

    config = ModelConfig(layout="llada", vocab_size=tasks.VOCAB_SIZE, d_model=128, n_layers=6,
                         n_heads=4, n_kv_heads=4, head_dim=32, mlp_dim=384,
                         rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                         logits_shift=False, mask_token_id=tasks.MASK_ID, max_seq_len=2048)
    folder = Path(tempfile.mkdtemp(prefix="bicache_tok_"))
    tasks.build_tokenizer(folder / "tokenizer.json")
    tokenizer = Tokenizer(folder / "tokenizer.json", chat_template=FALLBACK_CHAT_TEMPLATE)
    return ServedModel(init_params(config, jax.random.key(seed)), config, None, tokenizer,
                       "random-cpu-small", tasks.EOS_ID)


# ----------------------------------------------------------------------------- batcher


class QueueFull(Exception):
    """The batcher holds `max_queue` waiting requests."""


class ShuttingDown(Exception):
    """The batcher no longer takes requests."""


@dataclasses.dataclass
class _Job:
    request: Request
    future: concurrent.futures.Future
    arrival: float


class Batcher:
    """A bounded queue of requests served by one worker thread running the `Engine`."""

    def __init__(self, engine: Engine, *, batch_window_s: float, max_queue: int,
                 on_round: Callable[[list[RequestResult], float], None] | None = None):
        self.engine = engine
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.on_round = on_round
        self._pending: deque[_Job] = deque()
        self._running = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="bicache-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for the worker."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests in the worker's current round."""
        return self._running

    def submit(self, request: Request) -> concurrent.futures.Future:
        """Queue a request; its future resolves to its `RequestResult`."""
        job = _Job(request, concurrent.futures.Future(), time.perf_counter())
        with self._cond:
            if self._closed:
                raise ShuttingDown
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Serve what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            # The collection window: requests arriving together share batches.
            deadline = self._pending[0].arrival + self.batch_window_s
            while (len(self._pending) < self.engine.max_batch and not self._closed
                   and (left := deadline - time.perf_counter()) > 0):
                self._cond.wait(left)
            jobs = list(self._pending)
            self._pending.clear()
            self._running = len(jobs)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            start = time.perf_counter()
            results = []
            try:
                for result in self.engine.serve(job.request for job in jobs):
                    results.append(result)
                    jobs[result.index].future.set_result(result)
            except Exception as e:  # the engine itself broke: fail the round, go on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self._running = 0
            if self.on_round is not None:
                self.on_round(results, time.perf_counter() - start)


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class Metrics:
    """Server counters (the engine and the store keep their own)."""

    requests: dict = dataclasses.field(default_factory=dict)  # (endpoint, status) -> n
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    rejected_queue_full: int = 0

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def on_round(self, results: list[RequestResult], seconds: float) -> None:
        self.generated_tokens += sum(len(r.tokens) for r in results if r.ok)
        self.busy_seconds += seconds


def prometheus_text(metrics: Metrics, engine: Engine, batcher: Batcher) -> str:
    """The `/metrics` page (Prometheus text exposition format 0.0.4)."""
    st, store = engine.stats, engine.store
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP bicache_{name} {text}")
        lines.append(f"# TYPE bicache_{name} {kind}")
        lines.extend(f"bicache_{name}{labels} {value:g}" for labels, value in samples)

    metric("http_requests_total", "counter", "HTTP requests by endpoint and status.",
           [(f'{{endpoint="{e}",code="{c}"}}', n)
            for (e, c), n in sorted(metrics.requests.items())])
    metric("engine_requests_total", "counter", "Requests the engine served.",
           [("", st.requests)])
    metric("engine_failed_total", "counter", "Requests whose batch failed.", [("", st.failed)])
    metric("batches_total", "counter", "Batches run.", [("", st.batches)])
    metric("padded_rows_total", "counter", "Batch rows added to fill buckets.",
           [("", st.padded_rows)])
    metric("queue_length", "gauge", "Requests waiting for the engine.",
           [("", batcher.queued)])
    metric("running_requests", "gauge", "Requests in the engine's current round.",
           [("", batcher.running)])
    metric("rejected_queue_full_total", "counter", "Requests answered 429.",
           [("", metrics.rejected_queue_full)])
    metric("store_hits_total", "counter", "Prefix store hits.", [("", store.stats.hits)])
    metric("store_misses_total", "counter", "Prefix store misses.", [("", store.stats.misses)])
    metric("store_evictions_total", "counter", "Prefix store evictions.",
           [("", store.stats.evictions)])
    metric("store_bytes", "gauge", "Bytes of prefix KV held.", [("", store.bytes_held)])
    metric("store_tokens", "gauge", "Prefix tokens held.", [("", store.tokens_held)])
    metric("store_entries", "gauge", "Prefixes held.", [("", len(store))])
    metric("generated_tokens_total", "counter", "Canvas tokens generated.",
           [("", metrics.generated_tokens)])
    metric("tokens_per_second", "gauge",
           "Generated tokens per second of engine busy time since start.",
           [("", metrics.generated_tokens / metrics.busy_seconds
             if metrics.busy_seconds else 0.0)])
    metric("compiles_total", "counter", "Denoise-loop compilations.", [("", st.compiles)])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- requests


def _get(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """`body[name]` if present and not null, checked against `kinds` (bools are not
    numbers here, as in JSON)."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:60]}",
                       param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False
            ) -> float | None:
    value = _get(body, name, (int, float), "a number")
    if value is None:
        return None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", param=name,
                       code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = _get(body, name, (int,), "an integer")
    if value is None:
        return None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"'{name}' must be {bound}, got {value}", param=name,
                       code="invalid_value")
    return value


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text"}` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "'messages' is required and must be a list of messages",
                       param="messages", code="invalid_type" if messages is not None else None)
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages",
                       code="empty_array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]",
                           code="invalid_type")
        if m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {list(ROLES)}, got "
                           f"{json.dumps(m.get('role'))}", param=f"messages[{i}].role",
                           code="invalid_value")
        out.append({"role": m["role"], "content": _content(m, i)})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (it is the prompt; "
                       "the ones before it are the cached shared prefix)",
                       param=f"messages[{len(out) - 1}].role", code="invalid_value")
    return out


def _ids_or_text(body: dict, name: str, tokenizer: Tokenizer, required: bool) -> list[int]:
    """A completions `prompt` / `prefix`: text or one list of token ids."""
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"'{name}' is required", param=name)
        return []
    if isinstance(value, str):
        return tokenizer.encode(value)
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                       for i in value):
        return list(value)
    if isinstance(value, list):
        raise APIError(400, f"'{name}' must be a string or one list of token ids (send one "
                       f"request per prompt: a list of prompts is not supported)", param=name,
                       code="invalid_type")
    raise APIError(400, f"'{name}' must be a string or a list of token ids", param=name,
                   code="invalid_type")


@dataclasses.dataclass(frozen=True)
class _Parsed:
    """A checked request: what to run and how to answer it."""

    request: Request
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    prefix_len: int
    prompt_len: int


_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "n", "stream",
           "stream_options", "user", "policy", "steps", "block_length", "threshold",
           "remasking"}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"},
           "completions": _COMMON | {"prompt", "prefix"}}


class App:
    """The request handlers over one model, engine and batcher."""

    def __init__(self, model: ServedModel, settings: ServerSettings):
        self.model = model
        self.settings = settings
        get_policy(settings.policy)  # a bad default fails at startup, not per request
        buckets = sorted({min(2 ** i, settings.max_batch)
                          for i in range(settings.max_batch.bit_length() + 1)})
        self.engine = Engine(model.params, model.config, budget_tokens=settings.store_budget,
                             depth_table=model.depth_table, buckets=buckets,
                             key=jax.random.key(settings.seed),
                             max_pending=settings.max_queue + settings.max_batch)
        self.metrics = Metrics()
        self.batcher = Batcher(self.engine, batch_window_s=settings.batch_window_s,
                               max_queue=settings.max_queue, on_round=self.metrics.on_round)
        self.created = int(time.time())

    @property
    def default_depth(self) -> int | None:
        """BiCache's depth for a model without a profiler table (None: use the table)."""
        if self.model.depth_table is not None:
            return None
        depth = self.settings.reuse_depth
        return self.model.config.n_layers // 2 if depth is None else depth

    # ------------------------------------------------------------------------- parsing

    def parse(self, body: Any, kind: str) -> _Parsed:
        """Check an OpenAI request body and build its engine `Request` (APIError 4xx)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - _FIELDS[kind])
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                           param=unknown[0], code="unknown_parameter")
        model = _get(body, "model", (str,), "a string")
        if model is not None and model != self.model.name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves "
                           f"'{self.model.name}')", param="model", code="model_not_found")
        n = _integer(body, "n", 1)
        if n not in (None, 1):
            raise APIError(400, "only n = 1 is supported (send n requests instead)",
                           param="n", code="invalid_value")
        stream = _get(body, "stream", (bool,), "a boolean") or False
        options = _get(body, "stream_options", (dict,), "an object") or {}
        include_usage = _get(options, "include_usage", (bool,), "a boolean") or False
        _get(body, "user", (str,), "a string")
        limit = self.settings.max_tokens_limit
        max_tokens = _integer(body, "max_tokens", 1, limit)
        if kind == "chat":
            later = _integer(body, "max_completion_tokens", 1, limit)
            max_tokens = later if later is not None else max_tokens
        max_tokens = self.settings.max_tokens if max_tokens is None else max_tokens
        temperature = _number(body, "temperature", 0.0, 2.0) or 0.0
        top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
        threshold = _number(body, "threshold", 0.0, 1.0, low_open=True)
        stop = _get(body, "stop", (str, list), "a string or a list of strings")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"'stop' must be up to {MAX_STOP} non-empty strings",
                           param="stop", code="invalid_value")
        policy = _get(body, "policy", (str,), "a string") or self.settings.policy
        if policy not in POLICIES:
            raise APIError(400, f"unknown policy {policy!r}; known: {sorted(POLICIES)}",
                           param="policy", code="invalid_value")
        remasking = _get(body, "remasking", (str,), "a string")
        if remasking is not None and remasking not in REMASKING:
            raise APIError(400, f"'remasking' must be one of {list(REMASKING)}",
                           param="remasking", code="invalid_value")
        if remasking is None:
            remasking = "random" if POLICIES[policy].fixed_order else "low_confidence"
        if top_p is not None and top_p < 1 and remasking not in DREAM_REMASKING:
            raise APIError(400, f"top_p < 1 needs a Dream sampler (remasking one of "
                           f"{list(DREAM_REMASKING)}); {remasking!r} samples the full "
                           f"distribution", param="top_p", code="invalid_value")
        block_length = _integer(body, "block_length", 1, limit)
        block = block_length or min(self.settings.block_length, max_tokens)
        # The canvas holds whole blocks; the reply keeps the first max_tokens of it.
        gen_length = -(-max_tokens // block) * block
        steps = _integer(body, "steps", 1, 16 * limit)

        tok = self.model.tokenizer
        try:
            if kind == "chat":
                prefix, prompt = tok.split_conversation(_messages(body))
            else:
                prefix = _ids_or_text(body, "prefix", tok, required=False)
                prompt = _ids_or_text(body, "prompt", tok, required=True)
        except ValueError as e:  # the chat template could not render or split it
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        where = "messages" if kind == "chat" else "prompt"
        if not prompt:
            raise APIError(400, "the prompt is empty", param=where, code="invalid_value")
        context = self.model.config.max_seq_len
        total = len(prefix) + len(prompt) + gen_length
        if total > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. "
                           f"However, you requested {total} tokens ({len(prefix)} prefix + "
                           f"{len(prompt)} prompt + {gen_length} canvas). Please reduce the "
                           f"length of the messages or max_tokens.", param=where,
                           code="context_length_exceeded")
        try:
            sampler = SamplerConfig(remasking=remasking, temperature=temperature, top_p=top_p,
                                    threshold=threshold)
        except ValueError as e:
            raise APIError(400, str(e), param="threshold", code="invalid_value") from None
        depth = self.default_depth if POLICIES[policy].refreshes else None
        request = Request(prompt=prompt, prefix=prefix, gen_length=gen_length, steps=steps,
                          block_length=block, policy=policy, sampler=sampler,
                          reuse_depth=depth)
        try:
            self.engine.check(request)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return _Parsed(request, max_tokens, tuple(stop), stream, include_usage, len(prefix),
                       len(prompt))

    # ------------------------------------------------------------------------- answers

    def visible_text(self, canvas: np.ndarray, parsed: _Parsed) -> tuple[str, int, bool]:
        """(text, completion tokens, stopped) of a canvas prefix: cut at EOS, decoded,
        cut at the first stop sequence."""
        ids = [int(t) for t in canvas[:parsed.max_tokens]]
        eos = self.model.eos_token_id
        stopped = eos is not None and eos in ids
        if stopped:
            ids = ids[:ids.index(eos)]
        text = self.model.tokenizer.decode(ids)
        cuts = [i for s in parsed.stop if (i := text.find(s)) >= 0]
        if cuts:
            text, stopped = text[:min(cuts)], True
        return text, len(ids), stopped

    def usage(self, parsed: _Parsed, result: RequestResult, completion_tokens: int) -> dict:
        prompt_tokens = parsed.prefix_len + parsed.prompt_len
        cached = parsed.prefix_len if result.cache_hit else 0
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
                "cached_prefix_tokens": cached, "reuse_depth": result.reuse_depth}

    def info(self, parsed: _Parsed, result: RequestResult) -> dict:
        """Our extension block: how the request was served."""
        return {"policy": parsed.request.policy, "cache_hit": result.cache_hit,
                "nfe": result.nfe, "batch_size": result.batch_size, "bucket": result.bucket,
                "latency_s": result.latency_s, "queue_wait_s": result.queue_wait_s,
                "tokens": [int(t) for t in result.tokens[:parsed.max_tokens]],
                "gen_length": parsed.request.gen_length,
                "block_length": parsed.request.block_length}

    def completion(self, kind: str, parsed: _Parsed, result: RequestResult) -> dict:
        text, n_tokens, stopped = self.visible_text(result.tokens, parsed)
        finish = "stop" if stopped else "length"
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            head = _head("chatcmpl", "chat.completion", self.model.name)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            head = _head("cmpl", "text_completion", self.model.name)
        return head | {"choices": [choice], "usage": self.usage(parsed, result, n_tokens),
                       "bicache": self.info(parsed, result)}

    async def run(self, parsed: _Parsed) -> RequestResult:
        """Queue a request and wait for its result (APIError on 429 / 500 / 503)."""
        future = self.submit(parsed.request)
        try:
            result = await asyncio.wrap_future(future)
        except Exception as e:
            result = e
        return _checked(result)

    def submit(self, request: Request) -> concurrent.futures.Future:
        try:
            return self.batcher.submit(request)
        except QueueFull:
            self.metrics.rejected_queue_full += 1
            raise APIError(429, f"the server's queue is full ({self.settings.max_queue} "
                           f"requests waiting); retry later",
                           code="rate_limit_exceeded") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None

    def start_stream(self, kind: str, parsed: _Parsed) -> AsyncIterator[str]:
        """Queue a streaming request (APIError on 429 / 503 before any byte is sent) and
        return its SSE events: one chunk per finished block with the new text, then
        `[DONE]`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:  # from the engine thread, in call order
            loop.call_soon_threadsafe(events.put_nowait, item)

        request = dataclasses.replace(parsed.request,
                                      on_block=lambda block, canvas: put((block, canvas)))
        future = self.submit(request)
        # Queued after every on_block of the batch: None means "the batch is over".
        future.add_done_callback(lambda _: put(None))
        return self._events(kind, parsed, events, future)

    async def _events(self, kind: str, parsed: _Parsed, events: asyncio.Queue,
                      future: concurrent.futures.Future) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = _head("chatcmpl" if kind == "chat" else "cmpl", obj, self.model.name)
        block_length = parsed.request.block_length
        num_blocks = parsed.request.gen_length // block_length
        text = _TextStream(parsed.stop)

        def chunk(delta: str, block: int, finish: str | None) -> str:
            if kind == "chat":
                message = {"role": "assistant", "content": delta} if block == 0 else {
                    "content": delta}
                choice = {"index": 0, "delta": message, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return _sse(head | {"choices": [choice], "block": block})

        finish = None
        while (item := await events.get()) is not None:
            block, canvas = item
            if finish is not None:
                continue  # a stop sequence ended the reply; its batch runs on
            visible, _, stopped = self.visible_text(canvas[:(block + 1) * block_length],
                                                    parsed)
            if block == num_blocks - 1 or stopped:
                finish = "stop" if stopped else "length"
            yield chunk(text.push(visible, final=finish is not None), block, finish)
        try:
            result = _checked(future.exception() or future.result())
        except APIError as e:
            yield _sse(e.body())
        else:
            if parsed.include_usage:
                _, n_tokens, _ = self.visible_text(result.tokens, parsed)
                yield _sse(head | {"choices": [], "usage": self.usage(parsed, result, n_tokens),
                                   "bicache": self.info(parsed, result)})
        yield "data: [DONE]\n\n"


class _TextStream:
    """Text deltas of a growing completion whose concatenation is the final text: text
    that could still turn into a stop sequence is held back until it cannot."""

    def __init__(self, stop: Sequence[str]):
        self.sent = ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, visible: str, final: bool) -> str:
        end = len(visible) if final else max(len(self.sent), len(visible) - self.hold)
        # A byte-level decoder shows a cut multi-byte character as U+FFFD: wait for it.
        while not final and end > len(self.sent) and visible[end - 1] == "\ufffd":
            end -= 1
        delta = visible[len(self.sent):end] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta


def _head(prefix: str, obj: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj,
            "created": int(time.time()), "model": model}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _checked(result: RequestResult | BaseException) -> RequestResult:
    """The result of a request, or the APIError 500 of its failed batch."""
    if isinstance(result, BaseException):  # the engine itself raised (Batcher._loop)
        raise APIError(500, f"the engine failed: {type(result).__name__}: {result}",
                       code="engine_failed")
    if not result.ok:  # requests are checked before queueing: this is the batch failing
        raise APIError(500, f"the batch serving this request failed: {result.error}",
                       code="batch_failed")
    return result


# ----------------------------------------------------------------------------- ASGI app


def create_app(model: ServedModel, settings: ServerSettings | None = None):
    """The Starlette application (its lifespan starts and drains the engine thread)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    app_state = App(model, settings or ServerSettings())

    def error(e: APIError, endpoint: str) -> JSONResponse:
        app_state.metrics.count(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request: HTTPRequest) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(400, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}",
                           code="invalid_json") from None

    def completions_route(kind: str, endpoint: str):
        async def handler(request: HTTPRequest):
            try:
                parsed = app_state.parse(await read_json(request), kind)
                if parsed.stream:
                    events = app_state.start_stream(kind, parsed)
                    app_state.metrics.count(endpoint, 200)
                    return StreamingResponse(events, media_type="text/event-stream")
                result = await app_state.run(parsed)
            except APIError as e:
                return error(e, endpoint)
            app_state.metrics.count(endpoint, 200)
            return JSONResponse(app_state.completion(kind, parsed, result))
        return handler

    async def health(_: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model.name,
                             "queue_length": app_state.batcher.queued,
                             "running": app_state.batcher.running})

    async def models(_: HTTPRequest) -> JSONResponse:
        cfg = model.config
        return JSONResponse({"object": "list", "data": [{
            "id": model.name, "object": "model", "created": app_state.created,
            "owned_by": "bicache_jax", "max_model_len": cfg.max_seq_len,
            "layout": cfg.layout, "n_layers": cfg.n_layers,
            "default_policy": app_state.settings.policy,
            "depth_table": model.depth_table, "default_reuse_depth": app_state.default_depth,
            "policies": sorted(POLICIES)}]})

    async def metrics(_: HTTPRequest) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(app_state.metrics, app_state.engine,
                                                 app_state.batcher),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(_: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail),
                                     type_="invalid_request_error").body(),
                            status_code=exc.status_code)

    async def server_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}")
                            .body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app_state.batcher.start()
        try:
            yield
        finally:  # uvicorn has drained the connections: nothing is waiting on the worker
            await asyncio.to_thread(app_state.batcher.close)

    app = Starlette(routes=[
        Route("/v1/chat/completions", completions_route("chat", "chat"), methods=["POST"]),
        Route("/v1/completions", completions_route("completions", "completions"),
              methods=["POST"]),
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
    ], exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    app.state.bicache = app_state
    return app


def uvicorn_server(app, host: str, port: int, log_level: str):
    """A uvicorn server whose SIGTERM / SIGINT shut it down gracefully and return
    (uvicorn re-raises a captured signal after shutting down, which would make the exit
    status the signal's instead of 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=None))


def serve(model: ServedModel, settings: ServerSettings, *, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> int:
    """Run the server until SIGTERM / SIGINT; 0 once every open request is answered."""
    server = uvicorn_server(create_app(model, settings), host, port, log_level)
    server.run()
    return 0 if server.started else 1


__all__ = ["APIError", "App", "Batcher", "FALLBACK_CHAT_TEMPLATE", "ServedModel",
           "ServerSettings", "create_app", "load_served_model", "prometheus_text",
           "random_model", "serve", "uvicorn_server"]
