"""The masked-diffusion objective on hand-checked cases, the SFT mask, and the trainer:
loss goes down, a resumed run reproduces the uninterrupted loss curve."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bicache_jax import tasks
from bicache_jax.config import tiny_llada
from bicache_jax.model import init_params
from bicache_jax.train import (
    EPS,
    PAIR_EDGE,
    Batch,
    TrainConfig,
    context_cap,
    diffusion_loss,
    eligible_mask,
    evaluate,
    init_state,
    make_train_step,
    masked_diffusion_loss,
    matmul_peak_gflops,
    sample_mask,
    sample_t,
    step_flops,
    train,
    train_batch,
    train_instances,
    train_rows,
)


def test_uniform_logits_by_hand():
    # Uniform logits over V = 3: every masked CE is log 3. Two masked tokens, t = 0.5,
    # normaliser 4: loss = 2 * log 3 / 0.5 / 4 = log 3.
    logits = jnp.zeros((1, 4, 3))
    tokens = jnp.array([[0, 1, 2, 1]])
    masked = jnp.array([[True, False, True, False]])
    loss, per_seq = masked_diffusion_loss(logits, tokens, masked, jnp.array([0.5]),
                                          jnp.array([4.0]))
    assert float(loss) == pytest.approx(math.log(3), rel=1e-6)
    assert per_seq.shape == (1,)


def test_logits_table_by_hand():
    # Two sequences, a tiny logits table, fixed mask pattern and t; expected by numpy.
    table = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [-2.0, 1.0, 0.0],
                      [0.0, 4.0, 1.0]], np.float32)
    logits = np.stack([table, table[::-1]])  # [2, 4, 3]
    tokens = np.array([[0, 2, 1, 1], [1, 0, 0, 2]])
    masked = np.array([[True, True, False, True], [False, True, False, False]])
    t = np.array([0.25, 0.8], np.float32)
    norm = np.array([4.0, 2.0], np.float32)

    def ce(row, tok):
        return -(row[tok] - np.log(np.sum(np.exp(row))))

    seq0 = (ce(table[0], 0) + ce(table[1], 2) + ce(table[3], 1)) / 0.25 / 4
    seq1 = ce(table[::-1][1], 0) / 0.8 / 2
    # Spot-check one CE by hand: row [2, 0, -1], token 0: log(1 + e^-2 + e^-3) = 0.1698
    assert ce(table[0], 0) == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-3)))
    loss, per_seq = masked_diffusion_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                          jnp.asarray(masked), jnp.asarray(t),
                                          jnp.asarray(norm))
    np.testing.assert_allclose(per_seq, [seq0, seq1], rtol=1e-5)
    assert float(loss) == pytest.approx((seq0 + seq1) / 2, rel=1e-5)


def _toy_batch():
    # Row 0: SFT, prompt 5 tokens, response 3, padding 2. Row 1: pretraining, length 8.
    tokens = jnp.array([[1, 10, 11, 12, 4, 20, 21, 2, 0, 0],
                        [1, 10, 11, 12, 4, 20, 21, 2, 2, 0]], jnp.int32)
    response = jnp.arange(10)[None, :] >= 5
    return Batch(tokens, jnp.array([8, 9]), jnp.broadcast_to(response, (2, 10)),
                 jnp.array([True, False]))


def test_sft_never_masks_the_prompt_nor_padding():
    batch = _toy_batch()
    elig = np.asarray(eligible_mask(batch))
    np.testing.assert_array_equal(elig[0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(elig[1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    seen_prompt_masked = False
    for i in range(200):
        masked, t = sample_mask(jax.random.key(i), batch)
        m = np.asarray(masked)
        assert not m[0, :5].any() and not m[0, 8:].any() and not m[1, 9:].any()
        seen_prompt_masked |= bool(m[1, :5].any())
        assert ((EPS <= np.asarray(t)) & (np.asarray(t) < 1)).all()
    assert seen_prompt_masked  # the pretraining row does mask prompt tokens


def test_stratified_t_spreads_evenly():
    t = np.sort(np.asarray(sample_t(jax.random.key(3), 8, stratified=True)))
    gaps = np.diff(t)
    np.testing.assert_allclose(gaps, (1 - EPS) / 8, rtol=1e-4)


def test_diffusion_loss_uses_the_sampled_mask():
    batch = _toy_batch()
    config = tiny_llada()
    seen = {}
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(2, 10, config.vocab_size)), jnp.float32)

    def stub(params, cfg, tokens, lengths):
        seen["tokens"], seen["lengths"] = tokens, lengths
        return table

    key = jax.random.key(7)
    loss, aux = diffusion_loss({}, config, batch, key, logits_fn=stub)
    masked, t = sample_mask(key, batch)
    np.testing.assert_array_equal(aux["masked"], masked)
    expect = np.where(np.asarray(masked), config.mask_token_id, np.asarray(batch.tokens))
    np.testing.assert_array_equal(seen["tokens"], expect)
    np.testing.assert_array_equal(seen["lengths"], batch.lengths)
    ref, _ = masked_diffusion_loss(table, batch.tokens, masked, t, jnp.array([3.0, 9.0]))
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_response_mask_all_masks_every_response_token_with_weight_one():
    # SFT row: its whole response is masked and t = 1, so the loss is the plain mean CE
    # of the response; the pretraining row keeps its sampled mask and t.
    batch = _toy_batch()
    config = tiny_llada()
    table = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, config.vocab_size)),
                        jnp.float32)
    key = jax.random.key(5)
    loss, aux = diffusion_loss({}, config, batch, key, response_mask="all",
                               logits_fn=lambda *_: table)
    sampled, t = sample_mask(key, batch)
    m = np.asarray(aux["masked"])
    np.testing.assert_array_equal(m[0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(m[1], np.asarray(sampled)[1])
    np.testing.assert_allclose(np.asarray(aux["t"]), [1.0, float(t[1])])
    logp = jax.nn.log_softmax(table[0], axis=-1)
    ce = -np.asarray([logp[i, int(batch.tokens[0, i])] for i in (5, 6, 7)])
    assert float(aux["per_seq"][0]) == pytest.approx(float(ce.mean()), rel=1e-6)
    with pytest.raises(ValueError):
        diffusion_loss({}, config, batch, key, response_mask="some",
                       logits_fn=lambda *_: table)


def test_one_slot_canvas_is_the_bare_answer():
    inst = tasks.eval_instances(1, families=("facts",))[0]
    assert inst.response_ids(1) == inst.answer_ids
    assert tasks.is_correct(inst.response_ids(1), inst)
    batch = train_batch(TrainConfig(batch_size=4, gen_length=1, bucket=16, max_qa=1,
                                    pair_steps=0), 0)
    assert (np.asarray(batch.response).sum(axis=1) == 1).all()
    assert batch.tokens.shape[1] % 16 == 0


def test_step_flops_match_xla_cost_of_the_forward():
    # One third of step_flops is the forward's matmul count: XLA's own FLOP count of the
    # compiled forward (matmuls plus a few elementwise ops) agrees within 10%. One layer:
    # XLA counts the body of the layer scan once.
    import dataclasses

    from bicache_jax.model import forward

    config = dataclasses.replace(tiny_llada(), n_layers=1)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.zeros((2, 32), jnp.int32)
    lengths = jnp.full((2,), 32)
    cost = jax.jit(forward, static_argnums=1).lower(params, config, tokens, lengths) \
        .compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert step_flops(config, 2, 32) / 3 == pytest.approx(cost["flops"], rel=0.1)
    assert matmul_peak_gflops(n=64, repeats=2) > 0


# The ELBO objective over a multi-slot canvas (not the shipped recipe's defaults): every
# path of the loss is exercised, and 30 steps visibly lower it.
TINY = dict(d_model=32, n_layers=2, n_heads=4, mlp_mult=2, batch_size=8, context_min=24,
            context_max=56, lr=3e-3, warmup=5, gen_length=8, weighting="elbo",
            response_mask="random", bucket=64, pair_steps=0)


def test_a_few_steps_reduce_the_loss():
    tc = TrainConfig(steps=30, **(TINY | {"lr": 1e-2}))
    config = tc.model_config()
    state = init_state(tc)
    step_fn = make_train_step(tc)
    held = jax.tree.map(jnp.asarray, train_batch(tc, 10_000))
    keys = [jax.random.key(i) for i in range(4)]

    def held_loss(params):
        return np.mean([float(diffusion_loss(params, config, held, k)[0]) for k in keys])

    before = held_loss(state.params)
    for step in range(tc.steps):
        state, metrics = step_fn(state, jax.tree.map(jnp.asarray, train_batch(tc, step)), step)
        assert np.isfinite(float(metrics["loss"]))
    after = held_loss(state.params)
    assert after < 0.7 * before, (before, after)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    tc = TrainConfig(steps=10, **TINY)
    full = train(tc, tmp_path / "full", ckpt_every=4, progress=False)
    part = tmp_path / "part"
    train(tc, part, ckpt_every=4, progress=False, stop_after=6)  # checkpoint at 4, stop at 6
    assert not (part / "model").exists()
    resumed = train(tc, part, ckpt_every=4, progress=False)
    full_losses = [r["loss"] for r in full["records"]]
    assert [r["step"] for r in resumed["records"]] == list(range(10))
    assert [r["loss"] for r in resumed["records"]] == full_losses
    logged = [json.loads(line)["loss"] for line in
              (part / "loss.jsonl").read_text().splitlines()]
    assert logged == full_losses
    jax.tree.map(np.testing.assert_array_equal, full["params"], resumed["params"])
    # The exported model folder restores to the same params, with its tokenizer.
    from bicache_jax.checkpoint import restore

    params, config, _ = restore(part / "model")
    assert config == tc.model_config()
    jax.tree.map(np.testing.assert_array_equal, params, resumed["params"])
    assert (part / "model" / "tokenizer.json").is_file()
    assert (part / "model" / "loss.png").is_file()
    with pytest.raises(ValueError):  # another run's config in the same directory
        train(TrainConfig(steps=11, **TINY), part, progress=False)


def test_evaluate_scores_a_perfect_oracle(monkeypatch):
    # decode_canvas replaced by the true answers: evaluate reports 1.0 per family.
    from bicache_jax import train as train_mod

    insts = tasks.eval_instances(3)
    monkeypatch.setattr(train_mod, "decode_canvas",
                        lambda p, c, xs, g, b: np.array([x.response_ids(g) for x in xs]))
    acc = evaluate({}, tiny_llada(), insts)
    assert acc == {"facts": 1.0, "fewshot": 1.0, "dialog": 1.0, "all": 1.0}


def test_packed_rows_mask_only_answers_and_never_repeat_a_topic():
    tc = TrainConfig(batch_size=8, max_qa=6, pair_steps=0, pair_frac=0.0)
    for step in range(3):
        rows, _ = train_rows(tc, step)
        batch = train_batch(tc, step)
        assert batch.tokens.shape[1] % tc.bucket == 0
        for r, group in enumerate(rows):
            topics = [t for inst in group for t in inst.meta["topic"]]
            assert len(topics) == len(set(topics))
            n = int(batch.lengths[r])
            resp = np.asarray(batch.response[r])
            assert not resp[n:].any()
            # answers (+ one <eos>) of the history, then the served canvas of gen_length
            want = sum(len(x.answer_ids) + 1 for x in group[1:]) + tc.gen_length
            assert resp.sum() == want
            toks = np.asarray(batch.tokens[r])
            served = group[0].response_ids(tc.gen_length)
            assert toks[n - tc.gen_length:n].tolist() == list(served)
            assert resp[n - tc.gen_length:n].all()
            prompt = group[0].prompt_ids
            assert toks[n - tc.gen_length - len(prompt):n - tc.gen_length].tolist() == \
                list(prompt)
            assert not resp[:len(group[0].prefix_ids)].any()


def test_curriculum_caps_the_context_then_releases_it():
    tc = TrainConfig(batch_size=16, curriculum=100, curriculum_start=32, context_min=24,
                     context_max=120, curriculum_hold=0, pair_steps=0)
    assert [context_cap(tc, s) for s in (0, 50, 99, 100, 5000)] == [32, 76, 119, 120, 120]
    held = dataclasses.replace(tc, curriculum_hold=30)  # the start holds, then the same ramp
    assert [context_cap(held, s) for s in (0, 29, 30, 80, 129, 130)] == [32, 32, 32, 76, 119, 120]
    assert context_cap(TrainConfig(context_max=120, curriculum=0), 0) == 120  # none
    # (a minimal world plus its question may overshoot a small cap, never the cap's
    # 48-token bucket: such worlds are redrawn)
    early = [x.context_len for s in range(5) for x in train_instances(tc, s)]
    late = [x.context_len for s in range(200, 210) for x in train_instances(tc, s)]
    assert max(early) < 48 and max(late) > 90


def _pair_answer(ids):
    """The value after the asked key (the row's last token) in a pair row's table."""
    *table, asked = ids
    return table[table.index(asked) + 1]


def test_pair_rows_first_then_a_share_of_the_short_batches():
    tc = TrainConfig(batch_size=64, pair_steps=6, pair_two_steps=3, pair_frac=0.5,
                     curriculum=0, context_max=95)
    semi = tasks.TOKEN_ID[";"]
    names = {tasks.TOKEN_ID[w] for w in tasks.NAMES}
    numbers = {tasks.TOKEN_ID[w] for w in tasks.NUMBERS}
    sources = {tasks.TOKEN_ID[w] for w in tasks.SOURCES}
    images = {tasks.TOKEN_ID[w] for w in tasks.IMAGES}
    for step, most, pad in ((0, 2, 8), (2, 2, 8), (3, 4, 16), (5, 4, 16)):
        rows, sft = train_rows(tc, step)
        assert sft.all() and train_batch(tc, step).tokens.shape[1] == pad
        classes = set()
        for (ids, is_q), (answer, is_a) in rows:
            assert not is_q and is_a and len(answer) == 1
            assert answer[0] == _pair_answer(ids)  # the value right after the asked key
            table = [i for i in ids[:-1] if i != semi]
            keys, values = table[::2], table[1::2]
            assert 2 <= len(keys) <= most and len(set(keys)) == len(keys)
            if set(keys) <= names:  # facts' classes: a ';' after every pair
                assert set(values) <= numbers and ids[:-1].count(semi) == len(keys)
                classes.add("facts")
            else:  # fewshot's: distinct sources onto distinct images, ';' every two pairs
                assert set(keys) <= sources and set(values) <= images
                assert len(set(table)) == len(table)
                assert ids[:-1].count(semi) == (len(keys) + 1) // 2
                classes.add("fewshot")
        assert classes == {"facts", "fewshot"}
    # After pair_steps: pair rows only in batches padded to <= PAIR_EDGE tokens.
    shares = {}
    for step in range(6, 40):
        batch = train_batch(tc, step)
        n_pair = sum(not isinstance(r, list) or not isinstance(r[0], tasks.Instance)
                     for r in train_rows(tc, step)[0])
        shares.setdefault(batch.tokens.shape[1] <= PAIR_EDGE, []).append(n_pair / 64)
    assert shares[False] and max(shares[False]) == 0
    assert 0.3 < np.mean(shares[True]) < 0.7


def test_family_weights_set_the_suite_mix():
    tc = TrainConfig(batch_size=256, pair_steps=0, family_weights=(1.0, 6.0, 1.0))
    fams = [x.family for s in range(4) for x in train_instances(tc, s)]
    assert 0.65 < fams.count("fewshot") / len(fams) < 0.85
    with pytest.raises(ValueError, match="one positive weight per family"):
        TrainConfig(family_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="one positive weight per family"):
        TrainConfig(family_weights=(1.0, 0.0, 1.0))
    # A subset of the families keeps the weights of the families it names.
    sub = TrainConfig(batch_size=256, pair_steps=0, families=("facts", "fewshot"),
                      family_weights=(1.0, 3.0, 5.0))
    fams = [x.family for s in range(4) for x in train_instances(sub, s)]
    assert "dialog" not in fams and 0.65 < fams.count("fewshot") / len(fams) < 0.85
    assert TrainConfig.from_json(tc.to_json()) == tc


def test_rows_fit_their_bucket():
    # A world that overshoots the step's bucket is redrawn (a minimal chat often does).
    tc = TrainConfig(batch_size=64, pair_steps=0, curriculum=0, context_max=31)
    for step in range(3):
        assert train_batch(tc, step).tokens.shape[1] == 32


def test_recall_rows_restate_what_the_checker_derives():
    # Every answer of a recall row is what the independent checker derives from the
    # prefix for the matching question; only those answers are maskable.
    tc = TrainConfig(batch_size=32, recall_frac=1.0, pair_steps=0, pair_frac=0.0)
    rows, _ = train_rows(tc, 3)
    batch = train_batch(tc, 3)
    n_checked = 0
    for r, segs in enumerate(rows):
        prefix = tasks.decode(segs[0][0])
        family = prefix.split()[3]
        words = tasks.decode([i for ids, _ in segs[1:] for i in ids]).split()
        assert words[:2] == ["recall", ":"]
        answers = [tasks.decode(ids) for ids, is_answer in segs if is_answer]
        clauses = " ".join(words[2:]).replace(" .", " ;").split(" ;")
        for clause, answer in zip([c.split() for c in clauses if c.strip()], answers,
                                  strict=False):
            if family == "facts":
                question = f"question : what is {clause[0]}"
            elif family == "examples":
                question = f"input : {clause[0]}"
            else:
                question = f"user : what is the {clause[1]} of {clause[3]} ? assistant : <sep>"
            assert tasks.check_answer(prefix, question) == answer == clause[-1]
            n_checked += 1
        n = int(batch.lengths[r])
        assert int(np.asarray(batch.response[r])[:n].sum()) == len(answers)
    assert n_checked > 2 * len(rows)  # capped worlds: 2-4 facts, 3-5 symbols, 1+ chat facts
