"""Router-faithful observation of MoE layers during an ordinary forward pass.

Per MoE layer, one hook on the block records its input ``x``; the adapter's ``observe_hooks``
record the experts the block used and their raw outputs f_j(x) (before the gate weights
multiply them): by default one hook on the stacked experts call, which receives the indices.
After the forward, the adapter recomputes the routing from ``x`` and we check that its
selection equals what the block actually used, so the gate weights we report are the model's.
The forward's outputs are the un-hooked ones: the hooks only read.
"""

import attrs
import numpy as np

from .adapter import MoEAdapter, MoELayer, stacked_experts_hooks
from .hooks import call_hooks
from .types import LayerObservation


class RoutingMismatch(RuntimeError):
    pass


@attrs.define
class _Record:
    x: object = None
    indices: object = None
    outputs: object = None


class Observer:
    """Use as ``with Observer(model, adapter, needs) as obs: model(tokens)``, then
    ``obs.observations(mask)`` gives one ``LayerObservation`` per MoE layer."""

    def __init__(
        self,
        model,
        adapter: MoEAdapter,
        needs=frozenset({"selected", "weights"}),
        layers: list[MoELayer] | None = None,
    ):
        self.model = model
        self.adapter = adapter
        self.needs = frozenset(needs)
        # ``layers``: observe only these MoE layers (the runner observes one at a time)
        self.layers: list[MoELayer] = adapter.moe_layers(model) if layers is None else layers
        if not self.layers:
            raise ValueError(f"{adapter.name}: found no MoE layers in this model")
        self.records = [_Record() for _ in self.layers]
        self._context = None

    def _hooks(self):
        hooks = []
        experts_hooks = getattr(self.adapter, "observe_hooks", None) or stacked_experts_hooks
        for layer, record in zip(self.layers, self.records):
            hooks.append((layer.block, self._block_hook(record)))
            hooks.extend(experts_hooks(layer, record))
        return hooks

    @staticmethod
    def _block_hook(record):
        def wrapper(module, call, x, *args, **kwargs):
            record.x = x
            record.indices = record.outputs = None
            return call(x, *args, **kwargs)

        return wrapper

    def __enter__(self):
        self._context = call_hooks(self._hooks())
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def observations(self, mask=None) -> list[LayerObservation]:
        """Evaluate what the last forward recorded; ``mask`` (batch, seq) marks real tokens."""
        return self.finish(self.pending(), mask)

    def pending(self) -> list[dict]:
        """What the last forward recorded, per MoE layer, as lazy MLX arrays (the adapter's
        routing recomputed from the block input), not evaluated yet; the records are cleared.
        ``finish`` (or ``finish(concat_pending([...]))`` for several forwards) evaluates it."""
        import mlx.core as mx

        pending = []
        for layer, record in zip(self.layers, self.records):
            if record.x is None or record.indices is None:
                raise RuntimeError(f"MoE layer {layer.index} was not called in the forward")
            indices, weights, logits = self.adapter.routing(layer.block, record.x)
            if isinstance(record.indices, list):  # one entry per (token, slot)
                record.indices = mx.array(record.indices)
                record.outputs = mx.stack(record.outputs)
            item = {
                "used": record.indices,
                "indices": indices,
                "weights": weights.astype(mx.float32),
            }
            if "norms" in self.needs:
                outs = record.outputs.astype(mx.float32)
                item["norms"] = mx.sqrt(mx.sum(outs * outs, axis=-1))
            if "logits" in self.needs:
                item["logits"] = logits.astype(mx.float32)
            if "outputs" in self.needs:
                item["outputs"] = record.outputs.astype(mx.float32)
            pending.append(item)
            record.x = record.indices = record.outputs = None
        return pending

    def concat_pending(self, forwards: list[list[dict]]) -> list[dict]:
        """Several forwards' ``pending`` as one (tokens in order), so that one ``finish``
        evaluates and converts them all: per token, the same observations."""
        import mlx.core as mx

        merged = []
        for position, layer in enumerate(self.layers):
            k, item = layer.top_k, {}
            for key in forwards[0][position]:
                parts = [f[position][key] for f in forwards]
                width = parts[0].shape[-1]
                tail = {"logits": (width,), "outputs": (k, width)}.get(key, (k,))
                item[key] = mx.concatenate([p.reshape(-1, *tail) for p in parts])
            merged.append(item)
        return merged

    def finish(self, pending: list[dict], mask=None) -> list[LayerObservation]:
        """Evaluate ``pending`` into one ``LayerObservation`` per MoE layer."""
        import mlx.core as mx

        mx.eval(pending)
        keep = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        return [self._observation(layer, item, keep) for layer, item in zip(self.layers, pending)]

    def _observation(self, layer, item, keep) -> LayerObservation:
        k = layer.top_k
        used = np.array(item["used"]).reshape(-1, k)
        chosen = np.array(item["indices"]).reshape(-1, k)
        weights = np.array(item["weights"]).reshape(-1, k)
        # Order both by expert id so weights line up with the recorded outputs.
        used_order = np.argsort(used, axis=-1, kind="stable")
        chosen_order = np.argsort(chosen, axis=-1, kind="stable")
        used = np.take_along_axis(used, used_order, -1)
        chosen = np.take_along_axis(chosen, chosen_order, -1)
        if not np.array_equal(used, chosen):
            bad = int(np.sum(np.any(used != chosen, axis=-1)))
            raise RoutingMismatch(
                f"{self.adapter.name}: layer {layer.index}: the adapter's routing differs from "
                f"the block's on {bad} of {used.shape[0]} tokens; the adapter is wrong for "
                "this model"
            )
        obs = LayerObservation(
            layer=layer.position,
            num_experts=layer.num_experts,
            selected=used,
            weights=np.take_along_axis(weights, chosen_order, -1),
        )
        if "norms" in item:
            norms = np.array(item["norms"]).reshape(-1, k)
            obs.norms = np.take_along_axis(norms, used_order, -1)
        if "outputs" in item:
            outputs = np.array(item["outputs"])
            outputs = outputs.reshape(-1, k, outputs.shape[-1])
            obs.outputs = np.take_along_axis(outputs, used_order[..., None], 1)
        if "logits" in item:
            obs.logits = np.array(item["logits"]).reshape(-1, layer.num_experts)
        if keep is not None:
            for field in ("selected", "weights", "norms", "outputs", "logits"):
                value = getattr(obs, field)
                if value is not None:
                    setattr(obs, field, value[keep])
        return obs
