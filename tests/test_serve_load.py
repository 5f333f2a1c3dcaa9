"""benchmarks/serve_load.py: a tiny smoke run through the real server writes its result."""

import json
import sys
from pathlib import Path

from server_fixtures import chat_model_folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serve_load  # noqa: E402


def test_workload_shares_the_system_prompt_and_histories():
    chats = serve_load.workload(6, seed=0, system_words=5, user_words=3, histories=2)
    assert len({json.dumps(c[0]) for c in chats}) == 1
    assert len({json.dumps(c[:-1]) for c in chats}) == 2  # two shared prefixes
    assert all(c[-1]["role"] == "user" and len(c) == 4 for c in chats)


def test_smoke_run_writes_json_and_png(tmp_path):
    out = tmp_path / "load.json"
    result = serve_load.main([
        "--model", str(chat_model_folder(tmp_path / "tiny")), "--policies", "none,bicache",
        "--clients", "4", "--requests", "8", "--max-batch", "4", "--system-words", "10",
        "--user-words", "3", "--histories", "0", "--max-tokens", "8", "--block-length", "4",
        "--verify", "4", "--out", str(out), "--plot"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 0
    by = {r["policy"]: r for r in result["results"]}
    assert set(by) == {"none", "bicache"}
    for r in by.values():
        assert r["answered"] == r["sent"] == 8 and r["errors"] == []
        assert r["identical"] == r["verified"] == 4
        assert r["tokens_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0
        assert r["compiles_during_load"] == 0  # the warm-up compiled every bucket
    assert by["none"]["store_hit_rate"] is None
    assert by["bicache"]["store_hit_rate"] > 0.5  # only the first batch computes the prefix
    assert "bicache / none" in serve_load.markdown_table(result)
