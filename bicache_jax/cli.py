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
import gc
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .cli_args import HelpFormatter, int_in, unit_float
from .policies import POLICIES, get_policy
from .sampling import REMASKING

# Bad input or usage: exit status 2 with one line (argparse's own errors exit 2 too).
# A failure while running (I/O, ...) exits 1.
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _add_sampler_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("decoding")
    g.add_argument("--gen-length", type=int_in(1), default=32, help="tokens to generate")
    g.add_argument("--steps", type=int_in(1), default=None,
                   help="denoising steps (None: gen-length)")
    g.add_argument("--block-length", type=int_in(1), default=None,
                   help="semi-autoregressive block length (None: gen-length)")
    g.add_argument("--policy", default="none", choices=sorted(POLICIES), metavar="POLICY",
                   help=f"cache policy: {', '.join(POLICIES)}")
    g.add_argument("--reuse-depth", type=int_in(0), default=None,
                   help="BiCache depth b (None: from the model's profiler table)")
    g.add_argument("--refresh-interval", type=int_in(1), default=None,
                   help="steps between refreshes (None: BiCache 16, dkv_decode/dkv_pd 8, "
                        "dkv_greedy 2)")
    g.add_argument("--window-size", type=int_in(0), default=None,
                   help="dkv_greedy: masked neighbours recomputed around each next token "
                        "(None: 0)")
    g.add_argument("--remasking", default=None, choices=REMASKING, metavar="RULE",
                   help=f"{', '.join(REMASKING)} (None: low_confidence; random for "
                        f"dkv_greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=None, help="Dream: nucleus sampling")
    g.add_argument("--top-k", type=int_in(1), default=None, help="Dream: top-k sampling")
    g.add_argument("--alg-temp", type=float, default=0.0,
                   help="Dream: temperature of the confidence ranking")
    g.add_argument("--threshold", type=unit_float, default=None,
                   help="Fast-dLLM parallel decoding: unmask all tokens above this "
                        "confidence (at least one per step)")
    g.add_argument("--cfg-scale", type=float, default=0.0,
                   help="LLaDA classifier-free guidance scale (policy none)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed")


def _sampler(args):
    from .sampling import SamplerConfig

    remasking = args.remasking or ("random" if get_policy(args.policy).fixed_order
                                   else "low_confidence")
    return SamplerConfig(remasking=remasking, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, alg_temp=args.alg_temp,
                         threshold=args.threshold, cfg_scale=args.cfg_scale)


def _ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{flag}: token ids must be integers, got {text!r}") from None


def cmd_generate(args) -> int:
    import jax

    from .checkpoint import load_model
    from .generate import Prompt, check_policy_settings, generate
    from .prefix_store import PrefixStore

    # Everything that needs no model first: a bad flag must not cost a conversion.
    sampler = _sampler(args)
    check_policy_settings(get_policy(args.policy), args.reuse_depth, args.refresh_interval,
                          args.window_size)
    if args.prompt_ids is None and args.prompt is None:
        raise ValueError("give --prompt TEXT or --prompt-ids IDS")
    if args.prompt_ids is not None:
        prompt = _ids(args.prompt_ids, "--prompt-ids")
        prefix = _ids(args.prefix_ids, "--prefix-ids") if args.prefix_ids else []
    params, config, table, tok = load_model(args.model)
    if args.prompt_ids is None:
        if tok is None:
            raise ValueError("this model has no tokenizer.json; use --prompt-ids")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        if args.raw:
            prefix, prompt = tok.encode(args.system or ""), tok.encode(args.prompt)
        else:
            prefix, prompt = tok.split_conversation(messages)
    store = PrefixStore(depth_table=table)
    t0 = time.perf_counter()
    out = generate(params, [Prompt(prompt=prompt, prefix=prefix)], store, config=config,
                   gen_length=args.gen_length, steps=args.steps,
                   block_length=args.block_length, policy=args.policy,
                   sampler=sampler, key=jax.random.key(args.seed),
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


def _in_gc_callback(frame) -> bool:
    """Whether `frame` runs inside a `gc.callbacks` function (jax registers one)."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def cmd_convert(args) -> int:
    from .checkpoint import convert_checkpoint

    out = Path(args.out_dir)
    if out.exists() and not args.overwrite:  # before minutes of converting
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    signals = []

    def interrupt(signum, frame):  # SIGTERM unwinds like Ctrl-C, so save() cleans up
        signals.append(signum)
        if _in_gc_callback(frame):  # Python would print and swallow it there: ask again
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
            return
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        config = convert_checkpoint(args.hf_dir, out, dtype=args.dtype,
                                    overwrite=args.overwrite)
        if signals:  # the KeyboardInterrupt was swallowed (by a C extension or a __del__)
            shutil.rmtree(out, ignore_errors=True)
            raise KeyboardInterrupt
    except BaseException:
        # An interrupt inside a C extension (TensorStore) may surface as another error.
        if not signals:
            raise
        print(f"interrupted: nothing written to {out} (partial files removed)",
              file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM
                          else signal.default_int_handler)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = Path(args.hf_dir) / name
        if src.exists():
            (out / name).write_bytes(src.read_bytes())
    print(f"wrote {out} ({config.layout}, {config.n_layers} layers, "
          f"{config.param_count() / 1e6:.1f}M params, {args.dtype})")
    return 0


def cmd_profile(args) -> int:
    from .checkpoint import DEFAULT_MODEL, TABLE_FILE, load_model
    from .profiler import profile, read_pairs

    model = Path(args.model) if args.model else DEFAULT_MODEL
    out = Path(args.out) if args.out else model / TABLE_FILE
    if out.exists() and not args.overwrite:  # before loading the model
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    pairs = read_pairs(args.data)
    params, config, _, _ = load_model(model)
    try:
        result = profile(params, config, pairs, threshold=args.threshold,
                         min_samples=args.min_samples)
    except ValueError as e:
        raise ValueError(f"{args.data}: {e}") from None
    result.save(out)
    where = ("; `bj.load` and `--model` read it from there" if out == model / TABLE_FILE
             else f"; copy it to {model / TABLE_FILE} for `bj.load` to find it")
    print(f"r -> b table: {result.table}\nwrote {out}{where}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, requests=args.requests)


def cmd_serve(args) -> int:
    from .checkpoint import DEFAULT_MODEL
    from .server import ServerSettings, load_served_model, random_model, serve

    model_dir = Path(args.model or DEFAULT_MODEL)
    if not model_dir.exists() and args.model is None:
        print("No trained default model found: serving a small RANDOM-WEIGHT model on the "
              "task suite's tokenizer (its replies are noise; pass --model PATH).",
              file=sys.stderr)
        model = random_model(args.seed)
    else:
        model = load_served_model(model_dir)
    if args.model_name:
        model = dataclasses.replace(model, name=args.model_name)
    max_tokens = args.max_tokens
    trained = model_dir / "train_config.json"
    if max_tokens is None:  # a model of our trainer fills the canvas it was trained on
        max_tokens = (json.loads(trained.read_text())["gen_length"] if trained.is_file()
                      else 32)
    settings = ServerSettings(
        policy=args.policy, max_batch=args.max_batch, store_budget=args.store_budget,
        max_tokens=max_tokens, max_tokens_limit=args.max_tokens_limit,
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

MODEL_HELP = "checkpoint or HF folder (None: the built-in model)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bicache-jax", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, text):
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    p = command("demo", "shared-prefix workload with every policy")
    p.add_argument("--model", help=MODEL_HELP + ", or 'random'")
    p.add_argument("--requests", type=int_in(1), default=48, help="requests to serve")
    p.set_defaults(func=cmd_demo)

    p = command("generate", "generate from text or token ids")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--prompt", help="user message (text; needs a tokenizer)")
    p.add_argument("--system", help="system prompt: the shared prefix")
    p.add_argument("--raw", action="store_true", help="no chat template: prefix = system "
                   "text, prompt = prompt text")
    p.add_argument("--prompt-ids", help="prompt token ids, space or comma separated")
    p.add_argument("--prefix-ids", help="shared prefix token ids")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_generate)

    p = command("convert", "HF LLaDA/Dream folder -> bicache_jax checkpoint")
    p.add_argument("hf_dir", help="HF folder (config.json + safetensors)")
    p.add_argument("out_dir", help="checkpoint folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype of the stored params")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.set_defaults(func=cmd_convert)

    p = command("profile", "build BiCache's r -> b table")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--data", required=True,
                   help='JSONL, one {"prefix": [ids], "prompt": [ids]} per line')
    p.add_argument("--threshold", type=unit_float, default=0.97,
                   help="a layer is reusable while its mean K/V cosine stays above this")
    p.add_argument("--min-samples", type=int_in(1), default=1,
                   help="skip ratio buckets with fewer samples")
    p.add_argument("--out", help="table JSON (None: MODEL/bicache_table.json, where "
                                 "`bj.load(MODEL)` finds it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table")
    p.set_defaults(func=cmd_profile)

    p = command("serve", "OpenAI-compatible HTTP server")
    p.add_argument("--model", help="checkpoint or HF folder with tokenizer.json (None: the "
                   "shipped default model)")
    p.add_argument("--model-name", help="the model id clients send (None: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="port to listen on")
    p.add_argument("--policy", default="bicache_dual", choices=sorted(POLICIES),
                   metavar="POLICY", help="default cache policy: " + ", ".join(sorted(POLICIES)))
    p.add_argument("--max-batch", type=int_in(1), default=8, help="largest batch")
    p.add_argument("--store-budget", type=int_in(1), default=5000,
                   help="prefix store budget in tokens")
    p.add_argument("--max-tokens", type=int_in(1), default=None,
                   help="default max_tokens (None: the canvas a `bicache-jax train` model "
                        "was trained on, from its train_config.json; else 32)")
    p.add_argument("--max-tokens-limit", type=int_in(1), default=1024,
                   help="the most max_tokens a request may ask")
    p.add_argument("--block-length", type=int_in(1), default=32,
                   help="default semi-autoregressive block (one SSE event each)")
    p.add_argument("--reuse-depth", type=int_in(0), default=None,
                   help="BiCache depth when the model has no profiler table (None: half "
                        "the layers)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="wait this long for requests to batch with the first")
    p.add_argument("--max-queue", type=int_in(1), default=256,
                   help="requests waiting before 429")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampler")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=cmd_serve)

    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; see main
    return ap


def main(argv=None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failure while running, 2 bad
    input or usage, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]][0](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT as e:  # bad input: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...: the run failed, not the input
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
