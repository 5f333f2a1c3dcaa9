"""The shared-prefix task suite: answers right by construction (independent checker),
determinism, train / eval seed split, prefix-ratio coverage, tokenizer round trip."""

import numpy as np
import pytest

from bicache_jax import tasks
from bicache_jax.train import TrainConfig, train_instances


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_checker_agrees_with_generator(family):
    seeds = [*range(300), *range(tasks.EVAL_SEED_START, tasks.EVAL_SEED_START + 100)]
    for seed in seeds:
        for q in range(2):
            inst = tasks.make_instance(family, seed, q)
            assert tasks.check_answer(inst.prefix_text, inst.prompt_text) == inst.answer_text
            assert tasks.encode(inst.answer_text) == list(inst.answer_ids)
            assert 1 <= len(inst.answer_ids) < tasks.GEN_LENGTH
            assert tasks.UNK_ID not in inst.prefix_ids + inst.prompt_ids + inst.answer_ids
            assert inst.prefix_ids[0] == tasks.BOS_ID
            assert inst.prefix_ids[-1] == tasks.SEP_ID
            # facts and fewshot end the question with the asked key, where the answer
            # slot follows it as a value follows its key in the prefix.
            last = tasks.SEP if family == "dialog" else inst.meta["topic"][0]
            assert inst.prompt_text.split()[-1] == last


def test_checker_hand_examples():
    assert tasks.check_answer("<bos> system : facts . kab 47 ; dov 12 ; <sep>",
                              "note : nice . question : what is dov") == "12"
    # A system note padding the prefix is not part of the table.
    assert tasks.check_answer("<bos> system : facts . note : dov 3 . kab 47 ; <sep>",
                              "question : what is kab") == "47"
    assert tasks.check_answer("<bos> system : examples . A C B D ; B D E F ; <sep>",
                              "input : E") == "F"
    # The checker reads examples of any length and multi-symbol inputs (the generator
    # writes two symbols per example and asks for one).
    assert tasks.check_answer("<bos> system : examples . A C B D E F ; <sep>",
                              "input : E A B") == "F C D"
    chat = ("<bos> system : chat . user : the city of kab is rome . assistant : ok . "
            "user : tell me something . assistant : rain . "
            "user : now the city of kab is oslo . assistant : noted . <sep>")
    assert tasks.check_answer(chat, "user : what is the city of kab ? assistant : <sep>") == "oslo"
    with pytest.raises(ValueError):
        tasks.check_answer(chat, "user : what is the pet of kab ? assistant : <sep>")
    with pytest.raises(ValueError):
        tasks.check_answer("<bos> system : facts . kab 4 ; <sep>", "question : what is dov")
    with pytest.raises(ValueError):  # inconsistent substitution
        tasks.check_answer("<bos> system : examples . A C B D ; A E ; <sep>", "input : A")
    with pytest.raises(ValueError):  # a symbol without its image
        tasks.check_answer("<bos> system : examples . A C B ; <sep>", "input : A")


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_deterministic_and_shared_prefix(family):
    a = tasks.generate_instances(family, 123, 12, questions_per_prefix=4)
    b = tasks.generate_instances(family, 123, 12, questions_per_prefix=4)
    assert a == b and [x.meta for x in a] == [x.meta for x in b]
    for g in range(3):
        group = a[4 * g:4 * g + 4]
        assert len({x.prefix_ids for x in group}) == 1  # one shared prefix per seed
        assert len({x.prompt_ids for x in group}) > 1
    assert len({x.prefix_ids for x in tasks.generate_instances(family, 0, 50)}) == 50


def test_eval_seeds_disjoint_from_training():
    ev = tasks.eval_instances(20, questions_per_prefix=2)
    assert len(ev) == 20 * len(tasks.FAMILIES)
    assert all(x.meta["seed"] >= tasks.EVAL_SEED_START for x in ev)
    with pytest.raises(ValueError):
        tasks.eval_instances(4, seed=tasks.EVAL_SEED_START - 1)
    tc = TrainConfig(batch_size=16, pair_steps=0)  # suite rows from the first update
    for step in range(20):
        instances = train_instances(tc, step)
        assert all(x.meta["seed"] < tasks.EVAL_SEED_START for x in instances)
    # ... and the training prefixes of a long stretch never equal an eval prefix.
    # A minimal world (one chat fact, 19 tokens) recurs by chance across seeds (a few
    # thousand such chats exist); its answer is read from the prefix either way. Larger
    # worlds never do.
    eval_prefixes = {x.prefix_ids for x in tasks.eval_instances(100)}
    train_prefixes = {x.prefix_ids for s in range(50) for x in train_instances(tc, s)}
    shared = eval_prefixes & train_prefixes
    assert all(len(p) <= 20 for p in shared) and len(shared) <= 0.02 * len(eval_prefixes)


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_prefix_ratio_coverage(family):
    insts = tasks.generate_instances(family, tasks.EVAL_SEED_START, 400)
    ratios = np.array([x.prefix_ratio for x in insts])
    # The minimal world and the question bound each family's extremes (see
    # test_suite_spans_ten_to_ninety_five_percent for the suite as a whole).
    assert ratios.min() <= 0.2 and ratios.max() >= 0.88
    hist, _ = np.histogram(ratios, bins=np.linspace(0.1, 0.95, 10))
    assert (hist > 0).all(), hist
    ctx = np.array([x.context_len for x in insts])
    assert ctx.max() <= tasks.DEFAULT_CONTEXT[1]
    assert np.abs(ratios - [x.meta["target_ratio"] for x in insts]).mean() < 0.1


def test_suite_spans_ten_to_ninety_five_percent():
    ratios = [x.prefix_ratio for fam in tasks.FAMILIES
              for x in tasks.generate_instances(fam, tasks.EVAL_SEED_START, 400)]
    assert min(ratios) <= 0.14 and max(ratios) >= 0.93


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_world_sizes_are_capped_and_long_prefixes_padded(family):
    insts = tasks.generate_instances(family, tasks.EVAL_SEED_START, 200)
    for x in insts:
        body = x.prefix_text.split()[5:-1]
        padded = body[:2] == ["note", ":"]
        if padded:
            body = body[body.index(".") + 1:]
        if family == "facts":
            assert body.count(";") <= tasks.MAX_FACTS
        elif family == "fewshot":
            assert body.count(";") <= tasks.MAX_EXAMPLES
            # each example is (source, image) pairs: sources from the alphabet's first
            # half, images from its second, and the question asks a source
            pairs = [ex.split() for ex in " ".join(body).split(";") if ex.strip()]
            sources = {w for ex in pairs for w in ex[::2]}
            images = {w for ex in pairs for w in ex[1::2]}
            assert sources <= set(tasks.SOURCES) and images <= set(tasks.IMAGES)
            assert tasks.decode(x.question_ids[2:]) in sources
        else:
            assert body.count("user") <= tasks.MAX_TURNS
    if family == "dialog":  # ten chat turns can fill a long prefix on their own
        return
    # a capped table or example list is at most 42 tokens: longer prefixes carry the note
    long = [x for x in insts if len(x.prefix_ids) > 80]
    assert long and all(x.prefix_text.split()[5:7] == ["note", ":"] for x in long)


def test_is_correct():
    inst = tasks.make_instance("facts", 5)
    n = len(inst.answer_ids)
    canvas = list(inst.response_ids())
    assert tasks.is_correct(canvas, inst)
    assert tasks.is_correct(canvas[:n + 1] + [tasks.TOKEN_ID["7"]] * (7 - n), inst)
    assert not tasks.is_correct(canvas[:n] + [tasks.TOKEN_ID["7"]] * (8 - n), inst)
    assert not tasks.is_correct([tasks.EOS_ID] * 8, inst)


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    tasks.build_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == tasks.VOCAB_SIZE
    for name, i in [("<pad>", tasks.PAD_ID), ("<mask>", tasks.MASK_ID),
                    ("<eos>", tasks.EOS_ID), ("<bos>", tasks.BOS_ID)]:
        assert tok.token_to_id(name) == i
    for fam in tasks.FAMILIES:
        inst = tasks.make_instance(fam, 9)
        text = inst.prefix_text + " " + inst.prompt_text + " " + inst.answer_text
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == list(inst.prefix_ids + inst.prompt_ids + inst.answer_ids)
        assert tok.decode(ids, skip_special_tokens=False) == text
