"""``check_neuron_scorer``: a neuron scorer answers ``score(weight, stats)`` as ``mlxfun
sparsify`` and ``mlxfun prune-neurons`` call it: a finite float array of the weight's shape, the
same on the same inputs, the inputs left untouched, also for a channel no token reached (an
expert never routed to: every statistic 0)."""

import numpy as np

from ..types import CHANNEL_STATS
from .failures import fail, plugin_label
from .plugin import check_plugin


def synthetic_stats(inputs: int, seed: int = 0, empty: bool = False) -> dict[str, np.ndarray]:
    """Every statistic of ``CHANNEL_STATS`` for ``inputs`` channels, as a collection gives them
    (``empty``: a unit that saw no token)."""
    rng = np.random.default_rng(seed)
    tokens = 0 if empty else 40
    x = rng.normal(size=(tokens, inputs))
    a = np.abs(x)
    scale = 0.0 if empty else 1.0
    return {
        "count": np.asarray(float(tokens)),
        "docs": np.asarray(0.0 if empty else 4.0),
        "sq_norm": (x * x).sum(0),
        "mean": x.mean(0) if tokens else np.zeros(inputs),
        "mean_abs": a.mean(0) if tokens else np.zeros(inputs),
        "active": rng.uniform(size=inputs) * scale,
        "top_mean": (a.max(0) if tokens else np.zeros(inputs)),
        "tf": a.mean(0) if tokens else np.zeros(inputs),
        "df": rng.integers(0, 5, size=inputs).astype(float) * scale,
        "fisher": rng.uniform(size=inputs) * scale,
    }


def check_neuron_scorer(scorer) -> None:
    check_plugin("neuron_scorer", scorer)
    label = plugin_label("neuron_scorer", scorer)
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(6, 8)).astype(np.float32)
    for empty in (False, True):
        stats = {k: v for k, v in synthetic_stats(8, empty=empty).items() if k in CHANNEL_STATS}
        before_w = weight.copy()
        before_s = {k: v.copy() for k, v in stats.items()}
        try:
            first = np.asarray(scorer.score(weight, stats))
            second = np.asarray(scorer.score(weight, stats))
        except Exception as exc:
            fail(
                label,
                f"score(weight (6, 8), stats{' of an unused unit' if empty else ''}) raised {type(exc).__name__}: {exc}",
            )
        if first.shape != weight.shape:
            fail(label, f"score returned shape {first.shape}, expected the weight's {weight.shape}")
        if not np.issubdtype(first.dtype, np.floating) or not np.all(np.isfinite(first)):
            fail(
                label, "score must return finite floats" + (" for an unused unit" if empty else "")
            )
        if not np.array_equal(first, second):
            fail(label, "score is not deterministic: two calls on the same inputs differ")
        if not np.array_equal(weight, before_w) or any(
            not np.array_equal(stats[k], before_s[k]) for k in stats
        ):
            fail(label, "score modified its inputs")
