"""One calibration pass that feeds every requested scorer (``mlxfun collect``)."""

import time
from pathlib import Path

import attrs
import numpy as np

from .datasets import batches
from .errors import MlxfunError
from .observe import Observer
from .stats import StatsCollector, model_fingerprint


def with_seed(scorers, seed: int):
    """Scorers that take a seed (the random baseline) get the run's seed."""
    return [
        attrs.evolve(s, seed=seed) if hasattr(s, "seed") and attrs.has(type(s)) else s
        for s in scorers
    ]


def collect_stats(
    model,
    adapter,
    sequences,
    scorers,
    batch_size: int = 4,
    progress: bool = True,
    stream: bool = False,
    spill=None,
):
    """Run ``sequences`` (lists of token ids) through the model, observing every MoE layer.

    Sequences are batched by length (right-padded, padding masked out), so the statistics do
    not depend on how the tokens were batched. The model runs one decoder layer at a time over
    every batch (``runner.LayerRunner``), up to the last MoE layer: no later layer, LM head or
    KV cache. ``stream``: the model was loaded lazily; each layer's weights are read as it
    runs and dropped after it (``runner.release``). ``spill``: a directory for the hidden
    states. An architecture the runner cannot step through is run whole (one forward per
    batch), unless ``stream`` or ``spill`` asks for the runner. Returns
    ``(collector, fingerprint_layers)``.
    """
    layers = adapter.moe_layers(model)
    num_experts = max(layer.num_experts for layer in layers)
    collector = StatsCollector(scorers, len(layers), num_experts)
    ordered = sorted(sequences, key=len, reverse=True)
    batched = list(batches(ordered, batch_size))
    try:
        run = _layer_run(model, adapter, batched, stream, spill)
    except MlxfunError:
        if stream or spill is not None:
            raise
        run = None
    if run is None:
        _forward_collect(model, adapter, batched, collector, progress)
    else:
        _runner_collect(run, model, adapter, batched, collector, progress, stream)
    return collector, layers


def _layer_run(model, adapter, batched, stream: bool, spill):
    import mlx.core as mx

    from .runner import LayerRunner, release_outside

    run = LayerRunner(model, adapter, [mx.array(t) for t, _ in batched], spill=spill)
    if stream:
        release_outside(model, run.path)
    return run


def _progress(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", disable=not progress, desc="collect", dynamic_ncols=True)


def _runner_collect(run, model, adapter, batched, collector, progress, stream) -> None:
    from .runner import release

    by_index = {layer.index: layer for layer in run.moe_layers}
    tokens = sum(int(mask.sum()) for _, mask in batched)
    bar = _progress(tokens * len(by_index), progress)
    try:
        with bar:
            for index in range(run.stop + 1):
                moe = by_index.get(index)
                if moe is None:
                    run.run(index)
                else:
                    observer = Observer(model, adapter, collector.needs, layers=[moe])

                    def observe(batch, observer=observer):
                        mask = batched[batch][1]
                        collector.update(observer.observations(mask))
                        bar.update(int(mask.sum()))

                    with observer:
                        run.run(index, on_batch=observe)
                if stream:
                    release(run.layers[index])
    finally:
        run.close()


def _forward_collect(model, adapter, batched, collector, progress) -> None:
    """The whole model per batch (architectures the runner cannot step through)."""
    import mlx.core as mx

    observer = Observer(model, adapter, collector.needs)
    bar = _progress(sum(int(mask.sum()) for _, mask in batched), progress)
    start = time.perf_counter()
    samples = 0
    with bar, observer:
        for tokens, mask in batched:
            model(mx.array(tokens))  # only the MoE observations are evaluated
            collector.update(observer.observations(mask))
            samples += tokens.shape[0]
            bar.update(int(mask.sum()))
            elapsed = time.perf_counter() - start
            bar.set_postfix(samples=samples, tok_s=f"{bar.n / max(elapsed, 1e-9):.0f}")


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
    stream: bool = False  # read each layer's weights as it runs, drop them after
    spill: Path | None = attrs.field(
        default=None, converter=lambda p: None if p is None else Path(p)
    )
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
    if request.pipeline and (request.stream or request.spill is not None):
        raise MlxfunError(
            "--pipeline already splits the layers over the ranks and runs them whole; "
            "drop --stream / --spill, or drop --pipeline to stream on every rank"
        )
    ranks = distributed.join(request.rank_timeout)
    if ranks.writes:
        check_output_file(request.output, inputs=[request.model, *request.datasets])
    if request.spill is not None:
        _check_spill(request.spill)  # one-line error now, not after loading the model
    adapter = plugins.adapter_for_config(read_config(request.model))
    names = plugins.plugin_names("scorer") if request.scorers is None else request.scorers
    chosen = with_seed([plugins.get_scorer(n) for n in names], request.seed)
    samples = load_samples(request.datasets, max_samples=request.max_samples, seed=request.seed)
    loaded, tokenizer, config = load_model(request.model, lazy=request.pipeline or request.stream)
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
    # before the run: --stream drops each layer's weights (and so its shapes) after it ran
    fingerprint = model_fingerprint(config, adapter.moe_layers(model))
    mine = distributed.share(sequences, request.batch_size, ranks)
    progress = request.progress and ranks.writes
    collector, _ = collect_stats(
        model,
        adapter,
        mine,
        scorers,
        request.batch_size,
        progress=progress,
        stream=request.stream,
        spill=request.spill,
    )
    distributed.combine_ranks(ranks, collector, scorers)
    return collector, fingerprint


def _check_spill(directory: Path) -> None:
    import os

    from .runner import spill_file

    fd, probe = spill_file(directory)
    os.close(fd)
    os.unlink(probe)


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
