"""``mlxfun merge`` time for 4 vs 16 decoder layers of the same width: the cost per layer must
stay flat now that merging steps the calibration batches through the layers once.

    python benchmarks/merge_layers.py [--layers 4,16] [--max-tokens 1024] [--quadratic]

Builds seeded tiny-width qwen3_moe checkpoints (hidden 256, 16 experts top-2, byte tokenizer)
with each layer count, random REAP scores with the model's fingerprint, and merges half of the
experts of every layer (group size 0) on seeded word salad. Reports the wall time, the time per
MoE layer (total / layers) and the summed per-layer merge timings; the target is a per-layer
ratio 16/4 <= 1.25 (flat). ``--quadratic`` also times the former capture (the model run from the
first layer up to each block: the runner refused), for comparison.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARGS = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=128,
    rms_norm_eps=1e-6,
    vocab_size=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    norm_topk_prob=True,
)
WORDS = "the river cat sang def return value model layer expert router token memory".split()
FLAT_TARGET = 1.25


def checkpoint(work: Path, layers: int) -> tuple[Path, Path]:
    from mlxfun.core import plugins, slicing
    from mlxfun.core.config import read_config
    from mlxfun.core.stats import model_fingerprint, save_stats
    from mlxfun.core.testing import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint(
        work / f"model{layers}", "qwen3_moe", dict(ARGS, num_hidden_layers=layers)
    )
    config = read_config(model_dir)
    plans = slicing.layer_plans(
        slicing.model_skeleton(model_dir)[0], plugins.adapter_for_config(config)
    )
    scores = np.random.default_rng(0).random((len(plans), ARGS["num_experts"])) + 0.1
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    stats = work / f"stats{layers}.npz"
    save_stats(stats, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return model_dir, stats


def run(model_dir, stats, dataset, output, max_tokens) -> tuple[float, float]:
    from mlxfun.methods.ream import MergeRequest, merge

    request = MergeRequest(
        model=model_dir,
        stats=stats,
        dataset=[dataset],
        output=output,
        n=ARGS["num_experts"] // 2,
        group_size=0,
        max_tokens=max_tokens,
        progress=False,
    )
    start = time.perf_counter()
    summary = merge(request)
    return time.perf_counter() - start, sum(summary["timings"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="4,16")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--quadratic", action="store_true")
    opts = parser.parse_args()
    counts = [int(x) for x in opts.layers.split(",")]
    import os

    work = Path(tempfile.mkdtemp(prefix="mlxfun-merge-layers-"))
    rng = random.Random(0)
    dataset = work / "text.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n"
            for _ in range(40)
        )
    )
    load_before = os.getloadavg()
    rows = {}
    for layers in counts:
        model_dir, stats = checkpoint(work, layers)
        rows[layers] = {
            "runner": run(model_dir, stats, dataset, work / f"out{layers}", opts.max_tokens)
        }
        if opts.quadratic:
            from mlxfun.core import runner

            real = runner.LayerRunner

            def refuse(*args, **kwargs):
                raise runner.refusal("qwen3_moe", "benchmark: the former capture")

            runner.LayerRunner = refuse
            try:
                rows[layers]["quadratic"] = run(
                    model_dir, stats, dataset, work / f"quad{layers}", opts.max_tokens
                )
            finally:
                runner.LayerRunner = real
    load_after = os.getloadavg()
    print(
        f"qwen3_moe hidden {ARGS['hidden_size']}, {ARGS['num_experts']} experts top-2, merge "
        f"half (group size 0), {opts.max_tokens} calibration tokens"
    )
    for layers, modes in rows.items():
        for mode, (wall, merged) in modes.items():
            print(
                f"{layers:3d} layers {mode:9s}: wall {wall:7.2f} s, {wall / layers:6.3f} s per "
                f"layer (layer merges {merged:6.2f} s)"
            )
    small, large = min(counts), max(counts)
    ratio = (rows[large]["runner"][0] / large) / (rows[small]["runner"][0] / small)
    print(
        f"load average before {[round(x, 2) for x in load_before]}, after "
        f"{[round(x, 2) for x in load_after]}; {os.cpu_count()} cores"
    )
    print(f"per-layer time {large} / {small} layers: {ratio:.2f} (target <= {FLAT_TARGET}: flat)")
    return 0 if ratio <= FLAT_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
