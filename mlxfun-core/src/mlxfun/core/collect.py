"""One calibration pass that feeds every requested scorer (``mlxfun collect``)."""

import time

import attrs
import numpy as np

from .datasets import batches
from .observe import Observer
from .stats import StatsCollector, model_fingerprint


def with_seed(scorers, seed: int):
    """Scorers that take a seed (the random baseline) get the run's seed."""
    return [
        attrs.evolve(s, seed=seed) if hasattr(s, "seed") and attrs.has(type(s)) else s
        for s in scorers
    ]


def collect_stats(model, adapter, sequences, scorers, batch_size: int = 4, progress: bool = True):
    """Run ``sequences`` (lists of token ids) through the model, observing every MoE layer.

    Sequences are batched by length (right-padded, padding masked out), so the statistics do
    not depend on how the tokens were batched. Returns ``(collector, fingerprint_layers)``.
    """
    import mlx.core as mx
    from tqdm import tqdm

    layers = adapter.moe_layers(model)
    num_experts = max(layer.num_experts for layer in layers)
    collector = StatsCollector(scorers, len(layers), num_experts)
    observer = Observer(model, adapter, collector.needs)
    ordered = sorted(sequences, key=len, reverse=True)
    total = sum(len(s) for s in ordered)
    bar = tqdm(total=total, unit="tok", disable=not progress, desc="collect", dynamic_ncols=True)
    start = time.perf_counter()
    samples = 0
    with bar, observer:
        for tokens, mask in batches(ordered, batch_size):
            model(mx.array(tokens))  # only the MoE observations are evaluated
            collector.update(observer.observations(mask))
            samples += tokens.shape[0]
            bar.update(int(mask.sum()))
            elapsed = time.perf_counter() - start
            bar.set_postfix(samples=samples, tok_s=f"{bar.n / max(elapsed, 1e-9):.0f}")
    return collector, layers


def layer_summary(stats_scores: dict, token_counts, layers_index, top_k) -> list[dict]:
    """One row per MoE layer: tokens, experts used, routing entropy, top experts by REAP."""
    rows = []
    frequency = stats_scores.get("frequency")
    reap = stats_scores.get("reap")
    for position, index in enumerate(layers_index):
        row = {"layer": index, "tokens": int(token_counts[position])}
        if frequency is not None:
            counts = frequency[position]
            share = counts / max(counts.sum(), 1)
            nonzero = share[share > 0]
            entropy = float(-(nonzero * np.log2(nonzero)).sum())
            row["used"] = f"{int((counts > 0).sum())}/{counts.size}"
            row["entropy_bits"] = round(entropy, 3)
            row["max_share"] = round(float(share.max()), 3)
        if reap is not None:
            top = np.argsort(-reap[position], kind="stable")[:3]
            row["top_reap"] = ",".join(str(int(e)) for e in top)
            row["min_reap"] = float(reap[position].min())
        rows.append(row)
    return rows


__all__ = ["collect_stats", "layer_summary", "model_fingerprint", "with_seed"]
