"""Throughput benchmark: every policy across shared-prefix ratios and batch sizes.

Throughput = requests x gen_length / wall time of a warm `generate` call (compilation
excluded: reported separately with the number of compilations; the prefix store is warm,
as in serving, and the cold store fill is reported separately). Beside every measured time
stands a floor: the FLOPs the call must do (from the rows it really computed) divided by
the device's peak, so the distance to the limit is visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .cli_args import HelpFormatter, choice_list, int_in, int_list
from .config import ModelConfig, llada_8b
from .generate import Prompt, compile_count, compute_prefix_entry, generate
from .model import init_params
from .policies import POLICIES
from .prefix_store import PrefixStore
from .sampling import SamplerConfig

# Dense bf16 peaks (TFLOP/s) of accelerators we may be lent; CPU peak is measured.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5e": 197.0,
               "TPU v5p": 459.0, "TPU v6": 918.0}


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    model: str  # "cpu_small" | "llada_8b" | "toy"
    gen_length: int
    steps: int
    block_length: int
    refresh_interval: int
    prompt_len: int
    ratios: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    policies: tuple[str, ...]
    repeats: int = 2
    dtype: str = "float32"


SCALES = {
    # The paper's workload shape at LLaDA-8B size (random bf16 weights) for a GPU.
    "gpu": BenchSettings("llada_8b", 256, 128, 32, 16, 64, (10, 30, 50, 70, 90),
                         (1, 4, 16), tuple(POLICIES), repeats=2, dtype="bfloat16"),
    # A small LLaDA layout that finishes in minutes on 2 CPU cores.
    "cpu": BenchSettings("cpu_small", 64, 32, 16, 16, 16, (10, 30, 50, 70, 90), (1, 4),
                         tuple(POLICIES), repeats=2),
    # CI smoke size: checks the pipeline and the JSON, not the numbers.
    "toy": BenchSettings("toy", 16, 4, 8, 2, 4, (50,), (1,), ("none", "bicache"), repeats=1),
}


def model_config(name: str) -> ModelConfig:
    if name == "llada_8b":
        return llada_8b().replace(max_seq_len=8192)
    if name == "cpu_small":
        return ModelConfig(layout="llada", vocab_size=512, d_model=128, n_layers=6,
                           n_heads=4, n_kv_heads=4, head_dim=32, mlp_dim=384,
                           rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                           logits_shift=False, mask_token_id=511, max_seq_len=2048)
    if name == "cpu_d384":  # 13.8M params: the shape of issue 14's measurements
        return ModelConfig(layout="llada", vocab_size=4096, d_model=384, n_layers=6,
                           n_heads=6, n_kv_heads=6, head_dim=64, mlp_dim=1024,
                           rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                           logits_shift=False, mask_token_id=4095, max_seq_len=4096)
    if name == "toy":
        return ModelConfig(layout="llada", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=2, head_dim=16, mlp_dim=64, rope_theta=500000.0,
                           norm_eps=1e-5, qkv_bias=False, logits_shift=False,
                           mask_token_id=63, max_seq_len=512)
    raise ValueError(f"unknown benchmark model {name!r}")


def device_info() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count()}


def peak_tflops(repeats: int = 3) -> tuple[float, str]:
    """The device's peak: the table for known accelerators, else a measured matmul rate."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak, f"datasheet dense bf16 ({name})"
    n = 1024
    best = _best_seconds(lambda x: x @ x, jnp.ones((n, n), jnp.float32), repeats)
    return 2 * n ** 3 / best / 1e12, "measured float32 1024^3 matmul"


def _best_seconds(fn, x, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `jit(fn)(x)`, after one warm-up call."""
    f = jax.jit(fn)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def _layer_matmul_params(config: ModelConfig) -> int:
    """Weights of one layer's matmuls: Q, K, V, output projections and the gated MLP."""
    d = config.d_model
    return d * config.q_dim + 2 * d * config.kv_dim + config.q_dim * d + 3 * d * config.mlp_dim


def _row_flops(config: ModelConfig, seq_len: int) -> int:
    """FLOPs of one token-layer row: projections, MLP, attention over `seq_len` keys."""
    return (2 * _layer_matmul_params(config)
            + 4 * config.n_heads * config.head_dim * seq_len)


def call_flops(config: ModelConfig, rows_computed: float, seq_len: int, nfe: float,
               block_length: int) -> float:
    """FLOPs of a request: projections and MLP of every computed token-layer row,
    attention of every row against the whole sequence, the head on the decoded rows."""
    return (rows_computed * _row_flops(config, seq_len)
            + nfe * block_length * 2 * config.d_model * config.vocab_size)


def memory_gbps(mib: int = 64, repeats: int = 5) -> float:
    """Measured memory bandwidth: a jitted elementwise pass over `mib` MiB of float32 (read
    once, written once), best of `repeats`, GB/s."""
    x = jnp.ones((mib * 2**18,), jnp.float32)
    return 2 * x.nbytes / _best_seconds(lambda a: a * 2.0, x, repeats) / 1e9


def roofline_seconds(config: ModelConfig, rows_per_forward: np.ndarray, seq_len: int,
                     block_length: int, peak_flops: float, bandwidth: float) -> float:
    """A floor under a call's time that also counts memory traffic: for each forward,
    max(its FLOPs / peak, its bytes / bandwidth), summed. rows_per_forward [B, forwards]:
    token-layer rows. A forward reads every weight once (the embedding table aside) and,
    per request, the K/V of the whole sequence in every layer; the head runs on one block
    per request."""
    d = config.d_model
    per_row = _row_flops(config, seq_len)
    batch = rows_per_forward.shape[0]
    weights = 4 * (config.n_layers * _layer_matmul_params(config) + d * config.vocab_size)
    kv = 4 * batch * seq_len * config.n_layers * 2 * config.kv_dim
    head = batch * block_length * 2 * d * config.vocab_size
    rows = rows_per_forward.sum(axis=0)
    flops = rows[rows > 0] * per_row + head
    return float(np.sum(np.maximum(flops / peak_flops, (weights + kv) / bandwidth)))


def git_commit() -> str:
    """`git rev-parse HEAD` of this checkout, or "unknown" outside one."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(result: dict, out: str | Path | None, results: Path, name: str) -> Path:
    """Write a benchmark's JSON to `out`, default `<results>/<name>_<platform>.json`;
    returns the path."""
    path = Path(out or results / f"{name}_{jax.devices()[0].platform}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}\n")
    return path


def _prompts(config, batch, prefix_len, prompt_len, seed):
    rng = np.random.default_rng(seed)
    hi = config.mask_token_id
    prefix = tuple(rng.integers(0, hi, prefix_len).tolist())
    return [Prompt(prompt=tuple(rng.integers(0, hi, prompt_len).tolist()), prefix=prefix)
            for _ in range(batch)]


def run(settings: BenchSettings, *, params=None, depth_table=None, progress=print) -> dict:
    """Run the sweep; returns the JSON-ready result dict."""
    config = model_config(settings.model)
    if params is None:
        dtype = jnp.bfloat16 if settings.dtype == "bfloat16" else jnp.float32
        params = init_params(config, jax.random.key(0), dtype)
    peak, peak_source = peak_tflops()
    g, u = settings.gen_length, settings.prompt_len
    rows = []
    for batch in settings.batch_sizes:
        for ratio in settings.ratios:
            # ratio of the shared prefix in the prompt: p / (p + u)
            p = max(1, round(ratio / (100 - ratio) * u))
            prompts = _prompts(config, batch, p, u, seed=ratio)
            table = depth_table or {0: 0}
            for policy in settings.policies:
                # BiCache's depth for this ratio: from the table when given, else half depth.
                depth = None if depth_table else config.n_layers // 2
                kw = dict(config=config, gen_length=g, steps=settings.steps,
                          block_length=settings.block_length, policy=policy,
                          refresh_interval=(settings.refresh_interval
                                            if policy in ("bicache", "bicache_dual") else None),
                          reuse_depth=depth if "bicache" in policy else None,
                          # dKV-Cache-Greedy at the public README setting (N=2, w=4)
                          window_size=4 if POLICIES[policy].fixed_order else None)
                store = PrefixStore(depth_table=table, budget_tokens=max(5000, 2 * p))
                before = compile_count()
                t0 = time.perf_counter()
                out = generate(params, prompts, store, **kw)
                first = time.perf_counter() - t0
                compiles = compile_count() - before
                store = out.cache
                generate(params, prompts, store, **kw)  # warm-up: first runs are slower
                times = []
                for rep in range(settings.repeats):
                    t0 = time.perf_counter()
                    out = generate(params, prompts, store, key=jax.random.key(rep), **kw)
                    times.append(time.perf_counter() - t0)
                wall = float(np.median(times))
                nfe = float(np.mean(out.nfe))
                seq = p + u + g
                flops = sum(call_flops(config, float(r), seq, float(n), settings.block_length)
                            for r, n in zip(out.stats["rows_computed"], out.nfe, strict=True))
                store_fill_s = 0.0
                if POLICIES[policy].uses_store:  # a cold store: one prefix-alone forward
                    t0 = time.perf_counter()
                    jax.block_until_ready(compute_prefix_entry(params, config,
                                                               prompts[0].prefix).k)
                    store_fill_s = time.perf_counter() - t0
                row = {
                    "policy": policy, "ratio": ratio, "batch": batch, "prefix_len": p,
                    "prompt_len": u, "seq_len": seq, "wall_s": wall,
                    "tokens_per_s": batch * g / wall,
                    "compile_s": max(first - wall, 0.0), "compiles": compiles,
                    "step_s": wall / max(nfe, 1), "nfe": nfe,
                    "store_fill_s": store_fill_s,
                    "time_to_first_step_s": store_fill_s + wall / max(nfe, 1),
                    "rows_per_request": float(np.mean(out.stats["rows_computed"])),
                    "rows_padded_per_request": float(np.mean(out.stats["rows_padded"])),
                    "reuse_depth": int(out.stats["batch_reuse_depth"]),
                    "cache_bytes": out.cache.bytes_held if out.cache is not None else 0,
                    "flops": flops, "floor_s": flops / (peak * 1e12),
                    "mfu": flops / wall / (peak * 1e12),
                }
                rows.append(row)
                progress(f"{policy:>16} ratio {ratio:>2}% batch {batch:>2}: "
                         f"{row['tokens_per_s']:9.1f} tok/s  wall {wall:7.3f}s  "
                         f"floor {row['floor_s']:.4f}s  MFU {100 * row['mfu']:5.1f}%  "
                         f"rows/req {row['rows_per_request']:.0f}")
    return {
        "machine": {"node": platform.node(), "processor": platform.processor(),
                    "python": platform.python_version()},
        "device": device_info(), "jax_version": jax.__version__, "git_commit": git_commit(),
        "weights": "random (untrained): timing only" if settings.model != "trained" else
                   "trained",
        "peak_tflops": peak, "peak_source": peak_source,
        "settings": dataclasses.asdict(settings), "model_config": dataclasses.asdict(config),
        "results": rows,
    }


def speedups(result: dict) -> list[dict]:
    """bicache / none and bicache_dual / fastdllm_dual throughput ratios per setting."""
    by = {(r["policy"], r["ratio"], r["batch"]): r["tokens_per_s"] for r in result["results"]}
    out = []
    for (pol, ratio, batch), tps in sorted(by.items()):
        if pol == "bicache" and ("none", ratio, batch) in by:
            out.append({"ratio": ratio, "batch": batch, "pair": "bicache/none",
                        "speedup": tps / by[("none", ratio, batch)]})
        if pol == "bicache_dual" and ("fastdllm_dual", ratio, batch) in by:
            out.append({"ratio": ratio, "batch": batch, "pair": "bicache_dual/fastdllm_dual",
                        "speedup": tps / by[("fastdllm_dual", ratio, batch)]})
    return out


def markdown_table(result: dict) -> str:
    """README table generated from a result JSON."""
    lines = ["| policy | ratio % | batch | tokens/s | wall s | floor s | MFU % | rows/req |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['policy']} | {r['ratio']} | {r['batch']} | "
                     f"{r['tokens_per_s']:.1f} | {r['wall_s']:.3f} | {r['floor_s']:.4f} | "
                     f"{100 * r['mfu']:.1f} | {r['rows_per_request']:.0f} |")
    sp = speedups(result)
    if sp:
        lines += ["", "| pair | ratio % | batch | speedup |", "|---|---|---|---|"]
        lines += [f"| {s['pair']} | {s['ratio']} | {s['batch']} | {s['speedup']:.2f}x |"
                  for s in sp]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["results"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for pol in dict.fromkeys(r["policy"] for r in result["results"]):
            pts = sorted((r["ratio"], r["tokens_per_s"]) for r in result["results"]
                         if r["policy"] == pol and r["batch"] == batch)
            ax.plot(*zip(*pts, strict=True), marker="o", label=pol)
        ax.set(title=f"batch {batch} ({result['device']['device_kind']})",
               xlabel="shared prefix ratio (%)", ylabel="tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- paired runs


@dataclasses.dataclass(frozen=True)
class Workload:
    """One shared-prefix workload of a paired run: every request has the same shared
    prefix (`prefix_len` tokens) and its own prompt (`prompt_len`)."""

    name: str
    prefix_len: int
    prompt_len: int
    batch: int = 1
    threshold: float | None = None
    reuse_depth: int = 2
    policies: tuple[str, ...] = ("fastdllm_dual", "bicache_dual", "bicache_dual_tuned")
    steps: int | None = None  # decoding steps (None: the scale's)


# Policy variants of a paired run: (policy, extra generate arguments).
VARIANTS = {
    "none": ("none", {}),
    "bicache": ("bicache", {}),
    "fastdllm_prefix": ("fastdllm_prefix", {}),
    "fastdllm_dual": ("fastdllm_dual", {}),
    "bicache_dual": ("bicache_dual", {}),  # the official schedule, N = 16
    "bicache_dual_dobs": ("bicache_dual", {"decode_on_block_start": True}),
    "bicache_dual_tuned": ("bicache_dual", {"decode_on_block_start": True,
                                            "refresh_interval": 32}),
}
# Speedup pairs reported: (numerator, denominator) variants.
PAIRS = (("bicache", "none"), ("bicache_dual", "fastdllm_dual"),
         ("bicache_dual_dobs", "fastdllm_dual"), ("bicache_dual_tuned", "fastdllm_dual"))


@dataclasses.dataclass(frozen=True)
class PairedSettings:
    model: str
    gen_length: int
    steps: int
    block_length: int
    workloads: tuple[Workload, ...]
    repeats: int = 5


_ALL = ("none", "bicache", "fastdllm_prefix", "fastdllm_dual", "bicache_dual",
        "bicache_dual_dobs", "bicache_dual_tuned")
PAIRED_SCALES = {
    # The regime BiCache is for, at the shape of issue 14's checkpoint (d384 x 6 layers,
    # vocab 4096): 512-token prompts 90% / 50% shared, a 1024-token shared prefix with a
    # 64-token question; gen 256, 128 steps, blocks of 32. Random weights are never
    # confident: with threshold 0.9 every mask of a block has about the same confidence and
    # one token is unmasked per forward (256 forwards; with the head scaled up, all 32 of a
    # block at once: measured), where a trained model unmasks several. The k4 workloads
    # stand in for that parallel regime: a fixed quota of 4 tokens per forward (64 steps).
    "shared": PairedSettings("cpu_d384", 256, 128, 32, (
        Workload("p512_r90", 461, 51, policies=_ALL),
        Workload("p512_r50", 256, 256, policies=("none", "bicache", "fastdllm_dual",
                                                 "bicache_dual", "bicache_dual_tuned")),
        Workload("p1024_q64_t0.9", 1024, 64, threshold=0.9, reuse_depth=3),
        Workload("p1024_q64_k4", 1024, 64, reuse_depth=3, steps=64),
        Workload("p512_r90_b8", 461, 51, batch=8),
        Workload("p1024_q64_t0.9_b8", 1024, 64, batch=8, threshold=0.9, reuse_depth=3),
        Workload("p1024_q64_k4_b8", 1024, 64, batch=8, reuse_depth=3, steps=64),
    )),
    # CI smoke size: the pipeline and the JSON, not the numbers.
    "shared_toy": PairedSettings("toy", 16, 8, 8, (
        Workload("toy", 24, 8, reuse_depth=1, policies=("none", "bicache", "fastdllm_dual",
                                                        "bicache_dual")),
        Workload("toy_k4", 24, 8, reuse_depth=1, steps=4,
                 policies=("fastdllm_dual", "bicache_dual")),
    ), repeats=2),
}


def flop_bound_note() -> str:
    return ("FLOPs of a request = rows x per-row matmul FLOPs + rows x attention FLOPs over "
            "the keys each row sees + the head on the decoded rows, i.e. "
            "rows_computed * (2 (d q_dim + 2 d kv_dim + q_dim d + 3 d F) + 4 Hq D (p + u + g))"
            " + forwards * block_length * 2 d V (rows_computed counts token-layer rows; "
            "every row attends to the whole sequence). FLOP bound of a pair = FLOPs of the "
            "denominator / FLOPs of the numerator.")


def roofline_note() -> str:
    return ("Roofline floor of a request = sum over its forwards of max(FLOPs / matmul peak, "
            "bytes / memory bandwidth), bytes = every weight once + the K/V of the whole "
            "sequence in every layer (both measured in the same run; `roofline_seconds`). "
            "A 32-row block step does few FLOPs per weight byte: on 2 CPU cores it is bound "
            "by streaming the weights, which the FLOP bound does not count. Roofline bound "
            "of a pair = floor of the denominator / floor of the numerator.")


def run_paired(settings: PairedSettings, *, progress=print) -> dict:
    """Time every workload's policies interleaved request by request (each repeat sends one
    request batch through every policy in turn, the store warm as in serving); speedups
    are medians of the per-repeat ratios, so slow phases of a shared machine hit both
    sides of a pair."""
    config = model_config(settings.model)
    params = init_params(config, jax.random.key(0))
    peak, peak_source = peak_tflops()
    bandwidth = memory_gbps()
    g = settings.gen_length
    rows = []
    for wl in settings.workloads:
        sampler = SamplerConfig(threshold=wl.threshold)
        store = PrefixStore(budget_tokens=max(5000, 2 * wl.prefix_len))
        rng = np.random.default_rng(len(rows))
        prefix = tuple(rng.integers(0, config.mask_token_id, wl.prefix_len).tolist())

        def request(seed, prefix=prefix, wl=wl):
            r = np.random.default_rng(seed)
            return [Prompt(prompt=tuple(r.integers(0, config.mask_token_id,
                                                   wl.prompt_len).tolist()), prefix=prefix)
                    for _ in range(wl.batch)]

        def call(variant, prompts, store, wl=wl, sampler=sampler):
            policy, extra = VARIANTS[variant]
            kw = dict(config=config, gen_length=g, steps=wl.steps or settings.steps,
                      block_length=settings.block_length, policy=policy, sampler=sampler,
                      **extra)
            if "bicache" in policy:
                kw["reuse_depth"] = wl.reuse_depth
            t0, c0 = time.perf_counter(), time.process_time()
            out = generate(params, prompts, store, **kw)
            return out, time.perf_counter() - t0, time.process_time() - c0

        first = {}
        for v in wl.policies:  # compile + fill the store, then one warm-up call
            before = compile_count()
            out, wall, _ = call(v, request(0), store)
            store = out.cache
            first[v] = (wall, compile_count() - before)
            call(v, request(0), store)
        times = {v: [] for v in wl.policies}
        cpu = {v: [] for v in wl.policies}
        outs = {}
        for rep in range(settings.repeats):
            for v in wl.policies:
                out, wall, cpu_s = call(v, request(rep + 1), store)
                times[v].append(wall)
                cpu[v].append(cpu_s)
                outs[v] = out
            progress(f"{wl.name} repeat {rep + 1}/{settings.repeats}: " + "  ".join(
                f"{v} {times[v][-1]:.2f}s" for v in wl.policies))
        seq = wl.prefix_len + wl.prompt_len + g
        for v in wl.policies:
            out = outs[v]
            flops = sum(call_flops(config, float(r), seq, float(n), settings.block_length)
                        for r, n in zip(out.stats["rows_computed"], out.nfe, strict=True))
            roofline = roofline_seconds(config, out.stats["rows_per_forward"], seq,
                                        settings.block_length, 1e12 * peak, 1e9 * bandwidth)
            wall = float(np.median(times[v]))
            rows.append({
                "workload": wl.name, "variant": v, "policy": VARIANTS[v][0],
                "options": VARIANTS[v][1], "batch": wl.batch, "prefix_len": wl.prefix_len,
                "prompt_len": wl.prompt_len, "threshold": wl.threshold,
                "steps": wl.steps or settings.steps,
                "tokens_per_forward": float(g / np.mean(out.nfe)),
                "reuse_depth": int(out.stats["batch_reuse_depth"]),
                "wall_s": times[v], "cpu_s": cpu[v], "median_wall_s": wall,
                "tokens_per_s": wl.batch * g / wall, "nfe": float(np.mean(out.nfe)),
                "rows_per_request": float(np.mean(out.stats["rows_computed"])),
                "refreshes": float(np.mean(out.stats["refreshes"])),
                "prefix_cache_bytes": int(out.stats["prefix_cache_bytes"]),
                "flops": flops, "achieved_gflops": flops / wall / 1e9,
                "roofline_s": roofline,
                "first_call_s": first[v][0], "compiles": first[v][1]})
    by = {(r["workload"], r["variant"]): r for r in rows}
    pairs = []
    for wl in settings.workloads:
        for num, den in PAIRS:
            if (wl.name, num) in by and (wl.name, den) in by:
                a, b = by[(wl.name, num)], by[(wl.name, den)]
                ratios = np.array(b["wall_s"]) / np.array(a["wall_s"])
                pairs.append({"workload": wl.name, "pair": f"{num}/{den}",
                              "speedup": float(np.median(ratios)),
                              "speedup_cpu_time": float(np.median(np.array(b["cpu_s"])
                                                                  / np.array(a["cpu_s"]))),
                              "ratios": ratios.tolist(),
                              "flop_bound": b["flops"] / a["flops"],
                              "roofline_bound": b["roofline_s"] / a["roofline_s"]})
    return {
        "machine": {"node": platform.node(), "processor": platform.processor(),
                    "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "device": device_info(), "jax_version": jax.__version__, "git_commit": git_commit(),
        "weights": "random (untrained): timing only", "peak_tflops": peak,
        "peak_source": peak_source, "flop_bound": flop_bound_note(),
        "memory_gbps": bandwidth, "roofline_bound": roofline_note(),
        "settings": dataclasses.asdict(settings), "model_config": dataclasses.asdict(config),
        "results": rows, "pairs": pairs,
    }


def paired_markdown(result: dict) -> str:
    """README tables of a paired run."""
    steps = result["settings"]["steps"]
    lines = ["| workload | variant | batch | steps | tok/s | nfe | rows/req | refreshes | GFLOP/s"
             " | prefix KV MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['variant']} | {r['batch']} | {r.get('steps', steps)} "
              f"| {r['tokens_per_s']:.1f} "
              f"| {r['nfe']:.0f} | {r['rows_per_request']:.0f} | {r['refreshes']:.0f} | "
              f"{r['achieved_gflops']:.1f} | {r['prefix_cache_bytes'] / 2**20:.1f} |"
              for r in result["results"]]
    lines += ["", "| workload | pair | speedup (median of paired ratios) | FLOP bound |"
              " measured / FLOP bound | roofline bound |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['workload']} | {p['pair']} | {p['speedup']:.2f}x | "
              f"{p['flop_bound']:.2f}x | {p['speedup'] / p['flop_bound']:.2f} | "
              + (f"{p['roofline_bound']:.2f}x |" if "roofline_bound" in p else "- |")
              for p in result["pairs"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `bicache-jax bench` argument parser."""
    ap = argparse.ArgumentParser(prog="bicache-jax bench", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES) + sorted(PAIRED_SCALES), default="cpu",
                    help="cpu: small model, minutes on 2 cores; gpu: LLaDA-8B shape, "
                         "random bf16 weights; toy: CI smoke test; shared: the shared-prefix "
                         "regime, policies interleaved request by request (d384 x 6 model, "
                         "~20 min on 2 cores); shared_toy: its CI smoke test")
    ap.add_argument("--workloads", help="shared scales: comma-separated workload names "
                                        "(None: all of the scale's)")
    ap.add_argument("--repeats", type=int_in(1),
                    help="shared scales: requests per policy (None: the scale's)")
    ap.add_argument("--policies", type=choice_list(POLICIES, "policy"),
                    help="comma-separated subset of policies (None: the scale's)")
    ap.add_argument("--batch-sizes", type=int_list(1),
                    help="comma-separated, e.g. 1,4,16 (None: the scale's)")
    ap.add_argument("--ratios", type=int_list(0, 99),
                    help="comma-separated prefix ratios in percent, 0-99 (None: the scale's)")
    ap.add_argument("--out", help="result JSON path (default benchmarks/results/"
                                  "throughput_<scale>_<device>.json)")
    ap.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.scale in PAIRED_SCALES:
        return _main_paired(ap, args)
    settings = SCALES[args.scale]
    changes = {}
    for name in ("policies", "batch_sizes", "ratios"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    settings = dataclasses.replace(settings, **changes)
    result = run(settings)
    slug = result["device"]["device_kind"].lower().replace(" ", "_")
    out = Path(args.out or f"benchmarks/results/throughput_{args.scale}_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    print(f"wrote {out}")
    if args.plot:
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return 0


def _main_paired(ap, args) -> int:
    settings = PAIRED_SCALES[args.scale]
    if args.workloads:
        names = args.workloads.split(",")
        known = {w.name for w in settings.workloads}
        for n in names:
            if n not in known:
                ap.error(f"--workloads: unknown workload {n!r}; known: {sorted(known)}")
        settings = dataclasses.replace(settings, workloads=tuple(
            w for w in settings.workloads if w.name in names))
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    result = run_paired(settings)
    out = Path(args.out or f"benchmarks/results/throughput_{args.scale}_"
               f"{result['device']['device_kind'].lower().replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(paired_markdown(result))
    print(f"wrote {out}")
    return 0
