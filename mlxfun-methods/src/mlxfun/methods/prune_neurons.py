"""``mlxfun prune-neurons``: remove whole intermediate neurons from MLPs and experts.

An MLP's intermediate neuron n is row n of its gate and up projections and column n of its down
projection. Its score is the sum over column n of the neuron scorer's down-projection scores
(``neuron_scorers``; the statistics of the down projection's input channel n are that neuron's
activations, per expert from the tokens routed to it): for ``wanda`` ||X_n|| * sum_i |W_in|.
Every pruned MLP (dense, shared expert: scored from the MoE block's input, all tokens) loses
``round(ratio * neurons)`` neurons, every expert of a layer the same count (its own
lowest-scored ones), so the switch tensors stay rectangular. When one value per size key
describes every layer (no ``--last``) and the architecture builds the result from it, the
config's size keys are updated and stock mlx-lm loads the result as it is; else every pruned
module gets its own sizes through mlxfun's model file (``mlxfun.core.nonuniform.sizes_config``;
``mlx_lm.load(path, trust_remote_code=True)``). Attention is left as it is. With
``sequential`` each layer is cut before its outputs feed the next one.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

from .linear_inputs import check_not_quantized, layer_targets, run_layers
from .sparsify import SparsifyRequest, load_calibration, versions, write_model

UP = ("gate_proj", "up_proj", "fc1", "w1", "w3")
DOWN = ("down_proj", "fc2", "w2")
SIZE_KEYS = ("intermediate_size", "moe_intermediate_size", "ffn_dim", "ffn_hidden_size")


@attrs.define(kw_only=True)
class PruneNeuronsRequest(SparsifyRequest):
    ratio: float = 0.25


@attrs.define
class Unit:
    """One MLP (dense, or the stacked experts of a layer): its up-side and down projections."""

    layer: int
    path: str
    kind: str  # "mlp", "experts" or "shared" (a shared expert: a dense MLP in an MoE layer)
    ups: list  # (name, module)
    down: object  # Target of the down projection

    @property
    def neurons(self) -> int:
        return int(self.down.module.weight.shape[-1])


def layer_units(index, layer, prefix, experts: bool) -> list[Unit]:
    units: dict[str, Unit] = {}
    targets = layer_targets(layer, prefix, mlp=True, attention=False, experts=experts)
    by_parent: dict[str, list] = {}
    for target in targets:
        parent, _, name = target.name.rpartition(".")
        by_parent.setdefault(parent, []).append((name, target))
    for parent, members in by_parent.items():
        names = dict(members)
        down = [names[n] for n in DOWN if n in names]
        ups = [(n, names[n].module) for n in UP if n in names]
        if len(down) != 1 or not ups:
            continue
        kind = "shared" if "shared_expert" in parent else down[0].group
        units[parent] = Unit(index, parent, kind, ups, down[0])
    return list(units.values())


def neuron_scores(unit: Unit, stats, scorer, options) -> np.ndarray:
    """(neurons,) for a dense MLP, (experts, neurons) for stacked experts."""
    import mlx.core as mx

    w = np.array(unit.down.module.weight.astype(mx.float32))
    if unit.kind == "experts":
        return np.stack(
            [
                np.asarray(scorer.score(w[e], None if stats is None else stats[e], **options)).sum(
                    0
                )
                for e in range(w.shape[0])
            ]
        )
    return np.asarray(scorer.score(w, stats, **options)).sum(0)


def keep_neurons(scores: np.ndarray, remove: int) -> np.ndarray:
    """Sorted indices of the kept neurons along the last axis (lowest scores removed)."""
    order = np.argsort(scores, axis=-1, kind="stable")[..., remove:]
    return np.sort(order, axis=-1)


def cut(unit: Unit, keep: np.ndarray) -> None:
    """Keep only neurons ``keep`` of ``unit`` (per expert for stacked experts), in place."""
    import mlx.core as mx

    idx = mx.array(keep.astype(np.int32))
    for _, module in unit.ups:
        if unit.kind == "experts":
            module.weight = mx.take_along_axis(module.weight, idx[..., None], axis=1)
            if "bias" in module:
                module.bias = mx.take_along_axis(module.bias, idx, axis=1)
        else:
            module.weight = module.weight[idx]
            if "bias" in module:
                module.bias = module.bias[idx]
    down = unit.down.module
    if unit.kind == "experts":
        down.weight = mx.take_along_axis(down.weight, idx[:, None, :], axis=2)
    else:
        down.weight = down.weight[:, idx]
    mx.eval([m.parameters() for _, m in unit.ups], down.parameters())


def size_overrides(config: dict, kind: str, size: int, kept: int) -> dict:
    """The config values that make the architecture build a ``kind`` unit of ``size`` neurons
    with ``kept``: its size key, or for DeepSeek-style shared experts (``moe_intermediate_size
    * n_shared_experts`` neurons) those two."""
    preferred = {
        "experts": ("moe_intermediate_size",),
        "mlp": ("intermediate_size",),
        "shared": ("shared_expert_intermediate_size",),
    }[kind]
    for key in preferred:
        if config.get(key) == size:
            return {key: kept}
    shared = config.get("n_shared_experts")
    if kind == "shared" and shared and config.get("moe_intermediate_size", 0) * shared == size:
        if kept % shared == 0:
            return {"moe_intermediate_size": kept // shared}
        return {"moe_intermediate_size": kept, "n_shared_experts": 1}
    for key in SIZE_KEYS:
        if config.get(key) == size:
            return {key: kept}
    raise MlxfunError(
        f"cannot find the config key holding the {kind} intermediate size {size} "
        f"(tried {', '.join(SIZE_KEYS)}); this architecture is not supported by prune-neurons"
    )


def prune_neurons(request: PruneNeuronsRequest) -> dict:
    from mlx_lm.utils import save_config
    from mlxfun.core import nonuniform, plugins
    from mlxfun.core.config import read_config
    from mlxfun.core.models import load_model
    from mlxfun.core.outputs import atomic_output_dir, check_output
    from mlxfun.core.runner import all_decoder_layers

    if not 0.0 < request.ratio < 1.0:
        raise MlxfunError(f"--ratio must be in (0, 1), got {request.ratio}")
    if request.output is None:
        raise MlxfunError("pass an --output directory")
    if request.last is not None and request.last < 1:
        raise MlxfunError(f"--last must be at least 1, got {request.last}")
    scorer = plugins.get_neuron_scorer(request.method)
    if scorer.stats and not request.dataset:
        raise MlxfunError(f"--method {request.method} needs a calibration --dataset")
    inputs = [request.model, *request.dataset]
    check_output(request.output, request.force, inputs)
    start = time.perf_counter()
    model, tokenizer, config = load_model(request.model)
    check_not_quantized(model)
    if nonuniform.is_nonuniform(config) and any(
        "config" in layer for layer in config["mlxfun"]["nonuniform"]["layers"]
    ):
        raise MlxfunError(
            f"{request.model} already has per-module sizes (mlxfun_nonuniform.py, written by "
            "prune-neurons); pruning it again is not supported: start from its source model"
        )
    path, layers = all_decoder_layers(model)
    if not layers:
        raise MlxfunError(f"{type(model).__name__}: found no list of decoder layers")
    first = 0 if request.last is None else max(0, len(layers) - request.last)
    units_of = {}
    for index, layer in enumerate(layers):
        if index >= first:
            units_of[index] = layer_units(index, layer, f"{path}.{index}", request.experts)
    if not any(units_of.values()):
        raise MlxfunError("no MLP or experts to prune neurons from (--no-experts on an MoE model?)")
    rows, removed, sizes = [], {}, []
    options = request.score_options()

    def on_layer(index, targets, stats):
        for unit in units_of.get(index, []):
            before = unit.neurons
            remove = int(round(request.ratio * before))
            if remove >= before:
                raise MlxfunError(f"--ratio {request.ratio} removes every neuron of {unit.path}")
            scores = neuron_scores(unit, stats.get(unit.down.name), scorer, options)
            keep = keep_neurons(scores, remove)
            dropped = np.sort(np.argsort(scores, axis=-1, kind="stable")[..., :remove], axis=-1)
            cut(unit, keep)
            overrides = size_overrides(config, unit.kind, before, before - remove)
            sizes.append({"layer": index, "module": unit.path, "config": overrides})
            removed[unit.path] = dropped.tolist()
            rows.append(
                {"layer": index, "unit": unit.path, "kind": unit.kind, "neurons": before}
                | {"kept": before - remove, "removed": remove}
            )

    def targets_of(index, layer, prefix):
        return [unit.down for unit in units_of.get(index, [])]

    calibration = None
    if scorer.stats:
        calibration = load_calibration(request, tokenizer)
        run_layers(
            model,
            calibration,
            targets_of,
            on_layer,
            options=request.stat_options(),
            sequential=request.sequential,
        )
    else:
        for index in units_of:
            on_layer(index, [], {})
    bytes_before = _weight_bytes(request.model)
    uniform = _uniform_config(config, sizes) if first == 0 else None
    provenance = {
        "mlxfun_version": versions().get("mlxfun-core"),
        "method": "prune-neurons",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_model": str(request.model.resolve()),
        "scorer": request.method,
        "ratio": request.ratio,
        "sequential": request.sequential,
        "datasets": [str(Path(p).resolve()) for p in request.dataset],
        "calibration_tokens": calibration.tokens if calibration else 0,
        "sizes": sizes,
        "removed_neurons": removed,
        "versions": versions(),
    }
    with atomic_output_dir(request.output, force=request.force, inputs=inputs) as tmp:
        write_model(tmp, model, request.model, config=uniform or config, provenance=provenance)
        if uniform is None or not _builds(tmp):
            new_config, source = nonuniform.sizes_config(config, sizes)
            save_config(new_config, tmp / "config.json")
            (tmp / nonuniform.MODEL_FILE).write_text(source)
            if not _builds(tmp):
                raise MlxfunError(
                    "the pruned model does not build with its modules' new sizes; this "
                    "architecture sizes them in a way prune-neurons does not know: not supported"
                )
        changes = _changes(config, read_config(tmp))
        bytes_after = _weight_bytes(tmp)
    return {
        "method": request.method,
        "ratio": request.ratio,
        "layers": rows,
        "config_changes": changes,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "calibration_tokens": provenance["calibration_tokens"],
        "seconds": round(time.perf_counter() - start, 2),
        "output": str(request.output),
    }


def _weight_bytes(directory) -> int:
    from mlxfun.core.slicing import read_headers, tensor_bytes

    return sum(
        tensor_bytes(i) for shard in read_headers(directory).values() for i in shard.values()
    )


def _uniform_config(config: dict, sizes: list[dict]) -> dict | None:
    """The config with every unit's size values, when no two units need different values for
    one key (then the model may build from it alone); else None."""
    values: dict = {}
    for size in sizes:
        for key, value in size["config"].items():
            if values.setdefault(key, value) != value:
                return None
    return {**config, **values}


def _builds(directory: Path) -> bool:
    """Whether the written model builds from its config with exactly its weights' shapes (a
    config key may size other modules too, such as DeepSeek's shared experts)."""
    from mlxfun.core.models import load_mlx_model

    try:
        load_mlx_model(directory, lazy=True)
    except MlxfunError:
        return False
    return True


def _changes(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if before.get(k) != v}
