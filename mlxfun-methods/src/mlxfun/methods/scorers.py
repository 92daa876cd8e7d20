"""The built-in expert scorers (definitions: docs/algorithms.md, REAP arXiv 2510.13999).

Every scorer accumulates float64 sums and counts over the routed (layer, expert) pairs of every
batch, so a score is exact over all tokens however they were batched, and two accumulators
combine by addition (``max_activation`` by maximum). Higher score = more important.

numpy is imported inside the functions that compute: ``mlxfun plugins`` imports this module to
list the scorers, and numpy would add 0.1-0.25 s to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import numpy as np
    from mlxfun.core.types import LayerObservation


def _scatter(acc: np.ndarray, obs: LayerObservation, values) -> None:
    import numpy as np

    np.add.at(
        acc[obs.layer],
        obs.selected.reshape(-1),
        np.broadcast_to(values, obs.selected.shape).reshape(-1),
    )


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    import numpy as np

    # An expert never routed to has no mean: it scores 0, the least possible value.
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


@attrs.define(frozen=True)
class SumScorer:
    """score[l, e] = sum over tokens routed to e of ``value`` (optionally divided by the count)."""

    name: str
    description: str
    needs: frozenset
    value: str  # "one", "weight", "norm", "weighted_norm"
    mean: bool = False

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
        import numpy as np

        shape = (num_layers, num_experts)
        return {"sum": np.zeros(shape), "count": np.zeros(shape)}

    def update(self, acc: dict[str, np.ndarray], obs: LayerObservation) -> None:
        import numpy as np

        values = {
            "one": 1.0,
            "weight": lambda: obs.weights,
            "norm": lambda: obs.norms,
            "weighted_norm": lambda: obs.weights.astype(np.float64) * obs.norms,
        }[self.value]
        values = values() if callable(values) else values
        _scatter(acc["sum"], obs, np.asarray(values, dtype=np.float64))
        _scatter(acc["count"], obs, 1.0)

    def combine(self, a: dict, b: dict) -> dict:
        return {key: a[key] + b[key] for key in a}

    def finalize(self, acc: dict[str, np.ndarray]) -> np.ndarray:
        return _mean(acc["sum"], acc["count"]) if self.mean else acc["sum"].copy()


@attrs.define(frozen=True)
class MaxActivationScorer:
    name: str = "max_activation"
    description: str = "largest ||f_j(x)||_2 over the tokens routed to the expert"
    needs: frozenset = frozenset({"selected", "norms"})

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
        import numpy as np

        return {"max": np.zeros((num_layers, num_experts))}

    def update(self, acc, obs: LayerObservation) -> None:
        import numpy as np

        np.maximum.at(
            acc["max"][obs.layer],
            obs.selected.reshape(-1),
            obs.norms.reshape(-1).astype(np.float64),
        )

    def combine(self, a: dict, b: dict) -> dict:
        import numpy as np

        return {"max": np.maximum(a["max"], b["max"])}

    def finalize(self, acc) -> np.ndarray:
        return acc["max"].copy()


@attrs.define(frozen=True)
class RandomScorer:
    """A seeded random baseline: the same seed and shape always give the same scores."""

    name: str = "random"
    description: str = "seeded uniform random scores (a baseline; --seed sets the seed)"
    needs: frozenset = frozenset()
    seed: int = 0

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
        import numpy as np

        return {"shape": np.array([num_layers, num_experts], dtype=np.float64)}

    def update(self, acc, obs: LayerObservation) -> None:
        pass

    def combine(self, a: dict, b: dict) -> dict:
        return dict(a)

    def finalize(self, acc, seed: int | None = None) -> np.ndarray:
        import numpy as np

        num_layers, num_experts = (int(v) for v in acc["shape"])
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return rng.random((num_layers, num_experts))


SCORERS = [
    SumScorer(
        "frequency",
        "number of tokens routed to the expert",
        frozenset({"selected"}),
        "one",
    ),
    SumScorer(
        "weighted_frequency",
        "sum of the expert's gate weights over its routed tokens",
        frozenset({"selected", "weights"}),
        "weight",
    ),
    SumScorer(
        "ean_sum",
        "EAN: sum of ||f_j(x)||_2 over the expert's routed tokens",
        frozenset({"selected", "norms"}),
        "norm",
    ),
    SumScorer(
        "ean_mean",
        "EAN mean: mean of ||f_j(x)||_2 over the expert's routed tokens",
        frozenset({"selected", "norms"}),
        "norm",
        mean=True,
    ),
    SumScorer(
        "reap",
        "REAP: mean of g_j(x) * ||f_j(x)||_2 over the expert's routed tokens",
        frozenset({"selected", "weights", "norms"}),
        "weighted_norm",
        mean=True,
    ),
    MaxActivationScorer(),
    RandomScorer(),
]
