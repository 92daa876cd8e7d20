"""Per-input-channel statistics of one linear layer's calibration inputs (seeds 001 and 002).

``channel_stats(x, docs, classes)`` turns the inputs one linear layer (or one expert's
projection: the rows of the tokens routed to it) received, ``x`` (tokens, in), into the
statistics every neuron scorer reads (``mlxfun.core.types.CHANNEL_STATS``), per input channel j:

- ``count``: tokens; ``sq_norm``: sum_t x_tj^2 (Wanda's ||X_j||^2); ``mean``: mean x_tj;
  ``mean_abs``: mean |x_tj|;
- ``active``: the share of tokens with |x_tj| above tau, tau the 60th percentile of |x| over the
  whole layer (every token and channel; a per-channel percentile would make every rate 0.4);
- ``top_mean``: the mean of channel j's largest 10% of |x_tj| (at least one token);
- ``tf``, ``df``, ``docs``: TF-IDF over documents (``doc`` mode: the calibration samples;
  ``topic`` mode: k-means clusters of the rows of ``x``): tf_j = mean over documents of the
  document's mean |x_j|; document d holds channel j when its mean |x_j| exceeds the 60th
  percentile of all (document, channel) means; df_j counts those documents;
- ``fisher``: between-class over within-class variance of x_j, the classes the calibration
  set's most frequent token ids (``classes`` < 0: a token of no class; a class needs two
  tokens in this unit).

Everything is float64 and computed from the whole of ``x`` at once (exact quantiles); the
collection holds one decoder layer's inputs at a time (``linear_inputs``).
"""

from __future__ import annotations

import attrs
import numpy as np


@attrs.define(frozen=True)
class StatOptions:
    active_quantile: float = 0.6
    top_fraction: float = 0.1
    tfidf_mode: str = "doc"  # "doc" or "topic"
    topics: int = 16
    topic_iterations: int = 10
    seed: int = 0
    eps: float = 1e-10


def kmeans(x: np.ndarray, k: int, iterations: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (Lloyd's algorithm, seeded initial rows; an empty
    cluster keeps its centre). Ends with every row labelled by its nearest centre."""
    n = x.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(n, size=k, replace=False)].astype(np.float64)
    x = x.astype(np.float64)
    labels = _nearest(x, centres)
    for _ in range(iterations):
        for c in range(k):
            members = labels == c
            if members.any():
                centres[c] = x[members].mean(0)
        labels = _nearest(x, centres)
    return labels


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.argmin(d, axis=1)


def empty_stats(inputs: int) -> dict[str, np.ndarray]:
    zeros = np.zeros(inputs)
    stats = {k: zeros.copy() for k in ("sq_norm", "mean", "mean_abs", "active", "top_mean")}
    stats.update(tf=zeros.copy(), df=zeros.copy(), fisher=zeros.copy())
    stats.update(count=np.asarray(0.0), docs=np.asarray(0.0))
    return stats


def channel_stats(
    x: np.ndarray, docs: np.ndarray, classes: np.ndarray, options: StatOptions = StatOptions()
) -> dict[str, np.ndarray]:
    n, inputs = x.shape
    if n == 0:
        return empty_stats(inputs)
    x = x.astype(np.float64)
    a = np.abs(x)
    tau = np.quantile(a, options.active_quantile)
    top = max(1, int(np.ceil(options.top_fraction * n)))
    stats = {
        "count": np.asarray(float(n)),
        "sq_norm": (x * x).sum(0),
        "mean": x.mean(0),
        "mean_abs": a.mean(0),
        "active": (a > tau).mean(0),
        "top_mean": np.partition(a, n - top, axis=0)[n - top :].mean(0),
        "fisher": fisher(x, classes, options.eps),
    }
    if options.tfidf_mode == "topic":
        labels = kmeans(x, options.topics, options.topic_iterations, options.seed)
    else:
        labels = np.asarray(docs)
    stats.update(tfidf_counts(a, labels, options.active_quantile))
    return stats


def tfidf_counts(a: np.ndarray, labels: np.ndarray, quantile: float) -> dict[str, np.ndarray]:
    """``tf``, ``df`` and ``docs`` of |x| ``a`` grouped by document ``labels``."""
    _, inverse = np.unique(labels, return_inverse=True)
    d = int(inverse.max()) + 1
    sums = np.zeros((d, a.shape[1]))
    np.add.at(sums, inverse, a)
    per_doc = sums / np.bincount(inverse, minlength=d)[:, None]
    threshold = np.quantile(per_doc, quantile)
    return {
        "tf": per_doc.mean(0),
        "df": (per_doc > threshold).sum(0).astype(np.float64),
        "docs": np.asarray(float(d)),
    }


def fisher(x: np.ndarray, classes: np.ndarray, eps: float) -> np.ndarray:
    """sum_c n_c (mu_c - mu)^2 / sum_c sum_{t in c} (x_t - mu_c)^2 per channel, over the tokens
    that have a class seen at least twice here (a single token has no within-class spread)."""
    classes = np.asarray(classes)
    ids, inverse, sizes = np.unique(classes, return_inverse=True, return_counts=True)
    keep = (classes >= 0) & (sizes[inverse] >= 2)
    if not keep.any():
        return np.zeros(x.shape[1])
    x, classes = x[keep], classes[keep]
    _, inverse = np.unique(classes, return_inverse=True)
    c = int(inverse.max()) + 1
    counts = np.bincount(inverse, minlength=c).astype(np.float64)
    sums = np.zeros((c, x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts[:, None]
    mu = x.mean(0)
    between = (counts[:, None] * (means - mu) ** 2).sum(0)
    within = ((x - means[inverse]) ** 2).sum(0)
    return between / (within + eps)
