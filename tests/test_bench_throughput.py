"""Smoke test of the throughput benchmark at toy size: the JSON schema, not the values."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent


def test_toy_benchmark_writes_valid_json(tmp_path):
    out = tmp_path / "toy.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                           "--scale", "toy", "--out", str(out), "--plot"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "device", "jax_version", "git_commit", "settings", "results",
                "peak_tflops", "weights"):
        assert key in result
    assert {r["policy"] for r in result["results"]} == {"none", "bicache"}
    for row in result["results"]:
        for key in ("tokens_per_s", "wall_s", "step_s", "flops", "floor_s", "mfu",
                    "rows_per_request", "time_to_first_step_s"):
            assert row[key] > 0, key
        assert row["compiles"] >= 0 and row["compile_s"] >= 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "bicache/none" in proc.stdout


def test_paired_toy_benchmark_interleaves_and_reports_pairs(tmp_path):
    out = tmp_path / "paired.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                           "--scale", "shared_toy", "--out", str(out), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "FLOPs of a request" in result["flop_bound"]
    variants = {r["variant"] for r in result["results"]}
    assert variants == {"none", "bicache", "fastdllm_dual", "bicache_dual"}
    for row in result["results"]:
        assert len(row["wall_s"]) == 2 and row["flops"] > 0 and row["tokens_per_s"] > 0
    # The k4 workload decodes with 4 steps for 16 tokens: 4 tokens per decoding forward
    # (the dual cache's block-start forward decodes too; BiCache's official one does not).
    k4 = {r["variant"]: r for r in result["results"] if r["workload"] == "toy_k4"}
    assert k4["fastdllm_dual"]["steps"] == 4 and k4["fastdllm_dual"]["nfe"] == 4
    assert k4["fastdllm_dual"]["tokens_per_forward"] == 4.0
    assert k4["bicache_dual"]["nfe"] == 6  # + one block-start forward per block
    pairs = {(p["workload"], p["pair"]): p for p in result["pairs"]}
    assert set(pairs) == {("toy", "bicache/none"), ("toy", "bicache_dual/fastdllm_dual"),
                          ("toy_k4", "bicache_dual/fastdllm_dual")}
    for p in pairs.values():  # the median of the per-repeat ratios, beside the FLOP bound
        assert len(p["ratios"]) == 2
        assert p["speedup"] == pytest.approx(float(np.median(p["ratios"])))
        assert p["flop_bound"] > 1.0  # both cached policies compute fewer rows
    assert "FLOP bound" in proc.stdout


def test_roofline_is_the_flop_floor_or_the_byte_floor_per_forward():
    from bicache_jax.bench import call_flops, model_config, roofline_seconds

    config = model_config("cpu_d384")
    rows = np.array([[320 * 6, 32 * 6, 32 * 6, 0]])  # a block start, two steps, a done block
    # With unbounded bandwidth the floor is the FLOP count of `call_flops` / peak.
    flops = call_flops(config, float(rows.sum()), 1000, 3, 32)
    assert roofline_seconds(config, rows, 1000, 32, 1e11, 1e30) == pytest.approx(flops / 1e11)
    # With unbounded FLOPs every forward that ran streams the weights and the K/V once.
    weights = 4 * (config.param_count() - config.vocab_size * config.d_model)
    kv = 4 * 1000 * config.n_layers * 2 * config.kv_dim
    norms = 4 * (2 * config.n_layers + 1) * config.d_model  # norm weights are not streamed
    assert roofline_seconds(config, rows, 1000, 32, 1e30, 1e10) == pytest.approx(
        3 * (weights - norms + kv) / 1e10)
