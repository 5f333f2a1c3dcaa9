"""How fast can a small LLaDA-layout model learn to read its prompt? Three synthetic probes.

    python benchmarks/learnability.py [--steps-copy 400] [--steps-recall 600]
        [--steps-format 1500] [--batch 32] [--probes copy,recall,format]
        [--formats bare:bare,...] [--seed 0] [--out PATH]

All probes train with the project's trainer pieces (`train.make_batch`,
`train.make_train_step`: SFT masked diffusion, flat weighting, AdamW) on fresh random rows
every step and report held-out exact accuracy of the first canvas slot, decoded in one
forward with the whole canvas masked, every 50 steps (250 for `format`):

* `copy`: `<bos> n n ... n what X ? <sep> | X <eos>...`: copy the name three tokens before
  the canvas, among 5-30 distractor names. One attention hop by relative position. Run
  with canvases of 1, 2, 4 and 8 slots (the answer, then `<eos>` padding).
* `recall`: `<bos> k1 = v1 ; ... kK = vK ; what ki ? <sep> | vi`: associative recall over K
  key/value pairs (the core of every task family in `bicache_jax/tasks.py`), one-slot
  canvas, K = 2 and 6.
* `format`: recall over 4 pairs with the table and the question in several forms (`FORMATS`:
  bare `k v` vs the suite's `k = v ;`, a bare question `k` right before the canvas vs the
  suite's `what k ? <sep>`, keys adjacent to values and to the canvas, a question laid
  out like a table entry): which part of the suite's format delays the key matching (run
  it with `--batch 256`, the batch at which bare recall is learned). `--formats` picks
  some of them and `--seed` sets the initialisation and the training rows: the key
  matching emerges as a sudden jump whose update varies from seed to seed, so one seed
  per form does not rank the forms.
* `suite`: the trainer's own served facts rows (`tasks.make_instance`, contexts 24-32: a
  table of 2-4 entries in the suite's template, one question, no packing) at d64 and d128,
  held out on evaluation seeds: whether the template or the width is what the trainer
  adds to the format probe's difficulty.

Writes `benchmarks/results/learnability_<device>.json` and prints a table. Why it exists:
the task-suite model did not learn in a CPU hour, and these probes separate the two
obstacles found (see the README's "Training the default model").
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bicache_jax import tasks
from bicache_jax.bench import write_result
from bicache_jax.model import forward
from bicache_jax.train import TrainConfig, init_state, make_batch, make_train_step, row_segments

NAMES = [tasks.TOKEN_ID[w] for w in tasks.NAMES]
VALUES = [tasks.TOKEN_ID[w] for w in tasks.NUMBERS]
WHAT, Q, EQ, SEMI = (tasks.TOKEN_ID[w] for w in ("what", "?", "=", ";"))


def copy_row(rng: np.random.Generator, slots: int):
    x = int(rng.choice(NAMES))
    filler = [int(v) for v in rng.choice(NAMES, size=int(rng.integers(5, 31)))]
    return [((tasks.BOS_ID, *filler), False), ((WHAT, x, Q, tasks.SEP_ID), False),
            ((x,) + (tasks.EOS_ID,) * (slots - 1), True)]


TABLE_FORMS = {"bare": lambda k, v: [k, v], "suite": lambda k, v: [k, EQ, v, SEMI],
               "adjacent": lambda k, v: [k, v, SEMI]}
QUESTION_FORMS = {"bare": lambda k: (k,), "suite": lambda k: (WHAT, k, Q, tasks.SEP_ID),
                  "what": lambda k: (WHAT, k), "mirror": lambda k: (k, EQ)}


def format_row(rng: np.random.Generator, pairs: int, table: str, question: str):
    """Recall over `pairs` pairs, the table and the question each in one of several forms
    (`TABLE_FORMS`: `k v`, the suite's `k = v ;`, `k v ;`; `QUESTION_FORMS`: `k` right
    before the canvas, the suite's `what k ? <sep>` (the key three tokens before the
    answer), `what k`, and `k =`, which lays the canvas out like a value of the suite's
    table)."""
    keys = [int(k) for k in rng.choice(NAMES, size=pairs, replace=False)]
    values = [int(v) for v in rng.choice(VALUES, size=pairs)]
    prefix = [tasks.BOS_ID]
    for k, v in zip(keys, values, strict=True):
        prefix += TABLE_FORMS[table](k, v)
    i = int(rng.integers(pairs))
    return [(tuple(prefix), False), (QUESTION_FORMS[question](keys[i]), False),
            ((values[i],), True)]


def recall_row(rng: np.random.Generator, pairs: int):
    """The `recall` probe's row: the suite's table and question."""
    return format_row(rng, pairs, "suite", "suite")


SUITE_CONTEXT = (24, 32)


def suite_row(rng: np.random.Generator, held_out: bool = False):
    """One served facts request of the task suite at `SUITE_CONTEXT` (a training seed, or
    an evaluation seed when `held_out`)."""
    seed = int(rng.integers(tasks.EVAL_SEED_START)) + (tasks.EVAL_SEED_START if held_out else 0)
    inst = tasks.make_instance("facts", seed, int(rng.integers(4)), context=SUITE_CONTEXT)
    return row_segments([inst], 1)


FORMATS = (("bare", "bare"), ("bare", "suite"), ("suite", "bare"), ("suite", "suite"),
           ("adjacent", "what"), ("suite", "mirror"))


def run_probe(make_row, steps: int, tc: TrainConfig, batch: int = 32, pad_to: int = 64,
              every: int = 50, make_held=None) -> list[dict]:
    """Train on fresh rows; held-out first-slot accuracy (whole canvas masked) per `every`
    on 128 rows of `make_held` (default `make_row`)."""
    config = tc.model_config()
    state, step_fn = init_state(tc), make_train_step(tc)
    rng = np.random.default_rng(tc.seed)
    make_held = make_held or make_row
    held = make_batch([make_held(np.random.default_rng(10_000 + i)) for i in range(128)],
                      tc.gen_length, pad_to)
    first = np.argmax(held.response, axis=1)
    masked = jnp.asarray(np.where(held.response, tasks.MASK_ID, held.tokens))
    rows = np.arange(len(first))
    curve = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            logits = forward(state.params, config, masked, jnp.asarray(held.lengths))
            pred = np.asarray(jnp.argmax(logits, axis=-1))[rows, first]
            acc = float(np.mean(pred == held.tokens[rows, first]))
            curve.append({"step": step, "accuracy": acc})
            print(f"    step {step:4d}: accuracy {acc:.3f}", flush=True)
        if step == steps:
            break
        b = make_batch([make_row(rng) for _ in range(batch)], tc.gen_length, pad_to)
        state, _ = step_fn(state, jax.tree.map(jnp.asarray, b), step)
    return curve


def first_step_above(curve: list[dict], level: float = 0.9) -> int | None:
    return next((c["step"] for c in curve if c["accuracy"] >= level), None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps-copy", type=int, default=400)
    ap.add_argument("--steps-recall", type=int, default=600)
    ap.add_argument("--steps-format", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32, help="rows per update")
    ap.add_argument("--probes", default="copy,recall",
                    help="which probes to run (copy, recall, format, suite)")
    ap.add_argument("--formats", default=",".join(f"{t}:{q}" for t, q in FORMATS),
                    help="format probe forms, table:question (TABLE_FORMS:QUESTION_FORMS)")
    ap.add_argument("--seed", type=int, default=0,
                    help="initialisation and training-row seed of every probe")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    formats = [tuple(f.split(":")) for f in args.formats.split(",")]
    unknown = [f for f in formats if len(f) != 2 or f[0] not in TABLE_FORMS
               or f[1] not in QUESTION_FORMS]
    if unknown:
        ap.error(f"unknown format(s) {unknown}; tables {sorted(TABLE_FORMS)}, "
                 f"questions {sorted(QUESTION_FORMS)}")
    common = dict(lr=3e-3, warmup=20, weighting="flat", seed=args.seed)
    small = TrainConfig(d_model=64, n_layers=2, n_heads=4, steps=args.steps_copy, **common)
    probes = []
    for slots in (1, 2, 4, 8) if "copy" in args.probes else ():
        print(f"copy, canvas of {slots} slot(s), d64 L2", flush=True)
        t0 = time.time()
        curve = run_probe(lambda rng, s=slots: copy_row(rng, s), args.steps_copy, small,
                          batch=args.batch)
        probes.append({"probe": "copy", "canvas_slots": slots, "model": "d64 L2",
                       "curve": curve, "seconds": round(time.time() - t0, 1)})
    small = TrainConfig(d_model=64, n_layers=2, n_heads=4, steps=args.steps_recall, **common)
    for pairs in (2, 6) if "recall" in args.probes else ():
        print(f"recall, {pairs} pairs, canvas of 1 slot, d64 L2", flush=True)
        t0 = time.time()
        curve = run_probe(lambda rng, k=pairs: recall_row(rng, k), args.steps_recall, small,
                          batch=args.batch)
        probes.append({"probe": "recall", "pairs": pairs, "canvas_slots": 1,
                       "model": "d64 L2", "curve": curve,
                       "seconds": round(time.time() - t0, 1)})
    def slow(width: int) -> TrainConfig:  # the format and suite probes' longer runs
        return TrainConfig(d_model=width, n_layers=2, n_heads=4, steps=args.steps_format,
                           **{**common, "warmup": 100})

    for table, question in formats if "format" in args.probes else ():
        print(f"recall, 4 pairs, table {table}, question {question}, d64 L2", flush=True)
        t0 = time.time()
        curve = run_probe(lambda rng, t=table, q=question: format_row(rng, 4, t, q),
                          args.steps_format, slow(64), batch=args.batch, pad_to=32, every=250)
        probes.append({"probe": "recall", "pairs": 4, "table": table, "question": question,
                       "seed": args.seed, "canvas_slots": 1, "model": "d64 L2", "curve": curve,
                       "seconds": round(time.time() - t0, 1)})
    for width in (64, 128) if "suite" in args.probes else ():
        print(f"suite facts rows, contexts {SUITE_CONTEXT}, d{width} L2", flush=True)
        t0 = time.time()
        curve = run_probe(suite_row, args.steps_format, slow(width), batch=args.batch, pad_to=64,
                          every=250, make_held=lambda rng: suite_row(rng, held_out=True))
        probes.append({"probe": "suite facts", "pairs": "2-4", "seed": args.seed,
                       "canvas_slots": 1, "model": f"d{width} L2", "curve": curve,
                       "seconds": round(time.time() - t0, 1)})
    device = jax.devices()[0]
    result = {"machine": {"node": platform.node(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "device": device.device_kind, "platform": device.platform,
              "jax_version": jax.__version__, "batch": args.batch,
              "optimizer": "AdamW lr 3e-3, 20 warmup steps (100 for format and suite), "
                           "cosine decay",
              "probes": probes}
    write_result(result, args.out, Path(__file__).parent / "results", "learnability")
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    lines = ["| probe | canvas slots | model | final accuracy | first step >= 90% |",
             "|---|---|---|---|---|"]
    for p in result["probes"]:
        name = p["probe"] + (f" ({p['pairs']} pairs)" if "pairs" in p else "")
        if "table" in p:
            name += f", table {p['table']}, question {p['question']}, seed {p.get('seed', 0)}"
        elif "seed" in p:
            name += f", seed {p['seed']}"
        hit = first_step_above(p["curve"])
        lines.append(f"| {name} | {p['canvas_slots']} | {p['model']} | "
                     f"{p['curve'][-1]['accuracy']:.2f} | "
                     f"{hit if hit is not None else 'not within ' + str(p['curve'][-1]['step'])}"
                     " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
