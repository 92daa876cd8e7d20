"""Statistics accumulation and the stats file (``.npz``, loadable with ``allow_pickle=False``).

The file holds one float64 (num_moe_layers, num_experts) array per scorer, named after it, the
raw accumulators (``acc.<scorer>.<key>``) so files can be merged exactly, ``token_counts`` (tokens
seen per MoE layer) and ``metadata``: a JSON string with the format version, the model
fingerprint, the MoE layer indices, the datasets, the scorers and the mlxfun version.
"""

import hashlib
import json
import os
from pathlib import Path

import attrs
import numpy as np

from . import __version__
from .errors import MlxfunError

FORMAT_VERSION = 1
# Keys that do not change which experts exist or how they route.
_VOLATILE_CONFIG_KEYS = {
    "quantization",
    "quantization_config",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "architectures",
    "model_file",
    "mlxfun",
}


class StatsCollector:
    """Feeds ``LayerObservation``s to several scorers at once."""

    def __init__(self, scorers, num_layers: int, num_experts: int):
        self.scorers = list(scorers)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.accumulators = {s.name: s.init(num_layers, num_experts) for s in self.scorers}
        self.token_counts = np.zeros(num_layers, dtype=np.int64)

    @property
    def needs(self) -> frozenset:
        needs = {"selected", "weights"}
        for scorer in self.scorers:
            needs |= set(scorer.needs)
        return frozenset(needs)

    def update(self, observations) -> None:
        for obs in observations:
            self.token_counts[obs.layer] += obs.num_tokens
            for scorer in self.scorers:
                scorer.update(self.accumulators[scorer.name], obs)

    def scores(self) -> dict[str, np.ndarray]:
        return {
            s.name: np.asarray(s.finalize(self.accumulators[s.name]), dtype=np.float64)
            for s in self.scorers
        }


@attrs.define
class Stats:
    scores: dict[str, np.ndarray]
    accumulators: dict[str, dict[str, np.ndarray]]
    token_counts: np.ndarray
    metadata: dict

    @property
    def fingerprint(self) -> dict:
        return self.metadata["fingerprint"]

    def score(self, name: str) -> np.ndarray:
        if name not in self.scores:
            known = ", ".join(sorted(self.scores))
            raise MlxfunError(
                f"the stats file has no {name!r} scores; it has: {known} "
                f"(collect with --scorers {name})"
            )
        return self.scores[name]


def config_hash(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expert_shapes(experts) -> dict[str, list[int]]:
    """Logical shapes of an experts module's stacked tensors: ``[experts, out, in]`` per
    projection weight (unquantized, so a float model and its quantized conversion agree) and
    ``[experts, out]`` per expert bias. Experts kept as a list of separate modules (dbrx) give
    the same for each Linear of the first expert."""
    from .adapter import expert_projections, get_path, has_path

    if isinstance(experts, list):
        return _list_expert_shapes(experts)
    shapes = {}
    for name in expert_projections(experts):
        proj = get_path(experts, name)
        try:
            shape = [int(proj.num_experts), int(proj.output_dims), int(proj.input_dims)]
        except (AttributeError, TypeError):
            shape = [int(d) for d in proj.weight.shape]
        shapes[f"{name}.weight"] = shape
        if has_path(proj, "bias"):
            shapes[f"{name}.bias"] = [int(d) for d in proj.bias.shape]
    return shapes


def _list_expert_shapes(experts: list) -> dict[str, list[int]]:
    shapes = {}
    for name, module in experts[0].named_modules() if experts else ():
        if "weight" not in module or module["weight"].ndim != 2:
            continue
        out, inputs = (int(d) for d in module["weight"].shape)
        if "scales" in module:  # packed: 32 // bits values per uint32
            inputs = inputs * 32 // module.bits
        shapes[f"{name}.weight"] = [len(experts), out, inputs]
        if "bias" in module:
            shapes[f"{name}.bias"] = [len(experts), int(module["bias"].shape[0])]
    return shapes


def model_fingerprint(config: dict, layers) -> dict:
    """What identifies a model for statistics: architecture, config hash, MoE layers, experts
    and top-k per layer, and (for layers that carry their experts module, e.g. ``MoELayer``)
    the expert tensor shapes per layer."""
    fingerprint = {
        "model_type": config.get("model_type"),
        "config_hash": config_hash(config),
        "moe_layers": [layer.index for layer in layers],
        "experts_per_layer": [layer.num_experts for layer in layers],
        "top_k": [layer.top_k for layer in layers],
    }
    if layers and all(getattr(layer, "experts", None) is not None for layer in layers):
        fingerprint["expert_shapes"] = [expert_shapes(layer.experts) for layer in layers]
    return fingerprint


# Compared in this order; ``expert_shapes`` only when both sides have it (files written before
# it was recorded, and fingerprints of layers without their experts module, lack it).
_FINGERPRINT_KEYS = (
    "model_type",
    "moe_layers",
    "experts_per_layer",
    "expert_shapes",
    "config_hash",
)


def fingerprint_difference(theirs: dict, mine: dict) -> str | None:
    """``None`` when two fingerprints describe the same model, else what differs, worded as
    ``key: the stats file has X, the model has Y`` (``theirs`` is the stats file's)."""
    for key in _FINGERPRINT_KEYS:
        if key == "expert_shapes" and (key not in theirs or key not in mine):
            continue
        a, b = theirs.get(key), mine.get(key)
        if a == b:
            continue
        if key == "expert_shapes" and len(a) == len(b):
            layers = mine.get("moe_layers") or list(range(len(b)))
            for index, x, y in zip(layers, a, b):
                if x != y:
                    return (
                        f"expert shapes of layer {index}: the stats file has {x}, the model has {y}"
                    )
        return f"{key}: the stats file has {a}, the model has {b}"
    return None


def check_fingerprint(stats: Stats, fingerprint: dict, stats_path) -> None:
    """Refuse statistics from another model, naming what differs."""
    difference = fingerprint_difference(stats.fingerprint, fingerprint)
    if difference is not None:
        raise MlxfunError(
            f"{stats_path} was collected on another model ({difference}); "
            f"run `mlxfun collect` on this model"
        )


def save_stats(path, scores, accumulators, token_counts, metadata) -> None:
    arrays = {name: np.asarray(value, dtype=np.float64) for name, value in scores.items()}
    for name, acc in accumulators.items():
        for key, value in acc.items():
            arrays[f"acc.{name}.{key}"] = np.asarray(value, dtype=np.float64)
    arrays["token_counts"] = np.asarray(token_counts, dtype=np.int64)
    meta = {"format_version": FORMAT_VERSION, "mlxfun_version": __version__, **metadata}
    meta["scorers"] = sorted(scores)
    arrays["metadata"] = np.array(json.dumps(meta, sort_keys=True))
    from .outputs import remove_stale_siblings, run_tag

    path = Path(path)
    if path.is_dir():
        raise MlxfunError(f"{path} is a directory; pass a file name for the stats (.npz)")
    tmp = path.with_name(f".{path.name}.tmp-{run_tag()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        raise MlxfunError(f"cannot write the stats file {path}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def load_stats(path) -> Stats:
    path = Path(path)
    if not path.is_file():
        raise MlxfunError(f"stats file {path} does not exist; create it with `mlxfun collect`")
    not_stats = f"{path} is not an mlxfun stats file (.npz from mlxfun collect)"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except OSError as exc:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise MlxfunError(f"cannot read the stats file {path}: {exc}") from None
        raise MlxfunError(not_stats) from None
    except Exception:
        raise MlxfunError(not_stats) from None
    if not isinstance(arrays, dict) or "metadata" not in arrays:
        raise MlxfunError(not_stats)
    try:
        metadata = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError:
        raise MlxfunError(not_stats) from None
    if not isinstance(metadata, dict):
        raise MlxfunError(not_stats)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise MlxfunError(
            f"{path} has stats format {metadata.get('format_version')}; this mlxfun reads "
            f"format {FORMAT_VERSION}: collect again"
        )
    token_counts = arrays.pop("token_counts")
    accumulators: dict[str, dict] = {}
    scores = {}
    for key, value in arrays.items():
        if key.startswith("acc."):
            _, name, field = key.split(".", 2)
            accumulators.setdefault(name, {})[field] = value
        else:
            scores[key] = value
    return Stats(scores, accumulators, token_counts, metadata)


def existing_experts(shape, num_experts=None) -> np.ndarray:
    """Boolean (num_moe_layers, columns) mask of the experts that exist: a layer with fewer
    experts than the score array has columns (non-uniform models) has padded columns, which
    belong to no ranking. ``num_experts`` is one count per layer (default: every column)."""
    layers, width = shape
    if num_experts is None:
        return np.ones(shape, dtype=bool)
    counts = np.asarray(list(num_experts), dtype=np.int64)
    if counts.shape != (layers,) or (counts < 0).any() or (counts > width).any():
        raise MlxfunError(
            f"experts per layer {counts.tolist()} do not fit a score array of shape {tuple(shape)}"
        )
    return np.arange(width)[None, :] < counts[:, None]


def within_layer_ranks(scores: np.ndarray, num_experts=None) -> np.ndarray:
    """Rank of each expert among its layer's experts: 0 = least important, ties by expert id.
    Padded columns (experts the layer does not have, see ``existing_experts``) are 0 and take
    no rank."""
    scores = np.asarray(scores, dtype=np.float64)
    mask = existing_experts(scores.shape, num_experts)
    ranks = np.zeros(scores.shape, dtype=np.float64)
    for position in range(scores.shape[0]):
        real = np.flatnonzero(mask[position])
        order = real[np.argsort(scores[position, real], kind="stable")]
        ranks[position, order] = np.arange(order.size)
    return ranks


def model_wide_ranks(scores: np.ndarray, num_experts=None) -> np.ndarray:
    """Rank of each (layer, expert) among all the experts of the model: 0 = least important,
    ties by layer position then expert id (the ``model-wide`` selector's order). Padded columns
    are 0 and take no rank, so the ranks run 0 .. (experts in the model - 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    mask = existing_experts(scores.shape, num_experts)
    real = np.flatnonzero(mask.reshape(-1))
    order = real[np.argsort(scores.reshape(-1)[real], kind="stable")]
    ranks = np.zeros(scores.size, dtype=np.float64)
    ranks[order] = np.arange(order.size)
    return ranks.reshape(scores.shape)


def layer_expert_counts(stats: Stats, width: int) -> list[int]:
    """Experts per MoE layer from the stats file's fingerprint (every column when absent)."""
    counts = (stats.metadata.get("fingerprint") or {}).get("experts_per_layer")
    return list(counts) if counts else [width] * len(stats.token_counts)


MERGE_MODES = ("sum", "rank", "global-rank")


def merge_stats(stats_list: list[Stats], scorers_by_name: dict, mode: str = "sum") -> Stats:
    """Combine stats of the same model: ``sum`` is exactly one collect over all the datasets;
    ``rank`` sums each file's within-layer ranks (0 = least important), comparable inside a
    layer only; ``global-rank`` sums each file's model-wide ranks (``model_wide_ranks``),
    comparable across layers, for the ``model-wide`` selector. Ranks skip padded columns."""
    first = stats_list[0]
    for other in stats_list[1:]:
        difference = fingerprint_difference(other.fingerprint, first.fingerprint)
        if difference is not None:
            key = difference.split(":", 1)[0]
            raise MlxfunError(f"cannot merge stats of different models (they differ in {key})")
    names = sorted(set.intersection(*(set(s.scores) for s in stats_list)))
    metadata = dict(first.metadata)
    # keep the most complete fingerprint (files written before expert_shapes was recorded lack it)
    metadata["fingerprint"] = next(
        (s.fingerprint for s in stats_list if "expert_shapes" in s.fingerprint), first.fingerprint
    )
    metadata["datasets"] = [d for s in stats_list for d in _as_list(s.metadata.get("datasets"))]
    metadata["tokens_seen"] = int(sum(s.metadata.get("tokens_seen", 0) for s in stats_list))
    metadata["merged_from"] = len(stats_list)
    metadata["merge_mode"] = mode
    token_counts = sum(s.token_counts for s in stats_list)
    if mode not in MERGE_MODES:
        raise MlxfunError(f"unknown merge mode {mode!r}; use {', '.join(MERGE_MODES)}")
    if mode in ("rank", "global-rank"):
        rank = within_layer_ranks if mode == "rank" else model_wide_ranks
        scores = {}
        for n in names:
            counts = layer_expert_counts(first, first.scores[n].shape[1])
            scores[n] = sum(rank(s.scores[n], counts) for s in stats_list)
        return Stats(scores, {}, token_counts, metadata)
    accumulators, scores = {}, {}
    for name in names:
        if any(name not in s.accumulators for s in stats_list):
            raise MlxfunError(
                f"{name!r} has no accumulators in every file (a rank-merged file?); use --mode rank or global-rank"
            )
        scorer = scorers_by_name[name]
        acc = combine_accumulators(scorer, [s.accumulators[name] for s in stats_list])
        accumulators[name] = acc
        scores[name] = np.asarray(scorer.finalize(acc), dtype=np.float64)
    return Stats(scores, accumulators, token_counts, metadata)


def combine_accumulators(scorer, accumulators: list[dict]) -> dict:
    """One scorer's accumulators combined left to right with its ``combine`` (addition of
    every array when it has none): ``stats merge`` and distributed collection alike."""
    combine = getattr(scorer, "combine", None) or (lambda a, b: {k: a[k] + b[k] for k in a})
    acc = accumulators[0]
    for other in accumulators[1:]:
        acc = combine(acc, other)
    return acc


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
