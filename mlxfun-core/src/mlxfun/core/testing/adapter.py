"""``check_adapter``: an adapter finds a model's MoE layers and reproduces their routing
exactly."""

import numpy as np

from .failures import fail, plugin_label
from .observations import ALL_NEEDS
from .plugin import check_plugin


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    for holder in (args, getattr(args, "text_config", None)):
        value = (
            holder.get("vocab_size")
            if isinstance(holder, dict)
            else getattr(holder, "vocab_size", None)
        )
        if isinstance(value, int) and value > 0:
            return value
    return 32


def check_adapter(
    adapter,
    model,
    model_type: str,
    tokens=None,
    check_weights: bool = True,
    atol: float = 1e-4,
    config: dict | None = None,
    commands: bool = True,
    checkpoint=None,
):
    """The adapter finds the model's MoE layers and reproduces their routing exactly, and
    ``mlxfun collect``, ``prune`` and loading work on a checkpoint of the architecture.

    - ``model_type`` is one of ``adapter.model_types`` and ``matches`` accepts ``config``;
    - ``moe_layers(model)`` finds at least one layer, in forward order, with positions 0..n-1,
      a path that leads to the block, an expert count and 1 <= top_k <= experts;
    - a forward observed through ``mlxfun.core.observe.Observer`` equals the plain forward
      bit for bit, and the model's classes are restored afterwards;
    - the adapter's routing selects exactly the experts every block used (the observer checks
      this on every token);
    - with ``check_weights``, every block's output equals the sum over its selected experts of
      gate weight times raw expert output, plus the ungated ``shared_attrs`` modules; turn it
      off for blocks that gate their shared experts or transform the sum.

    ``tokens`` (batch, seq) defaults to random ids below the vocabulary size; ``config`` (default
    ``{"model_type": model_type}``) is what ``matches`` must accept.

    With ``commands`` (the default), the commands' own path, with this adapter in the plugin
    registry: the model is saved as a checkpoint (weights, the config ``build_tiny_model``
    built it from or else one from ``model.args``, with ``model_type``, and a byte-level
    tokenizer; or pass ``checkpoint``, e.g. from ``save_tiny_checkpoint``, with a vocabulary of
    at least 64 tokens), ``mlxfun collect`` observes every observable on it, ``mlxfun prune --n
    1`` removes one expert per layer, and the pruned model loads through mlxfun's loader (so
    the architecture's model classes must be found: mlx-lm's own, or the adapter's
    ``model_module``), runs, and has one expert fewer in every MoE layer. This needs
    the ``prune`` compressor (``mlxfun-methods``). Returns the observations of the forward.
    """
    import mlx.core as mx

    check_plugin("adapter", adapter)
    label = plugin_label("adapter", adapter)
    _check_declares(label, adapter, model_type, config)
    layers = _checked_layers(label, adapter, model)
    if tokens is None:
        ids = np.random.default_rng(0).integers(0, min(_vocab_size(model), 256), (2, 12))
        tokens = mx.array(ids.astype(np.int32))
    observations = _observed_forward(label, adapter, model, tokens)
    _check_observations(label, layers, observations, int(np.prod(tokens.shape)))
    if check_weights:
        _check_block_outputs(label, adapter, model, layers, observations, tokens, atol)
    if commands:
        _check_commands(label, adapter, model, model_type, checkpoint)
    return observations


def _check_declares(label: str, adapter, model_type: str, config: dict | None) -> None:
    """``model_type`` is declared and ``matches`` accepts ``config``."""
    if model_type not in adapter.model_types:
        fail(
            label,
            f"does not declare model_type {model_type!r} (model_types: "
            f"{tuple(adapter.model_types)})",
        )
    config = {"model_type": model_type} if config is None else config
    if not adapter.matches(config):
        fail(label, f"matches() rejects the config {config!r}")


def _checked_layers(label: str, adapter, model) -> list:
    """``moe_layers(model)``: at least one, in forward order, each fully described."""
    from ..adapter import get_path

    layers = adapter.moe_layers(model)
    if not isinstance(layers, list) or not layers:
        fail(
            label,
            f"moe_layers() found no MoE layer in this {type(model).__module__} model; "
            "check experts_attr (the experts module's attribute name on each block)",
        )
    for position, layer in enumerate(layers):
        where = f"MoE layer {position} ({getattr(layer, 'path', '?')})"
        if layer.position != position:
            fail(label, f"{where} has position {layer.position}; positions must be 0..n-1")
        if position and layer.index <= layers[position - 1].index:
            fail(label, f"{where}: moe_layers() must be in forward (decoder layer) order")
        if get_path(model, layer.path) is not layer.block:
            fail(label, f"{where}: path {layer.path!r} does not lead to the block")
        if not (isinstance(layer.num_experts, int) and layer.num_experts > 0):
            fail(label, f"{where}: num_experts {layer.num_experts!r} must be a positive int")
        if not (isinstance(layer.top_k, int) and 1 <= layer.top_k <= layer.num_experts):
            fail(label, f"{where}: top_k {layer.top_k!r} must be in 1..{layer.num_experts}")
    return layers


def _observed_forward(label: str, adapter, model, tokens) -> list:
    """The observations of one forward, which must equal the plain forward bit for bit, leave
    the model's classes as they were, and route as the blocks did."""
    import mlx.core as mx

    from ..observe import Observer, RoutingMismatch

    classes = [type(m) for _, m in model.named_modules()]
    plain = model(tokens)
    observer = Observer(model, adapter, ALL_NEEDS)
    with observer:
        hooked = model(tokens)
    mx.eval(plain, hooked)
    if [type(m) for _, m in model.named_modules()] != classes:
        fail(label, "the model's module classes were not restored after observation")
    if plain.shape != hooked.shape or not mx.array_equal(plain, hooked).item():
        fail(label, "the observed forward differs from the plain one; hooks must only read")
    try:
        return observer.observations()
    except RoutingMismatch as exc:
        fail(
            label,
            f"routing does not match the model: {exc}; route() must repeat the "
            "block's own router computation",
        )


def _check_observations(label: str, layers, observations, num_tokens: int) -> None:
    """Every layer's selection, gate weights and logits have the shapes of its top-k and
    expert count."""
    for layer, obs in zip(layers, observations):
        where = f"MoE layer {layer.position} ({layer.path})"
        if obs.selected.shape != (num_tokens, layer.top_k):
            fail(
                label,
                f"{where}: observed selection {obs.selected.shape}, expected "
                f"(tokens, top_k) = {(num_tokens, layer.top_k)}",
            )
        if obs.weights.shape != obs.selected.shape or not np.all(np.isfinite(obs.weights)):
            fail(label, f"{where}: gate weights must be finite and shaped like the selection")
        if obs.logits is not None and obs.logits.shape != (num_tokens, layer.num_experts):
            fail(
                label,
                f"{where}: router logits {obs.logits.shape}, expected "
                f"{(num_tokens, layer.num_experts)}; the router must score every expert",
            )


def _check_block_outputs(label, adapter, model, layers, observations, tokens, atol) -> None:
    """Every block's output is the sum of gate weight times expert output over its selected
    experts, plus the ungated shared experts."""
    import mlx.core as mx

    from ..adapter import get_path, has_path
    from ..hooks import call_hooks

    seen = {}

    def recorder(position):
        def wrapper(module, call, x, *args, **kwargs):
            out = call(x, *args, **kwargs)
            seen[position] = (x, out)
            return out

        return wrapper

    with call_hooks([(layer.block, recorder(layer.position)) for layer in layers]):
        mx.eval(model(tokens))
    for layer, obs in zip(layers, observations):
        x, out = seen[layer.position]
        rebuilt = np.einsum(
            "tk,tkh->th", obs.weights.astype(np.float64), obs.outputs.astype(np.float64)
        )
        for attr in getattr(adapter, "shared_attrs", ()):
            if not has_path(layer.block, attr):  # shared experts can be configured away
                continue
            shared = get_path(layer.block, attr)(x).astype(mx.float32)
            rebuilt += np.array(shared, dtype=np.float64).reshape(rebuilt.shape)
        actual = np.array(out.astype(mx.float32), dtype=np.float64).reshape(rebuilt.shape)
        scale = max(1.0, float(np.abs(actual).max()))
        error = float(np.abs(actual - rebuilt).max())
        if error > atol * scale:
            fail(
                label,
                f"MoE layer {layer.position} ({layer.path}): the block's output is "
                f"not sum(weight * expert output) + shared experts (max difference "
                f"{error:.3g}); the weights route() returns must be the factors the "
                "block multiplies (renormalisation, scaling); pass check_weights=False "
                "for blocks that gate their shared experts",
            )


def _check_commands(label: str, adapter, model, model_type: str, checkpoint) -> None:
    """collect, prune and load a checkpoint of the architecture through the commands' functions."""
    import tempfile
    from pathlib import Path

    from . import commands
    from .plugin_state import substituted_plugin

    folder = Path(tempfile.mkdtemp(dir=commands.scratch()))
    source = checkpoint or _save_checkpoint(label, model, model_type, folder / "model")
    what = f"a tiny {model_type} checkpoint"
    with commands.kit_plugins(), substituted_plugin("adapter", adapter):
        commands.run_step(
            label,
            f"mlxfun collect on {what}",
            commands.collect,
            source,
            [commands.KIT_SCORER],
            folder / "stats.npz",
        )
        summary = commands.run_step(
            label,
            f"mlxfun prune --n 1 on {what}",
            commands.prune,
            model=source,
            stats=folder / "stats.npz",
            output=folder / "pruned",
            scorer=commands.KIT_SCORER,
            selector=commands.KIT_SELECTOR,
            n=1,
        )
        pruned, found = commands.run_step(
            label,
            f"loading {what} after mlxfun prune --n 1 (num_experts_keys must name the config "
            "keys of the expert count; mlxfun must find the model classes)",
            commands.load_and_run,
            folder / "pruned",
        )
    if found is not adapter:
        fail(label, f"matches() rejects the pruned {model_type} config; {found.name} took it")
    counts = {layer.index: layer.num_experts for layer in adapter.moe_layers(pruned)}
    kept = {int(index): len(ids) for index, ids in summary["keep"].items()}
    if counts != kept:
        fail(
            label,
            f"after mlxfun prune --n 1 the model has {counts} experts per MoE layer (decoder "
            f"layer: count), the keep map {kept}; check num_experts_keys",
        )


def _save_checkpoint(label: str, model, model_type: str, directory):
    """The in-memory model as an mlx-lm model directory: weights, the ``config.json`` it was
    built from (``build_tiny_model``) or else one from its ``args`` dataclass, a byte-level
    tokenizer."""
    import dataclasses

    from mlx_lm.utils import save_config, save_model

    from .tiny_models import tiny_model_config, write_byte_tokenizer

    config = tiny_model_config(model)
    args = getattr(model, "args", None)
    if config is None and dataclasses.is_dataclass(args):
        config = dataclasses.asdict(args)
    if config is None:
        fail(
            label,
            "cannot save this model for the commands' path: it was not built by "
            "build_tiny_model and has no `args` dataclass (mlx-lm's ModelArgs); pass "
            "checkpoint=save_tiny_checkpoint(...) or commands=False",
        )
    config["model_type"] = model_type
    quantized = [m for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "scales")]
    if quantized and "quantization" not in config:  # quantized after it was built
        # mlx-lm reads each layer's own bits and group size from the weights; it needs the key
        first = quantized[0]
        config["quantization"] = {"group_size": first.group_size, "bits": first.bits}
    directory.mkdir(parents=True)
    save_model(directory, model)
    save_config(config, directory / "config.json")
    write_byte_tokenizer(directory)
    return directory
