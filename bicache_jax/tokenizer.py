"""Tokenizer + chat template of an HF model folder, and the prefix / prompt split.

`Tokenizer` wraps `tokenizers.Tokenizer` (`tokenizer.json`) and renders the chat template
of `tokenizer_config.json` the way `transformers` does: a sandboxed jinja2 environment
with `trim_blocks` / `lstrip_blocks`, the `loopcontrols` extension, a `raise_exception`
helper, a non-ASCII-escaping `tojson` filter, and the special tokens (`bos_token`,
`eos_token`, ...) as variables.

`split_conversation` cuts a conversation into the shared prefix (every message but the
last) and the prompt (the last user message plus the generation prompt) such that
`prefix_ids + prompt_ids` is exactly the tokenization of the whole rendered conversation,
and `prefix_ids` is exactly the tokenization of the prefix rendered alone, so the prefix
can be cached and reused by the next turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                  "cls_token", "mask_token")

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The chat template is missing, failed to render, or cannot be split into a prefix."""


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any, source: str) -> str:
    """`chat_template` is a string or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{source}: chat_template list has no 'default' template "
                                f"(has {sorted(k for k in named if k)})")
    raise ChatTemplateError(f"{source}: chat_template must be a string, got {type(value)}")


class Tokenizer:
    """Text <-> ids plus the model's chat template.

    tokenizer_file: path of `tokenizer.json`.
    config_file:    path of `tokenizer_config.json` (chat template, special tokens), or None.
    chat_template:  overrides the template found in `config_file` / next to it.
    """

    def __init__(self, tokenizer_file: str | Path, config_file: str | Path | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        self.tokenizer_file = Path(tokenizer_file)
        if not self.tokenizer_file.is_file():
            raise FileNotFoundError(f"{self.tokenizer_file}: missing")
        try:
            self._tok = _HFTokenizer.from_file(str(self.tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{self.tokenizer_file}: not a valid tokenizer.json: {e}") from e
        self.config_file = Path(config_file) if config_file is not None else None
        cfg: dict[str, Any] = {}
        if self.config_file is not None:
            try:
                cfg = json.loads(self.config_file.read_text(encoding="utf-8"))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{self.config_file}: missing") from e
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.config_file}: cannot read JSON: {e}") from e
            if not isinstance(cfg, dict):
                raise ValueError(f"{self.config_file}: expected a JSON object")
        self.special_tokens: dict[str, str] = {
            name: text for name in _SPECIAL_NAMES
            if (text := _token_text(cfg.get(name))) is not None}
        self._template_source = str(self.config_file or self.tokenizer_file)
        self.chat_template: str | None = chat_template
        if self.chat_template is None:
            self.chat_template = self._find_template(cfg)
        self._compiled = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and (if present) `tokenizer_config.json` from a folder."""
        folder = Path(folder)
        config = folder / TOKENIZER_CONFIG_FILE
        return cls(folder / TOKENIZER_FILE, config if config.is_file() else None)

    def _find_template(self, cfg: dict[str, Any]) -> str | None:
        if cfg.get("chat_template") is not None:
            return _pick_template(cfg["chat_template"], self._template_source)
        folder = (self.config_file or self.tokenizer_file).parent
        jinja_file, json_file = (folder / name for name in CHAT_TEMPLATE_FILES)
        if jinja_file.is_file():
            self._template_source = str(jinja_file)
            return jinja_file.read_text(encoding="utf-8")
        if json_file.is_file():
            self._template_source = str(json_file)
            data = json.loads(json_file.read_text(encoding="utf-8"))
            return _pick_template(data.get("chat_template"), str(json_file))
        return None

    # ------------------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (None when unknown)."""
        return self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token` from tokenizer_config.json, if any."""
        text = self.special_tokens.get("bos_token")
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token` from tokenizer_config.json, if any."""
        text = self.special_tokens.get("eos_token")
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        `add_special_tokens` defaults to False because rendered chat templates already
        spell out BOS and friends (as `transformers` does when tokenizing a chat).
        """
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------- chat

    def _template(self):
        if self.chat_template is None:
            raise ChatTemplateError(f"{self._template_source}: no chat_template")
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ChatTemplateError(f"chat template: {message}")

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                       separators: Any = None, sort_keys: bool = False) -> str:
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            def strftime_now(fmt: str) -> str:
                return datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"{self._template_source}: bad chat_template: {e}") from e
        return self._compiled

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True) -> str:
        """Render `messages` (dicts with `role` and `content`) with the chat template."""
        import jinja2

        variables = dict(self.special_tokens)
        try:
            return self._template().render(messages=list(messages),
                                           add_generation_prompt=add_generation_prompt,
                                           **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(
                f"{self._template_source}: chat_template failed to render: {e}") from e

    def split_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """`(prefix_ids, prompt_ids)` of a conversation ending with a user message.

        prefix: every message but the last, rendered without a generation prompt;
        prompt: the last (user) message plus the generation prompt. The full conversation
        is tokenized once and cut at the token boundary where the prefix text ends, so
        `prefix_ids + prompt_ids == encode(apply_chat_template(messages))`. Raises
        `ChatTemplateError` if the rendered prefix is not a string prefix of the full
        rendering, the cut falls inside a token, or the prefix tokenizes differently on
        its own.
        """
        messages = list(messages)
        if not messages:
            raise ValueError("split_conversation needs at least one message")
        if messages[-1].get("role") != "user":
            raise ValueError(f"the last message must be a user message, got role "
                             f"{messages[-1].get('role')!r}")
        full = self.apply_chat_template(messages, add_generation_prompt=True)
        head = messages[:-1]
        try:
            prefix = self.apply_chat_template(head, add_generation_prompt=False)
        except ChatTemplateError:
            if head:
                raise
            prefix = ""  # some templates cannot render an empty conversation
        if not full.startswith(prefix):
            at = next((i for i, (a, b) in enumerate(zip(prefix, full, strict=False)) if a != b),
                      min(len(prefix), len(full)))
            raise ChatTemplateError(
                f"{self._template_source}: the conversation without its last message does not "
                f"render as a prefix of the whole conversation (they differ at character {at}: "
                f"{prefix[at:at + 30]!r} vs {full[at:at + 30]!r}); cannot split it")
        enc = self._tok.encode(full, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        cut = len(prefix)
        n = sum(1 for _, end in offsets if end <= cut) if cut else 0
        straddles = [i for i, (start, end) in enumerate(offsets)
                     if start < cut < end or (i < n and end > cut) or (i >= n and start < cut)]
        if straddles:
            i = straddles[0]
            raise ChatTemplateError(
                f"{self._template_source}: the prefix ends at character {cut}, inside token "
                f"{i} ({full[offsets[i][0]:offsets[i][1]]!r}); cannot split there")
        if self.encode(prefix) != ids[:n]:
            raise ChatTemplateError(
                f"{self._template_source}: the prefix tokenizes differently alone than inside "
                "the whole conversation; cannot split it")
        return ids[:n], ids[n:]
