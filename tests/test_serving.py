"""The serving engine: mixed traffic batched == each request alone, bounded compiles and
store, per-request failures."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from numpy_reference import sharp_params

from bicache_jax import config as C
from bicache_jax.generate import Prompt, generate
from bicache_jax.prefix_store import PrefixStore
from bicache_jax.sampling import SamplerConfig
from bicache_jax.serving import Engine, Request
from bicache_jax.tokenizer import Tokenizer

CFG = C.tiny_llada(n_kv_heads=2).replace(attention_impl="reference")
GEN = dict(gen_length=16, steps=8, block_length=8)
BUDGET = 50  # prefix tokens: room for two of the prefixes below at a time
TABLE = {0: 1, 50: 2}  # prefix ratio (percent, canvas counted) -> reuse depth
BUCKETS = (1, 2, 4, 8)
WORDS = [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def params():
    return sharp_params(CFG, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS + ["<system>", "<user>", "<assistant>",
                                                 "<unk>"])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer(path, chat_template=CHAT_TEMPLATE)


def _traffic(tokenizer, n=200, seed=0):
    """n valid mixed requests: 3 id prefixes (17, 22, 29 tokens; all pad to 32) and a chat
    system prompt, no prefix now and then (policy none); prompts of 2..14 tokens; policies none,
    naive_prefix, bicache at an explicit depth or at the table's depth."""
    rng = np.random.default_rng(seed)

    def ids(k):
        return tuple(int(i) for i in rng.integers(0, 40, k))

    prefixes = [ids(17), ids(22), ids(29)]
    system = " ".join(rng.choice(WORDS, 20))
    out = []
    for i in range(n):
        policy = ("none", "naive_prefix", "bicache", "bicache")[i % 4]
        depth = 1 if (policy == "bicache" and i % 8 == 2) else None
        if i % 25 == 7:  # a chat request: the system prompt is the shared prefix
            msgs = [{"role": "system", "content": system},
                    {"role": "user", "content": " ".join(rng.choice(WORDS, 1 + i % 5))}]
            out.append(Request(messages=msgs, tokenizer=tokenizer, policy=policy,
                               reuse_depth=depth, request_id=f"r{i}", **GEN))
            continue
        prefix = prefixes[int(rng.integers(0, 3))]
        if i % 23 == 5:  # no prefix: the store policies refuse one, so it runs with none
            prefix, policy, depth = (), "none", None
        out.append(Request(prompt=ids(int(rng.integers(2, 15))), prefix=prefix, policy=policy,
                           reuse_depth=depth, request_id=f"r{i}", **GEN))
    return out


BAD = [  # (request, expected error fragment)
    (Request(prompt=(1, 2, CFG.mask_token_id), **GEN), "mask token"),
    (Request(prompt=(1, 2), gen_length=12, block_length=8), "block_length"),
    (Request(prompt=(1, 2), policy="magic", **GEN), "unknown policy"),
    (Request(prompt=(1, 2), policy="bicache", reuse_depth=9, **GEN), "reuse_depth"),
    (Request(prompt=(1, 2), prefix=tuple(range(60)), policy="bicache", **GEN), "budget"),
    (Request(prompt="hello", **GEN), "token ids"),
    (Request(messages=[{"role": "user", "content": "w1"}], **GEN), "tokenizer"),
    (Request(prompt=(), **GEN), "prompt is empty"),
    (Request(prompt=(1, 2), sampler="greedy", **GEN), "SamplerConfig"),
    (Request(prompt=(1, 99), **GEN), "token ids"),
    (Request(prompt=(1, 2), policy="bicache", reuse_depth=1, **GEN), "Prompt(prefix="),
    (Request(prompt=(1, 2), refresh_interval=4, **GEN), "refresh_interval is a setting"),
]


def _alone(params, req: Request, store: PrefixStore, tokenizer):
    if req.messages is not None:
        prefix, prompt = tokenizer.split_conversation(req.messages)
    else:
        prefix, prompt = req.prefix, req.prompt
    return generate(params, [Prompt(prompt=prompt, prefix=prefix)], store, config=CFG,
                    policy=req.policy, reuse_depth=req.reuse_depth, **GEN)


def test_mixed_traffic_equals_each_request_alone(params, tokenizer):
    good = _traffic(tokenizer)
    requests = list(good)
    for j, (bad, _) in enumerate(BAD):  # interleave the bad ones
        requests.insert(17 * j + 3, bad)
    batches = []
    engine = Engine(params, CFG, budget_tokens=BUDGET, depth_table=TABLE, buckets=BUCKETS,
                    on_batch=batches.append)
    results = engine.run(requests)
    assert [r.index for r in results] == list(range(len(requests)))

    # Validation failures fail alone, with clear messages; everything else completes.
    bad_results = [r for r in results if not r.ok]
    assert len(bad_results) == len(BAD)
    for (bad, fragment), r in zip(BAD, bad_results, strict=True):
        assert requests[r.index] is bad
        assert fragment in r.error, (fragment, r.error)
    ok = [r for r in results if r.ok]
    assert len(ok) == len(good)

    # Per request: the same tokens (and forwards) as the request run alone.
    alone_store = PrefixStore(budget_tokens=10_000, depth_table=TABLE)
    depths = set()
    for r in ok:
        req = requests[r.index]
        alone = _alone(params, req, alone_store, tokenizer)
        if alone.cache is not None:
            alone_store = alone.cache
        np.testing.assert_array_equal(r.tokens, alone.tokens[0], err_msg=req.request_id)
        assert r.nfe == alone.nfe[0], req.request_id
        if req.policy == "bicache":
            assert r.reuse_depth == alone.stats["reuse_depth"][0]
            depths.add(r.reuse_depth)
        assert r.latency_s >= r.time_to_first_step_s >= r.queue_wait_s >= 0
        assert 1 <= r.batch_size <= r.bucket and r.bucket in BUCKETS
    assert depths == {1, 2}  # the bicache requests ran at two depths, in separate batches
    assert len({tuple(r.tokens) for r in ok}) > 10, "degenerate model"

    # Batches are grouped: one policy, sampler, shape settings and depth per batch.
    groups = {b.group for b in batches}
    assert len(groups) == 4  # none, naive_prefix, bicache at depth 1 and at depth 2
    assert sum(b.size for b in batches) == len(good)
    assert max(b.size for b in batches) == 8

    # Compilations are bounded by the static shapes: groups x buckets x padded lengths.
    st = engine.stats
    assert st.compiles <= len(st.signatures) <= len(groups) * len(BUCKETS) * 3
    assert sum(b.compiles for b in batches) == st.compiles
    before = st.compiles
    again = engine.run(good)  # the same traffic again: the same shapes, nothing to compile
    assert st.compiles == before
    for r, first in zip(again, ok, strict=True):
        np.testing.assert_array_equal(r.tokens, first.tokens)

    # The store never holds more than its budget, yet serves hits.
    assert max(b.store_tokens for b in batches) <= BUDGET
    assert st.max_store_tokens <= BUDGET
    assert engine.store.stats.evictions > 0
    assert st.cache_hits > 0 and st.cache_misses > 0
    hits = [r.cache_hit for r in ok if requests[r.index].policy != "none"]
    assert set(hits) == {True, False}  # every store request has a prefix (none: None)
    assert all(r.cache_hit is None for r in ok if requests[r.index].policy == "none")
    assert json.dumps(engine.summary())


def test_chat_requests_and_text_output(params, tokenizer):
    system = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18"
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
            for q in ("w20 w21", "w22", "w23 w24 w25")]
    engine = Engine(params, CFG, tokenizer=tokenizer, buckets=BUCKETS)
    chat = engine.run([Request(messages=m, policy="naive_prefix", **GEN) for m in msgs])
    prefix, _ = tokenizer.split_conversation(msgs[0])
    assert len(prefix) == 19  # "<system>" + 18 words: the shared prefix
    assert [r.cache_hit for r in chat] == [False, False, False]  # one batch computed it
    direct = engine.run([Request(prompt=tokenizer.split_conversation(m)[1], prefix=prefix,
                                 policy="naive_prefix", **GEN) for m in msgs])
    for a, b in zip(chat, direct, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert a.text == tokenizer.decode(a.tokens.tolist())
        assert b.cache_hit is True
    with pytest.raises(ValueError, match="buckets"):
        Engine(params, CFG, buckets=())


def test_streaming_holds_memory_flat(params, tokenizer):
    """An endless-style stream: results come out as batches finish, the queue, the store
    and the live device arrays stay bounded."""
    seen = []

    def stream():
        for i, req in enumerate(_traffic(tokenizer, n=160, seed=1)):
            seen.append(i)
            yield req

    log = []
    engine = Engine(params, CFG, budget_tokens=BUDGET, depth_table=TABLE, buckets=BUCKETS,
                    max_pending=12,
                    on_batch=lambda b: log.append((b, len(jax.live_arrays()), len(seen))))
    done = 0
    for r in engine.serve(stream()):
        assert r.ok, r.error
        done += 1
        assert len(seen) - done <= 12 + 1  # never more than max_pending waiting
    assert done == 160
    assert all(b.store_tokens <= BUDGET for b, _, _ in log)
    live = [n for _, n, _ in log]
    half = len(live) // 2
    assert max(live[half:]) <= max(live[:half]) + 8, live


def test_a_failing_batch_fails_alone(params, monkeypatch):
    """A batch that raises at run time fails its own requests; other batches complete."""
    from bicache_jax import serving

    def flaky(params, prompts, cache=None, **kw):
        if kw["sampler"].temperature > 0:
            raise RuntimeError("device lost")
        return generate(params, prompts, cache, **kw)

    monkeypatch.setattr(serving, "generate", flaky)
    hot = SamplerConfig(temperature=1.0)
    engine = Engine(params, CFG, buckets=BUCKETS, key=jax.random.key(3))
    out = engine.run([Request(prompt=(1, 2, 3), sampler=hot, **GEN),
                      Request(prompt=(4, 5), **GEN), Request(prompt=(6,), sampler=hot, **GEN)])
    assert [r.ok for r in out] == [False, True, False]
    assert out[0].error == "RuntimeError: device lost" and out[2].error == out[0].error
    assert not np.any(out[1].tokens == CFG.mask_token_id)
    assert engine.stats.failed == 2 and engine.stats.batches == 2


def test_on_block_hands_back_each_finished_block(params):
    """A streaming request gets its canvas after every block; its batch (streaming or not)
    decodes exactly as `generate` does."""
    seen: dict[int, list] = {0: [], 2: []}

    def hook(i):
        return lambda block, tokens: seen[i].append((block, tokens.copy()))

    requests = [Request(prompt=(1, 2, 3), on_block=hook(0), **GEN),
                Request(prompt=(4, 5), **GEN),
                Request(prompt=(6, 7, 8, 9), prefix=(10, 11), on_block=hook(2), **GEN)]
    out = Engine(params, CFG, buckets=BUCKETS).run(requests)
    assert len({r.bucket for r in out}) == 1  # one batch
    block = GEN["block_length"]
    for i, req in enumerate(requests):
        alone = generate(params, [Prompt(prompt=req.prompt, prefix=req.prefix)], config=CFG,
                         **GEN).tokens[0]
        np.testing.assert_array_equal(out[i].tokens, alone)
        if i in seen:
            assert [b for b, _ in seen[i]] == [0, 1]
            first, last = seen[i][0][1], seen[i][1][1]
            np.testing.assert_array_equal(last, alone)
            np.testing.assert_array_equal(first[:block], alone[:block])
            assert np.all(first[block:] == CFG.mask_token_id)
