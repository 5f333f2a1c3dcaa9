"""Load test of `bicache-jax serve`: concurrent chat clients sharing a system prompt.

    python benchmarks/serve_load.py --plot                 # the measurement (minutes)
    python benchmarks/serve_load.py --quick --plot         # a smaller one (<= 5 min, 2 cores)

For each policy (default `none`, `bicache`, `bicache_dual`, `fastdllm_dual`) a fresh server
(a new engine and an empty prefix store, uvicorn in a thread of this process) serves
`--clients` concurrent asyncio + httpx clients on 127.0.0.1. Each client sends chat
requests one after another until `--requests` have been sent in all or `--duration`
seconds have passed. Every request is [system prompt] + one of `--histories` shared
multi-turn histories (none with 0) + its own user question, so the shared prefix (all
messages but the last) is the system prompt plus the history, and with the defaults it
is >= 80% of each request's context (prefix / (prefix + question + canvas)).

Before the clock starts, one burst per batch bucket (same shapes, a different system
prompt) compiles the programs the load needs; `compiles_during_load` reports any compiled
later.
Reported per policy: requests/s, generated tokens/s (canvas tokens), p50 / p99 latency,
store hit rate (the requests whose prefix was already in the store), the hit rate after
the first batch, and with `--verify N` whether the first N replies carry exactly the tokens
of `generate` on each request alone. Writes `benchmarks/results/serve_load_<device>.json`
(and `.png` with `--plot`).

Model: `--model PATH` (a checkpoint or HF folder with a tokenizer), else what
`bicache-jax serve` runs: the shipped default model, or until one ships a small
random-weight model on the task suite's tokenizer (timing only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np

from bicache_jax import tasks
from bicache_jax.bench import git_commit
from bicache_jax.checkpoint import DEFAULT_MODEL
from bicache_jax.generate import Prompt, generate
from bicache_jax.policies import POLICIES as POLICY_TABLE
from bicache_jax.prefix_store import PrefixStore
from bicache_jax.server import (
    ServedModel,
    ServerSettings,
    create_app,
    load_served_model,
    random_model,
    uvicorn_server,
)

RESULTS = Path(__file__).parent / "results"
POLICIES = ("none", "bicache", "bicache_dual", "fastdllm_dual")
WORDS = tasks.FILLER_WORDS  # one token each in the task tokenizer, plain words elsewhere


def workload(n: int, *, seed: int, system_words: int, user_words: int,
             histories: int) -> list[list[dict]]:
    """`n` chats: one system prompt, `histories` shared two-turn histories (round robin;
    none if 0), a distinct question each."""
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(str(w) for w in rng.choice(WORDS, k))

    system = [{"role": "system", "content": words(system_words)}]
    shared = [[{"role": "user", "content": words(user_words)},
               {"role": "assistant", "content": words(4)}] for _ in range(histories)]
    return [system + (shared[i % histories] if histories else [])
            + [{"role": "user", "content": words(user_words)}] for i in range(n)]


class RunningServer:
    """A fresh server (engine, store) in a thread of this process, on a free port."""

    def __init__(self, model: ServedModel, settings: ServerSettings):
        self.app = create_app(model, settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn_server(self.app, "127.0.0.1", 0, "warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def drive(url: str, chats: list[list[dict]], *, clients: int, duration: float,
                body: dict) -> tuple[list[dict], float]:
    """Send `chats` from `clients` concurrent clients until all are sent or `duration`
    seconds have passed; (one record per answered request, wall seconds)."""
    pending = iter(enumerate(chats))
    records: list[dict] = []
    start = time.perf_counter()

    async def client(c: httpx.AsyncClient) -> None:
        for i, messages in pending:
            if time.perf_counter() - start > duration:
                return
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json={"messages": messages, **body})
            rec = {"index": i, "status": r.status_code, "latency_s": time.perf_counter() - t0}
            if r.status_code == 200:
                reply = r.json()
                rec |= {"tokens": reply["bicache"]["tokens"],
                        "cache_hit": reply["bicache"]["cache_hit"],
                        "batch_size": reply["bicache"]["batch_size"],
                        "prompt_tokens": reply["usage"]["prompt_tokens"],
                        "cached_prefix_tokens": reply["usage"]["cached_prefix_tokens"],
                        "finished_s": time.perf_counter() - start}
            records.append(rec)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    return records, time.perf_counter() - start


def warm_up(srv: RunningServer, chats: list[list[dict]], body: dict) -> None:
    """Compile every batch bucket before the clock starts: one burst per bucket size, with
    a collection window long enough for each burst to form one batch. The chats have the
    load's shapes but their own system prompt, so the measured store starts empty."""
    app = srv.app.state.bicache
    window = app.batcher.batch_window_s
    app.batcher.batch_window_s = 2.0
    try:
        for size in app.engine.buckets:
            burst, chats = chats[:size], chats[size:]
            asyncio.run(drive(srv.url, burst, clients=size, duration=1e9, body=body))
    finally:
        app.batcher.batch_window_s = window


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def verify(model: ServedModel, chats: list[list[dict]], records: list[dict], policy: str,
           body: dict, depth: int | None, n: int) -> dict:
    """Compare the first `n` answered requests with `generate` on each alone."""
    ok = sorted((r for r in records if r["status"] == 200), key=lambda r: r["index"])[:n]
    same = 0
    for r in ok:
        prefix, prompt = model.tokenizer.split_conversation(chats[r["index"]])
        out = generate(model.params, [Prompt(prompt=prompt, prefix=prefix)],
                       PrefixStore(depth_table=model.depth_table), config=model.config,
                       policy=policy, gen_length=body["max_tokens"],
                       block_length=body["block_length"], steps=body.get("steps"),
                       reuse_depth=depth)
        same += bool(np.array_equal(out.tokens[0], r["tokens"]))
    return {"verified": len(ok), "identical": same}


def run_policy(model: ServedModel, policy: str, args: argparse.Namespace) -> dict:
    """Warm a fresh server up, then measure it under load."""
    settings = ServerSettings(policy=policy, max_batch=args.max_batch,
                              max_tokens=args.max_tokens, block_length=args.block_length,
                              max_tokens_limit=max(args.max_tokens, 1024),
                              batch_window_s=args.batch_window_ms / 1000,
                              max_queue=max(256, 2 * args.clients))
    body = {"max_tokens": args.max_tokens, "block_length": args.block_length}
    if args.steps:
        body["steps"] = args.steps
    shape = dict(system_words=args.system_words, user_words=args.user_words,
                 histories=args.histories)
    chats = workload(args.requests, seed=0, **shape)
    with RunningServer(model, settings) as srv:
        warm_up(srv, workload(sum(srv.app.state.bicache.engine.buckets), seed=1, **shape),
                body)
        before = _metrics(srv.url)
        records, wall = asyncio.run(drive(srv.url, chats, clients=args.clients,
                                          duration=args.duration, body=body))
        after = _metrics(srv.url)
        depth = srv.app.state.bicache.default_depth if POLICY_TABLE[policy].refreshes else None
    ok = [r for r in records if r["status"] == 200]
    latency = np.array([r["latency_s"] for r in ok]) if ok else np.zeros(1)
    hits = [r for r in ok if r["cache_hit"] is not None]
    first_batch = min(len(hits), args.max_batch)
    by_finish = sorted(hits, key=lambda r: r["finished_s"])[first_batch:]
    ratios = [r["prompt_tokens"] for r in ok]
    result = {
        "policy": policy, "sent": len(records), "answered": len(ok),
        "errors": sorted({r["status"] for r in records if r["status"] != 200}),
        "wall_s": wall, "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(len(r["tokens"]) for r in ok) / wall,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "store_hit_rate": (sum(r["cache_hit"] for r in hits) / len(hits)) if hits else None,
        "store_hit_rate_after_first_batch": (
            sum(r["cache_hit"] for r in by_finish) / len(by_finish) if by_finish else None),
        "mean_batch_size": float(np.mean([r["batch_size"] for r in ok])) if ok else 0.0,
        "mean_prompt_tokens": float(np.mean(ratios)) if ratios else 0.0,
        "compiles_during_load": after["bicache_compiles_total"]
        - before["bicache_compiles_total"],
    }
    if args.verify:
        result |= verify(model, chats, records, policy, body, depth, args.verify)
    return result


def _prefix_share(model: ServedModel, args: argparse.Namespace) -> float:
    """Shared prefix / (prefix + prompt + canvas) of the workload's first request."""
    chat = workload(1, seed=0, system_words=args.system_words, user_words=args.user_words,
                    histories=args.histories)[0]
    prefix, prompt = model.tokenizer.split_conversation(chat)
    return len(prefix) / (len(prefix) + len(prompt) + args.max_tokens)


def markdown_table(result: dict) -> str:
    lines = ["| policy | answered | req/s | tokens/s | p50 s | p99 s | store hit % | "
             "hit % after 1st batch | identical to generate |", "|---" * 9 + "|"]
    for r in result["results"]:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}"
        same = (f"{r['identical']}/{r['verified']}" if "verified" in r else "not checked")
        lines.append(f"| {r['policy']} | {r['answered']}/{r['sent']} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | "
                     f"{pct(r['store_hit_rate'])} | "
                     f"{pct(r['store_hit_rate_after_first_batch'])} | {same} |")
    for a, b in (("bicache", "none"), ("bicache_dual", "fastdllm_dual")):
        tps = {r["policy"]: r["tokens_per_s"] for r in result["results"]}
        if a in tps and b in tps and tps[b]:
            lines.append(f"\n{a} / {b} throughput: {tps[a] / tps[b]:.2f}x")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    names = [r["policy"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [r["tokens_per_s"] for r in rows])
    a.set_ylabel("generated tokens / s")
    a.set_title("throughput through the server")
    x = np.arange(len(rows))
    b.bar(x - 0.2, [r["latency_p50_s"] for r in rows], 0.4, label="p50")
    b.bar(x + 0.2, [r["latency_p99_s"] for r in rows], 0.4, label="p99")
    b.set_xticks(x, names)
    b.set_ylabel("latency s")
    b.legend()
    b.set_title("request latency")
    s = result["settings"]
    fig.suptitle(f"{s['clients']} clients, {result['model']}, prefix share "
                 f"{100 * result['prefix_share']:.0f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or HF folder with a tokenizer (default: what "
                    "`bicache-jax serve` runs)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=256, help="requests per policy (bound)")
    ap.add_argument("--duration", type=float, default=120.0,
                    help="seconds of sending per policy (bound)")
    ap.add_argument("--system-words", type=int, default=200)
    ap.add_argument("--user-words", type=int, default=12)
    ap.add_argument("--histories", type=int, default=4,
                    help="shared two-turn histories (0: single-turn chats)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="default: max_tokens")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--verify", type=int, default=64,
                    help="check the first N replies against generate alone (0: skip)")
    ap.add_argument("--quick", action="store_true",
                    help="64 clients, 128 requests, 60 s bound, verify 16")
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/"
                    "serve_load_<device>.json)")
    ap.add_argument("--plot", action="store_true", help="also write the PNG")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.requests, args.duration, args.verify = 128, 60.0, min(args.verify, 16)
    if args.model is None and not DEFAULT_MODEL.exists():
        model = random_model()
        weights = "random (untrained): timing only"
    else:
        model = load_served_model(args.model or DEFAULT_MODEL)
        weights = "trained"
    policies = [p for p in args.policies.split(",") if p]
    result = {
        "device": {"platform": jax.devices()[0].platform,
                   "device_kind": jax.devices()[0].device_kind,
                   "host": platform.machine()},
        "jax_version": jax.__version__, "git_commit": git_commit(), "model": model.name,
        "weights": weights, "prefix_share": _prefix_share(model, args),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "results": [],
    }
    for policy in policies:
        print(f"{policy}: warm-up, then {args.requests} requests from "
              f"{args.clients} clients ...", flush=True)
        result["results"].append(run_policy(model, policy, args))
        r = result["results"][-1]
        print(f"  {r['tokens_per_s']:.1f} tokens/s, p50 {r['latency_p50_s']:.2f} s, "
              f"p99 {r['latency_p99_s']:.2f} s, hit rate {r['store_hit_rate']}", flush=True)
    out = Path(args.out) if args.out else (
        RESULTS / f"serve_load_{result['device']['platform']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
