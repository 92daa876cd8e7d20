"""One calibration pass that feeds every requested scorer (``mlxfun collect``)."""

import time
from pathlib import Path

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


@attrs.define(kw_only=True)
class CollectRequest:
    """What ``mlxfun collect`` asks for."""

    model: Path = attrs.field(converter=Path)
    datasets: list = attrs.field(converter=lambda v: [Path(p) for p in v])
    output: Path = attrs.field(converter=Path)
    scorers: list[str] | None = None  # None: every installed scorer
    max_samples: int | None = None
    max_tokens: int = 512
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    pipeline: bool = False  # under mlx.launch: split the decoder layers, not the data
    rank_timeout: float = 600.0  # under mlx.launch: seconds to wait for the other ranks


def collect(request: CollectRequest) -> dict | None:
    """``mlxfun collect``: observe the model on the datasets, feed the scorers, write the stats
    file (nothing is written unless the whole pass succeeds). Returns the summary: ``output``,
    ``tokens_seen``, ``samples``, ``scorers`` and the per-layer ``layers`` rows.

    Under ``mlx.launch`` the ranks split the batches (or, with ``pipeline``, the decoder layers),
    their statistics are combined exactly and rank 0 writes the file and returns the summary;
    the other ranks return ``None`` (see ``distributed``)."""
    from . import distributed, plugins
    from .config import read_config
    from .datasets import load_samples, tokenize_samples
    from .errors import MlxfunError
    from .models import load_model
    from .outputs import check_output_file
    from .stats import save_stats

    if request.max_tokens <= 0 or request.batch_size <= 0:
        raise MlxfunError("--max-tokens and --batch-size must be positive")
    ranks = distributed.join(request.rank_timeout)
    if ranks.writes:
        check_output_file(request.output, inputs=[request.model, *request.datasets])
    adapter = plugins.adapter_for_config(read_config(request.model))
    names = plugins.plugin_names("scorer") if request.scorers is None else request.scorers
    chosen = with_seed([plugins.get_scorer(n) for n in names], request.seed)
    samples = load_samples(request.datasets, max_samples=request.max_samples, seed=request.seed)
    loaded, tokenizer, config = load_model(request.model, lazy=request.pipeline)
    sequences = tokenize_samples(samples, tokenizer, request.max_tokens)
    collector, fingerprint = _collect_ranks(
        request, ranks, loaded, config, adapter, chosen, sequences
    )
    if not ranks.writes:
        return None
    scores = collector.scores()
    tokens_seen = int(sum(len(s) for s in sequences))
    metadata = {
        "fingerprint": fingerprint,
        "moe_layers": fingerprint["moe_layers"],
        "model": str(request.model),
        "adapter": adapter.name,
        "datasets": [str(p) for p in request.datasets],
        "samples": len(sequences),
        "tokens_seen": tokens_seen,
        "max_samples": request.max_samples,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
    }
    if ranks.size > 1:
        metadata["ranks"] = ranks.size
        metadata["ranks_split"] = "layers" if request.pipeline else "data"
    save_stats(request.output, scores, collector.accumulators, collector.token_counts, metadata)
    return {
        "output": str(request.output),
        "tokens_seen": tokens_seen,
        "samples": len(sequences),
        "scorers": sorted(scores),
        "layers": layer_summary(scores, collector.token_counts, metadata["moe_layers"], None),
    }


def _collect_ranks(request, ranks, model, config, adapter, scorers, sequences):
    """``(collector, fingerprint)`` of this run over every rank: each rank checks that the
    others run the same job, then observes its share of the batches (or its layers) and the
    ranks' accumulators are combined exactly."""
    from . import distributed

    options = {
        "scorers": [s.name for s in scorers],
        "seed": request.seed,
        "batch_size": request.batch_size,
        "pipeline": request.pipeline,
    }
    distributed.check_same_run(
        ranks, distributed.run_fingerprint(request.model, config, sequences, options)
    )
    if request.pipeline:
        distributed.pipeline(model, ranks)
        return distributed.collect_pipelined(
            model, config, adapter, sequences, scorers, request.batch_size, ranks
        )
    mine = distributed.share(sequences, request.batch_size, ranks)
    progress = request.progress and ranks.writes
    collector, layers = collect_stats(
        model, adapter, mine, scorers, request.batch_size, progress=progress
    )
    distributed.combine_ranks(ranks, collector, scorers)
    return collector, model_fingerprint(config, layers)


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


__all__ = [
    "CollectRequest",
    "collect",
    "collect_stats",
    "layer_summary",
    "model_fingerprint",
    "with_seed",
]
