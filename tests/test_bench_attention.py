"""Smoke test of benchmarks/attention.py: `--quick` run, JSON schema, positive numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "attention.py"


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "attention_test.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    for key in ("machine", "device_kind", "jax_version", "git_commit", "settings", "results"):
        assert key in report
    assert report["machine"]["node"] is not None and "cpu" in report["machine"]
    assert isinstance(report["device_kind"], str) and report["device_kind"]
    assert report["settings"]["quick"] is True
    assert report["git_commit"] is None or isinstance(report["git_commit"], str)

    rows = report["results"]
    impls = {row["impl"] for row in rows}
    assert {"reference", "xla", "pallas"} <= impls
    if report["backend"] != "gpu":
        assert "cudnn" not in impls and "cudnn" in report["settings"]["skipped_impls"]
    for row in rows:
        for key in ("batch", "cached_len", "q_len", "fresh_len", "num_heads", "head_dim",
                    "dtype", "status"):
            assert key in row
        assert row["status"] == "ok", row
        assert row["time_ms"] > 0 and row["min_ms"] > 0 and row["tflops"] > 0
        assert row["flops"] == 4 * row["batch"] * row["num_heads"] * row["q_len"] * (
            row["cached_len"] + row["fresh_len"]) * row["head_dim"]
