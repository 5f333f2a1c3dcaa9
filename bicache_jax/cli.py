"""`bicache-jax`: the command line.

  bicache-jax demo                       shared-prefix workload, every policy, on the
                                         built-in default model
  bicache-jax generate --model M ...     generate from text or token ids
  bicache-jax convert HF_DIR OUT_DIR     HuggingFace LLaDA/Dream folder -> our checkpoint
  bicache-jax profile --model M --data pairs.jsonl
                                         build BiCache's r -> b table
  bicache-jax bench --scale cpu          throughput sweep of every policy
  bicache-jax eval                       accuracy of every policy on the task suite
  bicache-jax train --out DIR            train the small default model
  bicache-jax serve [--model M]          OpenAI-compatible HTTP server (chat, completions,
                                         streaming, /metrics)

Run `bicache-jax COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"


def _add_sampler_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("decoding")
    g.add_argument("--gen-length", type=int, default=32, help="tokens to generate")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: "
                   "gen-length)")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length (default: gen-length)")
    g.add_argument("--policy", default="none", help="cache policy: none, naive_prefix, "
                   "bicache, fastdllm_prefix, fastdllm_dual, bicache_dual, dkv_decode, "
                   "dkv_greedy, dkv_prefill, dkv_pd")
    g.add_argument("--reuse-depth", type=int, default=None,
                   help="BiCache depth b (default: from the model's profiler table)")
    g.add_argument("--refresh-interval", type=int, default=None,
                   help="steps between refreshes (BiCache default 16, dKV default 8)")
    g.add_argument("--window-size", type=int, default=None,
                   help="dkv_greedy: masked neighbours recomputed around each next token")
    g.add_argument("--remasking", default=None,
                   help="low_confidence (default; random for dkv_greedy), random (LLaDA) "
                        "or origin, maskgit_plus, topk_margin, entropy (Dream)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--alg-temp", type=float, default=0.0)
    g.add_argument("--threshold", type=float, default=None,
                   help="Fast-dLLM parallel decoding: unmask all tokens above this "
                        "confidence (at least one per step)")
    g.add_argument("--cfg-scale", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)


def _sampler(args):
    from .policies import get_policy
    from .sampling import SamplerConfig

    remasking = args.remasking or ("random" if get_policy(args.policy).fixed_order
                                   else "low_confidence")
    return SamplerConfig(remasking=remasking, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, alg_temp=args.alg_temp,
                         threshold=args.threshold, cfg_scale=args.cfg_scale)


def _load_model(path: str | None):
    """(params, config, depth_table, tokenizer or None) from a checkpoint or HF folder."""
    from .checkpoint import load

    path = Path(path) if path else DEFAULT_MODEL
    if not path.exists():
        sys.exit(f"error: no model at {path} (pass --model PATH: an HF folder or a "
                 f"checkpoint written by `bicache-jax convert`)")
    params, config, table = load(path)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(path)
    return params, config, table, tokenizer


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def cmd_generate(args) -> int:
    import jax

    from .generate import Prompt, generate
    from .prefix_store import PrefixStore

    params, config, table, tok = _load_model(args.model)
    if args.prompt_ids is not None:
        prompt = _ids(args.prompt_ids)
        prefix = _ids(args.prefix_ids) if args.prefix_ids else []
    elif args.prompt is not None:
        if tok is None:
            sys.exit("error: this model has no tokenizer.json; use --prompt-ids")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        if args.raw:
            prefix, prompt = tok.encode(args.system or ""), tok.encode(args.prompt)
        else:
            prefix, prompt = tok.split_conversation(messages)
    else:
        sys.exit("error: give --prompt TEXT or --prompt-ids IDS")
    store = PrefixStore(depth_table=table)
    t0 = time.perf_counter()
    out = generate(params, [Prompt(prompt=prompt, prefix=prefix)], store, config=config,
                   gen_length=args.gen_length, steps=args.steps,
                   block_length=args.block_length, policy=args.policy,
                   sampler=_sampler(args), key=jax.random.key(args.seed),
                   reuse_depth=args.reuse_depth, refresh_interval=args.refresh_interval,
                   window_size=args.window_size)
    seconds = time.perf_counter() - t0
    tokens = out.tokens[0].tolist()
    text = tok.decode(tokens) if tok is not None else None
    if args.json:
        print(json.dumps({
            "tokens": tokens, "text": text, "nfe": int(out.nfe[0]), "seconds": seconds,
            "policy": args.policy, "prefix_len": len(prefix), "prompt_len": len(prompt),
            "reuse_depth": int(out.stats["reuse_depth"][0]),
            "rows_computed": int(out.stats["rows_computed"][0]),
            "compiles": out.stats["compiles"]}))
    else:
        print(text if text is not None else " ".join(map(str, tokens)))
        print(f"[{args.policy}: {out.nfe[0]} forwards, {seconds:.2f}s incl. compile]",
              file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import save
    from .convert import convert_hf

    config, params = convert_hf(args.hf_dir, dtype=args.dtype, progress=True)
    save(args.out_dir, params, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = Path(args.hf_dir) / name
        if src.exists():
            (Path(args.out_dir) / name).write_bytes(src.read_bytes())
    print(f"wrote {args.out_dir} ({config.layout}, {config.n_layers} layers, "
          f"{config.param_count() / 1e6:.1f}M params, {args.dtype})")
    return 0


def cmd_profile(args) -> int:
    from .profiler import profile, read_pairs

    params, config, _, _ = _load_model(args.model)
    result = profile(params, config, read_pairs(args.data), threshold=args.threshold,
                     min_samples=args.min_samples)
    out = Path(args.out) if args.out else Path(args.model or DEFAULT_MODEL) / \
        "bicache_table.json"
    result.save(out)
    print(f"r -> b table: {result.table}\nwrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, requests=args.requests)


def cmd_serve(args) -> int:
    from .server import ServerSettings, load_served_model, random_model, serve

    if args.model is None and not DEFAULT_MODEL.exists():
        print("No trained default model found: serving a small RANDOM-WEIGHT model on the "
              "task suite's tokenizer (its replies are noise; pass --model PATH).",
              file=sys.stderr)
        model = random_model(args.seed)
    else:
        model = load_served_model(args.model or DEFAULT_MODEL)
    if args.model_name:
        model = dataclasses.replace(model, name=args.model_name)
    settings = ServerSettings(
        policy=args.policy, max_batch=args.max_batch, store_budget=args.store_budget,
        max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
        block_length=args.block_length, reuse_depth=args.reuse_depth,
        batch_window_s=args.batch_window_ms / 1000, max_queue=args.max_queue, seed=args.seed)
    return serve(model, settings, host=args.host, port=args.port, log_level=args.log_level)


def cmd_bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from .evaluate import main as eval_main

    return eval_main(argv)


def cmd_train(argv: list[str]) -> int:
    from .train import train_main

    train_main(argv)
    return 0


# Commands with their own argument parser: everything after the name is theirs (argparse's
# REMAINDER would drop a leading option such as `eval --n-per-family 4`).
DELEGATED = {"bench": (cmd_bench, "throughput sweep (see bench --help)"),
             "eval": (cmd_eval, "accuracy of every policy (see eval --help)"),
             "train": (cmd_train, "train the small default model (see train --help)")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bicache-jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="shared-prefix workload with every policy")
    p.add_argument("--model", help="checkpoint or HF folder (default: built-in model)")
    p.add_argument("--requests", type=int, default=48, help="requests to serve")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate from text or token ids")
    p.add_argument("--model", help="checkpoint or HF folder (default: built-in model)")
    p.add_argument("--prompt", help="user message (text; needs a tokenizer)")
    p.add_argument("--system", help="system prompt: the shared prefix")
    p.add_argument("--raw", action="store_true", help="no chat template: prefix = system "
                   "text, prompt = prompt text")
    p.add_argument("--prompt-ids", help="prompt token ids, space or comma separated")
    p.add_argument("--prefix-ids", help="shared prefix token ids")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="HF LLaDA/Dream folder -> bicache_jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("profile", help="build BiCache's r -> b table")
    p.add_argument("--model", help="checkpoint or HF folder (default: built-in model)")
    p.add_argument("--data", required=True,
                   help='JSONL, one {"prefix": [ids], "prompt": [ids]} per line')
    p.add_argument("--threshold", type=float, default=0.97)
    p.add_argument("--min-samples", type=int, default=1,
                   help="skip ratio buckets with fewer samples")
    p.add_argument("--out", help="table JSON (default: MODEL/bicache_table.json)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--model", help="checkpoint or HF folder with tokenizer.json (default: "
                   "built-in model)")
    p.add_argument("--model-name", help="the model id clients send (default: the folder "
                   "name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", default="bicache_dual", help="default cache policy")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch")
    p.add_argument("--store-budget", type=int, default=5000,
                   help="prefix store budget in tokens")
    p.add_argument("--max-tokens", type=int, default=32, help="default max_tokens")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="the most max_tokens a request may ask")
    p.add_argument("--block-length", type=int, default=32,
                   help="default semi-autoregressive block (one SSE event each)")
    p.add_argument("--reuse-depth", type=int, default=None,
                   help="BiCache depth when the model has no profiler table (default: half "
                        "the layers)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="wait this long for requests to batch with the first")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting before 429")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; see main
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]][0](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
