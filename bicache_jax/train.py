"""Train a small LLaDA-layout DLM on the shared-prefix task suite (`tasks.py`).

Objective (LLaDA's masked diffusion), `diffusion_loss`:

* per sequence a noise level t ~ U(eps, 1) (eps = 1e-3);
* every *eligible* token is replaced by `mask_token_id` with probability t, independently;
* loss of a sequence = sum over masked positions of CE(logits, token) / t, divided by the
  number of eligible tokens; the batch loss is the mean over sequences.

Two variants, chosen per sequence (`Batch.sft`):

* **pretraining**: every real token (`< lengths`) is eligible; the normaliser is the
  number of real tokens of the sequence (LLaDA normalises by the sequence length; we use
  each sequence's own unpadded length, so padding never changes the loss);
* **SFT**: only response tokens (`Batch.response`: the answer and its `<eos>` padding up
  to `gen_length`) are eligible; the shared prefix and the user prompt are never masked.
  The normaliser is the response length (LLaDA SFT divides by the answer length, `<eos>`
  padding included).

Packed SFT rows (`TrainConfig.max_qa > 1`): a row may carry up to `max_qa` requests on the
same shared prefix, earlier ones compact (`question | answer <eos>`) like a chat history,
the last one in the served layout (`row_segments`); every answer is eligible and the
normaliser is their total length. This is multi-turn SFT on one system prompt; it
multiplies the supervised answer tokens per forward (the prefix, most of the compute, is
shared). The recipe keeps one request per row: packed rows held every measured run on
the copy-any-value plateau. Evaluation always uses the served layout (one request,
canvas last).

Recall rows (`TrainConfig.recall_frac`): a share of rows are `prefix | recall : ...`, the
prefix's world restated item by item (`tasks.recall_segments`: every fact, every symbol's
image, every latest chat fact) with only the retrieved tokens maskable: many retrievals
per forward, in the prefix's own format. They are training data only, never served.

Pair rows (`TrainConfig.pair_steps`, `pair_frac`): bare key-value drills `k v ; k v ; k |
v` in the suite's own token classes (names onto numbers with a `;` after each pair, as in
facts; symbols onto other symbols with a `;` after every two pairs, as in fewshot), the
asked key right before the one-slot canvas. The first `pair_steps` updates train on them
alone, the first `pair_two_steps` of those with exactly two pairs (8-token rows), then 2 to
`PAIR_MAX` pairs; afterwards a share `pair_frac` of the rows of every batch padded to at most
`PAIR_EDGE` tokens stays pair rows (padded to longer rows they would mostly compute
padding). Key matching (find the asked key, read the token after it: what facts and
fewshot need) emerges on these short rows within a few hundred updates, where the suite's
rows (3-6x longer, the key among template words and filler) held every earlier run on the
copy-any-value plateau for thousands (README). `family_weights` sets the families' shares
of the suite rows.

Curriculum (`TrainConfig.curriculum`): the longest context stays at `curriculum_start`
for `curriculum_hold` steps, then grows linearly to `context_max` over `curriculum` steps
(`context_cap`), so retrieval is
first learned on small worlds with few distractors.

`response_mask="all"` (the recipe's default) masks every response token of an SFT row (t = 1
there; pretraining rows keep their sampled mask): the state held-out decoding starts from.
With a one-token canvas (`gen_length=1`, the answer alone) the random-ratio objective
masks the answer with probability t, so its expected loss is E[t] * CE of the same slot:
masking it always is the same objective with every row supervised instead of half of
them, and no `<eos>` slot, so no canvas slot has to work out its own index.

`weighting="flat"` replaces the 1/t ELBO weights by a plain mean of CE over the masked
tokens (the recipe's default: at batch 32, 1/t up to 1/eps lets a few
barely-masked rows dominate each update).

With `weighting="elbo"` the pretraining and SFT losses are unbiased
estimates of an upper bound on the negative log-likelihood of the eligible tokens.
`sample_t` can draw the batch's t stratified (one uniform offset, evenly spaced;
marginally still U(eps, 1)), which lowers the variance of the 1/t-weighted loss.

Trainer (`train`, CLI `train_main`): AdamW with linear warmup + cosine decay and global
norm clipping, one jitted train step (one compile per padded length bucket), batches drawn
from the task suite as a pure function of `(seed, step)`, orbax checkpoints of (params,
optimizer state) every `ckpt_every` steps in `<out>/checkpoints` (rerunning the same
command resumes from the latest one and reproduces the uninterrupted loss curve), a tqdm
bar, `<out>/loss.jsonl` (one record per step) and `<out>/loss.png`, periodic held-out
accuracy in `<out>/eval.jsonl`, and at the end a model folder (`<out>/model` or
`--export`) written with `checkpoint.save` plus `tokenizer.json`, `train_config.json`,
`loss.jsonl`, `loss.png` and `eval.json`.

Accuracy (`evaluate`) uses LLaDA low-confidence decoding on the full sequence (no
cache): a canvas of `gen_length` masks after prefix + prompt, `gen_length` steps, each one
full forward that unmasks the masked canvas position whose argmax token has the highest
softmax probability — what `generate(policy="none", steps=gen_length,
block_length=gen_length)` does.

Example (every `TrainConfig` default is the default model's recipe, `DEFAULT_RECIPE`;
see README):

    python -m bicache_jax.train --out runs/default --export bicache_jax/assets/default_model
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from . import tasks
from .cli_args import HelpFormatter
from .config import ModelConfig
from .model import forward, init_params

EPS = 1e-3

# ----------------------------------------------------------------------------- objective


class Batch(NamedTuple):
    """A padded training batch (a pytree of arrays).

    tokens:   [B, T] clean tokens `[prefix | prompt | response | <pad>...]` (a packed row
              has further `question | response` pairs after the first response).
    lengths:  [B] real tokens per row (keys at positions >= lengths are masked out).
    response: [B, T] True on response tokens (answers and their `<eos>` padding).
    sft:      [B] True: SFT objective (only response tokens are masked); False: the
              pretraining objective (any real token may be masked).
    """

    tokens: Int[Array, "batch seq"]
    lengths: Int[Array, " batch"]
    response: Bool[Array, "batch seq"]
    sft: Bool[Array, " batch"]


def eligible_mask(batch: Batch) -> Bool[Array, "batch seq"]:
    """Positions that may be masked: real tokens, and for SFT rows only the response."""
    pos = jnp.arange(batch.tokens.shape[1])[None, :]
    real = pos < batch.lengths[:, None]
    return real & (batch.response | ~batch.sft[:, None])


def sample_t(key: jax.Array, batch_size: int, eps: float = EPS,
             stratified: bool = False) -> Float[Array, " batch"]:
    """Noise levels t ~ U(eps, 1) per sequence (stratified: evenly spaced, random offset)."""
    u = jax.random.uniform(key, (batch_size,))
    if stratified:
        u = jnp.mod(u[0] + jnp.arange(batch_size) / batch_size, 1.0)
    return eps + (1.0 - eps) * u


def sample_mask(key: jax.Array, batch: Batch, eps: float = EPS, stratified: bool = False
                ) -> tuple[Bool[Array, "batch seq"], Float[Array, " batch"]]:
    """Draw t per sequence and mask each eligible token with probability t.

    Returns `(masked [B, T], t [B])`; positions that are not eligible are never masked.
    """
    k_t, k_m = jax.random.split(key)
    t = sample_t(k_t, batch.tokens.shape[0], eps, stratified)
    u = jax.random.uniform(k_m, batch.tokens.shape)
    return eligible_mask(batch) & (u < t[:, None]), t


def masked_diffusion_loss(
    logits: Float[Array, "batch seq vocab"], tokens: Int[Array, "batch seq"],
    masked: Bool[Array, "batch seq"], t: Float[Array, " batch"],
    normaliser: Float[Array, " batch"],
) -> tuple[Float[Array, ""], Float[Array, " batch"]]:
    """mean_b [ sum_{i masked} CE(logits[b, i], tokens[b, i]) / t[b] / normaliser[b] ].

    Returns `(loss, per_sequence_loss)`.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    per_seq = jnp.sum(jnp.where(masked, ce, 0.0), axis=1) / t / jnp.maximum(normaliser, 1)
    return jnp.mean(per_seq), per_seq


LogitsFn = Callable[[dict, ModelConfig, Array, Array], Array]


def diffusion_loss(params: dict, config: ModelConfig, batch: Batch, key: jax.Array, *,
                   eps: float = EPS, stratified: bool = False, weighting: str = "elbo",
                   response_mask: str = "random",
                   logits_fn: LogitsFn | None = None) -> tuple[Array, dict]:
    """The masked-diffusion loss of `batch` (pretraining / SFT per row, see module doc).

    `response_mask="all"` masks every response token of the SFT rows (t = 1 there; see
    the module doc); `"random"` masks each with probability t. `logits_fn(params, config,
    tokens, lengths)` defaults to `model.forward`. Returns `(loss, aux)` with
    `aux = {"per_seq", "t", "masked"}`.
    """
    masked, t = sample_mask(key, batch, eps, stratified)
    if response_mask == "all":
        masked = jnp.where(batch.sft[:, None], eligible_mask(batch), masked)
        t = jnp.where(batch.sft, 1.0, t)
    elif response_mask != "random":
        raise ValueError(f"response_mask must be 'random' or 'all', got {response_mask!r}")
    noisy = jnp.where(masked, config.mask_token_id, batch.tokens)
    if logits_fn is None:
        logits = forward(params, config, noisy, batch.lengths, unroll_layers=True)
    else:
        logits = logits_fn(params, config, noisy, batch.lengths)
    normaliser = jnp.sum(eligible_mask(batch), axis=1).astype(jnp.float32)
    if weighting == "flat":  # CE averaged over the masked tokens, no 1/t
        t = jnp.ones_like(t)
        normaliser = jnp.sum(masked, axis=1).astype(jnp.float32)
    elif weighting != "elbo":
        raise ValueError(f"weighting must be 'elbo' or 'flat', got {weighting!r}")
    loss, per_seq = masked_diffusion_loss(logits, batch.tokens, masked, t, normaliser)
    return loss, {"per_seq": per_seq, "t": t, "masked": masked}


# ----------------------------------------------------------------------------- data


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def row_segments(group: Sequence[tasks.Instance], gen_length: int
                 ) -> list[tuple[tuple[int, ...], bool]]:
    """A training row as (ids, is_response) segments.

    `group[0]` is the served request and comes last, in the served layout (`prompt |
    answer <eos>...` up to gen_length); `group[1:]` are earlier requests on the same prefix
    in compact form (`question | answer <eos>`), like the history of a chat:
    `prefix | q2 a2 <eos> | q3 a3 <eos> | ... | prompt1 | answer1 <eos> ... <eos>`.
    """
    first = group[0]
    segs = [(first.prefix_ids, False)]
    for inst in group[1:]:
        if inst.prefix_ids != first.prefix_ids:
            raise ValueError("a packed row needs requests sharing one prefix")
        segs += [(inst.question_ids, False), (inst.answer_ids + (tasks.EOS_ID,), True)]
    segs += [(first.prompt_ids, False), (first.response_ids(gen_length), True)]
    return segs


Segments = list[tuple[tuple[int, ...], bool]]


def _as_segments(row, gen_length: int) -> Segments:
    if isinstance(row, tasks.Instance):
        return row_segments([row], gen_length)
    row = list(row)
    if row and isinstance(row[0], tasks.Instance):
        return row_segments(row, gen_length)
    return row


def row_length(row, gen_length: int) -> int:
    """Tokens of a row in any form `make_batch` takes."""
    return sum(len(ids) for ids, _ in _as_segments(row, gen_length))


def make_batch(rows: Sequence, gen_length: int, pad_to: int,
               sft: Sequence[bool] | None = None) -> Batch:
    """Rows of `pad_to` tokens, each given as an `Instance` (`[prefix | prompt | answer
    <eos>... | <pad>...]`), a list of instances sharing a prefix (a packed row, see
    `row_segments`) or a list of `(ids, is_response)` segments."""
    b = len(rows)
    tokens = np.full((b, pad_to), tasks.PAD_ID, np.int32)
    response = np.zeros((b, pad_to), bool)
    lengths = np.zeros(b, np.int32)
    for i, row in enumerate(rows):
        n = 0
        for ids, is_resp in _as_segments(row, gen_length):
            if n + len(ids) > pad_to:
                raise ValueError(f"row {i} does not fit {pad_to} tokens")
            tokens[i, n:n + len(ids)] = ids
            response[i, n:n + len(ids)] = is_resp
            n += len(ids)
        lengths[i] = n
    sft_arr = np.ones(b, bool) if sft is None else np.asarray(sft, bool)
    return Batch(tokens, lengths, response, sft_arr)


# A minimal world plus its question can exceed the context range's top by about ten
# tokens (measured: 56 tokens at context (16, 47), 126 at (24, 120)); the model must
# serve every instance of its range.
CONTEXT_OVERSHOOT = 16


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved as `train_config.json`)."""

    steps: int = 3600
    batch_size: int = 256
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    b2: float = 0.98
    pretrain_frac: float = 0.0
    max_qa: int = 1  # requests per training row (1..max_qa, sharing the prefix); packing
    # more held the trainer on the copy-any-value plateau (stopped_runs_3000steps_cpu.json)
    recall_frac: float = 0.0  # share of rows that are dense recall rows (`_recall_row`)
    curriculum: int = 400  # steps over which the longest context grows to context_max
    # the longest context at step 0 (with curriculum > 0): 31 keeps one bucket, rows of 32
    curriculum_start: int = 31
    curriculum_hold: int = 2800  # steps the longest context stays at curriculum_start
    stratified_t: bool = True
    weighting: str = "flat"
    response_mask: str = "all"  # "all": SFT rows mask the whole response (t = 1)
    gen_length: int = 1
    context_min: int = tasks.DEFAULT_CONTEXT[0]
    # below the suite's 120 (time: README); 95, not 96, saves a bucket of 112-token rows
    context_max: int = 95
    bucket: int = 16
    families: tuple[str, ...] = tasks.FAMILIES
    # Relative share of each family of `tasks.FAMILIES` among the suite rows (those not in
    # `families` are skipped); fewshot, learned last, gets twice the rows.
    family_weights: tuple[float, ...] = (1.0, 2.0, 1.0)
    pair_steps: int = 1800  # the first updates train on pair rows alone (`pair_row`) ...
    pair_two_steps: int = 800  # ... the first of them (if fewer) with two pairs per row
    pair_frac: float = 0.25  # share of pair rows in later batches of rows <= PAIR_EDGE
    # model size
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_mult: int = 4
    rope_theta: float = 10000.0

    def __post_init__(self):
        if len(self.family_weights) != len(tasks.FAMILIES) or min(self.family_weights) <= 0:
            raise ValueError(f"family_weights {self.family_weights} must give one positive "
                             f"weight per family of {tasks.FAMILIES}")
        if min(self.pair_steps, self.pair_two_steps) < 0 or not 0 <= self.pair_frac <= 1:
            raise ValueError(f"pair_steps {self.pair_steps} and pair_two_steps "
                             f"{self.pair_two_steps} must be >= 0, pair_frac {self.pair_frac} "
                             f"in [0, 1]")

    def model_config(self) -> ModelConfig:
        """The LLaDA-layout `ModelConfig` of this run (vocabulary of `tasks`)."""
        return ModelConfig(
            layout="llada", vocab_size=tasks.VOCAB_SIZE, d_model=self.d_model,
            n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_heads,
            head_dim=self.d_model // self.n_heads, mlp_dim=self.mlp_mult * self.d_model,
            rope_theta=self.rope_theta, norm_eps=1e-5, qkv_bias=False, logits_shift=False,
            mask_token_id=tasks.MASK_ID,
            max_seq_len=_round_up(self.context_max + CONTEXT_OVERSHOOT + self.gen_length,
                                  self.bucket))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        d = json.loads(text)
        d["families"] = tuple(d["families"])
        d["family_weights"] = tuple(d["family_weights"])
        return cls(**d)


DEFAULT_RECIPE = TrainConfig()  # the default model's training run (README, issue 15)


def _buckets(tc: TrainConfig) -> list[tuple[int, int]]:
    """Context-length ranges, one per padded length bucket (multiples of `tc.bucket`)."""
    out, lo = [], tc.context_min
    top = _round_up(tc.context_max + tc.gen_length, tc.bucket)
    for edge in range(tc.bucket, top + 1, tc.bucket):
        hi = min(edge - tc.gen_length, tc.context_max)
        if hi >= lo:
            out.append((lo, hi))
            lo = hi + 1
    return out


def context_cap(tc: TrainConfig, step: int) -> int:
    """The longest context of step `step`: with a curriculum it stays at
    `curriculum_start` for `curriculum_hold` steps, then grows linearly to `context_max`
    over `curriculum` steps (small worlds, few distractors, little filler first: the key
    matching emerges there, then extends to long prefixes)."""
    ramp = step - tc.curriculum_hold
    if tc.curriculum <= 0 or ramp >= tc.curriculum:
        return tc.context_max
    start = max(tc.context_min, min(tc.curriculum_start, tc.context_max))
    return start + (tc.context_max - start) * max(ramp, 0) // tc.curriculum


# Worlds drawn per row until one fits the step's bucket (a minimal chat overshoots a
# 24-31-token context in about 30% of draws; one such row padded every batch to 48).
FIT_TRIES = 8
QA_SLACK = 10  # context shortened per extra packed request, so packed rows fit the bucket


def train_rows(tc: TrainConfig, step: int) -> tuple[list, np.ndarray]:
    """The rows of update `step` and their SFT flags: a pure function of `(seed, step)`.

    The first `pair_steps` updates are pair rows alone (`pair_row`). Later a row is, with
    probability `pair_frac`, a pair row; else a list of instances sharing a prefix or, with
    probability `recall_frac`, the segments of a recall row (`_recall_row`).

    One context-length bucket per step (so the batch pads to a short length); per row a
    family (`family_weights`), a training seed (< EVAL_SEED_START; redrawn while its first
    request overshoots the bucket, up to `FIT_TRIES` draws), k in 1..max_qa requests on that seed's
    prefix (packed while the row fits the bucket; never two about the same topic, so an
    answer is never in the row's history), and whether the row uses the pretraining
    objective (probability `pretrain_frac`).
    """
    rng = np.random.default_rng([tc.seed, step, 0x5EED])
    if step < tc.pair_steps:
        most = 2 if step < tc.pair_two_steps else PAIR_MAX
        return [pair_row(rng, most) for _ in range(tc.batch_size)], np.ones(tc.batch_size, bool)
    cap = context_cap(tc, step)
    buckets = [(lo, min(hi, cap)) for lo, hi in _buckets(tc) if lo <= cap]
    lo, hi = buckets[int(rng.integers(len(buckets)))]
    edge = _round_up(hi + tc.gen_length, tc.bucket)
    weights = np.array([tc.family_weights[tasks.FAMILIES.index(f)] for f in tc.families])
    weights /= weights.sum()
    # Pair rows (at most 14 tokens) join only the shortest bucket's batches: padded to a
    # longer one they would mostly compute padding.
    pair_frac = tc.pair_frac if edge <= PAIR_EDGE else 0.0
    rows: list = []
    for _ in range(tc.batch_size):
        if rng.random() < pair_frac:
            rows.append(pair_row(rng, PAIR_MAX))
            continue
        fam = tc.families[int(rng.choice(len(tc.families), p=weights))]
        if rng.random() < tc.recall_frac:
            rows.append(_recall_row(fam, int(rng.integers(tasks.EVAL_SEED_START)),
                                    int(rng.integers(1 << 30)), edge))
            continue
        k = int(rng.integers(1, tc.max_qa + 1))
        questions = [int(q) for q in rng.permutation(2 * k + 2)]
        short = QA_SLACK * (k - 1)
        context = (max(tc.context_min, lo - short), max(tc.context_min, hi - short))
        for _ in range(FIT_TRIES):  # a minimal world may overshoot the bucket: redraw it
            seed = int(rng.integers(tasks.EVAL_SEED_START))
            group = [tasks.make_instance(fam, seed, questions[0], context=context)]
            if row_length(group, tc.gen_length) <= edge:
                break
        topics = set(group[0].meta["topic"])
        for q in questions[1:]:
            if len(group) == k:
                break
            extra = tasks.make_instance(fam, seed, q, context=context)
            if topics & set(extra.meta["topic"]):
                continue  # never ask about the same thing twice: no copying from history
            if row_length(group + [extra], tc.gen_length) > edge:
                break
            group.append(extra)
            topics |= set(extra.meta["topic"])
        rows.append(group)
    sft = rng.random(tc.batch_size) >= tc.pretrain_frac
    return rows, sft


PAIR_BUCKET = 8  # padding multiple of the pair-only batches
PAIR_EDGE = 32  # the longest padded row of a batch that takes pair rows
PAIR_MAX = 4  # pairs per pair row after the two-pair start (the facts tables' cap)
_PAIR_KEYS = {"facts": (np.array([tasks.TOKEN_ID[w] for w in tasks.NAMES]),
                        np.array([tasks.TOKEN_ID[w] for w in tasks.NUMBERS])),
              "fewshot": (np.array([tasks.TOKEN_ID[w] for w in tasks.SOURCES]),
                          np.array([tasks.TOKEN_ID[w] for w in tasks.IMAGES]))}


def pair_row(rng: np.random.Generator, most: int) -> Segments:
    """A bare key-value drill of 2..`most` pairs, the asked key last, its value the answer.

    Half the rows in the facts classes (distinct names onto numbers, `k v ;` per pair), half
    in fewshot's (distinct source symbols onto distinct image symbols, `s t s t ;`: two
    pairs to an example): `k1 v1 ; k2 v2 ; k2 | v2`. No header, no filler: at most
    `3 * most + 2` tokens.
    """
    n = int(rng.integers(2, most + 1))
    if rng.random() < 0.5:
        names, numbers = _PAIR_KEYS["facts"]
        keys, values, group = rng.choice(names, n, replace=False), rng.choice(numbers, n), 1
    else:
        sources, images = _PAIR_KEYS["fewshot"]
        keys, values = rng.choice(sources, n, replace=False), rng.choice(images, n, replace=False)
        group = 2
    ids: list[int] = []
    for j, (k, v) in enumerate(zip(keys, values, strict=True)):
        ids += [int(k), int(v)] + ([tasks.TOKEN_ID[";"]] if (j + 1) % group == 0 or j == n - 1
                                   else [])
    i = int(rng.integers(n))
    return [(tuple(ids) + (int(keys[i]),), False), ((int(values[i]),), True)]


def _recall_row(family: str, seed: int, order_seed: int, edge: int) -> Segments:
    """A dense recall row (`tasks.recall_segments`): a prefix of about 40% of the bucket,
    then as many restated items as fit in `edge` tokens."""
    prefix, items = tasks.recall_segments(
        family, seed, order_seed, context=(int(0.38 * edge), int(0.48 * edge)),
        ratio=(0.95, 0.96))
    segs: Segments = [(prefix, False)]
    n = len(prefix)
    for ids, is_answer in items:
        if n + len(ids) > edge:
            break
        segs.append((ids, is_answer))
        n += len(ids)
    return segs


def train_instances(tc: TrainConfig, step: int) -> list[tasks.Instance]:
    """Every served-format request in the batch of update `step` (see `train_rows`)."""
    return [inst for row in train_rows(tc, step)[0] for inst in row
            if isinstance(inst, tasks.Instance)]


def train_batch(tc: TrainConfig, step: int) -> Batch:
    """The padded batch of update `step` (see `train_rows`)."""
    rows, sft = train_rows(tc, step)
    longest = max(row_length(r, tc.gen_length) for r in rows)
    # Pair rows alone are at most 3 * PAIR_MAX + 2 tokens: pad to 8s (a two-pair row is 8).
    multiple = PAIR_BUCKET if step < tc.pair_steps else tc.bucket
    return make_batch(rows, tc.gen_length, _round_up(longest, multiple), sft)


# ----------------------------------------------------------------------------- decoding


@functools.partial(jax.jit, static_argnames=("config", "gen_length"))
def _low_confidence_decode(params, config: ModelConfig, tokens, lengths, start,
                           gen_length: int):
    pos = jnp.arange(tokens.shape[1])[None, :]
    canvas = (pos >= start[:, None]) & (pos < (start + gen_length)[:, None])

    def body(_, toks):
        logits = forward(params, config, toks, lengths)
        probs = jax.nn.softmax(logits, axis=-1)
        pred = jnp.argmax(logits, axis=-1)
        conf = jnp.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
        cand = canvas & (toks == config.mask_token_id)
        conf = jnp.where(cand, conf, -jnp.inf)
        best = jnp.argmax(conf, axis=1)  # ties: the lowest position
        pick = (pos == best[:, None]) & jnp.any(cand, axis=1, keepdims=True)
        return jnp.where(pick, pred, toks)

    out = jax.lax.fori_loop(0, gen_length, body, tokens)
    return jnp.take_along_axis(out, start[:, None] + jnp.arange(gen_length)[None, :], axis=1)


def decode_canvas(params: dict, config: ModelConfig, instances: Sequence[tasks.Instance],
                  gen_length: int = tasks.GEN_LENGTH, batch_size: int = 64,
                  bucket: int = 64) -> np.ndarray:
    """Low-confidence decoding without any cache: the `[N, gen_length]` decoded canvases.

    Requests are grouped by padded length (multiples of `bucket`) to limit compiles.
    """
    out = np.zeros((len(instances), gen_length), np.int32)
    order = sorted(range(len(instances)), key=lambda i: instances[i].context_len)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        pad_to = _round_up(max(instances[i].context_len for i in idx) + gen_length, bucket)
        tokens = np.full((len(idx), pad_to), tasks.PAD_ID, np.int32)
        lengths = np.zeros(len(idx), np.int32)
        start = np.zeros(len(idx), np.int32)
        for r, i in enumerate(idx):
            ctx = instances[i].prefix_ids + instances[i].prompt_ids
            tokens[r, :len(ctx)] = ctx
            tokens[r, len(ctx):len(ctx) + gen_length] = config.mask_token_id
            lengths[r] = len(ctx) + gen_length
            start[r] = len(ctx)
        out[idx] = np.asarray(_low_confidence_decode(
            params, config, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(start),
            gen_length))
    return out


def evaluate(params: dict, config: ModelConfig, instances: Sequence[tasks.Instance],
             gen_length: int = tasks.GEN_LENGTH, batch_size: int = 64) -> dict:
    """Exact-answer accuracy per family (and `all`) with full low-confidence decoding."""
    canvases = decode_canvas(params, config, instances, gen_length, batch_size)
    hits: dict[str, list[bool]] = {}
    for inst, canvas in zip(instances, canvases, strict=True):
        hits.setdefault(inst.family, []).append(tasks.is_correct(canvas, inst))
    acc = {fam: float(np.mean(h)) for fam, h in hits.items()}
    acc["all"] = float(np.mean([x for h in hits.values() for x in h]))
    return acc


# ----------------------------------------------------------------------------- training


class TrainState(NamedTuple):
    """What a checkpoint holds."""

    params: dict
    opt_state: optax.OptState


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 `tc.b2`) with linear warmup, cosine decay and norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup,
        decay_steps=max(tc.steps, tc.warmup + 1), end_value=tc.lr * tc.min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(schedule, b1=0.9, b2=tc.b2,
                                   weight_decay=tc.weight_decay))


def init_state(tc: TrainConfig) -> TrainState:
    """Fresh params (seeded by `tc.seed`) and optimizer state."""
    params = init_params(tc.model_config(), jax.random.key(tc.seed))
    return TrainState(params, make_optimizer(tc).init(params))


def make_train_step(tc: TrainConfig):
    """The jitted `step(state, batch, step_index) -> (state, metrics)`."""
    config = tc.model_config()
    opt = make_optimizer(tc)
    base_key = jax.random.key(tc.seed)

    @jax.jit
    def step_fn(state: TrainState, batch: Batch, step: Int[Array, ""]):
        key = jax.random.fold_in(base_key, step)

        def loss_fn(p):
            return diffusion_loss(p, config, batch, key, stratified=tc.stratified_t,
                                  weighting=tc.weighting, response_mask=tc.response_mask)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": loss,
                                               "grad_norm": optax.tree.norm(grads)}

    return step_fn


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """The float32 matmul rate of this machine: a jitted `n x n @ n x n`, best of
    `repeats` timed calls after a warm-up (GFLOP/s, 2 n^3 FLOPs per call)."""
    f = jax.jit(jnp.matmul)
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f(x, x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step on a `[batch, seq]` batch: forward 2 per weight
    per token (projections, MLP, lm_head; the embedding lookup is no matmul) plus
    attention's QK^T and AV (4 * seq * heads * head_dim per token per layer); the
    backward pass doubles the forward (3x in all)."""
    d, hd = config.d_model, config.head_dim
    q_o = 2 * d * config.n_heads * hd
    k_v = 2 * d * config.n_kv_heads * hd
    mlp = 3 * d * config.mlp_dim
    weights = config.n_layers * (q_o + k_v + mlp) + d * config.vocab_size
    attn = config.n_layers * 4 * seq * config.n_heads * hd
    return 3.0 * batch * seq * (2 * weights + attn)


def _checkpoint_manager(directory: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                             enable_async_checkpointing=False))


def _restore(manager, tc: TrainConfig) -> tuple[TrainState, int] | None:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.eval_shape(lambda: init_state(tc))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return TrainState(*restored), int(step)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: Sequence[dict], path: Path, title: str = "") -> None:
    """Per-step loss (faint) and its exponential moving average against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    ema, acc = np.zeros_like(loss), None
    for i, x in enumerate(loss):
        acc = x if acc is None else 0.98 * acc + 0.02 * x
        ema[i] = acc
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.25, lw=0.7, label="loss")
    ax.plot(steps, ema, lw=1.5, label="EMA (0.98)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


MONITOR_SEED = tasks.EVAL_SEED_START + 500_000  # eval seeds used for the periodic check


def train(tc: TrainConfig, out: str | Path, *, ckpt_every: int = 250, eval_every: int = 0,
          eval_n: int = 32, export: str | Path | None = None, progress: bool = True,
          stop_after: int | None = None, profile_n: int = 100) -> dict:
    """Run (or resume) training into `out`; returns `{"params", "config", "records"}`.

    Resumes from the latest checkpoint in `<out>/checkpoints` when there is one (the run
    config must match `<out>/train_config.json`). `stop_after` stops after that many
    updates in total (to simulate an interruption in tests). `export` writes the final
    model folder there (default: `<out>/model`), profiled on `profile_n` pairs per family
    (`profile_model`; 0: no `r -> b` table).
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        old = TrainConfig.from_json(cfg_path.read_text())
        if old != tc:
            raise ValueError(f"{cfg_path}: a different run lives in {out}; pick another --out"
                             f" (old {old}, new {tc})")
    else:
        cfg_path.write_text(tc.to_json() + "\n")
    config = tc.model_config()
    manager = _checkpoint_manager(out / "checkpoints")
    restored = _restore(manager, tc)
    if restored is None:
        state, start = init_state(tc), 0
    else:
        state, start = restored
    log_path, eval_path = out / "loss.jsonl", out / "eval.jsonl"
    records = [r for r in _read_jsonl(log_path) if r["step"] < start]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = [r for r in _read_jsonl(eval_path) if r["step"] <= start]
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in evals))
    step_fn = make_train_step(tc)
    peak = matmul_peak_gflops()
    print(f"float32 1024^3 matmul peak on this machine: {peak:.1f} GFLOP/s", file=sys.stderr)
    monitor = (tasks.eval_instances(eval_n, seed=MONITOR_SEED, families=tc.families,
                                    context=(tc.context_min, tc.context_max))
               if eval_every else [])
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=tc.steps, disable=not progress,
               dynamic_ncols=True, desc="train")
    ema = records[-1]["ema"] if records else None
    t0 = time.time()
    # Batches are pure functions of (seed, step): build the next one on a host thread while
    # the current step runs (JAX releases the GIL), without changing any result.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending = {start: pool.submit(train_batch, tc, start)} if start < end else {}
    with log_path.open("a") as log:
        for step in bar:
            batch = pending.pop(step).result()
            if step + 1 < end:
                pending[step + 1] = pool.submit(train_batch, tc, step + 1)
            t_step = time.perf_counter()
            state, metrics = step_fn(state, jax.tree.map(jnp.asarray, batch), step)
            loss = float(metrics["loss"])
            step_s = time.perf_counter() - t_step
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            rec = {"step": step, "loss": loss, "ema": ema,
                   "grad_norm": float(metrics["grad_norm"]),
                   "seq_len": int(batch.tokens.shape[1]),
                   "step_s": round(step_s, 4), "elapsed": round(time.time() - t0, 2)}
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", ema=f"{ema:.4f}")
            done = step + 1
            if done % ckpt_every == 0 or done == tc.steps:
                manager.save(done, args=_save_args(state), force=True)
                manager.wait_until_finished()
            if eval_every and (done % eval_every == 0 or done == tc.steps):
                acc = evaluate(state.params, config, monitor, tc.gen_length)
                with eval_path.open("a") as f:
                    f.write(json.dumps({"step": done, **acc}) + "\n")
                bar.write(f"step {done}: loss(ema) {ema:.4f} held-out acc "
                          + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    bar.close()
    pool.shutdown()
    manager.close()
    _write_throughput(out / "throughput.json", records[start:], config, tc, peak)
    if records:
        plot_loss(records, out / "loss.png", f"d{tc.d_model} L{tc.n_layers} seed {tc.seed}")
    if end == tc.steps:
        export_model(state.params, tc, export if export is not None else out / "model", out,
                     profile_n, progress)
    return {"params": state.params, "config": config, "records": records}


def _write_throughput(path: Path, records: Sequence[dict], config: ModelConfig,
                      tc: TrainConfig, peak: float) -> None:
    """Training-step throughput of this (part of the) run beside the matmul peak measured
    at its start, appended to `path` (one JSON object per invocation; resumed runs add
    one each). The first step of each padded length (its compile) is left out."""
    seen, steps = set(), []
    for r in records:
        if r["seq_len"] in seen:
            steps.append(r)
        seen.add(r["seq_len"])
    if not steps:
        return
    seconds = sum(r["step_s"] for r in steps)
    tokens = sum(tc.batch_size * r["seq_len"] for r in steps)
    flops = sum(step_flops(config, tc.batch_size, r["seq_len"]) for r in steps)
    gflops = flops / seconds / 1e9
    rec = {"steps": [steps[0]["step"], steps[-1]["step"]], "timed_steps": len(steps),
           "step_seconds": round(seconds, 2),
           "wall_seconds": round(records[-1]["elapsed"], 2),
           "tokens_per_s": round(tokens / seconds), "gflops_per_s": round(gflops, 2),
           "matmul_peak_gflops_per_s": round(peak, 2),
           "fraction_of_peak": round(gflops / peak, 3)}
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"training step: {rec['tokens_per_s']} tokens/s, {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of the {peak:.1f} GFLOP/s matmul peak", file=sys.stderr)


def _save_args(state: TrainState):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(state)


PROFILE_SEED = 900_000  # training-range seeds the offline profiler measures on


def profile_model(params: dict, tc: TrainConfig, n_per_family: int = 100,
                  progress: bool = True):
    """BiCache's offline profile of a trained model on `n_per_family` (prefix, prompt)
    pairs per family from the training distribution (seeds from `PROFILE_SEED`, below the
    evaluation range). Returns the `profiler.ProfileResult`."""
    from .profiler import profile

    pairs = [(inst.prefix_ids, inst.prompt_ids) for fam in tc.families
             for inst in tasks.generate_instances(fam, PROFILE_SEED, n_per_family,
                                                  context=(tc.context_min, tc.context_max))]
    return profile(params, tc.model_config(), pairs, progress=progress)


def export_model(params: dict, tc: TrainConfig, path: str | Path, run_dir: str | Path,
                 profile_n: int = 100, progress: bool = True) -> Path:
    """Write the model folder: `checkpoint.save` layout (with the profiler's `r -> b` table
    from `profile_model`, `profile_n` pairs per family; 0 skips it) + tokenizer and
    training records."""
    import shutil

    from .checkpoint import save

    table = (json.loads(profile_model(params, tc, profile_n, progress).to_json())
             if profile_n else None)
    path = save(path, params, tc.model_config(), table, overwrite=True)
    tasks.build_tokenizer(path / "tokenizer.json")
    (path / "train_config.json").write_text(tc.to_json() + "\n")
    run_dir = Path(run_dir)
    for name in ("loss.jsonl", "loss.png", "eval.jsonl", "throughput.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, path / name)
    return path


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The `train_main` argument parser (every `TrainConfig` field is a flag)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m bicache_jax.train", formatter_class=HelpFormatter,
        description="Train a small LLaDA-layout DLM on the shared-prefix task suite.")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--export", default=None,
                   help="where to write the final model folder (default <out>/model)")
    p.add_argument("--ckpt-every", type=int, default=250, help="checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=500,
                   help="held-out accuracy every N steps (0: never)")
    p.add_argument("--eval-n", type=int, default=32, help="monitor instances per family")
    p.add_argument("--profile-n", type=int, default=100,
                   help="profiler pairs per family for the exported r -> b table (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        if isinstance(default, tuple):  # the family list and its weights
            p.add_argument(flag, default=",".join(map(str, default)),
                           help=(f"comma-separated subset of {tasks.FAMILIES}"
                                 if f.name == "families"
                                 else f"comma-separated, one per family of {tasks.FAMILIES}"))
        elif isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                           default=default, help="TrainConfig field (true/false)")
        else:
            p.add_argument(flag, type=type(default), default=default,
                           help="TrainConfig field")
    return p


def train_main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry: parse `argv` and run `train` (see `--help`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["families"] = tuple(s for s in args.families.split(",") if s)
    unknown = set(values["families"]) - set(tasks.FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; known: {tasks.FAMILIES}")
    try:
        values["family_weights"] = tuple(float(w) for w in args.family_weights.split(",") if w)
        tc = TrainConfig(**values)
    except ValueError as e:
        parser.error(f"{e} (--families, --family-weights, --pair-steps, --pair-two-steps)")
    config = tc.model_config()
    print(f"model: {config.param_count() / 1e6:.2f}M params, max_seq_len "
          f"{config.max_seq_len}; {tc.steps} steps of {tc.batch_size}", file=sys.stderr)
    return train(tc, args.out, ckpt_every=args.ckpt_every, eval_every=args.eval_every,
                 eval_n=args.eval_n, export=args.export, progress=not args.no_progress,
                 profile_n=args.profile_n)


if __name__ == "__main__":
    train_main(sys.argv[1:])
