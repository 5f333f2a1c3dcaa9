"""Samplers: which masked positions to unmask at a step, and with which tokens.

Two families, as users of the two model lines know them:

* LLaDA (`remasking` "low_confidence" or "random"): tokens by Gumbel-max at `temperature`
  (argmax at 0); per block an even transfer schedule (`m // S`, remainder on the earliest
  steps); "low_confidence" unmasks the positions whose chosen token has the highest
  softmax probability, "random" ranks positions by uniform noise.
* Dream (`remasking` "origin", "maskgit_plus", "topk_margin", "entropy"): tokens sampled
  after `temperature` / `top_p` / `top_k`; the number to unmask follows Dream's timesteps
  `linspace(1, eps, S + 1)`; confidence = probability of the sampled token, top-1 minus
  top-2 probability, or negative entropy; with `alg_temp > 0` the positions are drawn
  (without replacement) from `softmax(confidence / alg_temp)` instead of taking the top.
  "origin" unmasks each masked position with probability `1 - s / t`.

Fast-dLLM's parallel decoding (`threshold`): unmask every candidate whose confidence is
at least `threshold`, and always the most confident one.

On a Dream checkpoint (shifted logits) two loops follow the public Dream code instead
(`public_dream_loop` says which; every remasking, as the public code ignores `alg` there):

* `FASTDLLM_DREAM`, the block caches (`fastdllm_prefix`, `fastdllm_dual`, and
  `bicache_dual` when its block-start forward decodes): Fast-dLLM's
  `dream/model/generation_utils_block.py` (`_sample`). The block-start forward decodes
  exactly the block's first position, whatever its confidence. Without a threshold,
  step i = 1 .. S-1 of the block unmasks `int(m * (1 - s / t))` of its m masked positions
  (t, s = points i, i + 1 of linspace(1, eps, S + 1); all that is left at i = S - 1),
  ranked by negative entropy; with a threshold (the public `alg="confidence_threshold"`)
  each step unmasks the most probable masked position and every other one whose token
  probability is >= threshold, with no step limit, until the block is done.
* `DREAM_THRESHOLD`, a threshold without a block cache: Dream's whole-canvas
  `confidence_threshold` of Fast-dLLM's `dream/model/generation_utils.py` (`_sample`):
  the confidence is the token probability and step i keeps at most `cap` positions,
  `m0 // S` plus what earlier steps left over (m0: masked at the start); from the last
  step on everything left, and the public loop adds steps until all are decoded.

Differences from the PyTorch references (measured in tests/test_sampling.py): LLaDA draws
Gumbel noise and softmax confidences in float64; we work in float32 and add the noise in
log space (`logits / T + g`, the same distribution as LLaDA's `exp(logits) / (-log u)^T`,
without its overflow). Dream averages the masked count over the batch before taking
`int(n * (1 - s / t))`; we use each request's own count, so a padded batch decodes like
each request alone. Fast-dLLM's Dream block loop with S = 1 step per block leaves all but
the first position of each block masked (it stops after one cached forward); ours
decodes the whole block at its start. Dream's whole-canvas `confidence_threshold` asserts
that the masked count is a multiple of S; ours puts the remainder on the last step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LLADA_REMASKING = ("low_confidence", "random")
DREAM_REMASKING = ("origin", "maskgit_plus", "topk_margin", "entropy")
REMASKING = LLADA_REMASKING + DREAM_REMASKING
FASTDLLM_DREAM = "fastdllm_dream"  # Fast-dLLM's Dream block-cache loop
DREAM_THRESHOLD = "dream_threshold"  # Dream's whole-canvas confidence_threshold


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How tokens are chosen and unmasked. Hashable: a static argument of the jitted loop."""

    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float = 0.0
    threshold: float | None = None
    cfg_scale: float = 0.0
    eps: float = 1e-3

    def __post_init__(self):
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.threshold is not None and self.remasking in ("random", "origin"):
            raise ValueError(
                f"threshold decoding ranks by confidence; remasking={self.remasking!r} has none")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    @property
    def is_dream(self) -> bool:
        return self.remasking in DREAM_REMASKING


def public_dream_loop(sampler: SamplerConfig, logits_shift: bool, block_cache: bool,
                      decodes_block_start: bool) -> str | None:
    """Which public Dream loop a run follows (see the module docstring), or None.

    logits_shift: a Dream checkpoint; block_cache: the policy has a Fast-dLLM block cache;
    decodes_block_start: its block-start forward decodes (else it only builds the cache,
    a schedule the public Dream code does not have)."""
    if not logits_shift:
        return None
    if block_cache:
        return FASTDLLM_DREAM if decodes_block_start else None
    return DREAM_THRESHOLD if sampler.threshold is not None else None


def loop_sampler(sampler: SamplerConfig, loop: str | None) -> SamplerConfig:
    """The sampler whose confidence a public Dream loop ranks by, whatever `remasking`
    says: the chosen token's probability with a threshold (`confidence_threshold`),
    negative entropy without. Tokens are the same for every Dream remasking."""
    if loop is None:
        return sampler
    return dataclasses.replace(
        sampler, remasking="maskgit_plus" if sampler.threshold is not None else "entropy")


# ----------------------------------------------------------------------------- schedules


def llada_transfer_counts(masked: Int[Array, " batch"], steps: int) -> Int[Array, "batch steps"]:
    """LLaDA's per-block schedule: `masked // steps` each, remainder on the earliest steps."""
    base = masked[:, None] // steps
    rem = masked[:, None] % steps
    return base + (jnp.arange(steps)[None, :] < rem).astype(masked.dtype)


def dream_transfer_count(masked: Int[Array, " batch"], step: Int[Array, ""], steps: int,
                         eps: float) -> Int[Array, " batch"]:
    """Dream: `int(n * (1 - s / t))` with t, s consecutive points of linspace(1, eps, S + 1);
    everything that is left at the last step."""
    ts = jnp.linspace(1.0, eps, steps + 1)
    t, s = ts[step], ts[step + 1]
    k = jnp.floor(masked.astype(jnp.float32) * (1.0 - s / t)).astype(masked.dtype)
    return jnp.where(step == steps - 1, masked, k)


# ----------------------------------------------------------------------------- tokens


def _filter_top_k_top_p(logits: Array, top_k: int | None, top_p: float | None) -> Array:
    if top_k is not None:
        kth = jnp.sort(logits, axis=-1)[..., -min(top_k, logits.shape[-1])][..., None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None, None],
            jnp.arange(logits.shape[1])[None, :, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def choose_tokens(
    logits: Float[Array, "batch rows vocab"], key: jax.Array, sampler: SamplerConfig,
) -> tuple[Int[Array, "batch rows"], Float[Array, "batch rows"]]:
    """Candidate token and its confidence for every row (confidence: higher = surer)."""
    logits = logits.astype(jnp.float32)
    if not sampler.is_dream:
        if sampler.temperature > 0:
            gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
            tokens = jnp.argmax(logits / sampler.temperature + gumbel, axis=-1)
        else:
            tokens = jnp.argmax(logits, axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)
        conf = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
        return tokens, conf
    if sampler.temperature > 0:
        logits = logits / sampler.temperature
    logits = _filter_top_k_top_p(logits, sampler.top_k, sampler.top_p)
    probs = jax.nn.softmax(logits, axis=-1)
    if sampler.temperature > 0:
        tokens = jax.random.categorical(key, logits, axis=-1)
    else:
        tokens = jnp.argmax(probs, axis=-1)
    if sampler.remasking == "topk_margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        conf = top2[..., 0] - top2[..., 1]
    elif sampler.remasking == "entropy":
        conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    else:
        conf = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    return tokens, conf


# ----------------------------------------------------------------------------- selection


def select_top(score: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
               count: Int[Array, " batch"]) -> Bool[Array, "batch rows"]:
    """The `count[b]` highest-scoring candidates of each row (ties: lower index first)."""
    score = jnp.where(candidates, score, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return candidates & (rank < count[:, None])


def select_threshold(conf: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
                     threshold: float) -> Bool[Array, "batch rows"]:
    """Fast-dLLM: every candidate with confidence >= threshold, and always the top one."""
    top = select_top(conf, candidates, jnp.ones(conf.shape[:1], jnp.int32))
    return candidates & ((conf >= threshold) | top)


def _select_dream_count(
    conf: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
    step: Int[Array, ""], steps: int, key: jax.Array, sampler: SamplerConfig,
) -> Bool[Array, "batch rows"]:
    """Dream's top-`dream_transfer_count` rule (drawn with `alg_temp > 0`)."""
    count = dream_transfer_count(jnp.sum(candidates, axis=-1), step, steps, sampler.eps)
    if sampler.alg_temp > 0:
        conf = conf / sampler.alg_temp + jax.random.gumbel(key, conf.shape)
    return select_top(conf, candidates, count)


def select_capped_threshold(
    conf: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
    step: Int[Array, ""], steps: int, masked_at_start: Int[Array, " batch"],
    threshold: float,
) -> Bool[Array, "batch rows"]:
    """Dream's whole-canvas `confidence_threshold`: the threshold rule among the `cap` most
    confident candidates. The public cap is `m0 // S` plus what earlier steps left; as
    the steps so far took all but that carry, cap = masked - (m0 // S) * (S - 1 - step),
    and from the last step on everything left."""
    masked = jnp.sum(candidates, axis=-1)
    cap = masked - (masked_at_start // steps) * jnp.maximum(steps - 1 - step, 0)
    return select_threshold(conf, select_top(conf, candidates, cap), threshold)


def select_fastdllm_dream(
    conf: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
    step: Int[Array, ""], steps: int, key: jax.Array, sampler: SamplerConfig,
) -> Bool[Array, "batch rows"]:
    """Fast-dLLM's Dream block loop (rows: the block; step 0: the block-start forward).
    `conf` must come from `loop_sampler(sampler, FASTDLLM_DREAM)`."""
    if sampler.threshold is not None:
        later = select_threshold(conf, candidates, sampler.threshold)
        start_count = 1
    else:
        later = _select_dream_count(conf, candidates, step, steps, key, sampler)
        start_count = 1 if steps > 1 else candidates.shape[-1]  # S = 1: all at the start
    # The block's first masked position (its first position: blocks decode in order).
    start = candidates & (jnp.cumsum(candidates, axis=-1) <= start_count)
    return jnp.where(step == 0, start, later)


def select_positions(
    conf: Float[Array, "batch rows"], candidates: Bool[Array, "batch rows"],
    step: Int[Array, ""], steps: int, quota: Int[Array, "batch steps"], key: jax.Array,
    sampler: SamplerConfig, loop: str | None = None,
) -> Bool[Array, "batch rows"]:
    """Which candidate rows to unmask this step (step index within the block; quota: the
    LLaDA schedule of the block, which sums to its masked count at the block start).
    `loop`: a public Dream loop (`public_dream_loop`), whose `conf` comes from
    `loop_sampler`."""
    if loop == FASTDLLM_DREAM:
        return select_fastdllm_dream(conf, candidates, step, steps, key, sampler)
    if loop == DREAM_THRESHOLD:
        return select_capped_threshold(conf, candidates, step, steps,
                                       jnp.sum(quota, axis=-1), sampler.threshold)
    if sampler.threshold is not None:
        return select_threshold(conf, candidates, sampler.threshold)
    if sampler.remasking == "random":
        return select_top(jax.random.uniform(key, conf.shape), candidates, quota[:, step])
    if sampler.remasking == "origin":
        ts = jnp.linspace(1.0, sampler.eps, steps + 1)
        p = jnp.where(step == steps - 1, 1.0, 1.0 - ts[step + 1] / ts[step])
        return candidates & (jax.random.uniform(key, conf.shape) < p)
    if sampler.is_dream:
        return _select_dream_count(conf, candidates, step, steps, key, sampler)
    return select_top(conf, candidates, quota[:, step])
