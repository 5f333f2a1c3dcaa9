"""Dream checkpoints against step-by-step references of the public Dream loops.

The references follow the public PyTorch code (NVlabs/Fast-dLLM), written here from its
rules on the float64 numpy model, one request at a time:

* `dream/model/generation_utils_block.py`, `_sample` (Fast-dLLM's prefix / dual cache):
  per block one full forward whose shifted logits decode the block's first position; then
  cached forwards on a window (prefix: the block and everything after it; dual: the
  block), the window's logits shifted inside the window; `alg="confidence_threshold"`:
  top-1 plus every masked position with probability >= threshold, until the block is
  done; otherwise `timesteps = linspace(1, eps, S + 1)` from index 1, `int(m * (1 - s /
  t))` (all at i = S - 1) ranked by negative entropy, whatever the alg.
* `dream/model/generation_utils.py`, `_sample` with `alg="confidence_threshold"` (the
  whole canvas, no cache): each step at most `m // S` plus the previous steps' leftover.
"""

import numpy as np
import pytest
from numpy_reference import numpy_forward_kv, sharp_params

from bicache_jax import Prompt, SamplerConfig, generate
from bicache_jax import config as C

CONFIGS = {
    "dream_gqa": C.tiny_dream().replace(attention_impl="reference"),
    "dream_mha": C.tiny_dream().replace(n_kv_heads=4, attention_impl="reference"),
}
EPS = 1e-3  # DreamGenerationConfig's default eps (ours too)


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, sharp_params(cfg, seed=3)) for name, cfg in CONFIGS.items()}


def _requests(cfg, seed):
    rng = np.random.default_rng(seed)

    def ids(n):
        return tuple(int(i) for i in rng.integers(0, cfg.mask_token_id - 1, n))

    shared = ids(21)
    return [Prompt(prompt=ids(5), prefix=shared), Prompt(prompt=ids(3), prefix=shared[:13]),
            Prompt(prompt=ids(7))]


def _shift(logits):
    """The public shift: row j takes row j - 1's logits, row 0 its own."""
    return np.concatenate([logits[:1], logits[:-1]])


def _probs(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _block_reference(params, cfg, prompt, gen_length, steps, block_length, cache,
                     threshold):
    """generation_utils_block.py's `_sample` (batch 1, temperature 0, alg_temp None)."""
    mask = cfg.mask_token_id
    x = np.array(list(prompt) + [mask] * gen_length)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    timesteps = np.linspace(1, EPS, per_block + 1, dtype=np.float32)
    nfe = 0
    for blk in range(n_blocks):
        s0 = len(prompt) + blk * block_length
        s1 = s0 + block_length
        logits, k, v = numpy_forward_kv(params, cfg, x)
        nfe += 1
        x[s0] = _probs(_shift(logits))[s0].argmax()  # the first position, any confidence
        cached = np.zeros(len(x), bool)
        cached[:s0] = True
        if cache == "dual":
            cached[s1:] = True
        window_end = s1 if cache == "dual" else len(x)
        i = 1
        while True:
            logits, _, _ = numpy_forward_kv(params, cfg, x, override=(k, v, cached))
            nfe += 1
            p = _probs(_shift(logits[s0:window_end]))[:block_length]
            masked = x[s0:s1] == mask
            tok = p.argmax(-1)
            if threshold is not None:
                conf = np.where(masked, p.max(-1), -np.inf)
                top = np.argsort(-conf, kind="stable")[:masked.sum()]
                keep = [top[0]] + [j for j in top[1:] if conf[j] >= threshold]
            else:
                if i == per_block:
                    break
                t, s = timesteps[i], timesteps[i + 1]
                m = np.float32(masked.sum())
                n = int(m * (np.float32(1) - s / t)) if i < per_block - 1 else int(m)
                negent = np.sum(p * np.log(p + 1e-10), axis=-1)
                conf = np.where(masked, negent, -np.inf)
                keep = np.argsort(-conf, kind="stable")[:n]
                i += 1
            keep = np.asarray(keep, int)
            x[s0 + keep] = tok[keep]
            if not np.any(x[s0:s1] == mask):
                break
    return x[len(prompt):], nfe


def _capped_threshold_reference(params, cfg, prompt, gen_length, steps, threshold):
    """generation_utils.py's `_sample`, alg "confidence_threshold" (batch 1, T = 0)."""
    mask = cfg.mask_token_id
    x = np.array(list(prompt) + [mask] * gen_length)
    assert gen_length % steps == 0  # the public code asserts it
    per_step, left, i, nfe = gen_length // steps, 0, 0, 0
    while i < steps:
        masked = x == mask
        p = _probs(_shift(numpy_forward_kv(params, cfg, x)[0]))
        nfe += 1
        conf = np.where(masked, p.max(-1), -np.inf)
        cur, left = per_step + left, 0
        top = np.argsort(-conf, kind="stable")[:cur]
        keep = [top[0]]
        for j in top[1:]:
            if conf[j] >= threshold:
                keep.append(j)
            elif i < steps - 1:
                left += 1
            else:  # at the last step a shortfall adds a step for what is left
                per_step, steps, left = 0, steps + 1, left + 1
        keep = np.asarray(keep, int)
        x[keep] = p.argmax(-1)[keep]
        i += 1
    return x[len(prompt):], nfe


SHAPES = {8: (16, 8), 32: (64, 16)}  # block_length: gen_length, steps (2 blocks; S = 4, 8)
# GQA: every cache x block x threshold; MHA: every block x threshold (one compile each is
# most of a case's time, so MHA alternates the cache).
BLOCK_CASES = [("dream_gqa", cache, bl, th) for cache in ("prefix", "dual") for bl in (8, 32)
               for th in (None, 0.5)] + [
    ("dream_mha", "dual", 8, None), ("dream_mha", "prefix", 8, 0.5),
    ("dream_mha", "prefix", 32, None), ("dream_mha", "dual", 32, 0.5)]


@pytest.mark.parametrize("name,cache,block_length,threshold", BLOCK_CASES)
def test_block_caches_match_fastdllm_dream_loop(models, name, cache, block_length,
                                                threshold):
    """entropy without a threshold; with one, maskgit_plus (the token probability, as the
    public `confidence_threshold`)."""
    cfg, params = models[name]
    gen_length, steps = SHAPES[block_length]
    remasking = "entropy" if threshold is None else "maskgit_plus"
    prompts = _requests(cfg, seed=11)
    out = generate(params, prompts, config=cfg, gen_length=gen_length, steps=steps,
                   block_length=block_length, policy=f"fastdllm_{cache}",
                   sampler=SamplerConfig(remasking=remasking, threshold=threshold))
    nfes = []
    for i, p in enumerate(prompts):
        want, nfe = _block_reference(params, cfg, p.prefix + p.prompt, gen_length, steps,
                                     block_length, cache, threshold)
        assert not np.any(want == cfg.mask_token_id)
        np.testing.assert_array_equal(out.tokens[i], want)
        assert out.nfe[i] == nfe
        nfes.append(nfe)
    if threshold is None:
        assert nfes == [steps] * len(prompts)  # the block start is a step of the schedule
    else:  # the threshold really decoded several positions at some step
        assert min(nfes) < gen_length + gen_length // block_length


def test_block_loop_ranks_by_entropy_whatever_the_remasking(models):
    """The public block loop ignores `alg` (but for its threshold branch)."""
    cfg, params = models["dream_gqa"]
    prompts = _requests(cfg, seed=4)
    kw = dict(config=cfg, gen_length=16, steps=8, block_length=8, policy="fastdllm_dual")
    entropy = generate(params, prompts, sampler=SamplerConfig(remasking="entropy"), **kw)
    for remasking in ("origin", "low_confidence"):
        other = generate(params, prompts, sampler=SamplerConfig(remasking=remasking), **kw)
        np.testing.assert_array_equal(other.tokens, entropy.tokens)


@pytest.mark.parametrize("name,steps", [("dream_gqa", 4), ("dream_gqa", 8), ("dream_mha", 8)])
def test_whole_canvas_threshold_is_capped_as_dream(models, name, steps):
    cfg, params = models[name]
    prompts = _requests(cfg, seed=12)
    out = generate(params, prompts, config=cfg, gen_length=16, steps=steps, block_length=16,
                   policy="none", sampler=SamplerConfig(remasking="maskgit_plus",
                                                        threshold=0.3))
    uncapped = 0
    for i, p in enumerate(prompts):
        want, nfe = _capped_threshold_reference(params, cfg, p.prefix + p.prompt, 16, steps,
                                                0.3)
        np.testing.assert_array_equal(out.tokens[i], want)
        assert out.nfe[i] == nfe
        uncapped += nfe != steps
    assert uncapped, "no request needed more steps than S: the carry is untested"
