"""Router biases: the one place an additive per-expert bias enters each architecture's routing.

A bias ``b`` (one value per expert the router can pick) goes where the architecture forms the
scores it selects experts by, so that the block's own code does the rest of its routing:

- ``correction``: the block has a selection-only correction bias (``adapter.
  correction_bias_attr``: DeepSeek-V3-style ``e_score_correction_bias``, ``expert_bias``,
  ``router_bias``): ``b`` is added to it. The selection (group scores of group-limited routers
  included) sees ``scores + correction + b``; the gate weights stay the model's un-biased
  scores of the chosen experts, renormalised as the block does.
- ``router``: the router is a module that returns the logits: a Linear (quantized or not) gets
  ``b`` as its ``bias`` parameter for the duration (added to the bias it has; mlx's Linear adds
  its bias when it has one), any other router module a call hook that adds ``b`` to its
  output. Softmax and sigmoid routers then see steered logits, so the weights are computed from
  them (a masked expert's softmax share is 0, as if it did not exist; a forced one takes a
  large share).
- ``gate``: the router is a raw weight array inside a gate module (deepseek, deepseek_v2):
  ``b`` is registered on the block (``hooks.router_biases``, added by
  ``MoEAdapter.router_logits``) and the gate module's call returns the adapter's routing of
  the biased logits (the adapter repeats the block's routing exactly).

``install_router_biases(model, adapter, {position: b})`` installs biases and returns the
function that removes them; ``router_bias_context`` does the same for a ``with`` block;
observation (``core.observe.Observer``) inside it sees the steered routing, since the adapter's
recomputation goes through the same hooked router, patched correction bias or registered bias.
"""

from contextlib import contextmanager

from .adapter import MoEAdapter, MoELayer, get_path
from .hooks import install_hooks, register_router_biases

POINTS = ("correction", "router", "gate")


def _owner(block, path: str):
    owner_path, _, attr = path.rpartition(".")
    return (get_path(block, owner_path) if owner_path else block), attr


def correction_bias(adapter: MoEAdapter, block):
    """``(owner module, attribute, array)`` of the block's correction bias, or None."""
    import mlx.core as mx

    if not adapter.correction_bias_attr:
        return None
    try:
        owner, attr = _owner(block, adapter.correction_bias_attr)
        value = getattr(owner, attr)
    except (AttributeError, KeyError, IndexError):
        return None
    return (owner, attr, value) if isinstance(value, mx.array) else None


def bias_point(adapter: MoEAdapter, layer: MoELayer) -> str:
    """Where a bias enters this layer's routing: one of ``POINTS`` (see the module docstring)."""
    import mlx.nn as nn

    if correction_bias(adapter, layer.block) is not None:
        return "correction"
    router = get_path(layer.block, adapter.router_attr)
    return "router" if isinstance(router, nn.Module) else "gate"


def normalised_scores(adapter: MoEAdapter, layer: MoELayer) -> bool:
    """Whether one expert's logit changes the others' router scores (a softmax over the
    experts), probed on zero logits; a sigmoid router's scores are per expert."""
    import mlx.core as mx

    zero = mx.zeros((1, layer.num_experts), dtype=mx.float32)
    low = mx.concatenate([mx.array([[-1e9]], dtype=mx.float32), zero[:, 1:]], axis=-1)
    a = adapter.router_scores(layer.block, zero)[..., 1:]
    b = adapter.router_scores(layer.block, low)[..., 1:]
    return not mx.allclose(a, b).item()


def removal_logits(adapter: MoEAdapter, layer: MoELayer, bias, removal=-1e8):
    """At the ``correction`` point, the logit bias that also takes removed experts (bias at or
    below ``removal``) out of a softmax router's normalisation, as if they were pruned; None
    when nothing needs it (no removal, sigmoid scores, or a router that is not a module: the
    raw-array routers with a correction bias, the DeepSeek-V3 family, are sigmoid-scored)."""
    import mlx.core as mx
    import mlx.nn as nn

    if removal is None:
        return None
    bias = mx.array(bias, dtype=mx.float32)
    removed = mx.where(bias <= removal, bias, 0.0)
    if not mx.any(removed).item():
        return None
    if not isinstance(get_path(layer.block, adapter.router_attr), nn.Module):
        return None
    return removed if normalised_scores(adapter, layer) else None


def _router_hook(bias):
    cast = {bias.dtype: bias}  # the bias in each logits dtype, cast once

    def wrapper(module, call, x, *args, **kwargs):
        out = call(x, *args, **kwargs)
        b = cast.get(out.dtype)
        if b is None:
            b = cast[out.dtype] = bias.astype(out.dtype)
        return out + b

    return wrapper


def _gate_hook(adapter, block):
    def wrapper(module, call, x, *args, **kwargs):
        return adapter.route(block, adapter.router_logits(block, x))

    return wrapper


_MISSING = object()


def linear_bias_dtype(router):
    """The dtype a router Linear's bias takes: its weight's, or its scales' when quantized."""
    import mlx.core as mx

    if "scales" in router:
        return router["scales"].dtype
    weight = router["weight"]
    return weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else mx.float32


def _logit_bias(router, bias, hooks: list, patches: list) -> None:
    """``bias`` on a router module's logits: a Linear (quantized or not) gets it as its own
    ``bias`` parameter for the duration (added to the one it has): no hook and no extra
    operation, and what ``amplify`` writes into a checkpoint; any other module a call hook."""
    import mlx.core as mx
    import mlx.nn as nn

    if not isinstance(router, nn.Linear | nn.QuantizedLinear):
        hooks.append((router, _router_hook(bias)))
        return
    old = router["bias"] if "bias" in router else _MISSING
    if old is _MISSING:
        new = bias.astype(linear_bias_dtype(router))
    else:
        new = (old.astype(mx.float32) + bias).astype(old.dtype)
    patches.append((router, "bias", old, new))


def install_router_biases(
    model, adapter: MoEAdapter, biases: dict, layers=None, removal: float | None = -1e8
):
    """Add ``biases[position]`` (a float32 array, one value per expert the router can pick) to
    the routing of those MoE layers now; returns the function that restores the model exactly
    (``router_bias_context`` is the same as a ``with`` block). ``layers``: the model's MoE
    layers when the caller has them. Values at or below ``removal`` remove the expert: at the
    ``correction`` point they also go on a softmax router's logits (``removal_logits``)."""
    import mlx.core as mx

    layers = adapter.moe_layers(model) if layers is None else layers
    hooks, registered, patches = [], [], []
    for layer in layers:
        if layer.position not in biases:
            continue
        bias = mx.array(biases[layer.position], dtype=mx.float32)
        if bias.shape != (layer.num_experts,):
            raise ValueError(
                f"layer {layer.index}: a router bias needs {layer.num_experts} values, "
                f"got shape {tuple(bias.shape)}"
            )
        point = bias_point(adapter, layer)
        if point == "correction":
            owner, attr, value = correction_bias(adapter, layer.block)
            steered = (value.astype(mx.float32) + bias).astype(value.dtype)
            patches.append((owner, attr, value, steered))
            removed = removal_logits(adapter, layer, bias, removal)
            if removed is not None:
                router = get_path(layer.block, adapter.router_attr)
                _logit_bias(router, removed, hooks, patches)
        elif point == "router":
            _logit_bias(get_path(layer.block, adapter.router_attr), bias, hooks, patches)
        else:
            gate_path = adapter.router_attr.rpartition(".")[0]
            gate = get_path(layer.block, gate_path) if gate_path else layer.block
            registered.append((layer.block, bias))
            hooks.append((gate, _gate_hook(adapter, layer.block)))
    unregister = register_router_biases(registered)
    try:
        unhook = install_hooks(hooks)
    except BaseException:
        unregister()
        raise
    for owner, attr, _, steered in patches:
        setattr(owner, attr, steered)

    def restore():
        for owner, attr, value, _ in reversed(patches):
            if value is _MISSING:
                del owner[attr]
            else:
                setattr(owner, attr, value)
        patches.clear()
        unhook()
        unregister()

    return restore


@contextmanager
def router_bias_context(model, adapter: MoEAdapter, biases: dict, layers=None, **options):
    """``install_router_biases`` for the duration of the block; restored on exit, also on
    error."""
    restore = install_router_biases(model, adapter, biases, layers, **options)
    try:
        yield
    finally:
        restore()
