"""The built-in neuron scorers: weight importance from input-channel statistics (Wanda arXiv
2306.11695; the selectivity variants of seed 002; NeuronRank TF-IDF and Fisher of seeds 001/002).

Every scorer gets one weight (out, in) and the statistics of its input channels
(``neuron_stats``) and returns a score per weight, higher = keep. With j the input channel:

- ``magnitude``: |W_ij|
- ``wanda``: |W_ij| * ||X_j||
- ``wanda_idf``: wanda * IDF_j, IDF_j = log(1 / p_j) clipped to [0, 10], p_j = ``active``
- ``wanda_spiky``: wanda * R_j, R_j = ``top_mean`` / ``mean_abs`` clipped to [1, 10]
- ``wanda_select``: wanda * IDF_j * R_j
- ``neuronrank_tfidf``: |W_ij|^a * tf_j^b * idf_j^g, idf_j = log((1 + D) / (1 + df_j)) + 1
  (a, b, g: ``weight_exp``, ``tf_exp``, ``idf_exp``; default 1, 1, 1.5)
- ``neuronrank_fisher``: |W_ij| * ||X_j|| * F_j, F_j the between/within token-class variance

numpy is imported inside the functions (``mlxfun plugins`` imports this module to list them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import numpy as np

EPS = 1e-10
CLIP = 10.0


def idf(stats) -> np.ndarray:
    import numpy as np

    return np.clip(np.log(1.0 / np.maximum(stats["active"], EPS)), 0.0, CLIP)


def spikiness(stats) -> np.ndarray:
    import numpy as np

    return np.clip(stats["top_mean"] / np.maximum(stats["mean_abs"], EPS), 1.0, CLIP)


def tfidf_idf(stats) -> np.ndarray:
    import numpy as np

    return np.log((1.0 + stats["docs"]) / (1.0 + stats["df"])) + 1.0


def _channel_factor(kind: str, stats, options) -> np.ndarray | None:
    import numpy as np

    norm = lambda: np.sqrt(stats["sq_norm"])  # noqa: E731
    if kind == "magnitude":
        return None
    if kind == "wanda":
        return norm()
    if kind == "wanda_idf":
        return norm() * idf(stats)
    if kind == "wanda_spiky":
        return norm() * spikiness(stats)
    if kind == "wanda_select":
        return norm() * idf(stats) * spikiness(stats)
    if kind == "neuronrank_fisher":
        return norm() * stats["fisher"]
    if kind == "neuronrank_tfidf":
        tf_exp = float(options.get("tf_exp", 1.0))
        idf_exp = float(options.get("idf_exp", 1.5))
        return stats["tf"] ** tf_exp * tfidf_idf(stats) ** idf_exp
    raise ValueError(kind)


@attrs.define(frozen=True)
class ChannelScorer:
    """score_ij = |W_ij|^weight_exp * factor_j, the factor from the input statistics."""

    name: str
    description: str
    stats: frozenset

    def score(self, weight, stats, **options):
        import numpy as np

        magnitude = np.abs(np.asarray(weight, dtype=np.float64))
        if self.name == "neuronrank_tfidf":
            magnitude = magnitude ** float(options.get("weight_exp", 1.0))
        factor = _channel_factor(self.name, stats, options)
        return magnitude if factor is None else magnitude * factor[None, :]


_SELECT = frozenset({"sq_norm", "active", "top_mean", "mean_abs"})

NEURON_SCORERS = (
    ChannelScorer("magnitude", "|W|: weight magnitude, no calibration statistics", frozenset()),
    ChannelScorer("wanda", "Wanda: |W| * ||X||_2 of the input channel", frozenset({"sq_norm"})),
    ChannelScorer(
        "wanda_idf",
        "Wanda * IDF: log(1 / active rate), favouring rarely active channels",
        frozenset({"sq_norm", "active"}),
    ),
    ChannelScorer(
        "wanda_spiky",
        "Wanda * spikiness: top-10% mean / mean |x|, favouring peaked channels",
        frozenset({"sq_norm", "top_mean", "mean_abs"}),
    ),
    ChannelScorer("wanda_select", "Wanda * IDF * spikiness (seed 002's recommended)", _SELECT),
    ChannelScorer(
        "neuronrank_tfidf",
        "NeuronRank TF-IDF: |W|^a * tf^b * idf^g over documents (samples or topic clusters)",
        frozenset({"tf", "df", "docs"}),
    ),
    ChannelScorer(
        "neuronrank_fisher",
        "NeuronRank Fisher: Wanda * between/within token-class variance of the channel",
        frozenset({"sq_norm", "fisher"}),
    ),
)
