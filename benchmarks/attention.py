"""Time the two-source attention implementations on LLaDA-8B shapes.

Implementations:
  reference  `pallas_kernels.attention_reference` (plain jnp, float32 softmax)
  xla        `jax.nn.dot_product_attention(..., implementation="xla")` on [cached ; fresh]
  cudnn      same with `implementation="cudnn"` (GPU only)
  pallas     `pallas_kernels.attention` (Triton on GPU, Mosaic on TPU, interpret on CPU)

Shapes: Hq = Hkv = 32, D = 128, cached S in {512, 2048, 8192}, Tq = Tf = T in
{32, 288, 1024}, batch in {1, 8, 32}, bfloat16, lengths full. Each timing is the median
of `--iters` calls after `--warmup` calls (compilation included in the first warm-up),
each synchronised with `block_until_ready`. TFLOP/s counts 4 * B * Hq * Tq * (S + Tf) * D.
Configs that run out of memory are recorded with status "oom" and skipped.

  python benchmarks/attention.py                 # full sweep, JSON under benchmarks/results/
  python benchmarks/attention.py --quick         # tiny CPU smoke run, 1 iteration
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from bicache_jax.pallas_kernels import attention as pallas_attention
from bicache_jax.pallas_kernels import attention_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("reference", "xla", "cudnn", "pallas")


def _attention_dpa(q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len, *, impl):
    """`jax.nn.dot_product_attention` over the concatenated sources with a key mask."""
    k = jnp.concatenate([cached_k, fresh_k], axis=1)
    v = jnp.concatenate([cached_v, fresh_v], axis=1)
    valid = jnp.concatenate([
        jnp.arange(cached_k.shape[1])[None, :] < cached_len[:, None],
        jnp.arange(fresh_k.shape[1])[None, :] < fresh_len[:, None],
    ], axis=1)
    out = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], implementation=impl)
    return jnp.where(jnp.any(valid, axis=1)[:, None, None, None], out, 0).astype(q.dtype)


def make_impl(name: str):
    """The jitted callable for implementation `name` (signature of `pallas_attention`)."""
    if name == "reference":
        return jax.jit(attention_reference)
    if name in ("xla", "cudnn"):
        return jax.jit(lambda *args: _attention_dpa(*args, impl=name))
    if name == "pallas":
        return jax.jit(pallas_attention)
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")


def available_impls(backend: str) -> tuple[str, ...]:
    """Implementations that can run on `backend` ("cpu", "gpu", "tpu")."""
    return tuple(i for i in IMPLS if i != "cudnn" or backend == "gpu")


def make_inputs(key, batch, q_len, cached, fresh, heads, kv_heads, head_dim, dtype):
    """Random q/k/v on the default device, lengths full."""
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (batch, q_len, heads, head_dim), dtype)
    ck = jax.random.normal(ks[1], (batch, cached, kv_heads, head_dim), dtype)
    cv = jax.random.normal(ks[2], (batch, cached, kv_heads, head_dim), dtype)
    fk = jax.random.normal(ks[3], (batch, fresh, kv_heads, head_dim), dtype)
    fv = jax.random.normal(ks[4], (batch, fresh, kv_heads, head_dim), dtype)
    cached_len = jnp.full((batch,), cached, jnp.int32)
    fresh_len = jnp.full((batch,), fresh, jnp.int32)
    return jax.block_until_ready((q, ck, cv, cached_len, fk, fv, fresh_len))


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def time_fn(fn, args, *, warmup: int, iters: int) -> list[float]:
    """Per-call wall times in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def slug(text: str) -> str:
    """Lower-case, dash-separated file-name-safe version of `text`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the repo, or None when unavailable."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(IMPLS)} (default: all available)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--cached", default="512,2048,8192", help="comma-separated cached lengths S")
    p.add_argument("--q-len", default="32,288,1024", help="comma-separated T (Tq = Tf = T)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 1 warm-up and 1 timed iteration (CPU smoke run)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/attention_<device-kind>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.cached, args.q_len = "1", "64", "16"
        args.heads = args.kv_heads = 2
        args.head_dim = 64
        args.warmup = args.iters = 1
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = jax.default_backend()
    device = jax.devices()[0]
    device_kind = device.device_kind
    impls = available_impls(backend)
    skipped = [i for i in IMPLS if i not in impls]
    if args.impls:
        wanted = [i.strip() for i in args.impls.split(",") if i.strip()]
        for name in wanted:
            if name not in IMPLS:
                raise SystemExit(f"unknown impl {name!r}; choose from {IMPLS}")
        skipped += [i for i in wanted if i not in impls]
        impls = tuple(i for i in impls if i in wanted)
    dtype = jnp.dtype(args.dtype)
    fns = {name: make_impl(name) for name in impls}

    results = []
    key = jax.random.key(0)
    configs = itertools.product(_ints(args.batch), _ints(args.cached), _ints(args.q_len))
    for batch, cached, t in configs:
        shape = dict(batch=batch, cached_len=cached, q_len=t, fresh_len=t, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype)
        flops = 4 * batch * args.heads * t * (cached + t) * args.head_dim
        try:
            inputs = make_inputs(key, batch, t, cached, t, args.heads, args.kv_heads,
                                 args.head_dim, dtype)
        except Exception as err:  # noqa: BLE001 - record and keep going
            status = "oom" if _is_oom(err) else "error"
            for name in impls:
                results.append(dict(impl=name, **shape, status=status, error=str(err)[:500]))
            continue
        for name in impls:
            row = dict(impl=name, **shape, flops=flops)
            try:
                times = time_fn(fns[name], inputs, warmup=args.warmup, iters=args.iters)
            except Exception as err:  # noqa: BLE001 - record and keep going
                row.update(status="oom" if _is_oom(err) else "error", error=str(err)[:500])
            else:
                median = statistics.median(times)
                row.update(status="ok", time_ms=median * 1e3, min_ms=min(times) * 1e3,
                           iters=len(times), tflops=flops / median / 1e12)
            results.append(row)
            msg = (f"{row['time_ms']:9.3f} ms {row['tflops']:8.3f} TFLOP/s"
                   if row["status"] == "ok" else row["status"])
            print(f"{name:9s} B={batch:<3d} S={cached:<5d} T={t:<5d} {msg}", flush=True)
        del inputs

    report = {
        "benchmark": "attention",
        "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "python": sys.version.split()[0]},
        "backend": backend,
        "device_kind": device_kind,
        "jax_version": jax.__version__,
        "git_commit": git_commit(),
        "settings": {
            "impls": list(impls), "skipped_impls": skipped, "batch": _ints(args.batch),
            "cached": _ints(args.cached), "q_len": _ints(args.q_len), "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "warmup": args.warmup, "iters": args.iters, "quick": args.quick,
            "lengths": "full", "flops": "4 * B * Hq * Tq * (S + Tf) * D",
        },
        "results": results,
    }
    out = Path(args.out) if args.out else (
        REPO_ROOT / "benchmarks" / "results" / f"attention_{slug(device_kind)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
