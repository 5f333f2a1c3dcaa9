"""The lm_eval adapter end to end on a tiny in-memory task (no download)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from numpy_reference import sharp_params

from bicache_jax import config as C
from bicache_jax.generate import Prompt, generate
from bicache_jax.lm_eval_adapter import MODEL_NAME, BiCacheLM
from bicache_jax.tokenizer import Tokenizer

CFG = C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference")
GEN = dict(gen_length=16, steps=8, block_length=8)
WORDS = ([f"w{i}" for i in range(40)] + ["Q:", "A:", "<sys>"]
         + [f"x{i}" for i in range(43, CFG.vocab_size - 1)] + ["<unk>"])  # every model id
SYSTEM = "<sys> w30 w31 w32 w33 w34 w35 w36 w37"
STOP = "w0"
TRAIN = [{"q": "w1 w2 w3", "a": "w4"}, {"q": "w5 w6", "a": "w7 w8"}]
TEST_QS = ["w9 w10", "w11", "w12 w13 w14", "w15 w16", "w17", "w18 w19 w20"]

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed "
                                   "(pip install lm-eval); the adapter imports without it")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return sharp_params(CFG, seed=5), Tokenizer(path)


def _lm(model, **kw):
    params, tok = model
    return BiCacheLM(params=params, config=CFG, tokenizer=tok, system_prompt=SYSTEM,
                     policy="bicache", reuse_depth=1, batch_size=4, **GEN, **kw)


def _expected(model):
    """What the model answers each test question when the prefix is the system prompt
    plus the two few-shot examples and the prompt is the question, computed directly."""
    params, tok = model
    shots = "".join(f"Q: {d['q']}\nA: {d['a']}\n\n" for d in TRAIN)
    prefix = tok.encode(SYSTEM + "\n\n" + shots)
    out = generate(params, [Prompt(prompt=tok.encode(f"Q: {q}\nA:"), prefix=prefix)
                            for q in TEST_QS], None, config=CFG, policy="bicache",
                   reuse_depth=1, **GEN)
    return [tok.decode(t.tolist()).split(STOP)[0] for t in out.tokens]


def test_adapter_imports_and_refuses_loglikelihood(model):
    lm = _lm(model)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])
    with pytest.raises(ValueError, match="unknown model args"):
        _lm(model, bogus=1)
    # The split: system prompt + few-shot block -> prefix, the last question -> prompt.
    prefix, prompt = lm.split_context("Q: w1\nA: w2\n\nQ: w3\nA:")
    tok = model[1]
    assert prefix == tok.encode(SYSTEM + "\n\nQ: w1\nA: w2\n\n")
    assert prompt == tok.encode("Q: w3\nA:")


def test_adapter_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # make `import lm_eval` fail
            "import bicache_jax.lm_eval_adapter as a\n"
            "assert not a.HAVE_LM_EVAL and a.BiCacheLM.__mro__[1].__module__ == a.__name__\n"
            "try:\n    a.main()\nexcept SystemExit as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install lm-eval" in out.stdout


@needs_lm_eval
def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is BiCacheLM


@needs_lm_eval
def test_tiny_task_end_to_end(model):
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    expected = _expected(model)
    assert len(set(expected)) > 1, "degenerate model"

    def load(**_):  # the task's targets are the model's own answers: exact_match must be 1
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list(TRAIN),
            "test": datasets.Dataset.from_list(
                [{"q": q, "a": a} for q, a in zip(TEST_QS, expected, strict=True)])})

    task = {
        "task": "bicache_tiny", "custom_dataset": load, "training_split": "train",
        "fewshot_split": "train", "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{a}}", "target_delimiter": " ",
        "fewshot_delimiter": "\n\n", "num_fewshot": 2,
        "fewshot_config": {"sampler": "first_n"},
        "generation_kwargs": {"until": [STOP], "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
    }
    lm = _lm(model)
    results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(
        include_defaults=False), bootstrap_iters=0, log_samples=True, random_seed=0)
    assert results["results"]["bicache_tiny"]["exact_match,none"] == 1.0
    samples = results["samples"]["bicache_tiny"]
    assert sorted(s["resps"][0][0] for s in samples) == sorted(expected)
    summary = lm.summary()
    # One shared prefix (system prompt + the same two shots): computed once, then hits.
    assert summary["store"]["misses"] == 1 and summary["cache_hits"] == len(TEST_QS) - 4
    assert summary["failures"] == 0 and summary["batches"] == 2  # buckets 1, 2, 4


@needs_lm_eval
def test_chat_template_path_splits_at_the_last_message(model):
    params, tok = model
    tok = Tokenizer(tok.tokenizer_file, chat_template=(
        "{% for m in messages %}{{ m.content }} \n\n{% endfor %}"))
    lm = BiCacheLM(params=params, config=CFG, tokenizer=tok, system_prompt=SYSTEM,
                   policy="naive_prefix", **GEN)
    rendered = lm.apply_chat_template([{"role": "user", "content": "Q: w1\nA:"}])
    prefix, prompt = lm.split_context(rendered)
    assert prefix == tok.encode(SYSTEM) and prompt == tok.encode("Q: w1\nA:")
    (text,) = lm.generate_until([_Inst(rendered, {"until": [STOP]})])
    out = generate(params, [Prompt(prompt=prompt, prefix=prefix)], None, config=CFG,
                   policy="naive_prefix", **GEN)
    assert text == tok.decode(out.tokens[0].tolist()).split(STOP)[0]
    assert np.all(out.tokens[0] != CFG.mask_token_id)


class _Inst:
    def __init__(self, context, gen_kwargs):
        self.args = (context, gen_kwargs)


@needs_lm_eval
def test_lm_eval_command_line_with_a_checkpoint(model, tmp_path):
    """`python -m bicache_jax.lm_eval_adapter run --model bicache_jax ...`: a saved
    checkpoint with its tokenizer and profile table, a YAML task over a local JSON file."""
    import json
    import os

    from bicache_jax import save

    params, tok = model
    ckpt = save(tmp_path / "ckpt", params, CFG, {"threshold": 0.9, "table": {"0": 1}})
    (ckpt / "tokenizer.json").write_text(tok.tokenizer_file.read_text())
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": "w1"}) + "\n" for q in TEST_QS[:3]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(
        "task: bicache_cli_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: "{{a}}"\n'
        "generation_kwargs:\n  until: [w0]\n"
        "metric_list:\n  - metric: exact_match\n")
    args = (f"pretrained={ckpt},policy=bicache,gen_length=16,steps=8,block_length=8,"
            "system_prompt=<sys> w30 w31")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "bicache_jax.lm_eval_adapter", "run", "--model", MODEL_NAME,
         "--model_args", args, "--tasks", "bicache_cli_tiny", "--include_path", str(tasks),
         "--batch_size", "4", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "request failed" not in out.stderr, out.stderr[-3000:]  # depth from the table
    (result,) = (tmp_path / "out").rglob("results_*.json")
    metrics = json.loads(result.read_text())["results"]["bicache_cli_tiny"]
    assert "exact_match,none" in metrics
