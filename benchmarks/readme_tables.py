"""Regenerate the README's result tables from the JSON under benchmarks/results/.

    python benchmarks/readme_tables.py

Replaces the text between `<!-- results:start -->` and `<!-- results:end -->` in README.md,
so every number quoted there comes from a result file, never typed by hand.
"""

import json
from pathlib import Path

from bicache_jax import bench, evaluate

ROOT = Path(__file__).parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def throughput_section(path: Path) -> str:
    result = json.loads(path.read_text())
    s = result["settings"]
    head = (f"### Throughput: `{path.name}`\n\n"
            f"Device: {result['device']['device_kind']} ({result['device']['platform']}), "
            f"jax {result['jax_version']}, commit `{result['git_commit'][:10]}`, "
            f"model `{s['model']}` ({result['weights']}), gen_length {s['gen_length']}, "
            f"{s['steps']} steps, block {s['block_length']}, refresh every "
            f"{s['refresh_interval']}, prompt {s['prompt_len']} tokens; peak "
            f"{result['peak_tflops']:.3g} TFLOP/s ({result['peak_source']}). `floor s` = "
            f"FLOPs the call must do / peak. BiCache reuse depth b = "
            f"{sorted({r['reuse_depth'] for r in result['results'] if 'bicache' in r['policy']})}"
            f" of {result['model_config']['n_layers']} layers.\n\n")
    speed = bench.speedups(result)
    lines = ["| pair | prefix ratio % | batch | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['ratio']} | {r['batch']} | {r['speedup']:.2f}x |"
              for r in speed]
    return head + "\n".join(lines) + "\n\n<details><summary>every configuration</summary>\n\n" \
        + bench.markdown_table(result).split("\n\n| pair")[0] + "\n\n</details>\n"


def paired_section(path: Path) -> str:
    result = json.loads(path.read_text())
    s = result["settings"]
    return (f"### Shared-prefix throughput, policies interleaved: `{path.name}`\n\n"
            f"Device: {result['device']['device_kind']} ({result['machine']['cpu_count']} "
            f"cores), jax {result['jax_version']}, commit `{result['git_commit'][:10]}`, model "
            f"`{s['model']}` ({result['weights']}), gen_length {s['gen_length']}, "
            f"{s['steps']} steps, blocks of {s['block_length']}, {s['repeats']} requests per "
            f"policy, each repeat sending one request through every policy in turn; speedup ="
            f" median of the per-repeat time ratios. Float32 matmul peak measured in the same "
            f"run: {1000 * result['peak_tflops']:.0f} GFLOP/s"
            + (f", memory bandwidth {result['memory_gbps']:.1f} GB/s. "
               f"{result['flop_bound']} {result['roofline_bound']}\n\n"
               if "memory_gbps" in result else f". {result['flop_bound']}\n\n")
            + bench.paired_markdown(result) + "\n")


def prefix_memory_section(path: Path) -> str:
    result = json.loads(path.read_text())
    lines = ["| policy | reuse depth | prefix KV held (MiB) | one copy per request (MiB) |",
             "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['reuse_depth']} | {r['prefix_cache_bytes'] / 2**20:.1f} "
              f"| {r['per_request_layout_bytes'] / 2**20:.1f} |" for r in result["results"]]
    return (f"### Prefix KV of a batch sharing one prefix: `{path.name}`\n\n"
            f"Batch {result['batch']}, one {result['prefix_len']}-token prefix, model "
            f"`{result['model']}` ({result['dtype']}), commit `{result['git_commit'][:10]}`. "
            "The store entry is held once for the batch; BiCache adds the per-request deep "
            "K/V its refreshes keep. The last column is the earlier layout, which gathered "
            "the whole entry into every request's row.\n\n" + "\n".join(lines) + "\n")


def _name(path: Path) -> str:
    """A result file's name under benchmarks/results/ (a candidate's folder included)."""
    return str(path.relative_to(ROOT / "benchmarks" / "results"))


def eval_section(path: Path) -> str:
    result = json.loads(path.read_text())
    return (f"### Accuracy: `{_name(path)}`\n\n{result['n_instances']} held-out instances, "
            f"device {result['device']}, jax {result['jax_version']}, commit "
            f"`{result['git_commit'][:10]}`, r -> b table {result['depth_table']}.\n\n"
            + evaluate.markdown_table(result) + "\n\nBy shared-prefix ratio "
            "r = p / (p + u), % (instances per bucket in the head):\n\n"
            + evaluate.markdown_ratio_table(result) + "\n")


def default_model_section(model: Path) -> str:
    """The shipped model's training run: its monitor curve and the step's speed."""
    tc = json.loads((model / "train_config.json").read_text())
    speed = json.loads((model / "throughput.json").read_text())
    curve = [json.loads(line) for line in (model / "eval.jsonl").read_text().splitlines()]
    fams = [f for f in curve[0] if f not in ("step", "all")]
    lines = ["| update | " + " | ".join(str(r["step"]) for r in curve) + " |",
             "|" + "---|" * (len(curve) + 1)]
    lines += [f"| {f} % | " + " | ".join(f"{100 * r[f]:.0f}" for r in curve) + " |"
              for f in fams]
    return (f"### Training the default model: `{model.relative_to(ROOT)}`\n\n"
            f"{tc['steps']} updates of {tc['batch_size']} rows, d{tc['d_model']} x "
            f"{tc['n_layers']} layers; training loop {speed['wall_seconds'] / 60:.1f} min, "
            f"step {speed['tokens_per_s']} tokens/s, {speed['gflops_per_s']} GFLOP/s = "
            f"{100 * speed['fraction_of_peak']:.0f}% of the {speed['matmul_peak_gflops_per_s']}"
            " GFLOP/s float32 matmul peak measured at its start. Held-out accuracy of the "
            "monitor (32 instances per family, no cache):\n\n" + "\n".join(lines) + "\n")


def profile_threshold_section(path: Path) -> str:
    import profile_threshold

    result = json.loads(path.read_text())
    cal, c = result["calibration"], result["model_config"]
    return (f"### Reuse depth and profiler threshold: `{_name(path)}`\n\nModel "
            f"`{result['model']}` (d{c['d_model']} x {c['n_layers']} layers), device "
            f"{result['device']}, jax {result['jax_version']}, commit "
            f"`{result['git_commit'][:10]}`; {cal['n']} requests from training-range seeds "
            f"{cal['seed']}+ ({cal['questions_per_prefix']} per prefix), profiler on "
            f"{result['profile_pairs_per_family']} pairs per family. `bicache` at every fixed "
            "depth, then with the table each threshold gives (a batch of 16 runs at its "
            "smallest depth); accuracy % by prefix ratio r (with the canvas), instances per "
            f"bucket {result['n_by_ratio']}. Smallest threshold within "
            f"{result['tolerance_points']} points of `none`: "
            f"{result['recommended_threshold'] or 'none of them'}.\n\n"
            + profile_threshold.markdown_table(result) + "\n")


def learnability_section(path: Path) -> str:
    import learnability

    result = json.loads(path.read_text())
    return (f"### Learnability probes: `{path.name}`\n\nDevice {result['device']}, jax "
            f"{result['jax_version']}, batch {result['batch']}, {result['optimizer']}; "
            "accuracy of the first canvas slot on 128 held-out rows, whole canvas "
            "masked.\n\n" + learnability.markdown_table(result) + "\n")


def lr_sweep_section(path: Path) -> str:
    import lr_sweep

    result = json.loads(path.read_text())
    r = result["recipe"]
    return (f"### Learning-rate sweep: `{path.name}`\n\nDevice {result['device']}, jax "
            f"{result['jax_version']}, commit `{result['git_commit'][:10]}`, matmul peak "
            f"{result['matmul_peak_gflops_per_s']} GFLOP/s; d{r['d_model']} L{r['n_layers']} "
            f"H{r['n_heads']}, batch {r['batch_size']}, {r['steps']} updates ({r['warmup']} "
            f"warm-up), contexts {r['context_min']}-{r['context_max']}, held-out accuracy on "
            f"{result['eval_n_per_family']} instances per family. Best held-out accuracy: lr "
            f"{result['best_accuracy_lr']:g}. {result.get('note', '')}\n\n"
            + lr_sweep.markdown_table(result) + "\n")


def serve_load_section(path: Path) -> str:
    import serve_load

    result = json.loads(path.read_text())
    s = result["settings"]
    return (f"### Serving under load: `{path.name}`\n\nDevice {result['device']['device_kind']}"
            f" ({result['device']['platform']}), jax {result['jax_version']}, commit "
            f"`{result['git_commit'][:10]}`, model `{result['model']}` ({result['weights']}); "
            f"{s['clients']} concurrent clients, {s['histories']} shared histories, system "
            f"prompt {s['system_words']} words, shared prefix "
            f"{100 * result['prefix_share']:.0f}% of the context, max_tokens "
            f"{s['max_tokens']}, block {s['block_length']}, max batch {s['max_batch']}.\n\n"
            + serve_load.markdown_table(result) + "\n")


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    parts = [paired_section(p) if "pairs" in json.loads(p.read_text()) else throughput_section(p)
             for p in sorted(results.glob("throughput_*.json"))]
    parts += [prefix_memory_section(p) for p in sorted(results.glob("prefix_memory_*.json"))]
    model = ROOT / "bicache_jax" / "assets" / "default_model"
    parts += [default_model_section(model)] if model.is_dir() else []
    parts += [eval_section(p) for p in sorted(results.glob("eval_*.json"))]
    parts += [profile_threshold_section(p) for p in sorted(
        results.glob("profile_threshold_*.json"))]
    parts += [eval_section(p) for p in sorted(results.glob("candidate_*/eval.json"))]
    parts += [profile_threshold_section(p) for p in sorted(
        results.glob("candidate_*/profile_threshold_*.json"))]
    parts += [learnability_section(p) for p in sorted(results.glob("learnability_*.json"))]
    parts += [lr_sweep_section(p) for p in sorted(results.glob("lr_sweep_*.json"))]
    parts += [serve_load_section(p) for p in sorted(results.glob("serve_load_*.json"))]
    readme = ROOT / "README.md"
    text = readme.read_text()
    before, rest = text.split(START)
    _, after = rest.split(END)
    readme.write_text(before + START + "\n" + "\n".join(parts) + END + after)
    print(f"updated {readme} from {len(parts)} result file(s)")


if __name__ == "__main__":
    main()
