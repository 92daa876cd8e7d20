"""``check_intervention``: an intervention changes a loaded model as the protocol says."""

from collections.abc import Callable

from .failures import fail, plugin_label
from .plugin import check_plugin
from .tiny_models import TINY_ARGS, build_tiny_model

TOKENS_SHAPE = (2, 12)


def check_intervention(
    intervention,
    options: dict | Callable | None = None,
    model=None,
    model_type: str = "qwen3_moe",
    expect_change: bool = True,
) -> None:
    """``apply(model, adapter, **options)`` called on a tiny model (default: a seeded
    Qwen3-MoE, ``TINY_ARGS``; or ``model`` of ``model_type``), as mlxfun calls it:

    - it returns None (a permanent change) or a no-argument function (the undo);
    - the model still runs, with finite logits of the same shape, and (``expect_change``)
      they differ from the unchanged model's;
    - observation composes with the change: ``Observer`` inside it finds the adapter's routing
      equal to what the blocks did (a change made beside the shared hooks and router biases
      of ``mlxfun.core.hooks`` / ``router_bias`` fails here);
    - the undo restores the logits bit for bit and leaves no hook behind, and the
      intervention applies again after it.

    ``options``: the intervention's options, or ``options(model, adapter) -> dict``. Needs
    ``mlxfun-adapters`` for the built-in architectures.
    """
    import mlx.core as mx
    import numpy as np

    from .. import plugins
    from ..observe import Observer, RoutingMismatch

    check_plugin("intervention", intervention)
    label = plugin_label("intervention", intervention)
    if model is None:
        model = build_tiny_model(model_type, TINY_ARGS, seed=0)
    adapter = plugins.adapter_for_config({"model_type": model_type})
    if adapter is None:
        fail(label, f"no installed adapter for model type {model_type!r} (install mlxfun-adapters)")
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, TOKENS_SHAPE))
    plain = model(tokens)
    mx.eval(plain)
    classes = {path: type(m) for path, m in model.named_modules()}

    def call_options():
        return dict(options(model, adapter) if callable(options) else (options or {}))

    undo = intervention.apply(model, adapter, **call_options())
    if undo is not None and not callable(undo):
        fail(label, f"apply returned {type(undo).__name__}; return None or an undo function")
    try:
        changed = model(tokens)
        mx.eval(changed)
        if changed.shape != plain.shape or not np.all(np.isfinite(np.array(changed))):
            fail(label, "after apply the model's logits change shape or are not finite")
        if expect_change and mx.array_equal(changed, plain).item():
            fail(label, "apply left the logits unchanged; check the options it was given")
        try:
            with Observer(model, adapter) as observer:
                model(tokens)
            observer.observations()
        except RoutingMismatch as exc:
            fail(
                label,
                f"observation does not see the change ({exc}); change routing through "
                "mlxfun.core.router_bias or mlxfun.core.hooks",
            )
    finally:
        if callable(undo):
            undo()
    if undo is None:
        return
    after = model(tokens)
    mx.eval(after)
    if not mx.array_equal(after, plain).item():
        fail(label, "the function apply returned did not restore the model's logits exactly")
    if {path: type(m) for path, m in model.named_modules()} != classes:
        fail(label, "the undo left a hooked module class behind")
    again = intervention.apply(model, adapter, **call_options())
    try:
        mx.eval(model(tokens))
    finally:
        if callable(again):
            again()
