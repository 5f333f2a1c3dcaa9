"""`bicache-jax demo`: a shared-prefix workload served with every cache policy.

With the built-in trained model (bicache_jax/assets/default_model) the requests come
from the project's task suite and the table shows exact-answer accuracy; without it (or
with `--model random`) a small random-weight model shows speed and token agreement only.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from .evaluate import EVAL_POLICIES, evaluate_policies
from .generate import Prompt, generate
from .policies import POLICIES
from .prefix_store import PrefixStore


def _serve(params, config, prompts, policy, store, batch_size, **kw):
    """Serve `prompts` in batches through one store; (tokens, seconds excl. compile)."""
    tokens, seconds = [], 0.0
    first = True
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if first:  # compile outside the clock, on the same shapes
            generate(params, chunk, PrefixStore(depth_table=store.depth_table),
                     config=config, policy=policy, **kw)
            first = False
        t0 = time.perf_counter()
        out = generate(params, chunk, store, config=config, policy=policy, **kw)
        seconds += time.perf_counter() - t0
        store = out.cache
        tokens.append(out.tokens)
    return np.concatenate(tokens), seconds


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def random_demo(requests: int = 16, reason: str = "asked for") -> int:
    from .bench import model_config
    from .model import init_params

    print(f"Running a small RANDOM-WEIGHT LLaDA-layout model ({reason}).\n"
          "The table shows speed and agreement with `none`, not accuracy.\n")
    config = model_config("cpu_small")
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prefix = tuple(rng.integers(0, config.mask_token_id, 192).tolist())
    prompts = [Prompt(prompt=tuple(rng.integers(0, config.mask_token_id, 16).tolist()),
                      prefix=prefix) for _ in range(requests)]
    rows, reference = [], None
    for policy in EVAL_POLICIES:
        kw = dict(gen_length=32, steps=32, block_length=16)
        if POLICIES[policy].takes_reuse_depth:  # no profiler table for random weights
            kw["reuse_depth"] = config.n_layers // 2
        tokens, seconds = _serve(params, config, prompts, policy, PrefixStore(), 8, **kw)
        reference = tokens if reference is None else reference
        rows.append({"policy": policy, "tps": len(prompts) * 32 / seconds,
                     "agree": 100 * float(np.mean(tokens == reference))})
        print(f"  {policy:>16}: {rows[-1]['tps']:8.1f} tokens/s")
    print()
    print(_table(rows, [("policy", "{policy}"), ("tokens/s", "{tps:.1f}"),
                        ("token agreement with none %", "{agree:.1f}")]))
    return 0


def run_demo(model: str | None = None, requests: int = 48) -> int:
    from .checkpoint import DEFAULT_MODEL

    if model == "random":
        return random_demo(min(requests, 16))
    if model is None and not DEFAULT_MODEL.exists():
        return random_demo(min(requests, 16), reason=f"no trained model at {DEFAULT_MODEL}")
    return evaluate_policies(model=model, n_per_family=max(1, requests // 3),
                             policies=EVAL_POLICIES, write=False)
