"""Which learning rate trains the default model's recipe fastest? A short sweep.

    python benchmarks/lr_sweep.py [--lrs 1.5e-3,3e-3,6e-3] [--steps 150]
        [--context-max 64] [--out PATH]

Runs the project's trainer (`bicache_jax.train.train`) with the shipped recipe
(`DEFAULT_RECIPE` in `bicache_jax.train`) for `--steps` updates per learning rate, on a
shortened context range (`--context-max`) so the sweep costs minutes, and reports the
final loss EMA and held-out exact accuracy per family (`--eval-n` instances each, decoded
without any cache). Same seed for every learning rate: the batches are identical, only the
step size differs. Writes `benchmarks/results/lr_sweep_<platform>.json` (machine, jax
version, commit, the matmul peak of this run) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import jax

from bicache_jax.bench import git_commit, write_result
from bicache_jax.train import DEFAULT_RECIPE, matmul_peak_gflops, train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", default="1.5e-3,3e-3,6e-3")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--context-max", type=int, default=64)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    peak = matmul_peak_gflops()
    runs = []
    for lr in (float(x) for x in args.lrs.split(",")):
        tc = dataclasses.replace(DEFAULT_RECIPE, lr=lr, steps=args.steps, warmup=args.warmup,
                                 context_max=args.context_max)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = train(tc, tmp, ckpt_every=10**9, eval_every=args.steps, eval_n=args.eval_n,
                        export=Path(tmp) / "model", progress=False, profile_n=0)
            acc = json.loads((Path(tmp) / "eval.jsonl").read_text().splitlines()[-1])
            thr = json.loads((Path(tmp) / "throughput.json").read_text().splitlines()[-1])
        rec = {"lr": lr, "final_loss_ema": round(res["records"][-1]["ema"], 4),
               "accuracy": {k: v for k, v in acc.items() if k != "step"},
               "seconds": round(time.time() - t0, 1), "gflops_per_s": thr["gflops_per_s"]}
        runs.append(rec)
        print(json.dumps(rec), flush=True)
    device = jax.devices()[0]
    base = dataclasses.replace(DEFAULT_RECIPE, steps=args.steps, warmup=args.warmup,
                               context_max=args.context_max)
    result = {"machine": {"node": platform.node(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "device": device.device_kind, "platform": device.platform,
              "jax_version": jax.__version__, "git_commit": git_commit(),
              "matmul_peak_gflops_per_s": round(peak, 1), "eval_n_per_family": args.eval_n,
              "recipe": json.loads(base.to_json()), "runs": runs,
              "best_accuracy_lr": max(runs, key=lambda r: r["accuracy"]["all"])["lr"]}
    write_result(result, args.out, Path(__file__).parent / "results", "lr_sweep")
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    """The sweep as a markdown table (one row per learning rate)."""
    fams = [k for k in result["runs"][0]["accuracy"] if k != "all"]
    lines = ["| lr | loss EMA | " + " | ".join(fams) + " | all | s |",
             "|---|---|" + "---|" * (len(fams) + 2)]
    for r in result["runs"]:
        a = r["accuracy"]
        lines.append(f"| {r['lr']:g} | {r['final_loss_ema']:.3f} | "
                     + " | ".join(f"{a[f]:.2f}" for f in fams)
                     + f" | {a['all']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
