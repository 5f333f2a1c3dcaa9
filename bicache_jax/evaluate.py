"""`bicache-jax eval`: accuracy and fidelity of every cache policy on the task suite.

Held-out instances (evaluation seeds, never seen in training) of every task family are
served with each policy. Reported: exact-answer accuracy per policy, per family and per
prefix-ratio bucket; fidelity against `none` (exact-answer agreement and token
agreement); how many distinct answers each policy gives (agreement means something only
when the outputs vary with the request); tokens/s. Results go to `benchmarks/results/` as
JSON plus a PNG of accuracy vs prefix ratio per policy.

A model made by `bicache-jax train` (its `train_config.json` sets the lengths) is fed the
suite's own ids; any other checkpoint or HF folder gets the suite's text rendered through
its own `tokenizer.json` (answers end at its EOS token), and one without a tokenizer is
refused before it is loaded.
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

from . import tasks
from .bench import git_commit
from .cli_args import HelpFormatter, choice_list, int_in
from .generate import Prompt, generate, prefix_ratio
from .policies import POLICIES
from .prefix_store import PrefixStore

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


def _answer(canvas, eos: int | None) -> tuple[int, ...]:
    """The canvas up to (excluding) its first `eos`; the whole canvas when eos is None."""
    ids = [int(i) for i in canvas]
    return tuple(ids[:ids.index(eos)] if eos in ids else ids)


def encode_instances(instances, tokenizer=None) -> tuple[list[Prompt], list[tuple], int | None]:
    """(prompts, answer ids, eos id) of `instances`: the suite's own ids (tokenizer None),
    or their texts rendered through a model's own tokenizer (answers end at its EOS)."""
    if tokenizer is None:
        return ([Prompt(prompt=i.prompt_ids, prefix=i.prefix_ids) for i in instances],
                [tuple(i.answer_ids) for i in instances], tasks.EOS_ID)
    prompts = [Prompt(prompt=tokenizer.encode(i.prompt_text),
                      prefix=tokenizer.encode(i.prefix_text)) for i in instances]
    answers = [tuple(tokenizer.encode(i.answer_text)) for i in instances]
    return prompts, answers, tokenizer.eos_token_id


def run_eval(params, config, instances, settings: EvalSettings, depth_table,
             policies=EVAL_POLICIES, progress=print, tokenizer=None) -> dict:
    """Serve `instances` with every policy; returns the JSON-ready result.

    `tokenizer`: render the instances' texts through the model's own tokenizer (a model
    not trained on the suite's vocabulary); None uses the suite's ids. An answer is
    exact when the canvas up to the first EOS equals it (no EOS known: when the canvas
    starts with it).
    """
    prompts, answers, eos = encode_instances(instances, tokenizer)
    ratios = [prefix_ratio(len(p.prefix), len(p.prompt), 0) for p in prompts]

    def correct(canvas, answer):
        if eos is None:
            return tuple(int(i) for i in canvas[:len(answer)]) == answer
        return _answer(canvas, eos) == answer

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
            store = out.cache
            tokens.append(out.tokens)
        tokens = np.concatenate(tokens)
        outputs[policy] = tokens
        hits = [correct(t, a) for t, a in zip(tokens, answers, strict=True)]
        per_policy[policy] = {
            "accuracy": float(np.mean(hits)), "correct": hits,
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
               "distinct_answers": len({_answer(t, eos) for t in outputs[policy]}),
               "by_family": {f: float(np.mean(corr[[i.family == f for i in instances]]))
                             for f in families},
               "by_ratio": {}, "n_by_ratio": {}}
        for b in buckets:
            sel = np.array([_bucket(r) == b for r in ratios])
            if sel.any():
                row["by_ratio"][b] = float(np.mean(corr[sel]))
                row["n_by_ratio"][b] = int(sel.sum())
        if ref_correct is not None:
            ref_answers = [_answer(t, eos) for t in outputs["none"]]
            got = [_answer(t, eos) for t in outputs[policy]]
            row["answer_agreement_with_none"] = float(np.mean(
                [a == r for a, r in zip(got, ref_answers, strict=True)]))
            row["token_agreement_with_none"] = float(np.mean(outputs[policy]
                                                             == outputs["none"]))
        rows.append(row)
    return {
        "machine": {"node": platform.node(), "python": platform.python_version()},
        "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        "git_commit": git_commit(), "settings": dataclasses.asdict(settings),
        "depth_table": depth_table,
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


def markdown_ratio_table(result: dict) -> str:
    """Accuracy per policy and prefix-ratio bucket (the bucket's instance count in the head)."""
    counts = result["ratio_of_instances"]
    buckets = [b for b, n in counts.items() if n]
    lines = ["| policy | " + " | ".join(f"r {b}% ({counts[b]})" for b in buckets) + " |",
             "|" + "---|" * (len(buckets) + 1)]
    lines += [f"| {r['policy']} | " + " | ".join(f"{100 * r['by_ratio'][b]:.1f}" for b in buckets)
              + " |" for r in result["results"]]
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


def _suite_for(model_dir: Path, has_tokenizer: bool) -> tuple[EvalSettings, tuple, bool]:
    """(settings, context range, whether to render through the model's tokenizer): the
    trainer's `train_config.json` when the project's trainer made the model (the suite's
    own ids), else the suite's defaults rendered through the model's tokenizer."""
    meta_path = model_dir / "train_config.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        g = meta["gen_length"]
        return (EvalSettings(gen_length=g, steps=g, block_length=meta.get("block_length", g)),
                (meta.get("context_min", tasks.DEFAULT_CONTEXT[0]),
                 meta.get("context_max", tasks.DEFAULT_CONTEXT[1])), False)
    if not has_tokenizer:
        raise ValueError(f"{model_dir}: evaluation needs either a model made by "
                         f"`bicache-jax train` (train_config.json) or a tokenizer.json "
                         f"beside the model to render the task suite as text")
    g = tasks.GEN_LENGTH
    return EvalSettings(gen_length=g, steps=g, block_length=g), tasks.DEFAULT_CONTEXT, True


def evaluate_policies(model=None, n_per_family: int = 20, policies=EVAL_POLICIES,
                      write: bool = True, out: str | None = None) -> int:
    """Load the model (default: the shipped one; any checkpoint or HF folder), evaluate,
    print the table. Raises ValueError, before any work, for a model it cannot evaluate."""
    from .checkpoint import DEFAULT_MODEL, load_model

    model_dir = Path(model) if model else DEFAULT_MODEL
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no model at {model_dir}")
    # Before loading (minutes for an 8B model): refuse a model this cannot evaluate.
    settings, context, use_tokenizer = _suite_for(model_dir,
                                                  (model_dir / "tokenizer.json").is_file())
    params, config, table, tokenizer = load_model(model)
    render = tokenizer if use_tokenizer else None
    instances = tasks.eval_instances(n_per_family, questions_per_prefix=4, context=context)
    if render is not None:  # a foreign tokenizer may need more tokens: drop what cannot fit
        prompts, _, _ = encode_instances(instances, render)
        fits = [len(p.prefix) + len(p.prompt) + settings.gen_length <= config.max_seq_len
                for p in prompts]
        instances = [i for i, ok in zip(instances, fits, strict=True) if ok]
        if not instances:
            raise ValueError(f"no task instance fits the model's max_seq_len "
                             f"{config.max_seq_len} through its tokenizer")
    print(f"evaluating {len(instances)} held-out instances ({n_per_family} per family) "
          f"with {len(policies)} policies; r -> b table {table}"
          + ("; rendered through the model's tokenizer" if render is not None else ""))
    result = run_eval(params, config, instances, settings, table, policies, tokenizer=render)
    print()
    print(markdown_table(result))
    print()
    print(markdown_ratio_table(result))
    if write:
        path = Path(out or "benchmarks/results/eval_default_model.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        plot(result, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `bicache-jax eval` argument parser."""
    ap = argparse.ArgumentParser(prog="bicache-jax eval", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", help="checkpoint or HF folder (None: the shipped model); "
                                    "without train_config.json it needs a tokenizer.json")
    ap.add_argument("--n-per-family", type=int_in(1), default=40,
                    help="held-out instances per task family")
    ap.add_argument("--policies", type=choice_list(POLICIES, "policy"),
                    default=",".join(EVAL_POLICIES), help="comma-separated policies")
    ap.add_argument("--out", help="result JSON (None: benchmarks/results/"
                                  "eval_default_model.json)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return evaluate_policies(args.model, args.n_per_family, args.policies, out=args.out)
