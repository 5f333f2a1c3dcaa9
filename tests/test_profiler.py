"""The r -> b profiler against an independent float64 computation."""

import json

import numpy as np
import pytest
from numpy_reference import numpy_forward_kv, sharp_params

from bicache_jax import config as C
from bicache_jax.profiler import (
    leading_layers_above,
    load_table,
    profile,
    read_pairs,
    staircase,
)

CFG = C.tiny_llada(n_kv_heads=2).replace(n_layers=4, attention_impl="reference")


@pytest.fixture(scope="module")
def params():
    return sharp_params(CFG, seed=1)


def _pairs(seed=0, n=12):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, u = [(4, 12), (10, 6), (14, 2)][i % 3]
        out.append((rng.integers(0, 60, p).tolist(), rng.integers(0, 60, u).tolist()))
    return out


def _numpy_scores(params, prefix, prompt):
    _, ka, va = numpy_forward_kv(params, CFG, np.asarray(prefix))
    _, kj, vj = numpy_forward_kv(params, CFG, np.asarray(prefix + prompt))
    p = len(prefix)
    total = 0
    for a, b in ((ka, kj[:, :p]), (va, vj[:, :p])):
        a, b = a.reshape(CFG.n_layers, p, -1), b.reshape(CFG.n_layers, p, -1)
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        total = total + cos.mean(-1) / 2
    return total


def test_table_equals_direct_computation_from_layer_scores(params):
    pairs = _pairs()
    ref = {}
    for prefix, prompt in pairs:
        r = round(100 * len(prefix) / (len(prefix) + len(prompt)))
        ref.setdefault(r, []).append(_numpy_scores(params, prefix, prompt))
    ref = {r: np.mean(v, axis=0) for r, v in ref.items()}
    all_scores = np.concatenate(list(ref.values()))
    # A threshold between scores, so float32 vs float64 cannot flip a comparison.
    threshold = float(np.sort(all_scores)[len(all_scores) // 2] + 1e-3)
    assert np.min(np.abs(all_scores - threshold)) > 1e-4
    result = profile(params, CFG, pairs, threshold=threshold, progress=False)
    for r, s in ref.items():
        np.testing.assert_allclose(result.scores[r], s, atol=1e-5)
    direct = {r: leading_layers_above(s, threshold) for r, s in ref.items()}
    assert result.table == staircase(direct)
    assert result.counts == {25: 4, 62: 4, 88: 4}
    depths = [result.table[r] for r in sorted(result.table)]
    assert depths == sorted(set(depths))  # strictly increasing staircase
    again = profile(params, CFG, pairs, threshold=threshold, progress=False)
    assert again.table == result.table and again.scores == result.scores
    # Another threshold read off the same scores equals profiling again at it.
    other = float(np.sort(all_scores)[len(all_scores) // 4] + 1e-3)
    reread = result.at_threshold(other)
    assert reread == profile(params, CFG, pairs, threshold=other, progress=False)
    assert reread.table == staircase({r: leading_layers_above(s, other)
                                      for r, s in ref.items()})
    assert reread.table != result.table  # the two thresholds give different depths
    with pytest.raises(ValueError, match="threshold"):
        result.at_threshold(1.5)


def test_staircase_and_leading_layers():
    assert leading_layers_above([0.99, 0.98, 0.5, 0.99], 0.97) == 2
    assert leading_layers_above([0.9], 0.97) == 0
    assert staircase({0: 1, 10: 1, 20: 3, 30: 2, 40: 4}) == {0: 1, 20: 3, 40: 4}


def test_save_load_and_sparse_buckets(params, tmp_path, capsys):
    pairs = _pairs(n=4)  # ratio 25 has 2 samples, 62 and 88 one each
    result = profile(params, CFG, pairs, min_samples=2, progress=False)
    assert set(result.skipped) == {62, 88}
    assert "fewer than 2 samples" in capsys.readouterr().err
    path = tmp_path / "table.json"
    result.save(path)
    assert load_table(path) == result.table


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prefix": [1, 2], "prompt": [3]}) + "\n"
                    + '{"prefix": [1], "prompt": "oops"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2"):
        read_pairs(path)
    path.write_text('{"prefix": [1], \n')
    with pytest.raises(ValueError, match=r"data.jsonl:1"):
        read_pairs(path)
    path.write_text(json.dumps({"prefix": [1, 2], "prompt": [3]}) + "\n")
    assert read_pairs(path) == [([1, 2], [3])]
