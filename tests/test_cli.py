"""The `bicache-jax` command line, end to end in subprocesses."""

import json
import subprocess
import sys

import numpy as np
from hf_fixtures import llada_folder

CLI = [sys.executable, "-m", "bicache_jax.cli"]


def run(*args, cwd=None):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_help_lists_every_command():
    out = run("--help").stdout
    for cmd in ("demo", "generate", "convert", "profile", "bench", "eval", "train", "serve"):
        assert cmd in out


def test_delegated_commands_take_their_own_options():
    for cmd, option in (("eval", "--n-per-family"), ("bench", "--scale"),
                        ("train", "--recall-frac")):
        assert option in run(cmd, "--help").stdout
    proc = subprocess.run([*CLI, "eval", "--policies", "nope"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "unknown policy 'nope'" in proc.stderr


def test_convert_generate_profile(tmp_path):
    hf, cfg, _ = llada_folder(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    run("convert", hf, ckpt, "--dtype", "float32")
    assert (ckpt / "config.json").exists()
    vocab = cfg["vocab_size"]
    rng = np.random.default_rng(0)
    prefix = " ".join(map(str, rng.integers(0, vocab - 8, 12)))
    prompt = ",".join(map(str, rng.integers(0, vocab - 8, 5)))
    out = json.loads(run("generate", "--model", ckpt, "--prompt-ids", prompt, "--prefix-ids",
                         prefix, "--gen-length", "8", "--steps", "4", "--policy", "bicache",
                         "--reuse-depth", "1", "--json").stdout)
    assert len(out["tokens"]) == 8 and out["nfe"] == 4 and out["seconds"] > 0
    assert out["prefix_len"] == 12 and out["prompt_len"] == 5 and out["reuse_depth"] == 1
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prefix": rng.integers(0, vocab - 8, p).tolist(),
                                        "prompt": rng.integers(0, vocab - 8, 4).tolist()})
                            + "\n" for p in (4, 8, 12, 16)))
    run("profile", "--model", ckpt, "--data", data, "--out", tmp_path / "table.json")
    table = json.loads((tmp_path / "table.json").read_text())["table"]
    assert all(0 <= b <= 2 for b in table.values())


def test_bad_policy_is_a_clear_error(tmp_path):
    hf, _, _ = llada_folder(tmp_path / "hf")
    proc = subprocess.run([*CLI, "generate", "--model", str(hf), "--prompt-ids", "1 2 3",
                           "--policy", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "argument --policy: invalid choice: 'nope'" in proc.stderr
