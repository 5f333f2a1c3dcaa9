"""Which profiler threshold keeps BiCache's answers on a small trained model? A sweep.

    python benchmarks/profile_threshold.py [--model DIR] [--thresholds 0.97,0.98,0.99,...]
        [--n-per-family 64] [--profile-n 100] [--tolerance 0.5] [--out PATH]

The public profiler's threshold, 0.97, was set on LLaDA-8B's 32 layers. This profiles a
model made by `bicache-jax train` (default: the shipped one) once, on the pairs its export
profiles (`train.profile_model`), reads the `r -> b` table at every threshold from those
same scores (`ProfileResult.at_threshold`), and serves calibration requests -- training-
range seeds from `CALIBRATION_SEED`, never the evaluation seeds -- with `none`, with
`bicache` under each table, and with `bicache` at every fixed depth. Reports accuracy and
answer agreement with `none`, overall and per prefix-ratio bucket, and the smallest
threshold (the most reuse) whose table keeps bicache within `--tolerance` points of
`none`. Writes `benchmarks/results/profile_threshold_<platform>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

import jax

from bicache_jax import tasks
from bicache_jax.bench import git_commit, write_result
from bicache_jax.checkpoint import DEFAULT_MODEL, load_model
from bicache_jax.evaluate import EvalSettings, run_eval
from bicache_jax.train import TrainConfig, profile_model

CALIBRATION_SEED = 950_000  # training range (< tasks.EVAL_SEED_START), apart from the profiler's
THRESHOLDS = (0.97, 0.98, 0.99, 0.995, 0.998, 0.999)


def _shown(path: Path) -> str:
    """`path` relative to the checkout when inside it (results name no home folder)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _summary(result: dict) -> dict:
    """accuracy, agreement with none and per-ratio accuracy of `bicache` in one run_eval."""
    row = next(r for r in result["results"] if r["policy"] == "bicache")
    return {"accuracy": row["accuracy"], "agreement": row["answer_agreement_with_none"],
            "by_ratio": row["by_ratio"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    ap.add_argument("--n-per-family", type=int, default=64)
    ap.add_argument("--profile-n", type=int, default=100, help="profiler pairs per family")
    ap.add_argument("--tolerance", type=float, default=0.5,
                    help="largest accuracy loss (points) the recommended threshold may cost")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir = Path(args.model)
    tc = TrainConfig.from_json((model_dir / "train_config.json").read_text())
    params, config, _, _ = load_model(model_dir)
    g = tc.gen_length
    settings = EvalSettings(gen_length=g, steps=g, block_length=g)
    instances = [inst for fam in tc.families for inst in tasks.generate_instances(
        fam, CALIBRATION_SEED, args.n_per_family, questions_per_prefix=4,
        context=(tc.context_min, tc.context_max))]
    profile = profile_model(params, tc, args.profile_n, progress=False)

    def serve(table):
        return run_eval(params, config, instances, settings, table, ("none", "bicache"),
                        progress=lambda _: None)

    fixed = {}
    for depth in range(1, config.n_layers + 1):
        result = serve({0: depth})
        fixed[depth] = _summary(result)
        print(f"depth {depth}: bicache {100 * fixed[depth]['accuracy']:.1f}%", flush=True)
    none = next(r for r in result["results"] if r["policy"] == "none")
    print(f"none: {100 * none['accuracy']:.1f}%")
    sweep = []
    for threshold in (float(t) for t in args.thresholds.split(",")):
        table = profile.at_threshold(threshold).table
        sweep.append({"threshold": threshold, "table": table, **_summary(serve(table))})
        print(f"threshold {threshold}: table {table}, bicache "
              f"{100 * sweep[-1]['accuracy']:.1f}%", flush=True)
    keeps = [s["threshold"] for s in sweep
             if 100 * (none["accuracy"] - s["accuracy"]) <= args.tolerance]
    device = jax.devices()[0]
    out = {"machine": {"node": platform.node(), "python": platform.python_version()},
           "device": device.device_kind, "jax_version": jax.__version__,
           "git_commit": git_commit(), "model": _shown(model_dir),
           "model_config": {"d_model": config.d_model, "n_layers": config.n_layers},
           "calibration": {"seed": CALIBRATION_SEED, "n_per_family": args.n_per_family,
                           "questions_per_prefix": 4, "n": len(instances)},
           "profile_pairs_per_family": args.profile_n,
           "settings": dataclasses.asdict(settings), "tolerance_points": args.tolerance,
           "none": {"accuracy": none["accuracy"], "by_ratio": none["by_ratio"]},
           "n_by_ratio": none["n_by_ratio"],
           "fixed_depth": fixed, "scores": profile.scores, "counts": profile.counts,
           "sweep": sweep, "recommended_threshold": min(keeps) if keeps else None}
    write_result(out, args.out, Path(__file__).parent / "results", "profile_threshold")
    print(markdown_table(out))


def markdown_table(result: dict) -> str:
    """bicache's accuracy per ratio bucket under each fixed depth and each threshold's table."""
    buckets = list(result["none"]["by_ratio"])
    head = ("| bicache depths | accuracy % | agreement % | "
            + " | ".join(f"r {b}%" for b in buckets) + " |")
    lines = [head, "|---" * (3 + len(buckets)) + "|"]

    def line(name, s):
        lines.append(f"| {name} | {100 * s['accuracy']:.1f} | "
                     + (f"{100 * s['agreement']:.1f}" if "agreement" in s else "-") + " | "
                     + " | ".join(f"{100 * s['by_ratio'].get(b, float('nan')):.0f}"
                                  for b in buckets) + " |")

    line("none", result["none"])
    for depth, s in result["fixed_depth"].items():
        line(f"fixed b = {depth}", s)
    for s in result["sweep"]:
        table = ", ".join(f"{r}: {b}" for r, b in s["table"].items())
        line(f"threshold {s['threshold']} {{{table}}}", s)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
