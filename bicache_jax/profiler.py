"""BiCache's offline profiler: the `r -> b` table of reuse depths.

For each (prefix P, prompt U) sample, two forwards with no canvas: P alone and P+U. Per
layer, the cosine similarity between the two runs' prefix-row K (and V), heads flattened,
averaged over prefix tokens and over {K, V}, is the layer's score. Scores are averaged
per prefix-ratio bucket `r = round(100 * p / (p + u))`; `b(r)` is the number of leading
layers scoring above `threshold`; the table keeps `r -> b` only where `b` strictly grows
over every smaller `r` (a monotone staircase).

Our cached K is after RoPE; per-token cosine similarity is the same before and after it
(both runs rotate a prefix token by the same position's rotation, which preserves norms
and dot products), so the scores equal the spec's pre-RoPE ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .model import encode_prefix

DEFAULT_THRESHOLD = 0.97


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """table: ratio percent -> reuse depth (the staircase); scores: ratio -> per-layer mean
    score; counts: ratio -> samples; skipped: ratios with fewer than `min_samples`."""

    table: dict[int, int]
    scores: dict[int, list[float]]
    counts: dict[int, int]
    threshold: float
    skipped: dict[int, int]

    def to_json(self) -> str:
        return json.dumps({"threshold": self.threshold, "table": self.table,
                           "scores": self.scores, "counts": self.counts,
                           "skipped": self.skipped}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def at_threshold(self, threshold: float) -> ProfileResult:
        """The same scores read at another threshold: no forward runs again."""
        _check_threshold(threshold)
        depths = {r: leading_layers_above(s, threshold) for r, s in self.scores.items()}
        return dataclasses.replace(self, table=staircase(depths), threshold=threshold)


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def parse_table(data) -> dict[int, int]:
    """The `r -> b` table of a profile result (`ProfileResult.to_json`'s object) or of a
    plain `{r: b}` mapping; JSON string keys become ints.

    Raises ValueError unless every r is an integer percent in [0, 100] and every b an
    integer >= 0.
    """
    table = data.get("table", data) if isinstance(data, dict) else data
    if not isinstance(table, dict):
        raise ValueError(f"a reuse table is a mapping r -> b, got {type(table).__name__}")
    out = {}
    for r, b in table.items():
        try:
            ri, bi = int(r), int(b)
        except (TypeError, ValueError):
            raise ValueError(f"reuse table entry {r!r}: {b!r} is not integer r -> b") from None
        if str(ri) != str(r).strip() or bi != b or not 0 <= ri <= 100 or bi < 0:
            raise ValueError(f"reuse table entry {r!r}: {b!r}: want an integer percent r in "
                             f"[0, 100] and an integer depth b >= 0")
        out[ri] = bi
    return dict(sorted(out.items()))


def load_table(path: str | Path) -> dict[int, int]:
    """Read the `r -> b` table of a saved profile or plain table file (see `parse_table`)."""
    return parse_table(json.loads(Path(path).read_text()))


def read_pairs(path: str | Path) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, prompt ids) pairs from JSONL lines `{"prefix": [...], "prompt": [...]}`."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prefix, prompt = row["prefix"], row["prompt"]
                if not (isinstance(prefix, list) and isinstance(prompt, list)
                        and all(isinstance(i, int) for i in prefix + prompt)):
                    raise TypeError("prefix and prompt must be lists of ints")
                if not prefix or not prompt:
                    raise ValueError("prefix and prompt must be non-empty")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: bad profiler sample ({e})") from e
            pairs.append((prefix, prompt))
    return pairs


def staircase(bucket_depths: dict[int, int]) -> dict[int, int]:
    """Keep `r -> b` only where b strictly exceeds b at every smaller r."""
    table, best = {}, -1
    for r in sorted(bucket_depths):
        if bucket_depths[r] > best:
            table[r] = best = bucket_depths[r]
    return table


def leading_layers_above(scores: Sequence[float], threshold: float) -> int:
    """Number of leading layers with score > threshold (stops at the first failure)."""
    n = 0
    for s in scores:
        if s <= threshold:
            break
        n += 1
    return n


def _pad(ids: Sequence[int], multiple: int = 16) -> np.ndarray:
    out = np.zeros((1, max(multiple, -(-len(ids) // multiple) * multiple)), np.int32)
    out[0, :len(ids)] = ids
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-layer mean over tokens of cosine(a, b); a, b: [L, P, features]."""
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.mean(num / np.maximum(den, 1e-30), axis=-1)


def layer_scores(params, config: ModelConfig, prefix: Sequence[int],
                 prompt: Sequence[int]) -> np.ndarray:
    """One sample's per-layer score: mean over prefix tokens and {K, V} of the cosine
    similarity of prefix K/V computed on P alone vs. on P+U. Shape [L]."""
    p = len(prefix)
    alone = encode_prefix(params, config, jnp.asarray(_pad(prefix)), jnp.asarray([p]))
    joint = encode_prefix(params, config, jnp.asarray(_pad(list(prefix) + list(prompt))),
                          jnp.asarray([p + len(prompt)]))
    score = 0.0
    for x, y in ((alone.k, joint.k), (alone.v, joint.v)):
        x = np.asarray(x[:, 0, :p], np.float64).reshape(config.n_layers, p, -1)
        y = np.asarray(y[:, 0, :p], np.float64).reshape(config.n_layers, p, -1)
        score = score + _cosine(x, y) / 2
    return score


def profile(params, config: ModelConfig, pairs: Iterable[tuple[Sequence[int], Sequence[int]]],
            threshold: float = DEFAULT_THRESHOLD, min_samples: int = 1,
            progress: bool = True) -> ProfileResult:
    """Build the `r -> b` table from (prefix, prompt) pairs (see module docstring)."""
    _check_threshold(threshold)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("profile() needs at least one (prefix, prompt) sample")
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for k, (prefix, prompt) in enumerate(pairs):  # all checks before the first forward
        if not prefix or not prompt:
            raise ValueError(f"sample {k + 1}: needs a non-empty prefix and prompt")
        config.check_ids(list(prefix) + list(prompt), f"sample {k + 1}")  # as generate
    for prefix, prompt in tqdm(pairs, desc="profiling", unit="sample", disable=not progress):
        if len(prefix) + len(prompt) > config.max_seq_len:
            raise ValueError(f"sample of {len(prefix) + len(prompt)} tokens exceeds "
                             f"max_seq_len {config.max_seq_len}")
        r = int(round(100 * len(prefix) / (len(prefix) + len(prompt))))
        sums[r] = sums.get(r, 0.0) + layer_scores(params, config, prefix, prompt)
        counts[r] = counts.get(r, 0) + 1
    skipped = {r: n for r, n in counts.items() if n < min_samples}
    if skipped:
        print(f"profiler: skipping {len(skipped)} ratio bucket(s) with fewer than "
              f"{min_samples} samples: {dict(sorted(skipped.items()))}", file=sys.stderr)
    scores = {r: (sums[r] / counts[r]).tolist() for r in sorted(counts) if r not in skipped}
    return ProfileResult(table={}, scores=scores, counts={r: counts[r] for r in scores},
                         threshold=threshold, skipped=skipped).at_threshold(threshold)
