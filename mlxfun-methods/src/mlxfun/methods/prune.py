"""The ``prune`` compressor: remove experts chosen by a selector from statistics, writing an
ordinary mlx-lm model directory (definitions in docs/prune.md).

The checkpoint is rewritten shard by shard at the byte level (``mlxfun.core.slicing``): router
rows, correction biases and every expert tensor lose the removed experts, shared experts and
everything else are copied, the config's expert counts are updated and top-k stays. A
non-uniform keep map (``model-wide``) ships a ``model_file`` (``mlxfun.core.nonuniform``).

Group-limited routers (``n_group > 1``): the experts of a layer form ``n_group`` contiguous
groups and only the best ``topk_group`` groups compete for each token. Pruning removes the same
number of experts from every group (the selectors' ``groups`` option), so each group keeps its
experts and its meaning, and ``n_group`` / ``topk_group`` stay. Each group keeps at least 2
experts (mlx-lm scores a group by the sum of its top two), and the ``topk_group`` best groups
keep at least top-k experts between them.

Zero experts (``LayerPlan.zero_experts``, longcat_flash's identity experts) are observed and
scored like the others, but they have no weights: removing one saves nothing and sends its
tokens to experts that compute. The selector chooses among the stored experts only (``n``,
``ratio`` and ``min_keep`` count those) and every zero expert is kept; the config's expert
count is the stored experts kept.
"""

import datetime
import json
import math
import shutil
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.adapter import get_path, has_path
from mlxfun.core.errors import MlxfunError
from mlxfun.core.outputs import PROVENANCE_FILE
from mlxfun.core.types import CompressRequest, SelectOptions

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".h5", ".ckpt"}

# Where mlx-lm blocks keep the router's group settings (first found wins).
GROUP_ATTRS = ("gate.n_group", "n_group", "args.n_group", "args.num_expert_group")
TOPK_GROUP_ATTRS = ("gate.topk_group", "topk_group", "args.topk_group")


# What ``mlxfun prune`` asks for is the core's compressor request (``protect`` / ``target`` map
# decoder layer indices, as ``mlxfun stats`` and ``mlxfun inspect`` show them, ``"*"`` = every
# MoE layer, to expert ids); the type is documented for plugins in docs/plugins.md ("Types").
PruneRequest = CompressRequest


# ---------------------------------------------------------------------------------------------
# --protect / --target


def _ints(text: str, what: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                low, high = (int(v) for v in part.split("..", 1))
                if high < low:
                    raise ValueError
                values.extend(range(low, high + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise MlxfunError(
                f"{what}: {part!r} is not an expert id or a range like 4..7"
            ) from None
    return values


def _layer_key(text, what: str):
    text = str(text).strip()
    if text == "*":
        return "*"
    try:
        return int(text)
    except ValueError:
        raise MlxfunError(f"{what}: layer {text!r} is not a layer index or '*'") from None


def parse_expert_lists(values, what: str = "--protect") -> dict:
    """``layer:expert[,expert...]`` items (several separated by ';', or repeated options;
    ranges ``a..b``; layer ``*`` = every MoE layer) or JSON files ``{"layer": [experts]}``,
    into ``{layer index or "*": sorted expert ids}``."""
    result: dict = {}

    def add(layer, experts):
        result.setdefault(layer, set()).update(experts)

    for value in values or ():
        value = str(value).strip()
        path = Path(value)
        if value.endswith(".json") or (path.is_file() and ":" not in value):
            if not path.is_file():
                raise MlxfunError(f"{what}: {value} does not exist")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise MlxfunError(f"{what}: {value} is not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise MlxfunError(f"{what}: {value} must hold an object {{layer: [experts]}}")
            for layer, experts in data.items():
                if isinstance(experts, str):
                    experts = _ints(experts, what)
                if not isinstance(experts, list) or not all(
                    isinstance(e, int) and not isinstance(e, bool) for e in experts
                ):
                    raise MlxfunError(f"{what}: {value}: layer {layer} needs a list of expert ids")
                add(_layer_key(layer, what), experts)
            continue
        for item in value.split(";"):
            item = item.strip()
            if not item:
                continue
            layer, sep, experts = item.partition(":")
            if not sep or not experts.strip():
                raise MlxfunError(
                    f"{what}: {item!r} is not layer:expert[,expert...] (e.g. 3:0,5 or '*:7')"
                )
            add(_layer_key(layer, what), _ints(experts, what))
    return {layer: sorted(experts) for layer, experts in result.items()}


def _to_positions(mapping: dict, layer_indices: list[int], what: str) -> dict[int, list[int]]:
    positions = {index: position for position, index in enumerate(layer_indices)}
    result: dict[int, set] = {}
    for layer, experts in mapping.items():
        if layer == "*":
            chosen = list(range(len(layer_indices)))
        elif int(layer) in positions:
            chosen = [positions[int(layer)]]
        else:
            raise MlxfunError(
                f"{what}: layer {layer} is not an MoE layer; the MoE layers are "
                f"{_ranges(layer_indices)}"
            )
        for position in chosen:
            result.setdefault(position, set()).update(experts)
    return {p: sorted(e) for p, e in result.items()}


def _ranges(values: list[int]) -> str:
    if len(values) > 6 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(str(v) for v in values)


# ---------------------------------------------------------------------------------------------
# Constraints from the architecture


def router_groups(adapter, block) -> tuple[int, int]:
    """``(n_group, topk_group)`` of a group-limited router, ``(1, 1)`` otherwise."""
    groups = topk = None
    for path in GROUP_ATTRS:
        if has_path(block, path):
            groups = get_path(block, path)
            break
    for path in TOPK_GROUP_ATTRS:
        if has_path(block, path):
            topk = get_path(block, path)
            break
    method = get_path(block, "gate.topk_method") if has_path(block, "gate.topk_method") else None
    if method is not None and method != "group_limited_greedy" and adapter.name == "deepseek_v2":
        return 1, 1  # deepseek_v2 applies its groups only with group_limited_greedy
    if not isinstance(groups, int) or groups <= 1:
        return 1, 1
    return groups, topk if isinstance(topk, int) and topk > 0 else groups


def _stored(plan) -> int:
    """The experts of a layer that have weights (all but its zero experts)."""
    return plan.num_experts - plan.zero_experts


def _zero_expert_options(plans, protect: dict, target: dict) -> dict:
    """``protect`` without zero experts (kept anyway); zero experts in ``target`` are refused."""
    for position, experts in target.items():
        plan = plans[position]
        zero = [e for e in experts if _stored(plan) <= e < plan.num_experts]
        if zero:
            raise MlxfunError(
                f"--target: experts {zero} of layer {plan.index} are zero (parameter-free) "
                f"experts, which pruning always keeps; target experts 0..{_stored(plan) - 1}"
            )
    return {
        position: [
            e for e in experts if not _stored(plans[position]) <= e < plans[position].num_experts
        ]
        for position, experts in protect.items()
    }


def _with_zero_experts(selection, plans):
    """The keep map with every layer's zero experts added (they are always kept)."""
    from mlxfun.core.types import Selection

    keep = {
        plan.position: [*selection.keep[plan.position], *range(_stored(plan), plan.num_experts)]
        for plan in plans
    }
    return Selection(keep, selection.removed, [plan.num_experts for plan in plans])


def _validate(selection, plans, groups: int, selector_name: str) -> None:
    """A third-party selector's answer must be a proper keep map before anything is written."""
    from mlxfun.core.types import Selection

    if not isinstance(selection, Selection) or not isinstance(selection.keep, dict):
        got = type(selection.keep if isinstance(selection, Selection) else selection).__name__
        what = "Selection.keep" if isinstance(selection, Selection) else "select()"
        raise MlxfunError(
            f"selector {selector_name!r}: {what} gave a {got}, expected "
            + ("a dict[int, list[int]]" if what == "Selection.keep" else "a Selection")
            + " (mlxfun.core.types; see docs/plugins.md, Types)"
        )
    for plan in plans:
        keep = selection.keep.get(plan.position)
        if keep is None:
            raise MlxfunError(
                f"selector {selector_name!r} gave no keep list for layer {plan.index}"
            )
        if sorted(set(keep)) != list(keep) or not all(0 <= e < _stored(plan) for e in keep):
            raise MlxfunError(
                f"selector {selector_name!r} kept {keep} in layer {plan.index}: not sorted, "
                f"unique ids in 0..{_stored(plan) - 1}"
            )
        if len(keep) < plan.top_k:
            raise MlxfunError(
                f"selector {selector_name!r} keeps {len(keep)} experts in layer {plan.index}, "
                f"fewer than top-k {plan.top_k}"
            )
        if groups > 1:
            size = _stored(plan) // groups
            counts = {sum(1 for e in keep if e // size == g) for g in range(groups)}
            if len(counts) != 1:
                raise MlxfunError(
                    f"selector {selector_name!r} removes unequal numbers from the {groups} router "
                    f"groups of layer {plan.index}; this router needs equal removals per group"
                )


# ---------------------------------------------------------------------------------------------
# The compressor


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for dist in ("mlxfun-core", "mlxfun-methods", "mlxfun-adapters", "mlx", "mlx-lm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _copy_other_files(source: Path, destination: Path, skip: set[str]) -> list[str]:
    """Tokenizer, generation and other small files beside the weights."""
    copied = []
    for path in sorted(source.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.name not in skip
            and path.suffix not in WEIGHT_SUFFIXES
        ):
            shutil.copy2(path, destination / path.name)
            copied.append(path.name)
    return copied


@attrs.define
class PrunePlan:
    """What ``plan_prune`` decided: the keep map and everything needed to write it."""

    source: Path
    config: dict
    adapter: object
    stats: object
    scores: np.ndarray
    plans: list
    selection: object
    owner: dict
    new_config: dict
    model_files: dict  # file name -> text: the model file(s) written beside config.json
    summary: dict
    provenance: dict
    skip: set


def plan_prune(request: PruneRequest, method: str = "prune") -> "PrunePlan":
    """Check the request and compute the keep map, the new config and the provenance, writing
    nothing (shared by ``prune`` and the ``ream`` merge)."""
    from mlxfun.core import plugins, slicing
    from mlxfun.core.stats import load_stats

    source = request.model
    config, adapter = _checked_source(request)
    selector = plugins.get_selector(request.selector)
    stats = load_stats(request.stats)
    scores = stats.score(request.scorer)
    plans, fingerprint, groups, topk_group = _moe_layout(request, config, adapter, stats)
    min_keep = _min_keep(request, adapter, plans, groups, topk_group)
    selection = _select(request, selector, scores, plans, groups, min_keep)
    headers = slicing.read_headers(source)
    slicing.check_weights_mlx(source)  # what the output's users will load it with
    owner = slicing.assign_tensors(plans, headers)
    new_config, model_files = _pruned_config(config, adapter, plans, selection, request)
    summary = _summary(request, adapter, scores, plans, selection, groups, headers, owner)
    summary["model_file"] = new_config.get("model_file")
    provenance = _provenance(
        request, method, fingerprint, stats, plans, selection, min_keep, groups, summary
    )
    return PrunePlan(
        source=source,
        config=config,
        adapter=adapter,
        stats=stats,
        scores=np.asarray(scores),
        plans=plans,
        selection=selection,
        owner=owner,
        new_config=new_config,
        model_files=model_files,
        summary=summary,
        provenance=provenance,
        skip=_files_not_copied(config) | set(model_files),
    )


def _checked_source(request: PruneRequest) -> tuple[dict, object]:
    """The source model's config and adapter, once the model may be pruned and the output
    written."""
    from mlxfun.core import biased_routers, plugins
    from mlxfun.core.config import read_config
    from mlxfun.core.outputs import check_output

    config = read_config(request.model)
    adapter = plugins.adapter_for_config(config)
    refusal = getattr(adapter, "prune_unsupported", None)
    if refusal:
        raise MlxfunError(f"{adapter.name} models cannot be pruned: {refusal}")
    if biased_routers.has_router_biases(config):
        raise MlxfunError(
            f"{request.model} was amplified (model_file {biased_routers.MODEL_FILE}), and "
            "pruning does not carry its router biases over; prune the model it was amplified "
            "from, then amplify the pruned model"
        )
    if not request.dry_run:
        if request.output is None:
            raise MlxfunError("pass --output (or --dry-run)")
        check_output(request.output, request.force, inputs=(request.model, request.stats))
    return config, adapter


def _moe_layout(request: PruneRequest, config: dict, adapter, stats) -> tuple:
    """``(plans, fingerprint, n_group, topk_group)`` of the source's MoE layers, once the stats
    are known to come from this model."""
    from mlxfun.core import slicing
    from mlxfun.core.stats import check_fingerprint, model_fingerprint

    skeleton, _ = slicing.model_skeleton(request.model)
    plans = slicing.layer_plans(skeleton, adapter)
    if not plans:
        raise MlxfunError(f"{adapter.name}: found no MoE layers in {request.model}")
    moe_layers = adapter.moe_layers(skeleton)
    # from the MoE layers (not the plans) so the fingerprint holds the expert tensor shapes
    fingerprint = model_fingerprint(config, moe_layers)
    check_fingerprint(stats, fingerprint, request.stats)

    blocks = {layer.position: layer.block for layer in moe_layers}
    group_settings = {router_groups(adapter, blocks[p.position]) for p in plans}
    if len(group_settings) != 1:
        raise MlxfunError(f"{adapter.name}: MoE layers disagree on their router groups")
    groups, topk_group = group_settings.pop()
    return plans, fingerprint, groups, topk_group


def _min_keep(request: PruneRequest, adapter, plans, groups: int, topk_group: int) -> list[int]:
    """The fewest experts each layer may keep: top-k, ``--min-keep``, the adapter's floor, and
    for group-limited routers two per group and top-k within the best ``topk_group`` groups."""
    top_k = [plan.top_k for plan in plans]
    if request.min_keep is not None:
        low = [k for k in top_k if request.min_keep < k]
        if low:
            raise MlxfunError(
                f"--min-keep {request.min_keep} is below top-k {max(low)}: a layer must keep at "
                f"least top-k experts"
            )
    floor = max(1, int(getattr(adapter, "min_experts", 1) or 1))
    min_keep = []
    for k in top_k:
        keep = max(request.min_keep or k, k, floor)
        if groups > 1:
            keep = max(keep, 2 * groups, groups * math.ceil(k / topk_group))
        min_keep.append(keep)
    return min_keep


def _select(request: PruneRequest, selector, scores, plans, groups: int, min_keep: list[int]):
    """The selector's keep map, checked before anything is written. The selector chooses among
    the stored experts; zero experts are added to the keep map afterwards (always kept)."""
    layer_indices = [plan.index for plan in plans]
    protect = _to_positions(request.protect, layer_indices, "--protect")
    target = _to_positions(request.target, layer_indices, "--target")
    zero_experts = any(plan.zero_experts for plan in plans)
    if zero_experts:
        protect = _zero_expert_options(plans, protect, target)
    options = SelectOptions(
        top_k=[plan.top_k for plan in plans],
        min_keep=min_keep,
        num_experts=[_stored(plan) for plan in plans],
        protect=protect,
        target=target,
        groups=groups,
        normalize=request.normalize,
        layer_indices=layer_indices,
        n=request.n,
        ratio=request.ratio,
    )
    selection = selector.select(np.asarray(scores), **options.as_kwargs())
    _validate(selection, plans, groups, request.selector)
    if zero_experts:
        selection = _with_zero_experts(selection, plans)
    return selection


def _config_counts(plans, selection) -> list[int]:
    """The experts with weights each layer keeps: what the config counts (longcat's zero
    experts have their own key)."""
    return [len(selection.keep[plan.position]) - plan.zero_experts for plan in plans]


def _pruned_config(config: dict, adapter, plans, selection, request) -> tuple[dict, dict]:
    """``(config, model files)`` of the pruned model: uniform counts edit the expert-count
    keys, different counts per layer need mlxfun's non-uniform model file; ``--model-file``
    adds a copy of the plugin's model module (``mlxfun.core.model_files``)."""
    from mlxfun.core import model_files, nonuniform

    new_config, model_file = _counts_config(config, adapter, plans, selection)
    files = {} if model_file is None else {nonuniform.MODEL_FILE: model_file}
    if request.model_file:
        new_config, copied = model_files.copy_model_module(new_config)
        files.update(copied)
    return new_config, files


def _counts_config(config: dict, adapter, plans, selection) -> tuple[dict, str | None]:
    """``(config, model file source or None)`` with the kept expert counts: uniform counts
    edit the expert-count keys, different counts per layer need mlxfun's non-uniform model
    file."""
    from mlxfun.core import nonuniform

    counts = _config_counts(plans, selection)
    keys = nonuniform.present_keys(config, adapter.num_experts_keys)
    for count in sorted(set(counts)):
        if not adapter.matches(nonuniform.uniform_config(config, keys, count)):
            raise MlxfunError(
                f"{adapter.name}: a layer with {count} experts is no longer an MoE layer for "
                f"mlx-lm; keep more experts (--min-keep)"
            )
    if len(set(counts)) == 1:
        return nonuniform.uniform_config(config, keys, counts[0]), None
    modules = [plan.module for plan in plans]
    if len(set(modules)) != len(modules):
        raise MlxfunError(
            f"{adapter.name}: several MoE layers share the module {modules[0]}; a "
            "non-uniform keep map cannot be built for it; use a per-layer selector"
        )
    layers_spec = [
        {"layer": plan.index, "module": plan.module, "num_experts": count}
        for plan, count in zip(plans, counts)
    ]
    return nonuniform.nonuniform_config(config, keys, layers_spec)


def _summary(request: PruneRequest, adapter, scores, plans, selection, groups, headers, owner):
    """What the command prints: counts, sizes (estimated from the headers; ``finish_summary``
    sets the written ones) and the removal report per layer."""
    from mlxfun.core import slicing

    from .selectors import removal_report

    kept = [len(selection.keep[plan.position]) for plan in plans]
    before, after = slicing.size_after(headers, owner, selection.keep)
    return {
        "model": str(request.model),
        "output": None if request.output is None else str(request.output),
        "dry_run": request.dry_run,
        "adapter": adapter.name,
        "scorer": request.scorer,
        "selector": request.selector,
        "uniform": len(set(_config_counts(plans, selection))) == 1,
        "groups": groups,
        "removed": selection.total_removed,
        "experts_before": sum(plan.num_experts for plan in plans),
        "experts_after": sum(kept),
        "bytes_before": before,
        "bytes_after": after,
        "bytes_saved": before - after,
        "layers": removal_report(selection, scores, [plan.index for plan in plans]),
        "keep": {str(plan.index): selection.keep[plan.position] for plan in plans},
    }


def _provenance(
    request: PruneRequest, method, fingerprint, stats, plans, selection, min_keep, groups, summary
) -> dict:
    """The output's mlxfun.json: how it was made, from what, and the source's own provenance
    when the source is itself an mlxfun output."""
    source = request.model
    provenance = {
        "mlxfun_version": _versions().get("mlxfun-core"),
        "method": method,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_model": str(source.resolve()),
        "source_fingerprint": fingerprint,
        "stats": {
            "path": str(request.stats.resolve()),
            "fingerprint": stats.fingerprint,
            "datasets": stats.metadata.get("datasets"),
            "tokens_seen": stats.metadata.get("tokens_seen"),
            "scorers": stats.metadata.get("scorers"),
        },
        "scorer": request.scorer,
        "selector": request.selector,
        "options": {
            "n": request.n,
            "ratio": request.ratio,
            "min_keep": min_keep,
            "protect": {str(k): v for k, v in request.protect.items()},
            "target": {str(k): v for k, v in request.target.items()},
            "normalize": request.normalize,
            "groups": groups,
        },
        "uniform": summary["uniform"],
        "moe_layers": [plan.index for plan in plans],
        "experts_before": [plan.num_experts for plan in plans],
        "experts_after": [len(selection.keep[plan.position]) for plan in plans],
        "keep": summary["keep"],
        "removed": {str(plan.index): selection.removed[plan.position] for plan in plans},
        "versions": _versions(),
    }
    previous = source / PROVENANCE_FILE
    if previous.is_file():
        try:
            provenance["source_provenance"] = json.loads(previous.read_text())
        except json.JSONDecodeError:
            pass
    return provenance


def _files_not_copied(config: dict) -> set[str]:
    """Source files that the pruned output writes anew rather than copies."""
    from mlxfun.core import slicing

    skip = {"config.json", PROVENANCE_FILE, slicing.INDEX_FILE}
    if config.get("model_file"):
        skip.add(str(config["model_file"]))
    recorded = config.get("mlxfun")
    nonuniform = recorded.get("nonuniform") if isinstance(recorded, dict) else None
    if isinstance(nonuniform, dict) and nonuniform.get("base_file"):
        skip.add(str(nonuniform["base_file"]))  # a model module copied by --model-file
    return skip


def write_pruned(plan: "PrunePlan", directory: Path) -> dict:
    """Write the pruned checkpoint, config, model file and the other files (not mlxfun.json)
    into ``directory``; returns the byte counts of ``slicing.slice_checkpoint``."""
    from mlxfun.core import slicing

    written = slicing.slice_checkpoint(plan.source, directory, plan.owner, plan.selection.keep)
    (directory / "config.json").write_text(json.dumps(plan.new_config, indent=4) + "\n")
    for name, text in plan.model_files.items():
        (directory / name).write_text(text)
    _copy_other_files(plan.source, directory, plan.skip)
    return written


def finish_summary(summary: dict, written: dict) -> dict:
    summary["bytes_after"] = written["bytes_after"]
    summary["bytes_saved"] = written["bytes_before"] - written["bytes_after"]
    summary["shards"] = written["shards"]
    return summary


def prune(request: PruneRequest) -> dict:
    from mlxfun.core.outputs import atomic_output_dir

    plan = plan_prune(request)
    if request.dry_run:
        return plan.summary
    inputs = (request.model, request.stats)
    with atomic_output_dir(request.output, force=request.force, inputs=inputs) as tmp:
        written = write_pruned(plan, tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(plan.provenance, indent=2) + "\n")
    return finish_summary(plan.summary, written)
