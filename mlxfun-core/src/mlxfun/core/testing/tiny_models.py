"""Tiny models with seeded random weights, in memory or saved as a checkpoint with a tokenizer.

``build_tiny_model`` builds one for adapter tests; ``save_tiny_checkpoint`` saves one as an
ordinary mlx-lm model directory (weights, config.json, a byte-level tokenizer), so that a plugin
author can run ``mlxfun collect``, ``prune`` and the loaders on their own architecture.
"""

import importlib
import json
import weakref
from pathlib import Path

import numpy as np

# Small enough for a test, read by most MoE architectures' ModelArgs (each takes the keys its
# signature names, so the rest are ignored): Qwen3-MoE-like, 2 layers of 8 experts, top-2.
TINY_ARGS = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    vocab_size=256,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _model_module(model_type: str, args: dict, module):
    """The module that builds ``model_type``: ``module`` itself (a module object), a module
    name (dotted: imported as is; bare: ``mlx_lm.models.<name>``), or by default the one mlxfun
    loads ``model_type`` with (an installed adapter's ``model_module``, else mlx-lm's)."""
    if module is None:
        from ..architectures import model_module

        return model_module({"model_type": model_type, **args})
    if not isinstance(module, str):
        return module
    if "." in module:
        return importlib.import_module(module)
    from ..mlxlm_models import model_module

    return model_module(module)


def build_tiny_model(
    model_type: str,
    args: dict,
    seed: int = 0,
    module=None,
    bits: int | None = None,
    group_size: int = 32,
):
    """A tiny model with seeded random weights, for adapter tests.

    ``module`` builds it: a module exposing ``Model`` and ``ModelArgs`` (a plugin's model
    module), or its name (``"qwen3_moe"`` for ``mlx_lm.models.qwen3_moe``, or a dotted name);
    default: the module mlxfun loads ``model_type`` with (an installed adapter's
    ``model_module``, else mlx-lm's). Parameters that the module initialises to a constant (zero routers
    or correction biases) are re-drawn so the routing really depends on the input. ``bits``
    quantizes every layer whose input size ``group_size`` divides, as mlx-lm's converter does.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path

    models = _model_module(model_type, args, module)
    mx.random.seed(seed)
    model = models.Model(models.ModelArgs.from_dict({"model_type": model_type, **args}))
    rng = np.random.default_rng(seed)

    def redraw(path, value):
        if not isinstance(value, mx.array) or not mx.issubdtype(value.dtype, mx.floating):
            return value
        flat = np.array(value)
        if flat.size and np.all(flat == flat.reshape(-1)[0]) and "norm" not in path:
            return mx.array(rng.normal(0.0, 0.3, value.shape).astype(np.float32))
        return value

    model.update(tree_map_with_path(redraw, model.parameters()))
    if bits is not None:
        nn.quantize(
            model,
            group_size=group_size,
            bits=bits,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
            ),
        )
    mx.eval(model.parameters())
    config = {"model_type": model_type, **args}
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    _built[id(model)] = (weakref.ref(model), config)
    return model


# id(model) -> (weak reference, config.json): the config each tiny model was built from
_built: dict[int, tuple] = {}


def tiny_model_config(model) -> dict | None:
    """The ``config.json`` that ``build_tiny_model`` built ``model`` from, or None."""
    reference, config = _built.get(id(model), (None, None))
    return dict(config) if reference is not None and reference() is model else None


def save_tiny_checkpoint(
    directory,
    model_type: str,
    args: dict | None = None,
    *,
    module=None,
    seed: int = 0,
    bits: int | None = None,
    group_size: int = 32,
) -> Path:
    """Build a tiny seeded model (``build_tiny_model``) and save it in ``directory`` as an
    mlx-lm model directory: ``model.safetensors``, ``config.json`` (``model_type`` and ``args``,
    plus ``quantization`` with ``bits``) and a 256-token byte-level tokenizer
    (``write_byte_tokenizer``). ``args`` default to ``TINY_ARGS``; keep ``vocab_size`` at 256 or
    more, so that every byte the tokenizer produces is a token of the model. Returns the path."""
    from mlx_lm.utils import save_config, save_model

    args = dict(TINY_ARGS if args is None else args)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(
        model_type, args, seed=seed, module=module, bits=bits, group_size=group_size
    )
    save_model(directory, model)
    save_config(tiny_model_config(model), directory / "config.json")
    write_byte_tokenizer(directory)
    return directory


def write_byte_tokenizer(directory) -> None:
    """A 256-token byte-level BPE tokenizer with no merges, token id = byte value, end of text
    = byte 0, as ``tokenizer.json`` and ``tokenizer_config.json`` in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    symbols = _byte_symbols()
    tokenizer = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": symbols[0],
                "model_max_length": 4096,
            }
        )
    )


def _byte_symbols() -> list[str]:
    """The character ByteLevel writes for each byte value (GPT-2's table): printable Latin-1
    bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]
