"""The evaluation harness on a tiny random model: structure and bookkeeping, not accuracy."""

import numpy as np

from bicache_jax import tasks
from bicache_jax.config import ModelConfig
from bicache_jax.evaluate import EvalSettings, markdown_table, plot, run_eval
from bicache_jax.model import init_params


def test_eval_reports_every_policy_family_and_ratio(tmp_path):
    import jax

    cfg = ModelConfig(layout="llada", vocab_size=tasks.VOCAB_SIZE, d_model=32, n_layers=2,
                      n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64, rope_theta=5e5,
                      norm_eps=1e-5, qkv_bias=False, logits_shift=False,
                      mask_token_id=tasks.MASK_ID, max_seq_len=512,
                      attention_impl="reference")
    params = init_params(cfg, jax.random.key(0))
    instances = tasks.eval_instances(2, questions_per_prefix=2, context=(32, 64))
    settings = EvalSettings(gen_length=8, steps=8, block_length=8, batch_size=6)
    result = run_eval(params, cfg, instances, settings, {0: 1},
                      policies=("none", "bicache", "naive_prefix"), progress=lambda _: None)
    rows = {r["policy"]: r for r in result["results"]}
    assert set(rows) == {"none", "bicache", "naive_prefix"}
    assert rows["none"]["answer_agreement_with_none"] == 1.0
    assert rows["none"]["token_agreement_with_none"] == 1.0
    for r in rows.values():
        assert set(r["by_family"]) == set(tasks.FAMILIES)
        assert 0 <= r["accuracy"] <= 1
        assert sum(r["n_by_ratio"].values()) == len(instances)
        # accuracy is the mean of the per-ratio accuracies weighted by their counts
        total = sum(r["by_ratio"][b] * r["n_by_ratio"][b] for b in r["by_ratio"])
        assert np.isclose(total / len(instances), r["accuracy"])
    assert "| bicache |" in markdown_table(result)
    plot(result, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
