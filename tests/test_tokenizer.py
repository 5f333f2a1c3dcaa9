"""Tokenizer: ids, the LLaDA-like chat template, and the prefix / prompt split."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from bicache_jax.tokenizer import ChatTemplateError, Tokenizer

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|mdm_mask|>"]

# LLaDA-8B-Instruct style: BOS before the first message, llama-3 headers, trimmed content.
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# Qwen2 / Dream style: a default system prompt injected when there is none.
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system\nYou are a helpful assistant.<|eot_id|>\n' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '\n' + message['content'] + '<|eot_id|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\n' }}{% endif %}")

SENTENCES = [
    "hello there, how are you today?", "I am fine, thank you. And you?",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a joke about cats and dogs.", "Write a short poem about the sea.",
    "hello hello hello world", "The quick brown fox jumps over the lazy dog.",
    "Explain diffusion language models in one sentence.", "système, café, naïve — ünïcödé",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False},
        "chat_template": LLADA_TEMPLATE, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tmp


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_folder(folder)


def conversation(turns: int):
    """`turns` user messages with assistant replies between them, and a system prompt."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"{SENTENCES[i % len(SENTENCES)]} ({i})"})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": f"  {SENTENCES[(i + 3) % 9]}\n"})
    return msgs


def test_encode_decode_round_trip(tok):
    text = "hello there, café <|eot_id|> dog"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "hello there, café  dog"
    assert tok.token_to_id("<|eot_id|>") in ids
    assert tok.bos_token_id == tok.token_to_id("<|startoftext|>")
    assert tok.eos_token_id == tok.token_to_id("<|eot_id|>")
    assert tok.vocab_size == 400


def test_chat_template_renders_like_llada(tok):
    msgs = [{"role": "user", "content": " Hi! "}]
    assert tok.apply_chat_template(msgs) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>")


@pytest.mark.parametrize("turns", [1, 2, 5])
@pytest.mark.parametrize("system", [True, False])
def test_split_equals_whole_rendering(tok, turns, system):
    msgs = conversation(turns)[(0 if system else 1):]
    prefix, prompt = tok.split_conversation(msgs)
    full = tok.encode(tok.apply_chat_template(msgs))
    assert prefix + prompt == full
    assert prefix == tok.encode(tok.apply_chat_template(msgs[:-1], add_generation_prompt=False))
    assert len(prompt) > 0
    header = [tok.token_to_id("<|start_header_id|>")]
    if len(msgs) == 1:
        assert prefix == []  # LLaDA puts BOS inside the first message: it goes with the prompt
        assert prompt[0] == tok.bos_token_id
    else:
        assert prefix[0] == tok.bos_token_id and prefix[-1] == tok.eos_token_id
        assert prompt[:1] == header
    assert tok.decode(prompt, skip_special_tokens=False).startswith(
        "<|start_header_id|>user<|end_header_id|>" if len(msgs) > 1 else "<|startoftext|>")


def test_split_prefix_is_stable_across_turns(tok):
    """The prefix of turn k+1 starts with the full conversation of turn k (cacheable)."""
    msgs = conversation(3)
    p1, q1 = tok.split_conversation(msgs[:2])
    p2, _ = tok.split_conversation(msgs[:4])
    assert p2[:len(p1) + len(q1)] == p1 + q1


def test_split_with_default_system_prompt_template(folder):
    tok = Tokenizer(folder / "tokenizer.json", folder / "tokenizer_config.json",
                    chat_template=QWEN_TEMPLATE)
    for turns in (1, 2, 5):
        msgs = conversation(turns)[1:]
        prefix, prompt = tok.split_conversation(msgs)
        assert prefix + prompt == tok.encode(tok.apply_chat_template(msgs))
        if turns == 1:
            assert prefix == []


def test_split_errors(folder, tok):
    with pytest.raises(ValueError, match="last message must be a user"):
        tok.split_conversation([{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="at least one"):
        tok.split_conversation([])
    # Rendering of the earlier messages changes once another follows: not a prefix.
    moving = Tokenizer(folder / "tokenizer.json", chat_template=(
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|eot_id|>{% else %}|"
        "{% endif %}{% endfor %}"))
    with pytest.raises(ChatTemplateError, match="prefix of the whole"):
        moving.split_conversation([{"role": "user", "content": "hello"},
                                   {"role": "user", "content": "dog"}])
    # No separator: the cut falls inside the merged token "hello".
    glued = Tokenizer(folder / "tokenizer.json",
                      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert len(glued.encode("hello")) == 1
    with pytest.raises(ChatTemplateError, match="inside token"):
        glued.split_conversation([{"role": "user", "content": "hel"},
                                  {"role": "user", "content": "lo"}])


def test_template_helpers_and_missing_template(folder):
    tok = Tokenizer(folder / "tokenizer.json", chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ messages | tojson }}"))
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == (
        '[{"role": "user", "content": "é<"}]')
    with pytest.raises(ChatTemplateError, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    bare = Tokenizer(folder / "tokenizer.json")
    with pytest.raises(ChatTemplateError, match="tokenizer.json: no chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        Tokenizer(folder / "nothing.json")
