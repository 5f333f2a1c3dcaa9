"""A tiny HF LLaDA folder with a word-level tokenizer and a chat template (server tests,
the load benchmark's smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

from hf_fixtures import LLADA_CONFIG, llada_folder

WORDS = [f"w{i}" for i in range(50)]
ROLE_TOKENS = ["<system>", "<user>", "<assistant>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
EOS_ID, MASK_ID = LLADA_CONFIG["eos_token_id"], LLADA_CONFIG["mask_token_id"]


def chat_model_folder(folder: Path, seed: int = 0) -> Path:
    """`llada_folder` (vocab 60, context 128) plus tokenizer.json (every id has a token:
    w0..w49, role tokens, spares, <eos> = 58, <mask> = 59) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    folder, _, _ = llada_folder(folder, seed=seed)
    spares = [f"<spare{i}>" for i in range(len(WORDS) + len(ROLE_TOKENS), EOS_ID)]
    vocab = {w: i for i, w in enumerate(WORDS + ROLE_TOKENS + spares + ["<eos>", "<mask>"])}
    assert len(vocab) == LLADA_CONFIG["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<eos>", "<mask>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}))
    return folder
