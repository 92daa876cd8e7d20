"""The residual stream's writers, and removing a direction from what they write.

Every architecture mlxfun can abliterate is declared in ``WRITERS``: where the token
embedding, the decoder layers and, inside each layer, the attention and MLP modules whose
outputs are added to the residual stream live, and which of their projections write into it
(a dense MLP's ``down_proj``, the routed experts' stacked ``switch_mlp.down_proj``, shared
experts). An architecture that is not declared is refused by name: a writer left out would
put the direction back.

Two ways to take a unit direction ``d`` out of the residual stream, with ``scale`` s:

- ``orthogonalize(model, d)`` edits the weights: a writer ``out = W x + b`` (W maps into the
  hidden size) becomes ``W' = W - s d (d^T W)``, ``b' = b - s d (d^T b)``; the embedding
  (rows are hidden vectors) ``E' = E - s (E d) d^T``. Stacked experts ``[E, hidden, inter]``
  are edited all at once, so experts no token routes to are edited too. Quantized weights are
  dequantized, edited and quantized again with the same bits, group size and mode.
- ``ablation(model, d)`` projects ``x - s (x . d) d`` out of what the embedding hands the first
  decoder layer and out of every attention and MLP output with call hooks, for trying a
  direction without writing weights. With s = 1 it also projects the input of every later
  decoder layer (as the reference implementation does; the residual is then already free of d
  up to rounding). Both give the same logits (tests/test_abliterate.py).

Architectures whose layers normalise a writer's output before adding it (Gemma's post norms)
are not declared: a norm with per-channel weights puts a removed direction back.
"""

from contextlib import contextmanager

import attrs
import numpy as np
from mlxfun.core.adapter import get_path, has_path
from mlxfun.core.errors import MlxfunError

DENSE_MLP = ("down_proj",)
ROUTED = ("switch_mlp.down_proj",)


@attrs.frozen
class Writers:
    """Where one architecture writes into the residual stream."""

    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    attn: str = "self_attn"
    attn_writers: tuple[str, ...] = ("o_proj",)
    mlp: str = "mlp"
    # the projections of the MLP module that write the residual stream; each layer has some
    mlp_writers: tuple[str, ...] = DENSE_MLP
    lm_head: str = "lm_head"


WRITERS = (
    Writers(("llama", "mistral", "qwen2", "qwen3")),
    Writers(("qwen3_moe",), mlp_writers=DENSE_MLP + ROUTED),
    Writers(("qwen2_moe",), mlp_writers=DENSE_MLP + ROUTED + ("shared_expert.down_proj",)),
    Writers(
        ("glm4_moe", "deepseek_v2", "deepseek_v3"),
        mlp_writers=DENSE_MLP + ROUTED + ("shared_experts.down_proj",),
    ),
    Writers(("mixtral",), mlp="block_sparse_moe", mlp_writers=ROUTED),
)


def known_model_types() -> list[str]:
    return sorted(t for w in WRITERS for t in w.model_types)


def writers_for(model_type: str) -> Writers:
    for writers in WRITERS:
        if model_type in writers.model_types:
            return writers
    raise MlxfunError(
        f"{model_type}: abliteration does not know which weights of this architecture write "
        f"the residual stream; known: {', '.join(known_model_types())}"
    )


def model_type_of(model) -> str:
    return getattr(getattr(model, "args", None), "model_type", "") or type(model).__module__


@attrs.define
class Writer:
    """One module that writes the residual stream: ``kind`` embed, attn, mlp (a dense MLP's
    down projection), expert (the stacked routed experts) or shared (shared experts)."""

    path: str
    module: object = attrs.field(repr=False)
    kind: str


def decoder_layers(model, writers: Writers) -> list:
    return get_path(model, writers.layers)


def residual_writers(model, skip_experts: bool = False) -> list[Writer]:
    """Every module of ``model`` that writes the residual stream, in forward order;
    ``skip_experts``: without the routed experts' stacked down projections."""
    writers = writers_for(model_type_of(model))
    found = [Writer(writers.embed, get_path(model, writers.embed), "embed")]
    for i, layer in enumerate(decoder_layers(model, writers)):
        prefix = f"{writers.layers}.{i}"
        for name in writers.attn_writers:
            path = f"{writers.attn}.{name}"
            found.append(Writer(f"{prefix}.{path}", get_path(layer, path), "attn"))
        in_mlp = 0
        for name in writers.mlp_writers:
            path = f"{writers.mlp}.{name}"
            if not has_path(layer, path):
                continue
            in_mlp += 1
            kind = "expert" if name in ROUTED else "shared" if "shared" in name else "mlp"
            if kind == "expert" and skip_experts:
                continue
            found.append(Writer(f"{prefix}.{path}", get_path(layer, path), kind))
        if not in_mlp:
            raise MlxfunError(
                f"{model_type_of(model)}: decoder layer {i} has none of the known residual "
                f"writers {', '.join(writers.mlp_writers)} under {writers.mlp}; its "
                "architecture cannot be abliterated"
            )
    return found


def unit(direction) -> np.ndarray:
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(d)
    if not np.isfinite(norm) or norm == 0:
        raise MlxfunError("the direction is zero or not finite; pass another --direction")
    return d / norm


# --- weight edit ------------------------------------------------------------------------------


def _project_out_rows(w, d, scale):
    """``W - s d (d^T W)`` for W (..., hidden, n) mapping into the hidden axis -2 (float32)."""
    import mlx.core as mx

    coeff = mx.einsum("h,...hn->...n", d, w)
    return w - scale * d[:, None] * coeff[..., None, :]


def _project_out_vectors(v, d, scale):
    """``v - s (v . d) d`` for vectors on the last axis."""
    return v - scale * (v @ d)[..., None] * d


def _dequantized(module):
    import mlx.core as mx

    return mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
    )


def _set_quantized(module, weight) -> float:
    """Quantize ``weight`` into ``module`` with its bits, group size and mode; returns the
    relative error that quantization adds to the edited weight (Frobenius norms)."""
    import mlx.core as mx

    mode = getattr(module, "mode", "affine")
    parts = mx.quantize(weight, group_size=module.group_size, bits=module.bits, mode=mode)
    module.weight, module.scales = parts[0], parts[1]
    if len(parts) > 2 and parts[2] is not None:
        module.biases = parts[2]
    back = _dequantized(module)
    return float(mx.linalg.norm(back - weight) / mx.maximum(mx.linalg.norm(weight), 1e-30))


def _edit(module, kind: str, d, scale: float) -> float | None:
    """Orthogonalise one writer in place; the added quantization error or None."""
    import mlx.core as mx

    quantized = "scales" in module
    weight = _dequantized(module) if quantized else module.weight
    dtype = module.scales.dtype if quantized else weight.dtype
    w = weight.astype(mx.float32)
    if kind == "embed":  # rows are hidden vectors
        edited = _project_out_vectors(w, d, scale)
    else:  # out = x @ W.T: W is (..., hidden, in)
        edited = _project_out_rows(w, d, scale)
    error = None
    if quantized:
        error = _set_quantized(module, edited.astype(dtype))
    else:
        module.weight = edited.astype(dtype)
    if kind != "embed" and "bias" in module:
        b = module.bias.astype(mx.float32)
        module.bias = _project_out_vectors(b, d, scale).astype(module.bias.dtype)
    return error


def untie_embeddings(model) -> bool:
    """Give a model with tied embeddings its own LM head, a copy of the unedited embedding, so
    that editing the embedding leaves the readout alone. True when it was tied."""
    import mlx.nn as nn

    args = getattr(model, "args", None)
    if not getattr(args, "tie_word_embeddings", False):
        return False
    writers = writers_for(model_type_of(model))
    embed = get_path(model, writers.embed)
    if "scales" in embed:
        mode = getattr(embed, "mode", "affine")
        size = embed.group_size  # the smallest shape quantize accepts; replaced below
        head = nn.QuantizedLinear(size, 1, False, embed.group_size, embed.bits, mode=mode)
        head.weight, head.scales = embed.weight, embed.scales
        if "biases" in embed:
            head.biases = embed.biases
    else:
        head = nn.Linear(1, 1, bias=False)
        head.weight = embed.weight
    setattr(model, writers.lm_head, head)
    args.tie_word_embeddings = False
    return True


def orthogonalize(model, direction, scale: float = 1.0, skip_experts: bool = False) -> dict:
    """Remove ``direction`` from everything that writes the residual stream, in place.

    A model with tied embeddings gets its own LM head first (``untie_embeddings``). Returns a
    summary: writers edited by kind, whether it untied, and for quantized writers the largest
    and mean relative error that requantizing added."""
    import mlx.core as mx

    writers = residual_writers(model, skip_experts)
    d = mx.array(unit(direction), dtype=mx.float32)
    untied = untie_embeddings(model)
    counts: dict[str, int] = {}
    errors = []
    for writer in writers:
        error = _edit(writer.module, writer.kind, d, scale)
        mx.eval(writer.module.parameters())
        counts[writer.kind] = counts.get(writer.kind, 0) + 1
        if error is not None:
            errors.append(error)
    summary = {"writers": counts, "untied_embeddings": untied, "scale": scale}
    if errors:
        summary["requantization_error"] = {"max": max(errors), "mean": float(np.mean(errors))}
    return summary


# --- run-time ablation --------------------------------------------------------------------------


@contextmanager
def ablation(model, direction, scale: float = 1.0, skip_experts: bool = False):
    """Project ``direction`` out of the residual stream with call hooks while the block runs
    (see the module doc). ``skip_experts`` (as ``orthogonalize(..., skip_experts=True)``):
    the MLP's other writers (dense and shared down projections) are hooked one by one instead
    of the whole MLP, and later decoder layers' inputs are left alone, since the routed
    experts still write the direction."""
    import mlx.core as mx
    from mlxfun.core.hooks import call_hooks

    writers = writers_for(model_type_of(model))
    d32 = mx.array(unit(direction), dtype=mx.float32)

    def project(x):
        d = d32.astype(x.dtype)
        return x - scale * (x @ d)[..., None] * d

    def before(module, call, x, *args, **kwargs):
        return call(project(x), *args, **kwargs)

    def after(module, call, *args, **kwargs):
        out = call(*args, **kwargs)
        if isinstance(out, tuple):
            return (project(out[0]), *out[1:])
        return project(out)

    every_layer = scale == 1.0 and not skip_experts
    hooks = []
    for i, layer in enumerate(decoder_layers(model, writers)):
        if i == 0 or every_layer:
            hooks.append((layer, before))
        hooks.append((get_path(layer, writers.attn), after))
        if not skip_experts:
            hooks.append((get_path(layer, writers.mlp), after))
            continue
        for name in writers.mlp_writers:
            path = f"{writers.mlp}.{name}"
            if name not in ROUTED and has_path(layer, path):
                hooks.append((get_path(layer, path), after))
    with call_hooks(hooks):
        yield
