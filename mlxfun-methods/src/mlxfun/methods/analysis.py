"""Expert analysis (``mlxfun analyze``, seed 003): per MoE layer, how similar the experts are,
which are little used, which specialise, which could merge, and how far the layer could shrink.

Similarities, each an (E, E) matrix in [0, 1] (definitions in docs/plans.md):
- ``router_weights``: cosine of the router's weight rows, mapped to [0, 1];
- ``weights``: cosine of each expert's flattened dequantized weights, mapped to [0, 1];
- ``ream`` (with ``--dataset``): the similarity REAM merges by (``ream.expert_similarity``, the
  mean of the router-gated output cosine and the router-logit similarity on calibration tokens),
  computed by ream's own functions; ``output`` and ``router_logits`` are its two halves.

Utilisation is a stats file's scorer (``mlxfun collect``). Specialists route a narrow set of
token classes: low entropy of the classes of the tokens that choose them (top-k), relative to
the entropy of all tokens' classes. The classes are the ``--dataset`` files when there are
several, else the kind of token text (word, number, space, punctuation, other).
"""

import math
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

SIMILARITIES = ("ream", "output", "router_logits", "router_weights", "weights")
TOKEN_CLASSES = ("word", "number", "space", "punctuation", "other")


# ---------------------------------------------------------------------------------------------
# numpy


def cosine01(rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows (E, d), mapped from [-1, 1] to [0, 1]; a zero row is
    similar 0.5 to everything but itself."""
    rows = np.asarray(rows, dtype=np.float64).reshape(rows.shape[0], -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    result = (np.clip(unit @ unit.T, -1.0, 1.0) + 1.0) / 2.0
    np.fill_diagonal(result, 1.0)
    return result


def weight_similarity(weights: dict) -> np.ndarray:
    """``cosine01`` of each expert's weights ({name: (E, ...)}) flattened and concatenated in
    name order."""
    names = sorted(weights)
    count = np.shape(weights[names[0]])[0]
    flat = [np.asarray(weights[n], dtype=np.float64).reshape(count, -1) for n in names]
    return cosine01(np.concatenate(flat, axis=1))


def top_pairs(similarity: np.ndarray, count: int) -> list[tuple[int, int, float]]:
    """The ``count`` most similar pairs ``(a, b, similarity)``, a < b; ties by ids."""
    num = similarity.shape[0]
    pairs = [(a, b, float(similarity[a, b])) for a in range(num) for b in range(a + 1, num)]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs[:count]


def threshold_groups(similarity: np.ndarray, threshold: float) -> list[list[int]]:
    """Complete-linkage clustering stopped at ``threshold``: clusters join, most similar first
    (ties: lowest ids), while every pair across them is at least ``threshold`` similar. Returns
    the clusters of two or more experts, sorted."""
    clusters = [[e] for e in range(similarity.shape[0])]
    link = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(link, -np.inf)
    alive = list(range(len(clusters)))
    while len(alive) > 1:
        best, pair = -np.inf, None
        for i, a in enumerate(alive):
            for b in alive[i + 1 :]:
                if link[a, b] > best:
                    best, pair = link[a, b], (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        link[a, :] = np.minimum(link[a, :], link[b, :])
        link[:, a] = link[a, :]
        link[a, a] = -np.inf
        alive.remove(b)
    return sorted(clusters[a] for a in alive if len(clusters[a]) > 1)


def class_counts(selected: np.ndarray, classes: np.ndarray, num_experts: int, num_classes: int):
    """(E, C) counts: how often each expert was among the top-k of a token of each class."""
    counts = np.zeros((num_experts, num_classes), dtype=np.float64)
    for slot in range(selected.shape[1]):
        np.add.at(counts, (selected[:, slot], classes), 1.0)
    return counts


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row's distribution (rows of zeros: 0)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=-1, keepdims=True)
    q = p / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log(q), 0.0)
    return terms.sum(axis=-1)


def relative_entropy(counts: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Each expert's class entropy divided by the entropy of all tokens' classes (1 = routed
    like the data, 0 = one class only); 1 for everything when the data has one class."""
    overall = entropy(np.bincount(classes, minlength=num_classes).astype(np.float64))
    if overall <= 0:
        return np.ones(counts.shape[0])
    return entropy(counts) / overall


def token_class(text: str) -> int:
    stripped = text.strip()
    if not stripped:
        return TOKEN_CLASSES.index("space")
    if stripped.isalpha():
        return TOKEN_CLASSES.index("word")
    if stripped.isdigit():
        return TOKEN_CLASSES.index("number")
    if all(not c.isalnum() for c in stripped):
        return TOKEN_CLASSES.index("punctuation")
    return TOKEN_CLASSES.index("other")


# ---------------------------------------------------------------------------------------------
# One layer's findings (numpy)


@attrs.define(kw_only=True)
class Thresholds:
    """The settings that turn measurements into candidates (docs/plans.md)."""

    similarity: str = "ream"  # which similarity groups and pairs use
    threshold: float = 0.6  # mergeable groups: complete linkage at this similarity
    low: float = 0.5  # prune candidates: utilisation below low x the layer's mean
    specialist: float = 0.5  # specialists: relative class entropy below this
    generalist: float = 0.9  # generalists: relative class entropy at least this, and used
    pairs: int = 5  # merge candidates listed per layer


def layer_findings(
    similarity: np.ndarray,
    utilisation: np.ndarray,
    rel_entropy: np.ndarray | None,
    min_keep: int,
    settings: Thresholds,
    reported: list | None = None,
) -> dict:
    """Candidates, groups, potential reduction and recommended target of one layer;
    ``reported``: the specialists a domain report names (instead of the entropy rule)."""
    num = similarity.shape[0]
    mean = float(np.mean(utilisation)) if num else 0.0
    specialists, generalists = [], []
    if reported is not None:
        specialists = sorted(e for e in reported if e < num)
    elif rel_entropy is not None:
        specialists = [e for e in range(num) if rel_entropy[e] < settings.specialist]
    if rel_entropy is not None:
        generalists = [
            e
            for e in range(num)
            if rel_entropy[e] >= settings.generalist
            and utilisation[e] >= mean
            and e not in specialists
        ]
    prune = sorted(
        (e for e in range(num) if utilisation[e] < settings.low * mean and e not in specialists),
        key=lambda e: (float(utilisation[e]), e),
    )
    groups = threshold_groups(similarity, settings.threshold)
    removable = set(prune)
    for group in groups:  # a group keeps its most used expert
        keeper = max(group, key=lambda e: (float(utilisation[e]), -e))
        removable.update(e for e in group if e != keeper and e not in specialists)
    potential = min(len(removable), num - min_keep)
    recommended = max(min_keep, num - potential, math.ceil(num / 2))
    return {
        "merge_candidates": top_pairs(similarity, settings.pairs),
        "prune_candidates": prune,
        "specialists": specialists,
        "generalists": generalists,
        "mergeable_groups": groups,
        "potential_reduction": int(potential),
        "max_compression_ratio": round(potential / num, 4) if num else 0.0,
        "recommended_target": int(recommended),
    }


# ---------------------------------------------------------------------------------------------
# The analysis


@attrs.define(kw_only=True)
class LayerAnalysis:
    layer: int
    position: int
    num_experts: int
    top_k: int
    min_keep: int
    expert_bytes: int  # bytes one removed expert saves in this layer (router row included)
    expert_params: int
    utilisation: list
    relative_entropy: list | None
    similarity: dict  # name -> (E, E) list of lists
    findings: dict

    def as_dict(self) -> dict:
        data = attrs.asdict(self, recurse=False)
        data.update(data.pop("findings"))
        return data


@attrs.define(kw_only=True)
class Analysis:
    model: str
    adapter: str
    fingerprint: dict
    stats: str
    scorer: str
    datasets: list
    settings: dict  # Thresholds and the calibration settings
    router_groups: list  # [n_group, topk_group]
    bytes_total: int
    bytes_experts: int
    sizes: list  # the parameter/byte breakdown (core.sizes.parameter_breakdown)
    layers: list

    def as_dict(self) -> dict:
        data = attrs.asdict(self, recurse=False)
        data["layers"] = [layer.as_dict() for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Analysis":
        layer_fields = {f.name for f in attrs.fields(LayerAnalysis)}
        layers = []
        for item in data["layers"]:
            findings = {k: v for k, v in item.items() if k not in layer_fields}
            plain = {k: v for k, v in item.items() if k in layer_fields and k != "findings"}
            layers.append(LayerAnalysis(**plain, findings=findings))
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: (layers if k == "layers" else v) for k, v in data.items() if k in fields})

    def summary(self) -> dict:
        experts = sum(layer.num_experts for layer in self.layers)
        recommended = sum(layer.findings["recommended_target"] for layer in self.layers)
        saved = sum(
            (layer.num_experts - layer.findings["recommended_target"]) * layer.expert_bytes
            for layer in self.layers
        )
        return {
            "moe_layers": len(self.layers),
            "experts": experts,
            "potential_reduction": sum(x.findings["potential_reduction"] for x in self.layers),
            "recommended_experts": recommended,
            "bytes_total": self.bytes_total,
            "bytes_experts": self.bytes_experts,
            "bytes_recommended": self.bytes_total - saved,
        }


@attrs.define(kw_only=True)
class AnalyzeRequest:
    model: Path = attrs.field(converter=Path)
    stats: Path = attrs.field(converter=Path)
    dataset: list = attrs.field(factory=list, converter=lambda v: [Path(p) for p in v])
    scorer: str = "reap"
    max_tokens: int = 2048
    max_samples: int | None = None
    batch_size: int = 4
    seed: int = 0
    thresholds: Thresholds = attrs.field(factory=Thresholds)
    domain_reports: list = attrs.field(factory=list)  # REPORT[:GROUP] of mlxfun domain-scan
    progress: bool = True


def expert_layout(model_dir: Path, adapter) -> tuple:
    """``(plans, owner, headers, per-expert bytes per layer, total bytes)`` from the checkpoint
    headers: what removing one expert of each layer saves, quantization included."""
    from mlxfun.core import slicing

    skeleton, _ = slicing.model_skeleton(model_dir)
    plans = slicing.layer_plans(skeleton, adapter)
    if not plans:
        raise MlxfunError(f"{adapter.name}: found no MoE layers in {model_dir}")
    headers = slicing.read_headers(model_dir)
    owner = slicing.assign_tensors(plans, headers)
    full = {p.position: list(range(p.num_experts)) for p in plans}
    total, _ = slicing.size_after(headers, owner, full)
    per_expert = []
    for plan in plans:
        keep = dict(full)
        keep[plan.position] = list(range(1, plan.num_experts))
        per_expert.append(total - slicing.size_after(headers, owner, keep)[1])
    return plans, owner, headers, per_expert, total


def stored_experts(plan) -> int:
    return plan.num_experts - plan.zero_experts


def min_keep_per_layer(adapter, plans, blocks) -> tuple[list[int], int, int]:
    """``(min_keep, n_group, topk_group)`` exactly as prune computes them."""
    from .prune import PruneRequest, _min_keep, router_groups

    settings = {router_groups(adapter, blocks[p.position]) for p in plans}
    if len(settings) != 1:
        raise MlxfunError(f"{adapter.name}: MoE layers disagree on their router groups")
    groups, topk_group = settings.pop()
    request = PruneRequest(model=".", stats=".", dry_run=True)
    return _min_keep(request, adapter, plans, groups, topk_group), groups, topk_group


def _router_weight(adapter, block, num_experts: int):
    """The router's (E, hidden) weight as float64 numpy, dequantized; None if it has none."""
    import mlx.core as mx
    from mlxfun.core.adapter import get_path, has_path

    if not has_path(block, adapter.router_attr):
        return None
    router = get_path(block, adapter.router_attr)
    weight = getattr(router, "weight", router) if not isinstance(router, mx.array) else router
    if not isinstance(weight, mx.array) or weight.ndim != 2:
        return None
    if "scales" in router:
        weight = mx.dequantize(
            weight, router.scales, router.get("biases"), group_size=router.group_size,
            bits=router.bits, mode=getattr(router, "mode", "affine"),
        )  # fmt: skip
    weight = np.array(weight.astype(mx.float32), dtype=np.float64)
    return weight if weight.shape[0] == num_experts else None


def _layer_weights(layer) -> dict:
    """Every stored expert's weights, dequantized float32 ``{name: (E, ...)}``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .ream import _dequantized_experts

    if isinstance(layer.experts, list):  # one module per expert (dbrx): stack their tensors
        per_expert = [dict(tree_flatten(m.parameters())) for m in layer.experts]
        return {
            name: mx.stack([p[name] for p in per_expert]).astype(mx.float32)
            for name in per_expert[0]
            if not name.endswith((".scales", ".biases"))
        }
    tensors = {f"e.{k}": v for k, v in tree_flatten(layer.experts.parameters())}
    return _dequantized_experts(tensors, "e", layer.experts)


def _token_classes(samples, sequences, tokenizer, datasets) -> tuple[np.ndarray, list[str]]:
    """One class per token of ``sequences``: the dataset file of its sample when there are
    several files, else the kind of its text."""
    files = [s.source.rsplit(":", 1)[0] for s in samples]
    sources = sorted(set(files))
    if len(datasets) > 1 and len(sources) > 1:
        # sequences follow the samples in order, empty ones dropped (tokenize_samples)
        kept = [f for f, s in zip(files, samples) if tokenizer.encode(s.render(tokenizer))]
        per_sample = [sources.index(f) for f in kept]
        classes = np.concatenate(
            [np.full(len(seq), per_sample[i], dtype=np.int64) for i, seq in enumerate(sequences)]
        )
        return classes, [Path(s).name for s in sources]
    classes = [token_class(tokenizer.decode([t])) for seq in sequences for t in seq]
    return np.asarray(classes, dtype=np.int64), list(TOKEN_CLASSES)


def analyse(request: AnalyzeRequest) -> Analysis:
    """Measure every MoE layer (see the module doc); reads the model and stats, writes
    nothing."""
    from mlxfun.core import plugins
    from mlxfun.core.config import read_config
    from mlxfun.core.models import load_model
    from mlxfun.core.stats import check_fingerprint, load_stats, model_fingerprint

    settings = request.thresholds
    if settings.similarity not in SIMILARITIES:
        raise MlxfunError(
            f"--similarity {settings.similarity!r}: choose one of {', '.join(SIMILARITIES)}"
        )
    if settings.similarity in ("ream", "output", "router_logits") and not request.dataset:
        raise MlxfunError(
            f"--similarity {settings.similarity} is measured on calibration tokens: pass "
            "--dataset, or use --similarity router_weights or weights"
        )
    config = read_config(request.model)
    adapter = plugins.adapter_for_config(config)
    model, tokenizer, _ = load_model(request.model)
    layers = adapter.moe_layers(model)
    if not layers:
        raise MlxfunError(f"{adapter.name}: found no MoE layers in {request.model}")
    fingerprint = model_fingerprint(config, layers)
    stats = load_stats(request.stats)
    check_fingerprint(stats, fingerprint, request.stats)
    scores = np.asarray(stats.score(request.scorer), dtype=np.float64)
    plans, _, _, per_expert, total = expert_layout(request.model, adapter)
    blocks = {layer.position: layer.block for layer in layers}
    min_keep, n_group, topk_group = min_keep_per_layer(adapter, plans, blocks)
    reported = None
    if request.domain_reports:
        from .scan_report import experts_from_reports

        reported = experts_from_reports(request.domain_reports, request.model, "--domain-report")
    measured = _measure(request, model, tokenizer, adapter, layers)
    result = []
    for plan, layer in zip(plans, layers):
        stored = stored_experts(plan)
        sims = {k: v[:stored, :stored] for k, v in measured["similarity"][layer.position].items()}
        if settings.similarity not in sims:
            raise MlxfunError(
                f"{adapter.name}: layer {plan.index}'s router has no (experts, hidden) weight "
                "matrix; use --similarity weights (or ream with --dataset)"
            )
        utilisation = scores[plan.position, :stored]
        rel = measured["entropy"][layer.position]
        rel = None if rel is None else rel[:stored]
        findings = layer_findings(
            sims[settings.similarity], utilisation, rel, min(min_keep[plan.position], stored),
            settings, None if reported is None else reported.get(plan.index, []),
        )  # fmt: skip
        result.append(
            LayerAnalysis(
                layer=plan.index,
                position=plan.position,
                num_experts=plan.num_experts,
                top_k=plan.top_k,
                min_keep=min_keep[plan.position],
                expert_bytes=int(per_expert[plan.position]),
                expert_params=measured["params"][layer.position],
                utilisation=[float(u) for u in utilisation],
                relative_entropy=None if rel is None else [round(float(r), 6) for r in rel],
                similarity={k: np.round(v, 6).tolist() for k, v in sims.items()},
                findings=findings,
            )
        )
    return Analysis(
        model=str(request.model),
        adapter=adapter.name,
        fingerprint=fingerprint,
        stats=str(request.stats),
        scorer=request.scorer,
        datasets=[str(p) for p in request.dataset],
        settings={
            **attrs.asdict(settings),
            "max_tokens": request.max_tokens,
            "max_samples": request.max_samples,
            "batch_size": request.batch_size,
            "seed": request.seed,
            "classes": measured["classes"],
            "specialists_from": "domain report" if reported is not None else "class entropy",
            "domain_reports": [str(r) for r in request.domain_reports],
            "tokens": measured["tokens"],
        },
        router_groups=[n_group, topk_group],
        bytes_total=int(total),
        bytes_experts=int(sum(per_expert[p.position] * stored_experts(p) for p in plans)),
        sizes=_sizes(request.model, adapter),
        layers=result,
    )


def _sizes(model_dir: Path, adapter) -> list:
    """The parameter/byte breakdown as stored (lazy load: no float32 copy)."""
    from mlxfun.core.models import load_mlx_model
    from mlxfun.core.sizes import parameter_breakdown

    model, _ = load_mlx_model(model_dir, lazy=True)
    return parameter_breakdown(model, adapter, adapter.moe_layers(model))


def _expert_params(weights: dict, stored: int) -> int:
    """Logical parameters of one expert, from its dequantized weights."""
    return int(sum(int(np.prod(v.shape)) for v in weights.values()) // max(stored, 1))


def _measure(request: AnalyzeRequest, model, tokenizer, adapter, layers) -> dict:
    """Per layer position: the similarity matrices and the relative class entropies."""
    from tqdm import tqdm

    similarity = {}
    entropies: dict = {layer.position: None for layer in layers}
    params = {}
    for layer in layers:
        weights = _layer_weights(layer)
        params[layer.position] = _expert_params(weights, layer.num_experts - layer.zero_experts)
        sims = {"weights": weight_similarity(weights)}
        router = _router_weight(adapter, layer.block, layer.num_experts)
        if router is not None:
            sims["router_weights"] = cosine01(router)
        similarity[layer.position] = sims
    if not request.dataset:
        return {
            "similarity": similarity,
            "entropy": entropies,
            "params": params,
            "classes": None,
            "tokens": 0,
        }
    from mlxfun.core.datasets import load_samples, tokenize_samples

    from .ream import BlockInputs, token_sample

    samples = interleave(
        load_samples(request.dataset, max_samples=request.max_samples, seed=request.seed)
    )
    sequences = token_sample(
        tokenize_samples(samples, tokenizer, request.max_tokens), request.max_tokens
    )
    if sum(len(s) for s in sequences) == 0:
        raise MlxfunError("the --dataset text gave no tokens")
    classes, names = _token_classes(samples, sequences, tokenizer, request.dataset)
    inputs = BlockInputs(model, adapter, sequences, request.batch_size)
    bar = tqdm(layers, desc="analyse", disable=not request.progress, dynamic_ncols=True)
    try:
        for layer in bar:
            x = inputs(layer)
            similarity[layer.position].update(_calibrated(adapter, layer, x))
            selected = _selected(adapter, layer, x)
            counts = class_counts(selected, classes, layer.num_experts, len(names))
            entropies[layer.position] = relative_entropy(counts, classes, len(names))
    finally:
        inputs.close()
    tokens = int(classes.shape[0])
    return {
        "similarity": similarity,
        "entropy": entropies,
        "params": params,
        "classes": names,
        "tokens": tokens,
    }


def interleave(samples) -> list:
    """Samples taken from each file in turn (round robin, files in first-seen order), so that
    a token budget covers every file."""
    by_file: dict = {}
    for sample in samples:
        by_file.setdefault(sample.source.rsplit(":", 1)[0], []).append(sample)
    queues = list(by_file.values())
    result = []
    for i in range(max(len(q) for q in queues)):
        result.extend(q[i] for q in queues if i < len(q))
    return result


def _calibrated(adapter, layer, x) -> dict:
    """REAM's similarity and its two halves on the block inputs ``x``, by ream's functions."""
    import mlx.core as mx

    from .ream import (
        _check_elementwise,
        _check_formula,
        expert_kind,
        expert_similarity,
        layer_statistics,
        output_similarity,
        router_similarity,
    )

    weights = _layer_weights(layer)
    kind = expert_kind(layer.experts)
    activation = layer.experts.activation
    _check_elementwise(kind, activation, int(weights[next(iter(weights))].shape[1]))
    stored = layer.num_experts - layer.zero_experts
    _check_formula(adapter, layer, kind, activation, weights, list(range(stored)), x)
    logits = adapter.router_logits(layer.block, x).astype(mx.float32)
    probs = adapter.router_scores(layer.block, logits).astype(mx.float32)
    means, logits_np = layer_statistics(kind, activation, weights, x, logits, probs, stored)
    return {
        "output": output_similarity(means),
        "router_logits": router_similarity(logits_np[:, :stored]),
        "ream": expert_similarity(means, logits_np[:, :stored]),
    }


def _selected(adapter, layer, x) -> np.ndarray:
    import mlx.core as mx

    indices, _, _ = adapter.routing(layer.block, x)
    indices = indices.reshape(-1, indices.shape[-1]).astype(mx.int64)
    return np.array(indices)
