"""Executing a compression plan (``mlxfun apply``): one pass of the existing machinery, with
the plan's keep map as ``--target`` removals (model-wide selector, n = all removals):
``ream.merge`` with the plan's merges as explicit groups when it merges, else ``prune``. The
output, its atomic writing, provenance (``mlxfun.json`` adds ``plan``) and non-uniform loading
are theirs. ``mapping_only`` writes the expert mapping and touches no weights."""

import json
from pathlib import Path

import attrs
from mlxfun.core.errors import MlxfunError

from .plans import ModelPlan, check_plan


@attrs.define(kw_only=True)
class ApplyRequest:
    model: Path = attrs.field(converter=Path)
    plan: ModelPlan
    output: Path = attrs.field(converter=Path)
    stats: Path | None = None  # default: the plan's
    dataset: list | None = None  # default: the plan's (needed when it merges)
    mapping_only: bool = False
    force: bool = False
    model_file: bool = False
    align_tokens: int = 1024
    progress: bool = True


def mapping(plan: ModelPlan) -> dict:
    """The whole model's mapping: per MoE layer (decoder index) the seed's
    ``expert_mapping`` (old -> new, -1 pruned) and ``merged_from`` (new -> old ids)."""
    return {
        "model": plan.model,
        "strategy": plan.strategy,
        "layers": {str(x.layer): x.mapping() for x in plan.layers},
    }


def apply_plan(request: ApplyRequest) -> dict:
    """Write the compressed model (or the mapping); returns the compressor's summary."""
    from mlxfun.core.outputs import check_output_file

    plan = request.plan
    check_plan(plan, request.model)
    if request.mapping_only:
        check_output_file(request.output, inputs=(request.model,))
        tmp = request.output.with_name(request.output.name + ".tmp")
        tmp.write_text(json.dumps(mapping(plan), indent=1) + "\n")
        tmp.replace(request.output)
        return {"mapping": str(request.output), "layers": len(plan.layers)}
    stats = Path(request.stats or plan.stats)
    if not stats.is_file():
        raise MlxfunError(f"the plan's stats file {stats} does not exist; pass --stats")
    removed = {x.layer: x.removed for x in plan.layers}
    options = dict(
        model=request.model,
        stats=stats,
        output=request.output,
        scorer=plan.scorer,
        selector="model-wide",
        n=sum(len(r) for r in removed.values()),
        target={layer: r for layer, r in removed.items() if r},
        force=request.force,
        model_file=request.model_file,
    )
    record = {"strategy": plan.strategy, "layers": [x.as_dict() for x in plan.layers]}
    if not plan.merges:
        return _prune(options, record)
    from .ream import MergeRequest, merge

    dataset = request.dataset if request.dataset else plan.datasets
    if not dataset:
        raise MlxfunError("the plan merges experts: pass --dataset (calibration text)")
    calibration = plan.calibration
    merge_request = MergeRequest(
        **options,
        dataset=dataset,
        max_tokens=calibration.get("max_tokens") or 2048,
        max_samples=calibration.get("max_samples"),
        batch_size=calibration.get("batch_size") or 4,
        seed=calibration.get("seed") or 0,
        align_tokens=request.align_tokens,
        progress=request.progress,
        groups={
            x.layer: {m.target_expert: m.source_experts for m in x.merges} for x in plan.layers
        },
        plan=record,
    )
    summary = merge(merge_request)
    summary["method"] = "plan (ream + prune)"
    return summary


def _prune(options: dict, record: dict) -> dict:
    """``prune`` with the plan recorded in mlxfun.json (prune's own steps)."""
    from mlxfun.core.outputs import PROVENANCE_FILE, atomic_output_dir

    from .prune import PruneRequest, finish_summary, plan_prune, write_pruned

    request = PruneRequest(**options)
    pruned = plan_prune(request)
    inputs = (request.model, request.stats)
    with atomic_output_dir(request.output, force=request.force, inputs=inputs) as tmp:
        written = write_pruned(pruned, tmp)
        provenance = dict(pruned.provenance, plan=record)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    summary = finish_summary(pruned.summary, written)
    summary["method"] = "plan (prune)"
    return summary
