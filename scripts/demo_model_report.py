"""Measure the demo model: validation perplexity per domain vs a unigram baseline, expert load
balance on the calibration text (smallest and largest share of the routed slots per layer, the
entropy of the load) and expert specialisation (Jensen-Shannon divergence between code and prose
routing, each expert's code share against its prose share, unused experts).

    python scripts/demo_model_report.py [--model demo/model] [--data demo/data] [--json]
"""

import argparse
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlxfun.core import plugins
from mlxfun.core.collect import collect_stats
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def perplexity(model, sequences, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = [s for s in sequences[start : start + batch_size] if len(s) > 1]
        for seq in chunk:
            tokens = mx.array(seq)[None]
            logits = model(tokens[:, :-1])
            loss = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")
            total += loss.item()
            count += len(seq) - 1
    return math.exp(total / count)


def unigram_perplexity(train_counts: np.ndarray, sequences) -> float:
    probs = (train_counts + 1) / (train_counts.sum() + train_counts.size)
    ids = np.concatenate([np.array(s[1:]) for s in sequences if len(s) > 1])
    return float(np.exp(-np.log(probs[ids]).mean()))


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return (kl(p, m) + kl(q, m)) / 2


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def balance_row(counts: np.ndarray) -> dict:
    """Load balance of one layer from its routed-slot counts per expert."""
    shares = counts / counts.sum()
    return {
        "min_share_pct": round(float(shares.min() * 100), 2),
        "max_share_pct": round(float(shares.max() * 100), 2),
        "entropy_bits": round(entropy_bits(counts), 3),
        "max_entropy_bits": round(float(np.log2(counts.size)), 3),
    }


def specialisation_row(code: np.ndarray, prose: np.ndarray) -> dict:
    """Per expert: its share of code slots over its share of prose slots (log2)."""
    code_share, prose_share = code / code.sum(), prose / prose.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log2(code_share / prose_share)
    return {
        "js_divergence_bits": round(js_divergence_bits(code, prose), 3),
        "log2_code_over_prose": [round(float(v), 2) for v in log_ratio],
        "code_experts": int((log_ratio >= 1).sum()),  # twice as likely on code as on prose
        "prose_experts": int((log_ratio <= -1).sum()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "model")
    parser.add_argument("--data", type=Path, default=ROOT / "demo" / "data")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    model, tokenizer, config = load_model(opts.model)
    adapter = plugins.adapter_for_config(config)
    frequency = plugins.get_scorer("frequency")
    vocab = config["vocab_size"]
    calib_counts = np.zeros(vocab)
    for domain in ("code", "prose"):
        for seq in tokenize_samples(
            load_samples([opts.data / f"calib_{domain}.jsonl"]), tokenizer, 10**9
        ):
            np.add.at(calib_counts, seq, 1)
    report = {"domains": {}, "layers": []}
    calibration = {}
    for domain in ("code", "prose"):
        sequences = tokenize_samples(
            load_samples([opts.data / f"calib_{domain}.jsonl"]), tokenizer, opts.max_tokens
        )
        collector, _ = collect_stats(model, adapter, sequences, [frequency], progress=False)
        calibration[domain] = collector.scores()["frequency"]
    routing = {}
    for domain in ("code", "prose"):
        sequences = tokenize_samples(
            load_samples([opts.data / f"eval_{domain}.jsonl"]), tokenizer, opts.max_tokens
        )
        collector, layers = collect_stats(model, adapter, sequences, [frequency], progress=False)
        routing[domain] = collector.scores()["frequency"]
        report["domains"][domain] = {
            "eval_tokens": int(sum(len(s) - 1 for s in sequences)),
            "perplexity": round(perplexity(model, sequences), 2),
            "unigram_perplexity": round(unigram_perplexity(calib_counts, sequences), 2),
        }
    for position, layer in enumerate(layers):
        code, prose = routing["code"][position], routing["prose"][position]
        calib = calibration["code"][position] + calibration["prose"][position]
        report["layers"].append(
            {
                "layer": layer.index,
                "calibration": balance_row(calib),
                **specialisation_row(code, prose),
                "dead_experts": int(((code + prose) == 0).sum()),
                "top_code_experts": [int(e) for e in np.argsort(-code)[:3]],
                "top_prose_experts": [int(e) for e in np.argsort(-prose)[:3]],
            }
        )
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    print("| domain | eval tokens | perplexity | unigram perplexity |\n|---|---:|---:|---:|")
    for domain, row in report["domains"].items():
        print(
            f"| {domain} | {row['eval_tokens']} | {row['perplexity']} | {row['unigram_perplexity']} |"
        )
    print(
        "\n| layer | smallest share | largest share | load entropy (bits, max 4) |"
        "\n|---:|---:|---:|---:|"
    )
    for row in report["layers"]:
        bal = row["calibration"]
        print(
            f"| {row['layer']} | {bal['min_share_pct']}% | {bal['max_share_pct']}% | "
            f"{bal['entropy_bits']} |"
        )
    print(
        "\n| layer | JS divergence code vs prose (bits) | code experts (>= 2x) | prose experts (>= 2x) "
        "| unused experts | top code experts | top prose experts |"
    )
    print("|---:|---:|---:|---:|---:|---|---|")
    for row in report["layers"]:
        print(
            f"| {row['layer']} | {row['js_divergence_bits']} | {row['code_experts']} | "
            f"{row['prose_experts']} | {row['dead_experts']} | "
            f"{row['top_code_experts']} | {row['top_prose_experts']} |"
        )
    print("\nlog2(code share / prose share) per expert:")
    for row in report["layers"]:
        print(
            f"  layer {row['layer']}: " + " ".join(f"{v:+.1f}" for v in row["log2_code_over_prose"])
        )


if __name__ == "__main__":
    main()
