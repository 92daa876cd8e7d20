"""The declarative base for architecture adapters.

An adapter says where an architecture keeps its experts and router and how the router picks
experts; everything else (finding the MoE layers, hooking, slicing) is shared. A new
architecture is usually one ``MoEAdapter(...)`` call::

    MoEAdapter(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        description="Qwen3-MoE: softmax over all experts, top-k, optional renormalisation",
        experts_attr="switch_mlp",
        router_attr="gate",
        route=softmax_topk(),
        num_experts_keys=("num_experts",),
    )

``route(block, logits)`` returns ``(indices, weights)`` exactly as the block computes them
(MLX arrays, last axis top-k). ``router_scores(block, logits)`` gives every expert's router
probability before the top-k (the softmax or sigmoid the route takes of the logits, without a
selection-only bias): an adapter's ``scores`` when declared, else the route's own ``scores``
attribute (the routing factories set it), else the softmax of the logits. The MoE layers are
found by looking for modules at ``<block>.<experts_attr>`` that hold stacked expert weights, so
dense layers, strided MoE layers and hybrid stacks need no extra description. An architecture
that mlx-lm lacks brings its model classes: ``model_module="package.module"``, a module with
``Model`` and ``ModelArgs`` like mlx-lm's (``mlxfun.core.architectures``). Nothing here imports
MLX at module import time.
"""

import re
from collections.abc import Callable
from typing import Any

import attrs

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")


@attrs.define
class MoELayer:
    """One MoE block inside a loaded model."""

    position: int = attrs.field(metadata={"doc": "index among the MoE layers: 0, 1, ..."})
    index: int = attrs.field(metadata={"doc": "decoder layer index"})
    path: str = attrs.field(
        metadata={"doc": 'dotted path of the block from the model root ("model.layers.3.mlp")'}
    )
    block: Any = attrs.field(repr=False, metadata={"doc": "the MoE block (an `mlx.nn.Module`)"})
    experts: Any = attrs.field(
        repr=False, metadata={"doc": "the stacked experts module, or a list of expert modules"}
    )
    num_experts: int = attrs.field(default=0, metadata={"doc": "experts the router can pick"})
    top_k: int = attrs.field(default=0, metadata={"doc": "experts each token uses"})
    # The last ``zero_experts`` of them are parameter-free experts that the block computes
    # itself (longcat_flash's identity experts): they have no weights in ``experts`` and
    # pruning keeps them.
    zero_experts: int = attrs.field(
        default=0,
        metadata={"doc": "the last ones of `num_experts` that are parameter-free (kept by prune)"},
    )


def gate_bias(gate):
    """The ``bias`` of a gate module (holding a raw router array) that ``mlxfun amplify``'s
    model file biased (``biased_routers.bias_gate``: its class is marked), or None."""
    return gate["bias"] if getattr(type(gate), "_mlxfun_gate_bias", False) else None


def get_path(obj, path: str):
    """Follow a dotted path of attributes, dict keys and list indices."""
    for part in path.split("."):
        if isinstance(obj, list | tuple):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def has_path(obj, path: str) -> bool:
    try:
        get_path(obj, path)
    except (AttributeError, KeyError, IndexError, ValueError):
        return False
    return True


def expert_projections(experts) -> list[str]:
    """The stacked projections (SwitchLinear-like children) of an experts module."""
    return [name for name in EXPERT_PROJECTIONS if has_path(experts, f"{name}.weight")]


def stacked_experts_hooks(layer: MoELayer, record) -> list:
    """The observer's default experts hook: the stacked experts call ``experts(x, indices)``
    records the indices it received and its raw outputs."""

    def wrapper(module, call, x, indices, *args, **kwargs):
        out = call(x, indices, *args, **kwargs)
        record.indices = indices
        record.outputs = out
        return out

    return [(layer.experts, wrapper)]


def _is_stacked_experts(module) -> bool:
    names = expert_projections(module)
    return bool(names) and all(get_path(module, f"{n}.weight").ndim == 3 for n in names)


def _first_attr(obj, candidates):
    for path in candidates:
        if has_path(obj, path):
            value = get_path(obj, path)
            if isinstance(value, int):
                return value
    return None


def softmax_scores(block, logits):
    """Router probabilities of a softmax router: softmax over all experts (float32)."""
    import mlx.core as mx

    return mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)


def sigmoid_scores(block, logits):
    """Router probabilities of a sigmoid router: the sigmoid of each logit (float32), without
    the correction bias (it only steers the selection)."""
    import mlx.core as mx

    return mx.sigmoid(logits.astype(mx.float32))


SCORE_FUNCTIONS = {"softmax": softmax_scores, "sigmoid": sigmoid_scores}


def with_scores(route: Callable, scores: Callable) -> Callable:
    """``route`` declaring its dense scores ``scores(block, logits)`` (as its ``scores``
    attribute, which ``MoEAdapter.router_scores`` reads); returns ``route``."""
    route.scores = scores
    return route


@attrs.define(kw_only=True, frozen=True)
class MoEAdapter:
    name: str
    model_types: tuple[str, ...]
    description: str = ""
    route: Callable = attrs.field(repr=False)
    router_family: str = ""
    experts_attr: str = "switch_mlp"
    router_attr: str = "gate"
    # logits(block, x): the router's logits; default applies router_attr (Linear or raw array).
    logits: Callable | None = attrs.field(default=None, repr=False)
    # scores(block, logits): every expert's router probability before the top-k, (..., E);
    # None: the route's ``scores`` attribute, else the softmax of the logits.
    scores: Callable | None = attrs.field(default=None, repr=False)
    correction_bias_attr: str | None = None
    shared_attrs: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_experts",)
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    top_k_attrs: tuple[str, ...] = ("top_k", "num_experts_per_tok", "gate.top_k", "router.top_k")
    mlx_lm_versions: str = ">=0.32,<0.33"
    # Model types this adapter knows about but cannot support correctly, with the reason.
    unsupported: dict[str, str] = attrs.field(factory=dict)
    notes: str = ""
    # "package.module" exposing Model and ModelArgs like mlx-lm's model modules, for a model
    # type mlx-lm lacks: mlxfun builds this adapter's models with it (mlxfun.core.architectures).
    model_module: str | None = None

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types

    def moe_layers(self, model) -> list[MoELayer]:
        """Every MoE block in the model, in forward order."""
        layers = []
        suffix = "." + self.experts_attr
        for path, module in model.named_modules():
            if not path.endswith(suffix) or not _is_stacked_experts(module):
                continue
            block_path = path[: -len(suffix)]
            block = get_path(model, block_path)
            numbers = re.findall(r"\.(\d+)(?:\.|$)", block_path)
            index = int(numbers[-1]) if numbers else 0
            num_experts = get_path(module, expert_projections(module)[0] + ".weight").shape[0]
            layers.append(MoELayer(0, index, block_path, block, module, num_experts, 0))
        layers.sort(key=lambda layer: layer.index)
        for position, layer in enumerate(layers):
            layer.position = position
            layer.top_k = self.top_k(layer.block, model)
        return layers

    def top_k(self, block, model) -> int:
        value = _first_attr(block, self.top_k_attrs)
        if value is None:
            args = getattr(model, "args", None)
            value = _first_attr(args, self.top_k_keys) if args is not None else None
        if value is None:
            raise ValueError(f"{self.name}: cannot find top-k on {type(block).__name__}")
        return value

    def router_logits(self, block, x):
        """The router's logits for block input ``x``; a raw-array router's stored bias (a gate
        biased by ``mlxfun amplify``'s model file, ``biased_routers``) and a router bias
        registered on its block (``hooks.router_biases``, steering) are added to them."""
        from .hooks import router_bias

        if self.logits is not None:
            logits = self.logits(block, x)
        else:
            router = get_path(block, self.router_attr)
            if callable(router):
                return router(x)
            logits = x @ router.T
            gate_path = self.router_attr.rpartition(".")[0]
            stored = gate_bias(get_path(block, gate_path)) if gate_path else None
            if stored is not None:
                logits = logits + stored.astype(logits.dtype)
        bias = router_bias(block)
        return logits if bias is None else logits + bias.astype(logits.dtype)

    def router_scores(self, block, logits):
        """Every expert's router probability before the top-k selection, (..., E) float32: what
        the route takes of the logits (softmax over all experts, or the sigmoid of each logit
        without the selection-only correction bias). For statistics that weight every expert
        by its probability (REAM's gated outputs)."""
        scores = self.scores or getattr(self.route, "scores", None) or softmax_scores
        return scores(block, logits)

    def routing(self, block, x):
        """``(indices, weights, logits)`` for block input ``x``, as the block computes them."""
        logits = self.router_logits(block, x)
        indices, weights = self.route(block, logits)
        return indices, weights, logits

    def observe_hooks(self, layer: MoELayer, record) -> list:
        """``(module, wrapper)`` pairs (``hooks.call_hooks``) that record, while the block runs,
        the experts it used and their raw outputs: they set ``record.indices`` (..., k) and
        ``record.outputs`` (..., k, hidden) as MLX arrays, or append to them as lists with one
        entry per (token, slot) in token order (experts called one token at a time). The
        observer resets both when the block is called. Default: ``stacked_experts_hooks``."""
        return stacked_experts_hooks(layer, record)

    def expert_outputs(self, layer: MoELayer, x, indices):
        """Raw outputs f_j(x) of the given experts (no gate weight), shape (..., k, hidden)."""
        return layer.experts(x, indices)

    def all_expert_outputs(self, layer: MoELayer, x):
        """Every expert's raw output on tokens ``x`` (tokens, hidden) -> (tokens, E, hidden)."""
        import mlx.core as mx

        indices = mx.broadcast_to(mx.arange(layer.num_experts), (x.shape[0], layer.num_experts))
        return self.expert_outputs(layer, x, indices)
