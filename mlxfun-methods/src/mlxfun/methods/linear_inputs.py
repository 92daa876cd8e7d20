"""What every linear layer of a model receives on calibration text, one decoder layer at a time.

``layer_targets`` finds a decoder layer's linear layers: the MLP's projections (dense
``Linear``), the stacked experts' projections (``SwitchLinear``, weight (E, out, in)) and,
on request, the attention projections; routers are left out. ``LayerCapture`` hooks them
(``mlxfun.core.hooks``) while the layer runner (``mlxfun.core.runner.LayerRunner``) applies that
layer to every calibration batch, and keeps the inputs of the real (non-padding) tokens: for a
stacked projection, the rows of the tokens the router sent to each expert (the experts call's
own ``indices``, recorded by ``mlxfun.core.adapter.stacked_experts_hooks``), not weighted by the
gate (the gate multiplies the expert's output, not its input). ``finish`` turns them into
``neuron_stats.channel_stats`` per linear (per expert) and drops them, so the collection holds
one decoder layer's inputs at a time.

``run_layers`` drives it: layer by layer, ``on_layer`` (which prunes) sees each layer's
statistics; with ``sequential`` the layer's outputs are recomputed after ``on_layer``, so later
layers see the earlier ones already pruned (as Wanda does).
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

from .neuron_stats import StatOptions, channel_stats

LINEAR_CLASSES = ("Linear", "SwitchLinear")
QUANTIZED_CLASSES = ("QuantizedLinear", "QuantizedSwitchLinear")
ATTENTION_PARTS = ("self_attn", "attention", "attn")
MLP_PARTS = ("mlp", "feed_forward", "block_sparse_moe", "moe")
ROUTERS = ("gate", "router", "shared_expert_gate")


@attrs.define
class Target:
    name: str  # the weight's module path from the model root
    module: Any = attrs.field(repr=False)
    group: str  # "mlp", "experts" or "attention"
    parent: Any = attrs.field(default=None, repr=False)  # the experts module calling a stacked one

    @property
    def stacked(self) -> bool:
        return self.group == "experts"


def _class_names(module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def check_not_quantized(model) -> None:
    for path, module in model.named_modules():
        if _class_names(module) & set(QUANTIZED_CLASSES):
            raise MlxfunError(
                f"{path} is quantized; zeroing or removing quantized weights would need a "
                "requantization that does not keep them zero: dequantize the model first "
                "(mlx_lm.convert --dequantize) and quantize the result afterwards"
            )


def layer_targets(
    layer, prefix: str, *, mlp: bool = True, attention: bool = False, experts: bool = True
) -> list[Target]:
    """The linear layers of decoder layer ``layer`` (path ``prefix``) to prune."""
    from mlxfun.core.adapter import get_path

    targets = []
    for path, module in sorted(layer.named_modules(), key=lambda item: item[0]):
        if not path or not (_class_names(module) & set(LINEAR_CLASSES)):
            continue
        parts = path.split(".")
        if parts[-1] in ROUTERS:
            continue
        stacked = module.weight.ndim == 3
        if parts[0] in ATTENTION_PARTS:
            group = "attention"
        elif parts[0] in MLP_PARTS:
            group = "experts" if stacked else "mlp"
        else:
            continue
        wanted = {"attention": attention, "mlp": mlp, "experts": experts}[group]
        if not wanted:
            continue
        parent = get_path(layer, ".".join(parts[:-1])) if stacked else None
        targets.append(Target(f"{prefix}.{path}", module, group, parent))
    return targets


@attrs.define
class Calibration:
    """The calibration batches and, per token (batch rows flattened), its sample (document)
    and its token class (one of the ``classes`` most frequent token ids, else -1)."""

    batches: list  # (tokens, mask) numpy
    docs: list  # per batch: (B * L,) int
    classes: list  # per batch: (B * L,) int

    @classmethod
    def build(cls, batches, classes: int = 32) -> Calibration:
        batches = list(batches)
        real = np.concatenate([t[m] for t, m in batches]) if batches else np.zeros(0, int)
        ids, counts = np.unique(real, return_counts=True)
        order = np.lexsort((ids, -counts))[:classes]
        label = {int(ids[i]): rank for rank, i in enumerate(order)}
        docs, labels, start = [], [], 0
        for tokens, _ in batches:
            rows, width = tokens.shape
            docs.append(np.repeat(np.arange(start, start + rows), width))
            labels.append(np.array([label.get(int(t), -1) for t in tokens.reshape(-1)]))
            start += rows
        return cls(batches, docs, labels)

    @property
    def tokens(self) -> int:
        return int(sum(m.sum() for _, m in self.batches))


class LayerCapture:
    """The inputs of ``targets`` on every batch of ``calibration`` while the runner applies
    their decoder layer (use ``hooks()`` with ``call_hooks`` and ``batch_done`` as the
    runner's ``on_batch``)."""

    def __init__(self, targets: list[Target], calibration: Calibration):
        self.targets = targets
        self.calibration = calibration
        self.pending: list = []
        self.routing: dict[int, Any] = {}  # id(experts module) -> its record
        self.rows: dict[str, list] = {t.name: [] for t in targets}

    def hooks(self) -> list:
        from mlxfun.core.adapter import MoELayer, stacked_experts_hooks

        hooks = []
        for target in self.targets:
            hooks.append((target.module, self._recorder(target)))
            if target.stacked and id(target.parent) not in self.routing:
                record = _Routing()
                self.routing[id(target.parent)] = record
                layer = MoELayer(0, 0, "", None, target.parent)
                hooks.extend(stacked_experts_hooks(layer, record))
        return hooks

    def _recorder(self, target: Target):
        def wrapper(module, call, x, *args, **kwargs):
            if target.stacked:
                indices = args[0]
                sort = bool(kwargs.get("sorted_indices", args[1] if len(args) > 1 else False))
                self.pending.append((target, x, indices, sort))
            else:
                self.pending.append((target, x, None, False))
            return call(x, *args, **kwargs)

        return wrapper

    def batch_done(self, batch: int) -> None:
        mask = self.calibration.batches[batch][1].reshape(-1)
        # projections fed the same array (q/k/v, gate/up) share one copy of its rows
        seen: dict[int, tuple] = {}
        for target, x, indices, sort in self.pending:
            key = id(x)
            if key not in seen:
                seen[key] = self._rows(target, x, indices, sort, mask)
            rows, token, experts = seen[key]
            self.rows[target.name].append((rows, token, batch, experts))
        self.pending = []

    def _rows(self, target, x, indices, sort, mask):
        """``(rows, token, experts)``: the real tokens' input rows, their token positions in
        the batch and (stacked) the expert of each row."""
        import mlx.core as mx

        if not target.stacked:
            rows = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
            return rows[mask], np.flatnonzero(mask), None
        routed = self.routing[id(target.parent)].indices
        k = routed.shape[-1]
        x = x.squeeze(-2)
        x = mx.broadcast_to(x, (*indices.shape, x.shape[-1])).astype(mx.float32)
        rows = np.array(x).reshape(-1, x.shape[-1])
        experts = np.array(indices).reshape(-1)
        if sort:  # the experts call sorted its rows by expert: mlx-lm's _gather_sort order
            position = np.array(mx.argsort(routed.flatten()))
        else:
            position = np.arange(experts.size)
        token = position // k
        keep = mask[token]
        return rows[keep], token[keep], experts[keep]

    def finish(self, options: StatOptions) -> dict[str, Any]:
        """Per target: its statistics (a list, one per expert, for a stacked projection)."""
        result = {}
        for target in self.targets:
            chunks = self.rows.pop(target.name)
            inputs = target.module.weight.shape[-1]
            x = _concat([c[0] for c in chunks], inputs)
            docs = _concat1([self.calibration.docs[c[2]][c[1]] for c in chunks])
            classes = _concat1([self.calibration.classes[c[2]][c[1]] for c in chunks])
            if not target.stacked:
                result[target.name] = channel_stats(x, docs, classes, options)
                continue
            experts = _concat1([c[3] for c in chunks])
            result[target.name] = [
                channel_stats(x[experts == e], docs[experts == e], classes[experts == e], options)
                for e in range(target.module.weight.shape[0])
            ]
        return result


@attrs.define
class _Routing:
    indices: Any = None
    outputs: Any = None


def _concat(parts, inputs: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, inputs), np.float32)


def _concat1(parts) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def run_layers(
    model,
    calibration: Calibration,
    targets_of,
    on_layer,
    *,
    options: StatOptions = StatOptions(),
    sequential: bool = True,
    progress=None,
) -> None:
    """For every decoder layer i: ``targets_of(i, layer, prefix)`` names its targets; their
    statistics go to ``on_layer(i, targets, stats)``. ``sequential``: layer i's outputs are
    computed after ``on_layer`` (which may prune it), else before."""
    import mlx.core as mx
    from mlxfun.core.hooks import call_hooks
    from mlxfun.core.runner import LayerRunner, all_decoder_layers

    decoder = all_decoder_layers(model)
    if not decoder[1]:
        raise MlxfunError(f"{type(model).__name__}: found no list of decoder layers to prune")
    token_batches = [mx.array(tokens) for tokens, _ in calibration.batches]
    try:
        runner = LayerRunner(model, None, token_batches, decoder=decoder)
    except MlxfunError as exc:  # the runner's fix names collect; ours is another
        fix = "; only --method magnitude works without a calibration forward"
        raise MlxfunError(str(exc).replace("; collect without --stream", fix)) from None
    path, layers = decoder
    try:
        for i, layer in enumerate(layers):
            targets = targets_of(i, layer, f"{path}.{i}")
            if not targets:
                runner.run(i)
                continue
            capture = LayerCapture(targets, calibration)
            with call_hooks(capture.hooks()):
                runner.run(i, on_batch=capture.batch_done, keep=not sequential)
            on_layer(i, targets, capture.finish(options))
            if sequential:
                runner.run(i)
            if progress is not None:
                progress(i)
    finally:
        runner.close()
