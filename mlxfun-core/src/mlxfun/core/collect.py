"""One calibration pass that feeds every requested scorer (``mlxfun collect``)."""

import time

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
