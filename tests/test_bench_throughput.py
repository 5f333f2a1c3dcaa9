"""Smoke test of the throughput benchmark at toy size: the JSON schema, not the values."""

import json
import subprocess
import sys
from pathlib import Path

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
