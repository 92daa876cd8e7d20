"""Gate amplification: a steering spec written into the model, so that stock mlx-lm applies it
with no mlxfun at inference (``mlxfun amplify``, and the ``amplify`` intervention in memory).

The bias goes where run-time steering puts it (``mlxfun.core.router_bias``), as a weight:

- ``correction`` point: added to the stored correction bias (``e_score_correction_bias``,
  ``expert_bias``, ``router_bias``); a masked expert's logit bias for softmax routers (see
  ``router_bias``) goes on the router Linear's bias as below;
- ``router`` point: added to the router Linear's bias when it has one (gpt_oss), otherwise a
  new ``<router>.bias`` tensor, which stock mlx-lm loads only through the model file
  ``mlxfun_router_bias.py`` (``mlxfun.core.biased_routers``; ``trust_remote_code=True``);
- ``gate`` point (a raw router array without a correction bias: deepseek, deepseek_v2): a new
  ``<gate>.bias`` tensor, which the same model file gives the gate module and adds to the logits
  the gate forms (``x @ weight.T + bias``, where run-time steering adds it), before its softmax
  and group-limited selection.

The values are the run-time ones (``steer.MASK`` -1e9, ``FORCE`` +50, or the rule's bias), so the
amplified model computes what ``steering`` computes. A finite -1e9 still never selects the
expert: on logits its softmax share underflows to exactly 0 and its sigmoid is 0; on a
correction bias its selection score is about -1e9, below every other expert's (scores in [0, 1]
plus biases of order 1). Tensors stored in float16 get the values clipped to float16's finite
range (-65504 is just as decisive). Quantized routers keep their quantized weight: a Linear's
bias is never quantized and ``nn.quantize`` keeps it.
"""

import datetime
import json
import shutil
from pathlib import Path

import attrs
from mlxfun.core.errors import MlxfunError


@attrs.define
class Edit:
    """One tensor the amplification writes: ``name`` in the checkpoint, ``values`` to add (or
    to store, ``new``), on ``module``'s attribute ``attr`` in the loaded model."""

    name: str
    module: object = attrs.field(repr=False)
    attr: str
    values: object = attrs.field(repr=False)  # float32 numpy (experts,)
    new: bool = False
    router: str | None = None  # the router (or gate) module's path, for a new bias
    gate: bool = False  # a gate module holding a raw router array (the ``gate`` point)


def router_edits(model, adapter, biases: dict, layers) -> list[Edit]:
    """The tensor edits that put ``biases`` ({position: float32 (experts,)}) into the model."""
    import numpy as np
    from mlxfun.core.adapter import gate_bias, get_path
    from mlxfun.core.router_bias import bias_point, correction_bias, removal_logits

    gate_path = adapter.router_attr.rpartition(".")[0]

    edits = []
    for layer in layers:
        if layer.position not in biases:
            continue
        bias = np.asarray(biases[layer.position], np.float32)
        point = bias_point(adapter, layer)
        router_path = f"{layer.path}.{adapter.router_attr}"
        if point == "gate":
            path = f"{layer.path}.{gate_path}" if gate_path else layer.path
            gate = get_path(layer.block, gate_path) if gate_path else layer.block
            new = gate_bias(gate) is None  # else a gate amplified before: add to its bias
            edits.append(Edit(f"{path}.bias", gate, "bias", bias, new, path, gate=True))
            continue
        logit_bias = bias
        if point == "correction":
            owner, attr, _ = correction_bias(adapter, layer.block)
            owner_path = adapter.correction_bias_attr.rpartition(".")[0]
            name = f"{layer.path}.{owner_path}.{attr}" if owner_path else f"{layer.path}.{attr}"
            edits.append(Edit(name, owner, attr, bias))
            removed = removal_logits(adapter, layer, bias)
            if removed is None:
                continue
            logit_bias = np.array(removed, dtype=np.float32)
        router = get_path(layer.block, adapter.router_attr)
        has_bias = "bias" in router
        edits.append(
            Edit(f"{router_path}.bias", router, "bias", logit_bias, not has_bias, router_path)
        )
    return edits


def _stored(values, dtype):
    """``values`` as an MLX array of ``dtype``, clipped to its finite range."""
    import mlx.core as mx
    import numpy as np

    info = mx.finfo(dtype)
    return mx.array(np.clip(values, float(info.min), float(info.max))).astype(dtype)


def apply_edits(edits: list[Edit]) -> None:
    """Make the edits on the loaded model (permanent)."""
    import mlx.core as mx
    from mlxfun.core.biased_routers import bias_gate
    from mlxfun.core.router_bias import linear_bias_dtype

    for edit in edits:
        if edit.gate and edit.new:
            bias_gate(edit.module, _stored(edit.values, edit.module["weight"].dtype))
        elif edit.new:
            setattr(edit.module, edit.attr, _stored(edit.values, linear_bias_dtype(edit.module)))
        else:
            old = getattr(edit.module, edit.attr)
            added = old.astype(mx.float32) + mx.array(edit.values)
            setattr(edit.module, edit.attr, _stored(added, old.dtype))


def amplify_in_memory(model, spec, adapter=None, config: dict | None = None) -> list[Edit]:
    """The ``amplify`` intervention: write the spec's biases into the loaded model's weights."""
    from .steer import adapter_of, as_spec, check_spec_fingerprint, layer_biases

    spec = as_spec(spec)
    adapter = adapter or adapter_of(model, config)
    layers = adapter.moe_layers(model)
    check_spec_fingerprint(spec, model, adapter, layers, config)
    edits = router_edits(model, adapter, layer_biases(spec, layers), layers)
    apply_edits(edits)
    return edits


# ---------------------------------------------------------------------------------------------
# The checkpoint


def amplify(model_dir, spec, output, force: bool = False) -> dict:
    """Write ``model_dir`` with ``spec``'s biases in its weights to ``output`` (atomically;
    the input is never modified); returns a summary."""
    import mlx.core as mx
    import numpy as np
    from mlxfun.core import biased_routers, nonuniform, plugins
    from mlxfun.core.config import read_config
    from mlxfun.core.models import load_mlx_model
    from mlxfun.core.outputs import PROVENANCE_FILE, atomic_output_dir, check_output
    from mlxfun.core.stats import model_fingerprint

    from .steer import as_spec, check_spec_fingerprint, layer_biases, load_spec

    model_dir = Path(model_dir)
    spec_path = None if not isinstance(spec, str | Path) else Path(spec)
    spec = load_spec(spec_path) if spec_path is not None else as_spec(spec)
    config = read_config(model_dir)
    if config.get("model_file") is not None:
        raise MlxfunError(
            f"amplify: {model_dir} has a model_file ({config['model_file']}), which amplify's "
            "own model file cannot build on; amplify a model that stock mlx-lm builds (one "
            "pruned uniformly, not model-wide) or steer this one at run time"
        )
    adapter = plugins.adapter_for_config(config)
    if adapter is None:
        raise MlxfunError(f"no installed adapter handles model type {config.get('model_type')!r}")
    inputs = [model_dir] + ([spec_path] if spec_path is not None else [])
    check_output(output, force, inputs)
    model, _ = load_mlx_model(model_dir, lazy=True)
    layers = adapter.moe_layers(model)
    fingerprint = model_fingerprint(config, layers)
    check_spec_fingerprint(spec, model, adapter, layers, config)
    edits = router_edits(model, adapter, layer_biases(spec, layers), layers)
    by_name = {edit.name: edit for edit in edits}
    routers = [edit.router for edit in edits if edit.new and not edit.gate]
    gates = [edit.router for edit in edits if edit.new and edit.gate]
    new_config = config
    files = {}
    if routers or gates:
        base = nonuniform.base_module(config)
        new_config = biased_routers.biased_config(config, base, routers, gates)
        files[biased_routers.MODEL_FILE] = biased_routers.model_file_source(base)

    shards = sorted(model_dir.glob("model*.safetensors"))
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    found = set()
    with atomic_output_dir(output, force, inputs) as tmp:
        for shard in shards:
            weights, metadata = mx.load(str(shard), return_metadata=True)
            for name in list(weights):
                edit = by_name.get(name)
                if edit is not None and not edit.new:
                    old = weights[name]
                    added = old.astype(mx.float32) + mx.array(edit.values)
                    weights[name] = _stored(added, old.dtype)
                    found.add(name)
            for edit in edits:
                if edit.new and f"{edit.router}.weight" in weights:
                    dtype = weights.get(f"{edit.router}.scales", weights[f"{edit.router}.weight"])
                    dtype = dtype.dtype if mx.issubdtype(dtype.dtype, mx.floating) else mx.float32
                    weights[edit.name] = _stored(edit.values, dtype)
                    found.add(edit.name)
                    if index is not None:
                        index["weight_map"][edit.name] = shard.name
            mx.save_safetensors(str(tmp / shard.name), weights, metadata or {"format": "mlx"})
            del weights
        missing = sorted(set(by_name) - found)
        if missing:
            raise MlxfunError(
                f"amplify: {model_dir}'s weights have no {missing[0]}; amplify works on "
                "checkpoints saved by mlx-lm (mlx_lm.convert), whose tensor names are the model's"
            )
        if index is not None:
            (tmp / index_path.name).write_text(json.dumps(index, indent=4) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=4) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text)
        skip = {"config.json", PROVENANCE_FILE, index_path.name, *(s.name for s in shards)}
        for path in model_dir.iterdir():
            if path.name in skip or path.name.startswith("."):
                continue
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
            elif path.is_dir():
                shutil.copytree(path, tmp / path.name)
        summary = {
            "output": str(output),
            "edits": [
                {
                    "tensor": e.name,
                    "new": e.new,
                    "experts": [int(i) for i in np.flatnonzero(e.values)],
                }
                for e in edits
            ],
            "model_file": files and biased_routers.MODEL_FILE or None,
        }
        provenance = {
            "method": "amplify",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source_model": str(model_dir.resolve()),
            "source_fingerprint": fingerprint,
            "spec": spec.to_json(),
            "spec_path": str(spec_path.resolve()) if spec_path is not None else None,
            "edits": summary["edits"],
            "model_file": summary["model_file"],
            "versions": _versions(),
        }
        previous = model_dir / PROVENANCE_FILE
        if previous.is_file():
            try:
                provenance["source_provenance"] = json.loads(previous.read_text())
            except json.JSONDecodeError:
                pass
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return summary


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for name in ("mlxfun-core", "mlxfun-methods", "mlx", "mlx-lm"):
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            pass
    return result
