"""The command line as a new user meets it: arguments checked before any model is loaded,
one-line errors, exit status 2 for bad input and 1 for a failure while running, the
profile -> load -> generate round trip, convert's target checks and interrupt cleanup."""

import argparse
import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hf_fixtures import llada_folder

import bicache_jax as bj
from bicache_jax import bench, checkpoint, cli, evaluate, tasks, train
from bicache_jax.checkpoint import TABLE_FILE


def run(capsys, *args):
    """`bicache-jax ARGS` in-process: (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return llada_folder(tmp_path_factory.mktemp("hf") / "llada")[0]


def _pairs(path, rows):
    path.write_text("".join(json.dumps({"prefix": p, "prompt": u}) + "\n" for p, u in rows))
    return path


GOOD_PAIRS = [(list(range(1, 1 + p)), [40, 41, 42, 43]) for p in (4, 8, 12, 16)]


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"bicache-jax {bj.__version__}"
    assert bj.__version__ == importlib.metadata.version("bicache-jax")


def _parsers():
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    own = [p for name, p in sub.choices.items() if name not in cli.DELEGATED]
    return [top, *own, bench.build_parser(), evaluate.build_parser(), train.build_parser()]


def test_every_option_has_help_text_and_shows_its_default():
    for parser in _parsers():
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
        if any(a.default not in (None, False, argparse.SUPPRESS) for a in parser._actions):
            assert "(default: " in parser.format_help(), parser.prog


@pytest.mark.parametrize("args,fragment", [
    (["--policy", "bogus"], "argument --policy: invalid choice: 'bogus'"),
    (["--reuse-depth", "1"], "reuse_depth is a setting of bicache, bicache_dual; policy "
                             "'none' does not use it"),
    (["--policy", "dkv_prefill", "--refresh-interval", "4"], "refresh_interval is a setting"),
    (["--gen-length", "0"], "argument --gen-length: must be >= 1, got 0"),
    (["--threshold", "1.5"], "argument --threshold: must be in (0, 1], got 1.5"),
    (["--prompt-ids", "1 x"], "--prompt-ids: token ids must be integers"),
])
def test_generate_checks_arguments_before_loading_the_model(capsys, tmp_path, args, fragment):
    # The model path does not exist: an error about the argument proves it came first.
    base = ["generate", "--model", tmp_path / "nowhere", "--prompt-ids", "1 2"]
    code, _, err = run(capsys, *base, *args)
    assert code == 2 and "no model at" not in err, err
    assert fragment in err.strip().splitlines()[-1]  # argparse: usage, then one line


def test_exit_status_2_for_bad_input_1_for_a_failure_while_running(capsys, tmp_path, hf,
                                                                     monkeypatch):
    code, _, err = run(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt-ids", "1")
    assert code == 2 and err.startswith("error: no model at")
    # No --model and no shipped model (a checkout without the assets).
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", tmp_path / "not_shipped")
    code, _, err = run(capsys, "generate", "--prompt-ids", "1")
    assert code == 2 and "pass --model PATH" in err
    monkeypatch.undo()
    (tmp_path / "dir").mkdir()  # writing the table onto a folder fails while running
    code, _, err = run(capsys, "profile", "--model", hf, "--data",
                       _pairs(tmp_path / "p.jsonl", GOOD_PAIRS), "--out", tmp_path / "dir",
                       "--overwrite")
    lines = err.replace("\r", "\n").strip().splitlines()  # the conversion's progress bar
    assert code == 1 and "Is a directory" in lines[-1] and "Traceback" not in err


@pytest.mark.parametrize("args,fragment", [
    (["bench", "--ratios", "150"], "argument --ratios: must be in [0, 99], got 150"),
    (["bench", "--batch-sizes", "0"], "argument --batch-sizes: must be >= 1, got 0"),
    (["bench", "--policies", "none,nope"], "argument --policies: unknown policy 'nope'"),
    (["eval", "--n-per-family", "0"], "argument --n-per-family: must be >= 1, got 0"),
    (["train", "--out", "x", "--families", "facts,nope"], "--families: unknown ['nope']"),
])
def test_delegated_commands_reject_bad_values_naming_the_flag(capsys, args, fragment):
    code, _, err = run(capsys, *args)
    assert code == 2 and fragment in err, err


def test_profile_load_generate_round_trip(capsys, tmp_path):
    hf = llada_folder(tmp_path / "hf")[0]
    data = _pairs(tmp_path / "pairs.jsonl", GOOD_PAIRS)
    code, out, err = run(capsys, "profile", "--model", hf, "--data", data)
    assert code == 0, err
    assert f"wrote {hf / TABLE_FILE}; `bj.load` and `--model` read it from there" in out
    written = json.loads((hf / TABLE_FILE).read_text())["table"]
    loaded = bj.load(hf, progress=False)
    assert isinstance(loaded, tuple) and len(loaded) == 3
    params, config, table = loaded  # still unpacks
    assert loaded.params is params and loaded.config is config
    assert loaded.depth_table == table == {int(r): b for r, b in written.items()}
    code, out, err = run(capsys, "generate", "--model", hf, "--prefix-ids", "1 2 3 4 5 6",
                         "--prompt-ids", "7 8", "--gen-length", "8", "--steps", "4",
                         "--policy", "bicache", "--json")  # no --reuse-depth: the table's
    assert code == 0, err
    assert json.loads(out)["reuse_depth"] >= 0
    # A second profile must not silently replace the table; --overwrite does.
    code, _, err = run(capsys, "profile", "--model", hf, "--data", data)
    assert code == 2 and "already exists (pass --overwrite" in err
    assert run(capsys, "profile", "--model", hf, "--data", data, "--overwrite")[0] == 0


@pytest.mark.parametrize("ids,fragment", [
    ([64], "sample 2: token ids must be in [0, 64)"),  # the embedding's 64 rows
    ([-1], "sample 2: token ids must be in [0, 64)"),
    ([59], "sample 2: contains the mask token id 59"),
])
def test_profile_validates_ids_like_generate(capsys, tmp_path, hf, ids, fragment):
    data = _pairs(tmp_path / "bad.jsonl", [GOOD_PAIRS[0], ([1, 2, *ids], [3, 4])])
    out = tmp_path / "table.json"
    code, _, err = run(capsys, "profile", "--model", hf, "--data", data, "--out", out)
    assert code == 2 and fragment in err and not out.exists(), err


def test_convert_checks_its_target_first_and_overwrites_on_request(capsys, tmp_path, hf):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "convert", hf, target, "--dtype", "float32")
    assert code == 2 and err == f"error: {target} already exists (pass --overwrite to " \
                                f"replace it)\n"  # one line, no conversion progress
    assert (target / "mine.txt").exists()
    stale = tmp_path / ".ckpt.tmp-dead"  # left by a killed earlier run
    (stale / "params").mkdir(parents=True)
    code, out, err = run(capsys, "convert", hf, target, "--dtype", "float32", "--overwrite")
    assert code == 0, err
    assert not stale.exists() and not (target / "mine.txt").exists()
    assert bj.load(target).config.n_layers == 3


@pytest.mark.parametrize("where,what", [("ocdbt.process_0/d", "cannot restore params"),
                                        ("", "cannot read the params metadata")])
def test_corrupt_checkpoint_is_one_line(capsys, tmp_path, hf, where, what):
    target = tmp_path / "ckpt"
    assert run(capsys, "convert", hf, target, "--dtype", "float32")[0] == 0
    chunks = [p for p in (target / "params" / where).rglob("*")
              if p.is_file() and p.parent.name == "d"]  # array data (and with "", metadata)
    assert chunks
    for p in chunks:
        p.write_bytes(b"garbage")
    code, _, err = run(capsys, "generate", "--model", target, "--prompt-ids", "1 2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert what in err and "corrupt or incomplete checkpoint?" in err
    assert "TensorStore" not in err


def test_interrupted_convert_leaves_nothing_and_says_one_line(tmp_path):
    hf = llada_folder(tmp_path / "hf", d_model=256, n_heads=4, n_kv_heads=4,
                      mlp_hidden_size=1024, n_layers=4, vocab_size=2048,
                      embedding_size=2048, mask_token_id=2047, eos_token_id=2046,
                      pad_token_id=2046)[0]
    proc = subprocess.Popen([sys.executable, "-m", "bicache_jax.cli", "convert", str(hf),
                             str(tmp_path / "ckpt"), "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".ckpt.tmp-*")):  # saving has begun
        assert proc.poll() is None and time.monotonic() < deadline, "finished before a save"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last == f"interrupted: nothing written to {tmp_path / 'ckpt'} (partial files " \
                  f"removed)"
    assert "Traceback" not in err


def test_eval_and_demo_refuse_a_model_they_cannot_evaluate(capsys, hf):
    for command in (["eval", "--model", hf], ["demo", "--model", hf]):
        code, _, err = run(capsys, *command)
        assert code == 2, err
        assert "evaluation needs either a model made by `bicache-jax train` " \
               "(train_config.json) or a tokenizer.json" in err


def test_eval_renders_the_suite_through_the_models_tokenizer(capsys, tmp_path):
    # A foreign (HF) model with its own tokenizer.json, no train_config.json.
    hf = llada_folder(tmp_path / "hf", vocab_size=tasks.VOCAB_SIZE,
                      embedding_size=tasks.VOCAB_SIZE, mask_token_id=tasks.MASK_ID,
                      eos_token_id=tasks.EOS_ID, pad_token_id=tasks.PAD_ID)[0]
    tasks.build_tokenizer(hf)
    out = tmp_path / "eval.json"
    code, stdout, err = run(capsys, "eval", "--model", hf, "--n-per-family", "1",
                            "--policies", "none,naive_prefix", "--out", out)
    assert code == 0, err
    assert "rendered through the model's tokenizer" in stdout
    result = json.loads(out.read_text())
    assert [r["policy"] for r in result["results"]] == ["none", "naive_prefix"]
    assert result["n_instances"] >= 3 and out.with_suffix(".png").exists()


def test_convert_interrupt_defers_inside_a_gc_callback():
    # A KeyboardInterrupt raised inside a gc callback is printed and swallowed by Python,
    # so the convert handler must recognise that frame and ask again later.
    from bicache_jax.cli import _in_gc_callback

    seen = []

    def record(phase, info):
        seen.append(_in_gc_callback(sys._getframe()))

    gc.callbacks.append(record)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(record)
    assert seen and all(seen)
    assert not _in_gc_callback(sys._getframe())
