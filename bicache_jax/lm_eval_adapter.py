"""An `lm_eval` (EleutherAI lm-evaluation-harness) model: `--model bicache_jax`.

Evaluates like the BiCache paper: a configurable **system prompt** (plus the few-shot
examples) is the shared **prefix**, served from the prefix store, and the question is the
request's own **prompt**. Requests go through the serving `Engine`, so compatible ones
are batched and the store is reused across the whole evaluation.

How a context is split:

* plain text (lm_eval renders "description + few-shot examples + question" into one
  string): the prompt is the text after the last `fewshot_delimiter` (lm_eval's default
  "\\n\\n"), the prefix is `system_prompt + system_delimiter` + everything before it
  (the few-shot block). With `split_fewshot=False` only the system prompt is the prefix.
  Prefix and prompt are tokenized separately. Few-shot examples are shared by all
  questions only with a fixed sampler (lm_eval's `fewshot_config: {sampler: first_n}`);
  otherwise each question has its own prefix (still correct, fewer store hits).
* chat (`--apply_chat_template`): lm_eval calls `apply_chat_template` here; the system
  prompt (when set and the chat has none) becomes the first message, and the rendered
  chat is cut with `Tokenizer.split_conversation`: prefix = every message but the last,
  prompt = the last user message + generation prompt.

Model args (`--model_args key=value,...`; all optional but the model): `pretrained` (a
bicache_jax checkpoint or HF folder with `tokenizer.json`), `dtype`, `system_prompt`,
`system_prompt_file`, `system_delimiter`, `split_fewshot`, `fewshot_delimiter`,
`add_bos_token`, `policy`, `gen_length`, `steps`, `block_length`, `reuse_depth`,
`refresh_interval`, `remasking`, `temperature`, `top_p`, `top_k`, `alg_temp`,
`threshold`, `cfg_scale`, `budget_tokens`, `batch_size`, `eos_token_id`, `seed`.
In Python, `params=`, `config=` and `tokenizer=` may be passed instead of `pretrained`.

Generation: the canvas is `gen_length` tokens (a diffusion LM denoises a fixed canvas, so
a task's `max_gen_toks` is not used); the output is cut at the first EOS id and then at the
earliest `until` string. A task's `temperature` gen_kwarg overrides the model arg.
`loglikelihood` and `loglikelihood_rolling` are not implemented (they raise): evaluate
generative tasks (`output_type: generate_until`).

Importing this module never needs `lm_eval`; when `lm_eval` is installed the class
subclasses `lm_eval.api.model.LM` and is registered as "bicache_jax". From the command
line: `python -m bicache_jax.lm_eval_adapter run --model bicache_jax --model_args
pretrained=PATH,system_prompt=... --tasks TASK` (lm_eval's CLI with this model
registered). `lm_eval` is installed with `pip install lm-eval`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from .prefix_store import DEFAULT_BUDGET_TOKENS
from .sampling import SamplerConfig
from .serving import Engine, Request

log = logging.getLogger(__name__)

try:  # lm_eval is optional: only needed to run an evaluation
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # exercised by tests/test_lm_eval.py in a child without lm_eval
    HAVE_LM_EVAL = False

    class _LMBase:  # type: ignore[no-redef]
        """Stand-in base class when lm_eval is not installed."""

        def __init__(self) -> None:
            self._rank, self._world_size, self._device = 0, 1, None
            self.cache_hook = None

    def register_model(*names):  # type: ignore[no-redef]
        return lambda cls: cls


def _register_model(name: str):
    """`lm_eval.api.registry.register_model(name)`, except in the copy of this module that
    `python -m` runs as `__main__` (the block at the bottom imports the real module, which
    registers; lm_eval refuses a second class under the same name)."""
    if __name__ == "__main__":
        return lambda cls: cls
    return register_model(name)


MODEL_NAME = "bicache_jax"
_NOT_GENERATIVE = (
    "bicache_jax is a diffusion LM served through its denoising loop: it has no "
    "left-to-right token likelihoods, so {method} is not implemented. Evaluate "
    "generative tasks (output_type: generate_until).")


def _opt(value: Any, cast: type) -> Any:
    """Model args arrive as strings, numbers or None (lm_eval's arg parsing)."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
        return None
    if cast is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    return cast(value)


def _depth_table(table: Any) -> dict[int, int] | None:
    """A checkpoint's profile table (the profiler's JSON or a bare `r -> b` dict)."""
    if table is None:
        return None
    if isinstance(table, dict) and isinstance(table.get("table"), dict):
        table = table["table"]
    return {int(r): int(b) for r, b in dict(table).items()}


@_register_model(MODEL_NAME)
class BiCacheLM(_LMBase):
    """lm_eval model serving a bicache_jax DLM with the system prompt as shared prefix.

    Args (see the module docstring for the model-arg names):
      pretrained: checkpoint / HF folder (loaded with `bicache_jax.load`, tokenizer from
        its `tokenizer.json`); or give `params`, `config` and `tokenizer` directly.
      system_prompt / system_prompt_file: text put in the shared prefix of every request.
      system_delimiter: between the system prompt and the few-shot block.
      split_fewshot, fewshot_delimiter: whether / where to cut the few-shot block into the
        prefix (text mode).
      add_bos_token: prepend the tokenizer's BOS id to every request.
      policy, gen_length, steps, block_length, reuse_depth, refresh_interval: `generate`.
      remasking, temperature, top_p, top_k, alg_temp, threshold, cfg_scale: the sampler.
      budget_tokens, depth_table: the prefix store (depth_table default: the checkpoint's).
      batch_size: the largest batch (buckets are the powers of two up to it; "auto" uses
        lm_eval's `max_batch_size`, else 8). lm_eval's CLI default is 1: pass
        `--batch_size 8` or more to batch questions.
      eos_token_id: where the answer ends (default: the tokenizer's EOS).
      seed: PRNG seed of the engine.
    """

    def __init__(self, pretrained: str | None = None, *, params: Any = None,
                 config: Any = None, tokenizer: Any = None, dtype: str | None = None,
                 system_prompt: str = "", system_prompt_file: str | None = None,
                 system_delimiter: str = "\n\n", split_fewshot: bool = True,
                 fewshot_delimiter: str = "\n\n", add_bos_token: bool = False,
                 policy: str = "bicache", gen_length: int = 64, steps: int | None = None,
                 block_length: int | None = None, reuse_depth: int | None = None,
                 refresh_interval: int | None = None, remasking: str = "low_confidence",
                 temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None, alg_temp: float = 0.0,
                 threshold: float | None = None, cfg_scale: float = 0.0,
                 budget_tokens: int = DEFAULT_BUDGET_TOKENS,
                 depth_table: dict[int, int] | None = None, batch_size: Any = 8,
                 eos_token_id: int | None = None, seed: int = 0, **unused: Any):
        super().__init__()
        # lm_eval hands every model `device`, `max_batch_size` etc.; JAX picks devices.
        unknown = sorted(set(unused) - {"device", "max_batch_size", "max_length",
                                        "trust_remote_code", "parallelize"})
        if unknown:
            raise ValueError(f"bicache_jax: unknown model args {unknown}")
        table = None
        if pretrained is not None:
            if params is not None or config is not None:
                raise ValueError("give either pretrained= or params=/config=, not both")
            from .checkpoint import load

            params, config, table = load(pretrained, dtype=dtype, progress=False)
            if tokenizer is None and (Path(pretrained) / "tokenizer.json").is_file():
                from .tokenizer import Tokenizer

                tokenizer = Tokenizer.from_folder(pretrained)
        if params is None or config is None:
            raise ValueError("bicache_jax needs pretrained=PATH (or params= and config=)")
        if tokenizer is None:
            raise ValueError("bicache_jax needs a tokenizer (tokenizer.json next to the "
                             "checkpoint, or tokenizer=)")
        if system_prompt_file:
            system_prompt = Path(system_prompt_file).read_text(encoding="utf-8")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.system_prompt = system_prompt or ""
        self.system_delimiter = system_delimiter
        self.split_fewshot = bool(_opt(split_fewshot, bool))
        self.fewshot_delimiter = fewshot_delimiter
        self.add_bos_token = bool(_opt(add_bos_token, bool))
        self.policy = policy
        self.gen_length = int(gen_length)
        self.steps = _opt(steps, int)
        self.block_length = _opt(block_length, int)
        self.reuse_depth = _opt(reuse_depth, int)
        self.refresh_interval = _opt(refresh_interval, int)
        self.sampler = SamplerConfig(
            remasking=remasking, temperature=float(temperature), top_p=_opt(top_p, float),
            top_k=_opt(top_k, int), alg_temp=float(alg_temp),
            threshold=_opt(threshold, float), cfg_scale=float(cfg_scale))
        self.eos_token_id = (_opt(eos_token_id, int) if eos_token_id is not None
                             else tokenizer.eos_token_id)
        if batch_size is None or str(batch_size).startswith("auto"):  # lm_eval's "auto"
            max_batch = int(unused.get("max_batch_size") or 8)
        else:
            max_batch = max(1, int(batch_size))
        buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.engine = Engine(params, config, budget_tokens=int(budget_tokens),
                             depth_table=_depth_table(depth_table) or _depth_table(table),
                             buckets=buckets, tokenizer=tokenizer,
                             key=jax.random.key(int(seed)))
        self._chat_splits: dict[str, tuple[list[int], list[int]]] = {}
        self.failures = 0

    # ------------------------------------------------------------------------- lm_eval API

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer / chat template (lm_eval's request caching)."""
        return str(getattr(self.tokenizer, "tokenizer_file", type(self.tokenizer).__name__))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (lm_eval records it with the results)."""
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render a chat; remember its prefix / prompt split for `generate_until`."""
        messages = [dict(m) for m in chat_history]
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt and messages and messages[-1].get("role") == "user":
            self._chat_splits[rendered] = self.tokenizer.split_conversation(messages)
        return rendered

    def split_context(self, context: str) -> tuple[list[int], list[int]]:
        """`(prefix_ids, prompt_ids)` of one lm_eval context (see the module docstring)."""
        split = self._chat_splits.get(context)
        if split is None:  # a chat context followed by text lm_eval appended (gen_prefix)
            for rendered, (pre, pro) in self._chat_splits.items():
                if context.startswith(rendered):
                    split = pre, pro + self.tokenizer.encode(context[len(rendered):])
                    break
        if split is not None:
            prefix, prompt = list(split[0]), list(split[1])
        else:
            head, question = "", context
            if self.split_fewshot and self.fewshot_delimiter:
                cut = context.rfind(self.fewshot_delimiter)
                if cut >= 0:
                    cut += len(self.fewshot_delimiter)
                    head, question = context[:cut], context[cut:]
            if self.system_prompt:
                head = self.system_prompt + self.system_delimiter + head
            prefix = self.tokenizer.encode(head) if head else []
            prompt = self.tokenizer.encode(question)
            if not prompt:  # nothing after the cut: the whole context is the prompt
                prefix, prompt = [], self.tokenizer.encode(
                    (self.system_prompt + self.system_delimiter if self.system_prompt
                     else "") + context)
        if self.add_bos_token and self.tokenizer.bos_token_id is not None:
            if prefix:
                prefix = [self.tokenizer.bos_token_id] + prefix
            else:
                prompt = [self.tokenizer.bos_token_id] + prompt
        return self._fit(prefix, prompt)

    def _fit(self, prefix: list[int], prompt: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate to the model's max_seq_len (as lm_eval's HF models do)."""
        room = self.config.max_seq_len - self.gen_length
        if len(prefix) + len(prompt) <= room:
            return prefix, prompt
        if len(prefix) < room:
            return prefix, prompt[-(room - len(prefix)):]
        return [], (prefix + prompt)[-room:]

    def _finish(self, tokens: Sequence[int], until: Sequence[str]) -> str:
        tokens = list(tokens)
        if self.eos_token_id is not None and self.eos_token_id in tokens:
            tokens = tokens[:tokens.index(self.eos_token_id)]
        text = self.tokenizer.decode(tokens)
        cuts = [text.find(s) for s in until if s and s in text]
        return text[:min(cuts)] if cuts else text

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for every lm_eval `Instance` (`args = (context, gen_kwargs)`)."""
        reqs, untils = [], []
        for inst in requests:
            context, gen_kwargs = inst.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
            sampler = self.sampler
            if gen_kwargs.get("temperature") is not None:
                sampler = dataclasses.replace(
                    sampler, temperature=float(gen_kwargs["temperature"]))
            prefix, prompt = self.split_context(context)
            reqs.append(Request(prompt=prompt, prefix=prefix, gen_length=self.gen_length,
                                steps=self.steps, block_length=self.block_length,
                                policy=self.policy, sampler=sampler,
                                reuse_depth=self.reuse_depth,
                                refresh_interval=self.refresh_interval))
        outputs = []
        for inst, until, res in zip(requests, untils, self.engine.run(reqs), strict=True):
            if res.ok:
                text = self._finish(res.tokens.tolist(), until)
            else:
                self.failures += 1
                log.warning("bicache_jax: request failed, answering '': %s", res.error)
                text = ""
            outputs.append(text)
            if self.cache_hook is not None:
                self.cache_hook.add_partial("generate_until", inst.args, text)
        self._chat_splits.clear()
        return outputs

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        """Not available for a diffusion LM served by denoising (raises)."""
        raise NotImplementedError(_NOT_GENERATIVE.format(method="loglikelihood"))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        """Not available for a diffusion LM served by denoising (raises)."""
        raise NotImplementedError(_NOT_GENERATIVE.format(method="loglikelihood_rolling"))

    def summary(self) -> dict:
        """The engine's counters (batches, compiles, store hits) as JSON-ready data."""
        return {**self.engine.summary(), "failures": self.failures}


def main() -> None:
    """lm_eval's command line with the "bicache_jax" model registered."""
    if not HAVE_LM_EVAL:
        raise SystemExit("lm_eval is not installed: pip install lm-eval")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = ["HAVE_LM_EVAL", "MODEL_NAME", "BiCacheLM", "main"]

if __name__ == "__main__":
    from bicache_jax.lm_eval_adapter import main as _main  # the registered module

    _main()
