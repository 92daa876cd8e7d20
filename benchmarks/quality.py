"""Quality of expert removal on the bundled demo MoE (the tables in benchmarks/RESULTS.md).

For 25% and 50% expert removal, every scorer with per-layer `bottom` and with `model-wide`
selection (the same total removed), calibrated on the mixed set and on each domain alone, this
prints the perplexity on each domain's held-out evaluation set as markdown tables. With
`--merge` it also merges (REAM, `mlxfun merge`, group sizes 16 and 0) at the same ratios and compares with REAP
pruning, and reports the merge time per layer against the collect time of the same tokens.

    python benchmarks/quality.py [--eval-tokens 8192] [--ratios 0.25,0.5] [--merge]

Statistics come from `mlxfun collect` on the code and the prose calibration sets; the mixed
statistics are their `mlxfun stats merge` (exactly one collect over both). Removal is applied in
memory by excluding the removed experts from routing (a -inf router bias), which the prune tests
prove gives the logits of the pruned model; merged models are written by `mlxfun merge` and
evaluated as loaded from disk.
"""

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlxfun.core import plugins
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model
from mlxfun.core.stats import load_stats

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DATA = ROOT / "demo" / "data"
SCORERS = ["random", "frequency", "weighted_frequency", "ean_sum", "ean_mean", "reap"]
CALIBRATIONS = ["mixed", "code", "prose"]
DOMAINS = ["code", "prose"]


def mlxfun(*args) -> str:
    command = [sys.executable, "-m", "mlxfun.cli", *map(str, args)]
    result = subprocess.run(command, text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"quality: mlxfun {args[0]} failed:\n{result.stderr}")
    return result.stdout


def perplexity(model, windows: np.ndarray, batch_size: int = 8) -> float:
    total = 0.0
    for start in range(0, len(windows), batch_size):
        tokens = mx.array(windows[start : start + batch_size])
        logits = model(tokens[:, :-1])
        total += nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def eval_windows(tokenizer, domain: str, budget: int, length: int = 257) -> np.ndarray:
    """The first `budget` tokens of the domain's evaluation set as full windows of `length`."""
    samples = load_samples([DATA / f"eval_{domain}.jsonl"])
    ids = [t for seq in tokenize_samples(samples, tokenizer, 10**9) for t in seq][:budget]
    count = len(ids) // length
    return np.array(ids[: count * length], dtype=np.int32).reshape(count, length)


def set_removed(layers, removed: dict) -> None:
    """Exclude experts from routing with a -inf bias on each (Linear) router."""
    for layer in layers:
        bias = np.zeros(layer.num_experts, dtype=np.float32)
        bias[list(removed.get(layer.position, []))] = -np.inf
        layer.block.gate.bias = mx.array(bias)


def collect_all(workdir: Path) -> tuple[dict, dict]:
    """Stats files per calibration set and the collect wall time per domain."""
    files, seconds = {}, {}
    for domain in DOMAINS:
        files[domain] = workdir / f"{domain}.npz"
        started = time.perf_counter()
        mlxfun("collect", "--model", MODEL, "--dataset", DATA / f"calib_{domain}.jsonl",
               "--output", files[domain], "--seed", "0")  # fmt: skip
        seconds[domain] = time.perf_counter() - started
    files["mixed"] = workdir / "mixed.npz"
    mlxfun("stats", "merge", files["code"], files["prose"], "-o", files["mixed"])
    return files, seconds


def removed_perplexity(model, layers, selector, scores, total, top_k, evals) -> dict:
    selection = selector.select(scores, n=total, top_k=top_k)
    set_removed(layers, selection.removed)
    return {d: perplexity(model, w) for d, w in evals.items()}


def random_row(model, layers, selector, shape, total, top_k, evals, seeds: int) -> dict:
    """Random removal does not depend on the calibration set: the mean over `seeds` draws,
    with the smallest and largest perplexity of each domain."""
    runs = []
    for seed in range(seeds):
        scores = np.random.default_rng(seed).random(shape)
        runs.append(removed_perplexity(model, layers, selector, scores, total, top_k, evals))
    row = {d: float(np.mean([r[d] for r in runs])) for d in DOMAINS}
    row["spread"] = {d: (min(r[d] for r in runs), max(r[d] for r in runs)) for d in DOMAINS}
    return row


def removal_grid(model, layers, stats, evals, ratios, random_seeds: int) -> list[dict]:
    top_k = layers[0].top_k
    num_experts = layers[0].num_experts
    rows = []
    for ratio in ratios:
        n = round(ratio * num_experts)
        for selector_name in ("bottom", "model-wide"):
            selector = plugins.get_selector(selector_name)
            total = n if selector_name == "bottom" else n * len(layers)
            shape = stats["mixed"].scores["reap"].shape
            random = random_row(model, layers, selector, shape, total, top_k, evals, random_seeds)
            for calibration in CALIBRATIONS:
                for scorer in SCORERS:
                    if scorer == "random":
                        ppl = random
                    else:
                        scores = stats[calibration].scores[scorer]
                        ppl = removed_perplexity(
                            model, layers, selector, scores, total, top_k, evals
                        )
                    rows.append(dict(ratio=ratio, selector=selector_name,
                                     calibration=calibration, scorer=scorer, **ppl))  # fmt: skip
                    print(f"  {ratio:.0%} {selector_name:10} {calibration:5} {scorer:18} "
                          f"code {ppl['code']:8.2f}  prose {ppl['prose']:8.2f}", flush=True)  # fmt: skip
    set_removed(layers, {})
    return rows


def merge_rows(workdir, stats_file, evals, ratios, group_sizes, max_tokens) -> tuple[list, dict]:
    """REAM merge at each ratio and group size (mixed calibration, REAP centroids), evaluated
    from disk, and the collect time of the same tokens for comparison."""
    from mlxfun.core.collect import collect_stats, with_seed
    from mlxfun.methods.ream import token_sample

    rows = []
    for ratio in ratios:
        for group_size in group_sizes:
            out = workdir / f"ream-{ratio}-{group_size}"
            report = json.loads(mlxfun(
                "merge", "--model", MODEL, "--stats", stats_file,
                "--dataset", DATA / "calib_mixed.jsonl", "--ratio", ratio,
                "--group-size", group_size, "--max-tokens", max_tokens, "--output", out, "--json",
            ))  # fmt: skip
            merged, _, _ = load_model(out)
            ppl = {d: perplexity(merged, w) for d, w in evals.items()}
            rows.append(dict(ratio=ratio, group_size=group_size, seconds=report["timings"],
                             tokens=report["tokens"], **ppl))  # fmt: skip
            print(f"  ream {ratio:.0%} C={group_size}: code {ppl['code']:.2f}  "
                  f"prose {ppl['prose']:.2f}; per layer "
                  f"{', '.join(f'{s:.1f}' for s in report['timings'])} s", flush=True)  # fmt: skip
            del merged
    # the same tokens as merge samples, through collect (all scorers, hooked forward)
    model, tokenizer, config = load_model(MODEL)
    samples = load_samples([DATA / "calib_mixed.jsonl"])
    sequences = token_sample(tokenize_samples(samples, tokenizer, max_tokens), max_tokens)
    scorers = with_seed([plugins.get_scorer(n) for n in SCORERS], 0)
    adapter = plugins.adapter_for_config(config)
    started = time.perf_counter()
    collect_stats(model, adapter, sequences, scorers, batch_size=4, progress=False)
    collect = {"seconds": time.perf_counter() - started, "tokens": sum(map(len, sequences))}
    return rows, collect


def cell(value: float, dense: float, spread=None) -> str:
    text = f"{value:.1f} ({value / dense - 1:+.0%})"
    if spread is not None:
        text += f" [{spread[0] / dense - 1:+.0%} to {spread[1] / dense - 1:+.0%}]"
    return text


def print_report(opts, dense, rows, merged, collect, elapsed) -> None:
    machine = f"{platform.system()} {platform.machine()}, {platform.processor() or 'CPU'}"
    print(f"\n## Demo MoE quality ({datetime.date.today()}, {machine}, mlx {mx.__version__})\n")
    print(f"Perplexity on {opts.eval_tokens} held-out tokens per domain (change vs the "
          f"unpruned model). Unpruned: code {dense['code']:.1f}, prose {dense['prose']:.1f}. "
          f"random: mean over {opts.random_seeds} seeds [smallest to largest change]; it does "
          f"not depend on the calibration set.\n")  # fmt: skip
    for ratio in opts.ratios:
        for selector in ("bottom", "model-wide"):
            what = "per layer" if selector == "bottom" else "same total, across layers"
            print(f"### {ratio:.0%} of experts removed, `{selector}` ({what})\n")
            head = [f"{c} calib: {d}" for c in CALIBRATIONS for d in DOMAINS]
            print("| scorer | " + " | ".join(head) + " |")
            print("|---|" + "---:|" * len(head))
            for scorer in SCORERS:
                cells = []
                for calibration in CALIBRATIONS:
                    row = next(r for r in rows if (r["ratio"], r["selector"], r["calibration"],
                               r["scorer"]) == (ratio, selector, calibration, scorer))  # fmt: skip
                    spread = row.get("spread", {})
                    cells += [cell(row[d], dense[d], spread.get(d)) for d in DOMAINS]
                print(f"| {scorer} | " + " | ".join(cells) + " |")
            print()
    if merged:
        print("### REAM merge vs REAP prune (mixed calibration, `bottom`)\n")
        print("| removed | method | code | prose | seconds per layer |")
        print("|---:|---|---:|---:|---|")
        for ratio in opts.ratios:
            prune = next(r for r in rows if (r["ratio"], r["selector"], r["calibration"],
                         r["scorer"]) == (ratio, "bottom", "mixed", "reap"))  # fmt: skip
            print(f"| {ratio:.0%} | prune (reap) | {cell(prune['code'], dense['code'])} | "
                  f"{cell(prune['prose'], dense['prose'])} | - |")  # fmt: skip
            for m in (m for m in merged if m["ratio"] == ratio):
                per_layer = ", ".join(f"{s:.1f}" for s in m["seconds"])
                print(f"| {ratio:.0%} | merge (ream, group size {m['group_size']}) | "
                      f"{cell(m['code'], dense['code'])} | {cell(m['prose'], dense['prose'])} | "
                      f"{per_layer} |")  # fmt: skip
        mean_layer = float(np.mean([s for m in merged for s in m["seconds"]]))
        print(f"\nMerge samples {merged[0]['tokens']} calibration tokens. Collecting every "
              f"statistic on the same {collect['tokens']} tokens takes {collect['seconds']:.1f} s; "
              f"one merged layer takes {mean_layer:.1f} s on average, "
              f"{mean_layer / collect['seconds']:.1f}x that collect time.\n")  # fmt: skip
    print(f"(benchmark wall time {elapsed / 60:.1f} min)")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-tokens", type=int, default=8192, help="per domain")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--merge", action="store_true", help="also REAM-merge at each ratio")
    parser.add_argument("--merge-tokens", type=int, default=2048, help="merge's token sample")
    parser.add_argument(
        "--group-sizes", default="16,0", help="merge --group-size values (0: MC-SMoE style)"
    )
    parser.add_argument("--random-seeds", type=int, default=5, help="random baseline draws")
    opts = parser.parse_args()
    opts.ratios = [float(r) for r in opts.ratios.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlxfun-quality-") as tmp:
        workdir = Path(tmp)
        print("collecting statistics (mlxfun collect, stats merge) ...", flush=True)
        files, _ = collect_all(workdir)
        stats = {c: load_stats(f) for c, f in files.items()}
        model, tokenizer, config = load_model(MODEL)
        layers = plugins.adapter_for_config(config).moe_layers(model)
        evals = {d: eval_windows(tokenizer, d, opts.eval_tokens) for d in DOMAINS}
        dense = {d: perplexity(model, w) for d, w in evals.items()}
        print(f"unpruned: code {dense['code']:.2f}  prose {dense['prose']:.2f}", flush=True)
        rows = removal_grid(model, layers, stats, evals, opts.ratios, opts.random_seeds)
        del model
        merged, collect = [], None
        if opts.merge:
            group_sizes = [int(c) for c in opts.group_sizes.split(",")]
            merged, collect = merge_rows(
                workdir, files["mixed"], evals, opts.ratios, group_sizes, opts.merge_tokens
            )
    print_report(opts, dense, rows, merged, collect, time.perf_counter() - started)


if __name__ == "__main__":
    main()
