"""Compression plans (``mlxfun plan`` / ``mlxfun apply``, seed 003): per MoE layer, which
experts stay, which merge into which (REAM) and which are pruned, chosen from an analysis
(``mlxfun.methods.analysis``), then executed in one pass by the existing machinery: ``ream``
with explicit groups when the plan merges, else ``prune`` with the plan's keep map (definitions
in docs/plans.md).

Choosing the experts to remove in a layer (greedy, one at a time): the cost of removing expert
e is its utilisation (scorer score over the layer's mean) times ``min(1, 2 (1 - s))`` (one
minus the cosine), with ``s`` its similarity to the most similar expert still kept when ``s``
reaches the threshold (it would merge there), else times 1 (it would be pruned). The cheapest goes first (ties: lowest id);
specialists go last (conservative and balanced). At the end every removed expert merges into
its most similar kept expert at or above the threshold, or is pruned. A strategy's total (or a
target size) is spread across layers by the same costs in the scorer's units (``_allocate``).

The estimated quality impact is the share of the layer's utilisation removed, each merged
expert's counted times ``min(1, 2 (1 - similarity))``: measured quantities (stats scores and the analysis's
similarity), not a measurement of quality.
"""

import json
import math
import re
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

STRATEGIES = ("conservative", "balanced", "aggressive")
BLEND = "ream"  # neurons aligned to the target's, saliency-weighted average (ream.merge_group)
IMPACT_LABELS = ((0.02, "none"), (0.08, "minimal"), (0.2, "moderate"))
SIZE_TOLERANCE = 0.01


# ---------------------------------------------------------------------------------------------
# The plan objects (the seed's fields)


@attrs.define(kw_only=True)
class ExpertMerge:
    source_experts: list  # old ids merged away into target_expert
    target_expert: int  # the kept expert (old id) that absorbs them
    similarity: float  # the lowest similarity of a source to the target
    weight_blend: str = BLEND


@attrs.define(kw_only=True)
class CompressionPlan:
    """One MoE layer's plan; ids are the source model's."""

    layer: int
    original_num_experts: int
    target_num_experts: int
    merges: list
    pruned_experts: list
    kept_experts: list
    estimated_memory_reduction: float  # share of the model's bytes this layer's plan removes
    estimated_quality_impact: str  # "none", "minimal", "moderate", "significant"
    impact: float  # the measured quantity behind the label (module doc)
    expert_params: int | None = None
    expert_bytes: int | None = None

    @property
    def params_removed(self) -> int | None:
        if self.expert_params is None:
            return None
        return (self.original_num_experts - self.target_num_experts) * self.expert_params

    @property
    def compression_ratio(self) -> float:
        return self.target_num_experts / self.original_num_experts

    @property
    def removed(self) -> list:
        return sorted(self.pruned_experts + [e for m in self.merges for e in m.source_experts])

    def mapping(self) -> dict:
        """``expert_mapping`` old -> new id (-1 pruned; a merged source maps to its target's new
        id) and ``merged_from`` new id -> old ids (the target first), as the seed's
        ``CompressedMoEConfig``."""
        new = {old: i for i, old in enumerate(self.kept_experts)}
        mapping = {e: new.get(e, -1) for e in range(self.original_num_experts)}
        merged_from = {new[e]: [e] for e in self.kept_experts}
        for merge in self.merges:
            for source in merge.source_experts:
                mapping[source] = new[merge.target_expert]
            merged_from[new[merge.target_expert]] += sorted(merge.source_experts)
        return {
            "layer": self.layer,
            "original_num_experts": self.original_num_experts,
            "compressed_num_experts": len(self.kept_experts),
            "expert_mapping": mapping,
            "merged_from": merged_from,
        }

    def as_dict(self) -> dict:
        data = attrs.asdict(self)
        data["params_removed"] = self.params_removed
        data["compression_ratio"] = round(self.compression_ratio, 4)
        return data


@attrs.define(kw_only=True)
class ModelPlan:
    """The whole model's plan: what ``mlxfun plan`` writes and ``mlxfun apply`` reads."""

    model: str
    adapter: str
    fingerprint: dict
    strategy: str  # a strategy, "target-experts N" or "target-size S"
    stats: str
    scorer: str
    datasets: list
    similarity: str
    threshold: float
    calibration: dict  # max_tokens, max_samples, batch_size, seed of the analysis
    bytes_before: int
    bytes_after: int
    target_bytes: int | None
    notes: list
    layers: list
    params_total: int | None = None  # the analysis's size breakdown (parameters)
    params_experts: int | None = None

    def size_estimate(self) -> dict:
        """The seed's ``estimate_compressed_size``: parameters and bytes before and after."""
        removed = sum(x.params_removed or 0 for x in self.layers)
        result = {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_removed": self.bytes_before - self.bytes_after,
            "reduction_ratio": round(self.estimated_memory_reduction, 6),
            "params_removed": removed,
        }
        if self.params_total is not None:
            result.update(
                original_params=self.params_total,
                compressed_params=self.params_total - removed,
                expert_params_original=self.params_experts,
                expert_params_compressed=self.params_experts - removed,
            )
        return result

    @property
    def estimated_memory_reduction(self) -> float:
        return 1 - self.bytes_after / self.bytes_before

    @property
    def merges(self) -> bool:
        return any(layer.merges for layer in self.layers)

    def as_dict(self) -> dict:
        data = attrs.asdict(self, recurse=False)
        data["layers"] = [layer.as_dict() for layer in self.layers]
        data["estimated_memory_reduction"] = round(self.estimated_memory_reduction, 6)
        data["size_estimate"] = self.size_estimate()
        data["experts_before"] = sum(x.original_num_experts for x in self.layers)
        data["experts_after"] = sum(x.target_num_experts for x in self.layers)
        data["quality_measure"] = (
            "share of each layer's utilisation (stats scorer) removed, merged experts counted "
            "times min(1, 2 (1 - similarity)) (analysis similarity); an estimate, not a quality "
            "measurement"
        )
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "ModelPlan":
        try:
            layers = []
            for item in data["layers"]:
                fields = {f.name for f in attrs.fields(CompressionPlan)}
                layer = {k: v for k, v in item.items() if k in fields}
                layer["merges"] = [ExpertMerge(**m) for m in layer["merges"]]
                layers.append(CompressionPlan(**layer))
            fields = {f.name for f in attrs.fields(cls)}
            return cls(
                **{k: (layers if k == "layers" else v) for k, v in data.items() if k in fields}
            )
        except (KeyError, TypeError) as exc:
            raise MlxfunError(
                f"{where} is not an mlxfun plan ({exc}); make one with mlxfun plan"
            ) from None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        tmp.replace(path)


def load_plan(path) -> ModelPlan:
    path = Path(path)
    if not path.is_file():
        raise MlxfunError(f"--plan {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MlxfunError(f"--plan {path} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise MlxfunError(f"--plan {path} is not an mlxfun plan; make one with mlxfun plan")
    return ModelPlan.from_dict(data, f"--plan {path}")


# ---------------------------------------------------------------------------------------------
# Choosing experts (numpy)


def _group_of(expert: int, num_experts: int, groups: int) -> int:
    return expert // (num_experts // groups) if groups > 1 else 0


def choose_removals(
    similarity: np.ndarray,
    utilisation: np.ndarray,
    count: int,
    threshold: float,
    protected=(),
    groups: int = 1,
) -> list[int]:
    """``count`` experts to remove in the order the greedy picks them (module doc); with router
    ``groups`` the same number from each group (``count`` a multiple of ``groups``) and
    similarity only counts within a group."""
    num = similarity.shape[0]
    mean = float(np.mean(utilisation)) or 1.0
    group = np.array([_group_of(e, num, groups) for e in range(num)])
    allowed = (group[:, None] == group[None, :]) & ~np.eye(num, dtype=bool)
    guarded = np.zeros(num, dtype=bool)
    guarded[list(protected)] = True
    kept = np.ones(num, dtype=bool)
    quota = np.full(groups, count // groups)
    removed: list[int] = []
    for _ in range(count):
        partner = np.where(allowed & kept[None, :], similarity, -np.inf).max(axis=1)
        cost = utilisation / mean * np.where(partner >= threshold, merge_loss(partner), 1.0)
        open_ = kept & (quota[group] > 0)
        if not open_.any():
            break
        pool = open_ & ~guarded if (open_ & ~guarded).any() else open_
        e = int(np.argmin(np.where(pool, cost, np.inf)))  # ties: the lowest id
        kept[e] = False
        quota[group[e]] -= 1
        removed.append(e)
    return removed


def assign(similarity, removed, kept, threshold: float, groups: int = 1):
    """``(merges {target: [sources]}, pruned)``: each removed expert joins its most similar
    kept expert (same router group; ties: lowest id) when at least ``threshold`` similar."""
    num = similarity.shape[0]
    merges: dict[int, list[int]] = {}
    pruned = []
    for e in removed:
        same = [k for k in kept if _group_of(k, num, groups) == _group_of(e, num, groups)]
        target = max(same, key=lambda k: (similarity[e, k], -k)) if same else None
        if target is not None and similarity[e, target] >= threshold:
            merges.setdefault(target, []).append(e)
        else:
            pruned.append(e)
    return merges, pruned


def merge_loss(similarity):
    """What a merge keeps of a pruning's loss: 1 - cosine, at most 1. The similarities map the
    cosine c to (c + 1) / 2, so this is min(1, 2 (1 - s)): an orthogonal or opposite partner
    is no better than pruning."""
    return np.minimum(1.0, 2.0 * (1.0 - np.asarray(similarity, dtype=np.float64)))


def impact(similarity, utilisation, merges: dict, pruned) -> float:
    """Share of the layer's utilisation removed, merged experts times ``merge_loss``."""
    total = float(np.sum(utilisation)) or 1.0
    lost = sum(float(utilisation[e]) for e in pruned)
    for target, sources in merges.items():
        lost += sum(
            float(utilisation[e]) * float(merge_loss(similarity[e, target])) for e in sources
        )
    return lost / total


def impact_label(value: float) -> str:
    for limit, label in IMPACT_LABELS:
        if value < limit:
            return label
    return "significant"


# ---------------------------------------------------------------------------------------------
# Planning


def parse_size(text) -> int:
    """``12GB``, ``750MB``, ``1.5GiB``, ``16000000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise MlxfunError(f"--target-size {text!r}: write a size like 12GB, 750MB or 1.5GiB")
    value, unit = float(match.group(1)), (match.group(2) or "").lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(round(value * base**power))


@attrs.define(kw_only=True)
class PlanRequest:
    strategy: str | None = None
    target_experts: int | None = None
    target_size: int | None = None  # bytes


def _layer_arrays(layer, name: str):
    sim = np.asarray(layer.similarity[name], dtype=np.float64)
    return sim, np.asarray(layer.utilisation, dtype=np.float64)


def _targets(analysis, request: PlanRequest) -> list[int]:
    """Experts each layer keeps, by strategy or --target-experts."""
    result = []
    for layer in analysis.layers:
        num, floor = len(layer.utilisation), layer.min_keep
        potential = layer.findings["potential_reduction"]
        if request.target_experts is not None:
            if request.target_experts < floor:
                raise MlxfunError(
                    f"--target-experts {request.target_experts} is below what layer "
                    f"{layer.layer} must keep ({floor}: top-k {layer.top_k}"
                    + (", router groups" if analysis.router_groups[0] > 1 else "")
                    + ")"
                )
            target = min(request.target_experts, num)
        elif request.strategy == "conservative":
            target = max(floor, num - potential, math.ceil(3 * num / 4))
        elif request.strategy == "balanced":
            target = layer.findings["recommended_target"]
        else:
            target = max(floor, math.ceil(num / 4))
        result.append(target)
    return result


def _round_to_groups(count: int, groups: int) -> int:
    return count - count % groups if groups > 1 else count


def make_plan(analysis, request: PlanRequest) -> ModelPlan:
    """The plan for ``analysis`` (``analysis.Analysis``) by strategy, expert count or size."""
    given = [request.strategy, request.target_experts, request.target_size]
    if sum(v is not None for v in given) != 1:
        raise MlxfunError("pass one of --strategy, --target-experts or --target-size")
    if request.strategy is not None and request.strategy not in STRATEGIES:
        raise MlxfunError(f"--strategy {request.strategy!r}: choose {', '.join(STRATEGIES)}")
    name = analysis.settings["similarity"]
    threshold = float(analysis.settings["threshold"])
    groups = analysis.router_groups[0]
    notes: list[str] = []
    protect = request.strategy in ("conservative", "balanced")
    if request.target_size is not None:
        removals = _size_removals(analysis, request.target_size, threshold, notes)
    elif request.strategy is not None:
        total = sum(
            len(x.utilisation) - t for x, t in zip(analysis.layers, _targets(analysis, request))
        )
        protected = [x.findings["specialists"] if protect else [] for x in analysis.layers]
        curves = _curves(analysis, threshold, protected)
        steps = _allocate(curves, lambda removed, size: removed >= total, analysis)[0]
        removals = [curve[step][0] for curve, step in zip(curves, steps)]
    else:
        targets = _targets(analysis, request)
        removals = []
        for layer, target in zip(analysis.layers, targets):
            sim, util = _layer_arrays(layer, name)
            count = _round_to_groups(len(util) - target, groups)
            specialists = layer.findings["specialists"] if protect else []
            removals.append(
                sorted(choose_removals(sim, util, count, threshold, specialists, groups))
            )
    layers = [
        _layer_plan(analysis, layer, removed, name, threshold)
        for layer, removed in zip(analysis.layers, removals)
    ]
    saved = sum(len(x.removed) * x.expert_bytes for x in layers)
    plan = ModelPlan(
        model=analysis.model,
        adapter=analysis.adapter,
        fingerprint=analysis.fingerprint,
        strategy=_strategy_name(request),
        stats=analysis.stats,
        scorer=analysis.scorer,
        datasets=analysis.datasets,
        similarity=name,
        threshold=threshold,
        calibration={
            k: analysis.settings.get(k) for k in ("max_tokens", "max_samples", "batch_size", "seed")
        },
        bytes_before=analysis.bytes_total,
        bytes_after=analysis.bytes_total - saved,
        target_bytes=request.target_size,
        notes=notes,
        layers=layers,
        params_total=_breakdown(analysis, "total"),
        params_experts=_breakdown(analysis, "experts"),
    )
    for layer in plan.layers:
        layer.estimated_memory_reduction = round(
            len(layer.removed) * layer.expert_bytes / plan.bytes_before, 6
        )
    return plan


def _breakdown(analysis, part: str) -> int | None:
    return next((r["parameters"] for r in analysis.sizes if r["part"] == part), None)


def _strategy_name(request: PlanRequest) -> str:
    if request.strategy is not None:
        return request.strategy
    if request.target_experts is not None:
        return f"target-experts {request.target_experts}"
    return f"target-size {request.target_size}"


def _layer_plan(analysis, layer, removed, name: str, threshold: float) -> CompressionPlan:
    sim, util = _layer_arrays(layer, name)
    stored = len(util)
    kept = [e for e in range(layer.num_experts) if e not in removed]
    merges, pruned = assign(
        sim, removed, [e for e in kept if e < stored], threshold, analysis.router_groups[0]
    )
    value = impact(sim, util, merges, pruned)
    return CompressionPlan(
        layer=layer.layer,
        original_num_experts=layer.num_experts,
        target_num_experts=len(kept),
        merges=[
            ExpertMerge(
                source_experts=sorted(sources),
                target_expert=target,
                similarity=round(min(float(sim[s, target]) for s in sources), 6),
            )
            for target, sources in sorted(merges.items())
        ],
        pruned_experts=sorted(pruned),
        kept_experts=kept,
        estimated_memory_reduction=0.0,
        estimated_quality_impact=impact_label(value),
        impact=round(value, 6),
        expert_params=layer.expert_params,
        expert_bytes=layer.expert_bytes,
    )


def _curves(analysis, threshold: float, protected=None) -> list[list[tuple[list[int], float]]]:
    """Per layer, for every removal count it allows (steps of one expert per router group,
    down to its minimum): ``(removed, lost utilisation)``, the lost utilisation in the
    scorer's own units (``impact`` times the layer's total), so layers compare as model-wide
    selection compares them."""
    groups = analysis.router_groups[0]
    name = analysis.settings["similarity"]
    curves = []
    for position, layer in enumerate(analysis.layers):
        sim, util = _layer_arrays(layer, name)
        guard = protected[position] if protected else []
        stored = len(util)
        most = _round_to_groups(stored - layer.min_keep, groups)
        if groups == 1:  # the greedy's first picks are the plan for fewer removals
            order = choose_removals(sim, util, most, threshold, guard)
            options = [order[:count] for count in range(most + 1)]
        else:
            options = [
                choose_removals(sim, util, count, threshold, guard, groups)
                for count in range(0, most + 1, groups)
            ]
        total = float(np.sum(util))
        curves.append(
            [
                (
                    sorted(r),
                    total * impact(sim, util, *assign(sim, r, _kept(stored, r), threshold, groups)),
                )
                for r in options
            ]
        )
    return curves


def _allocate(curves, done, analysis) -> tuple[list[int], int, bool]:
    """Greedy across layers: each step takes one more expert per router group from the layer
    where the lost utilisation grows least, until ``done(removed, size)``. Returns the steps
    per layer, the size and whether ``done`` was reached."""
    groups = analysis.router_groups[0]
    steps = [0] * len(curves)
    size, removed = analysis.bytes_total, 0
    while not done(removed, size):
        best = None
        for i, curve in enumerate(curves):
            if steps[i] + 1 < len(curve):
                cost = curve[steps[i] + 1][1] - curve[steps[i]][1]
                if best is None or cost < best[0]:
                    best = (cost, i)
        if best is None:
            return steps, size, False
        steps[best[1]] += 1
        removed += groups
        size -= groups * analysis.layers[best[1]].expert_bytes
    return steps, size, True


def _size_removals(analysis, target: int, threshold: float, notes: list) -> list[list[int]]:
    """Removals that bring the model to ``target`` bytes (``_allocate``), stopping at the first
    size at or below the target."""
    groups = analysis.router_groups[0]
    non_expert = analysis.bytes_total - analysis.bytes_experts
    if target < non_expert:
        raise MlxfunError(
            f"--target-size {target} bytes is below the model's non-expert weights "
            f"({non_expert} bytes); no expert plan gets there"
        )
    curves = _curves(analysis, threshold)
    steps, size, reached = _allocate(curves, lambda removed, size: size <= target, analysis)
    if not reached:
        notes.append(
            f"target size {target} bytes not reached: every layer is at its minimum "
            f"(top-k / router groups); the smallest plan is {size} bytes"
        )
    elif target - size > SIZE_TOLERANCE * target:
        step = max(x.expert_bytes for x in analysis.layers) * groups
        notes.append(
            f"size {size} bytes is {(target - size) / target:.1%} below the target: one step "
            f"removes up to {step} bytes (one expert per router group), more than 1%"
        )
    return [curve[step][0] for curve, step in zip(curves, steps)]


def _kept(num: int, removed) -> list[int]:
    return [e for e in range(num) if e not in removed]


# ---------------------------------------------------------------------------------------------
# Checking a plan against a model


def check_plan(plan: ModelPlan, model_dir: Path) -> dict:
    """Refuse (one line) a plan for another model, or counts that break top-k or router
    groups. Returns ``{"adapter", "min_keep", "groups"}``."""
    from mlxfun.core import plugins, slicing
    from mlxfun.core.config import read_config
    from mlxfun.core.stats import fingerprint_difference, model_fingerprint

    from .analysis import min_keep_per_layer

    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    skeleton, _ = slicing.model_skeleton(model_dir)
    moe_layers = adapter.moe_layers(skeleton)
    fingerprint = model_fingerprint(config, moe_layers)
    difference = fingerprint_difference(plan.fingerprint, fingerprint)
    if difference is not None:
        raise MlxfunError(f"the plan was made for another model ({difference}); run mlxfun plan")
    plans = slicing.layer_plans(skeleton, adapter)
    blocks = {layer.position: layer.block for layer in moe_layers}
    min_keep, groups, _ = min_keep_per_layer(adapter, plans, blocks)
    if [x.layer for x in plan.layers] != [p.index for p in plans]:
        raise MlxfunError("the plan's MoE layers are not this model's; run mlxfun plan")
    for layer, layer_plan, floor in zip(plan.layers, plans, min_keep):
        _check_layer(layer, layer_plan, floor, groups)
    return {"adapter": adapter, "min_keep": min_keep, "groups": groups}


def _check_layer(layer: CompressionPlan, layer_plan, floor: int, groups: int) -> None:
    num = layer_plan.num_experts
    stored = num - layer_plan.zero_experts
    kept, removed = layer.kept_experts, layer.removed
    if sorted(kept + removed) != list(range(num)) or kept != sorted(kept):
        raise MlxfunError(
            f"layer {layer.layer}: kept, pruned and merged experts must cover 0..{num - 1} once"
        )
    if any(e >= stored for e in removed):
        raise MlxfunError(f"layer {layer.layer}: zero (parameter-free) experts are always kept")
    if any(m.target_expert not in kept for m in layer.merges):
        raise MlxfunError(f"layer {layer.layer}: a merge target is not a kept expert")
    if len(kept) < floor:
        raise MlxfunError(
            f"layer {layer.layer} keeps {len(kept)} experts, fewer than it must ({floor}: "
            f"top-k {layer_plan.top_k}" + (", router groups" if groups > 1 else "") + ")"
        )
    if groups > 1:
        size = stored // groups
        counts = {sum(1 for e in removed if e // size == g) for g in range(groups)}
        if len(counts) != 1:
            raise MlxfunError(
                f"layer {layer.layer} removes unequal numbers from its {groups} router groups; "
                "this router needs equal removals per group"
            )
