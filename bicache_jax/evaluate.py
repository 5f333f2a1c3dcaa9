"""`bicache-jax eval`: accuracy and fidelity of every cache policy on the task suite.

Held-out instances (evaluation seeds, never seen in training) of every task family are
served with each policy. Reported: exact-answer accuracy per policy, per family and per
prefix-ratio bucket; fidelity against `none` (exact-answer agreement and token
agreement); how many distinct answers each policy gives (agreement means something only
when the outputs vary with the request); tokens/s. Results go to `benchmarks/results/` as
JSON plus a PNG of accuracy vs prefix ratio per policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from .generate import Prompt, generate, prefix_ratio
from .policies import POLICIES
from .prefix_store import PrefixStore
from .tasks import answer_from_canvas

EVAL_POLICIES = ("none", "naive_prefix", "bicache", "fastdllm_dual", "bicache_dual",
                 "fastdllm_prefix", "dkv_decode", "dkv_greedy", "dkv_prefill", "dkv_pd")
RATIO_BUCKETS = ((0, 30), (30, 50), (50, 70), (70, 90), (90, 101))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Decoding settings of the evaluation (the shipped model's defaults)."""

    gen_length: int
    steps: int
    block_length: int
    refresh_interval: int = 4
    batch_size: int = 16


def _bucket(ratio: int) -> str:
    for lo, hi in RATIO_BUCKETS:
        if lo <= ratio < hi:
            return f"{lo}-{min(hi, 100)}"
    raise ValueError(ratio)


def run_eval(params, config, instances, settings: EvalSettings, depth_table,
             policies=EVAL_POLICIES, progress=print) -> dict:
    """Serve `instances` with every policy; returns the JSON-ready result."""
    prompts = [Prompt(prompt=i.prompt_ids, prefix=i.prefix_ids) for i in instances]
    ratios = [prefix_ratio(len(i.prefix_ids), len(i.prompt_ids), 0) for i in instances]
    kw = dict(config=config, gen_length=settings.gen_length, steps=settings.steps,
              block_length=settings.block_length)
    outputs, per_policy = {}, {}
    for policy in policies:
        store = PrefixStore(depth_table=depth_table)
        refresh = settings.refresh_interval if policy in ("bicache", "bicache_dual") else None
        tokens, seconds, compile_s = [], 0.0, 0.0
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start:start + settings.batch_size]
            t0 = time.perf_counter()
            out = generate(params, chunk, store, policy=policy, refresh_interval=refresh,
                           window_size=4 if POLICIES[policy].fixed_order else None,
                           key=jax.random.key(start), **kw)
            dt = time.perf_counter() - t0
            if out.stats["compiles"]:
                compile_s += dt
            else:
                seconds += dt
            store = out.cache if out.cache is not None else store
            tokens.append(out.tokens)
        tokens = np.concatenate(tokens)
        outputs[policy] = tokens
        correct = [answer_from_canvas(t) == tuple(i.answer_ids)
                   for t, i in zip(tokens, instances, strict=True)]
        per_policy[policy] = {
            "accuracy": float(np.mean(correct)), "correct": correct,
            "tokens_per_s": (len(prompts) * settings.gen_length / seconds) if seconds else None,
            "compile_and_first_batch_s": compile_s,
        }
        progress(f"  {policy:>16}: accuracy {100 * per_policy[policy]['accuracy']:5.1f}%")
    families = sorted({i.family for i in instances})
    buckets = [f"{lo}-{min(hi, 100)}" for lo, hi in RATIO_BUCKETS]
    rows = []
    ref_correct = per_policy.get("none", {}).get("correct")
    for policy, res in per_policy.items():
        corr = np.asarray(res["correct"])
        row = {"policy": policy, "accuracy": res["accuracy"],
               "tokens_per_s": res["tokens_per_s"],
               "distinct_answers": len({answer_from_canvas(t) for t in outputs[policy]}),
               "by_family": {f: float(np.mean(corr[[i.family == f for i in instances]]))
                             for f in families},
               "by_ratio": {}, "n_by_ratio": {}}
        for b in buckets:
            sel = np.array([_bucket(r) == b for r in ratios])
            if sel.any():
                row["by_ratio"][b] = float(np.mean(corr[sel]))
                row["n_by_ratio"][b] = int(sel.sum())
        if ref_correct is not None:
            ref_answers = [answer_from_canvas(t) for t in outputs["none"]]
            answers = [answer_from_canvas(t) for t in outputs[policy]]
            row["answer_agreement_with_none"] = float(np.mean(
                [a == r for a, r in zip(answers, ref_answers, strict=True)]))
            row["token_agreement_with_none"] = float(np.mean(outputs[policy]
                                                             == outputs["none"]))
        rows.append(row)
    return {
        "machine": {"node": platform.node(), "python": platform.python_version()},
        "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        "settings": dataclasses.asdict(settings), "depth_table": depth_table,
        "n_instances": len(instances), "families": families,
        "ratio_of_instances": {b: int(sum(_bucket(r) == b for r in ratios)) for b in buckets},
        "results": rows,
    }


def markdown_table(result: dict) -> str:
    fams = result["families"]
    head = ("| policy | accuracy % | " + " | ".join(f"{f} %" for f in fams)
            + " | answers = none % | tokens = none % | distinct answers | tokens/s |")
    lines = [head, "|" + "---|" * (len(fams) + 6)]
    for r in result["results"]:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(
            f"| {r['policy']} | {100 * r['accuracy']:.1f} | "
            + " | ".join(f"{100 * r['by_family'][f]:.1f}" for f in fams)
            + f" | {100 * r.get('answer_agreement_with_none', float('nan')):.1f}"
            + f" | {100 * r.get('token_agreement_with_none', float('nan')):.1f}"
            + f" | {r['distinct_answers']} of {result['n_instances']} | {tps} |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["results"]:
        xs = list(r["by_ratio"])
        ax.plot(xs, [100 * r["by_ratio"][x] for x in xs], marker="o", label=r["policy"])
    ax.set(xlabel="shared prefix ratio p / (p + u), %", ylabel="exact-answer accuracy %",
           title="accuracy vs shared-prefix ratio per cache policy", ylim=(-5, 105))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_policies(model=None, n_per_family: int = 20, policies=EVAL_POLICIES,
                      write: bool = True, out: str | None = None) -> int:
    """Load the model (default: the shipped one), evaluate, print the table."""
    from . import tasks
    from .cli import DEFAULT_MODEL, _load_model

    params, config, table, _ = _load_model(model)
    model_dir = Path(model) if model else DEFAULT_MODEL
    meta = json.loads((model_dir / "train_config.json").read_text())
    settings = EvalSettings(gen_length=meta["gen_length"], steps=meta["gen_length"],
                            block_length=meta.get("block_length", meta["gen_length"]))
    context = (meta.get("context_min", tasks.DEFAULT_CONTEXT[0]),
               meta.get("context_max", tasks.DEFAULT_CONTEXT[1]))
    instances = tasks.eval_instances(n_per_family, questions_per_prefix=4, context=context)
    print(f"evaluating {len(instances)} held-out instances ({n_per_family} per family) "
          f"with {len(policies)} policies; r -> b table {table}")
    result = run_eval(params, config, instances, settings, table, policies)
    print()
    print(markdown_table(result))
    if write:
        path = Path(out or "benchmarks/results/eval_default_model.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bicache-jax eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the shipped model)")
    ap.add_argument("--n-per-family", type=int, default=40)
    ap.add_argument("--policies", default=",".join(EVAL_POLICIES))
    ap.add_argument("--out", help="result JSON (default benchmarks/results/"
                                  "eval_default_model.json)")
    args = ap.parse_args(argv)
    policies = tuple(args.policies.split(","))
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}; known: {sorted(POLICIES)}")
    return evaluate_policies(args.model, args.n_per_family, policies, out=args.out)
