"""Pruning is exact: for every supported architecture (the tiny configs of the adapter tests),
float32 and 4-bit, the pruned model's logits equal the original model's with the removed experts
excluded from routing (their router logits at -inf, their correction bias at -inf), for uniform
keep maps (stock ``mlx_lm.load``) and non-uniform ones (``trust_remote_code=True``).
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_config, save_model
from mlxfun.core import nonuniform, plugins, slicing
from mlxfun.core.adapter import get_path
from mlxfun.core.hooks import call_hooks
from mlxfun.core.io import read_config
from mlxfun.core.stats import model_fingerprint, save_stats
from mlxfun.methods.prune import PruneRequest, prune, router_groups

from .adapters import test_biased_family as biased
from .adapters import test_examples as examples
from .adapters import test_softmax_family as softmax
from .adapters import test_special_family as special
from .adapters.harness import build_tiny
from .model_dirs import write_byte_tokenizer

# (case id, model type, tiny args)
CASES = [
    ("qwen3_moe", "qwen3_moe", examples.QWEN3_MOE),
    ("mixtral", "mixtral", examples.MIXTRAL),
    *[(a[0], a[0], a[2]) for a in softmax.ARCHITECTURES],
    *[(c[0], c[0], c[1]) for c in biased.BF16_CASES],
    ("kimi_k25", "kimi_k25", biased.KIMI_K25),
    ("mistral3", "mistral3", biased.MISTRAL3),
    ("llama4", "llama4", special.LLAMA4),
    ("gemma4", "gemma4", special.GEMMA4),
    ("gemma4_text", "gemma4_text", special.GEMMA4_TEXT),
    ("deepseek_v41", "deepseek_v41", special.DEEPSEEK_V41),
]
_seen = set()
CASES = [c for c in CASES if not (c[0] in _seen or _seen.add(c[0]))]
TOKENS = mx.array(np.random.default_rng(5).integers(0, 256, (2, 12)))


def _config(model_type, args):
    return {"model_type": model_type, **args}


def grouped_args(model_type, args):
    """Group-limited routers get 16 experts in their groups, so each group can lose one and
    keep the two that mlx-lm's group score needs."""
    config = _config(model_type, args)
    adapter = plugins.adapter_for_config(config)
    skeleton = slicing.model_skeleton(None, config)[0]
    layer = adapter.moe_layers(skeleton)[0]
    groups, _ = router_groups(adapter, layer.block)
    if groups == 1:
        return args, 1
    config = json.loads(json.dumps(config))
    for key in nonuniform.present_keys(config, adapter.num_experts_keys):
        nonuniform.set_key(config, key, 16)
    config.pop("model_type")
    return config, groups


def write_dir(path, model_type, args, bits=None, seed=0):
    """A tiny seeded model directory; correction biases are made non-negative (see
    ``exclude``) and gemma4's per-expert scales positive, as in real checkpoints."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny(model_type, args, seed=seed)
    adapter = plugins.adapter_for_config(_config(model_type, args))

    def adjust(name, value):
        last = name.rsplit(".", 1)[-1]
        if last in ("e_score_correction_bias", "expert_bias", "router_bias"):
            return mx.abs(value) * 0.1
        if last == "per_expert_scale":
            return mx.abs(value) + 0.5
        return value

    model.update(tree_map_with_path(adjust, model.parameters()))
    if bits is not None:
        nn.quantize(
            model,
            group_size=32,
            bits=bits,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0
            ),
        )
    mx.eval(model.parameters())
    save_model(path, model)
    config = _config(model_type, args)
    if bits is not None:
        config["quantization"] = {"group_size": 32, "bits": bits}
    save_config(config, path / "config.json")
    write_byte_tokenizer(path)
    return path, adapter


def write_stats(model_dir, path, seed=0):
    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    skeleton, _ = slicing.model_skeleton(model_dir)
    plans = slicing.layer_plans(skeleton, adapter)
    scores = np.random.default_rng(seed).random((len(plans), max(p.num_experts for p in plans)))
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return path


def exclude(model, adapter, removed):
    """Hooks (to use with ``call_hooks``) and in-place edits that keep ``removed[position]``
    experts out of routing: -inf on their router logits (router modules) and on their
    correction bias; a raw router array without a bias gets its gate module replaced by the
    adapter's routing of the masked logits (the adapter repeats the block's routing exactly)."""
    hooks = []
    for layer in adapter.moe_layers(model):
        gone = removed.get(layer.position, [])
        if not gone:
            continue
        mask = np.zeros(layer.num_experts, dtype=np.float32)
        mask[gone] = -np.inf
        mask = mx.array(mask)
        has_bias = False
        if adapter.correction_bias_attr:
            try:
                owner_path, _, attr = adapter.correction_bias_attr.rpartition(".")
                owner = get_path(layer.block, owner_path) if owner_path else layer.block
                bias = getattr(owner, attr)
            except AttributeError:
                bias = None
            if isinstance(bias, mx.array):
                setattr(owner, attr, bias + mask.astype(bias.dtype))
                has_bias = True
        router = get_path(layer.block, adapter.router_attr)
        if isinstance(router, nn.Module):

            def add_mask(module, call, x, *args, _mask=mask, **kwargs):
                out = call(x, *args, **kwargs)
                return out + _mask.astype(out.dtype)

            hooks.append((router, add_mask))
        elif not has_bias:
            gate_path = adapter.router_attr.rpartition(".")[0]
            gate = get_path(layer.block, gate_path)

            def reroute(module, call, x, *args, _mask=mask, _block=layer.block, **kwargs):
                logits = adapter.router_logits(_block, x)
                return adapter.route(_block, logits + _mask.astype(logits.dtype))

            hooks.append((gate, reroute))
    return hooks


def pruned_matches_masked(source, output, adapter, trust=False, atol=1e-4):
    original, _ = mlx_lm_load(str(source))
    pruned, _ = mlx_lm_load(str(output), trust_remote_code=trust)
    provenance = json.loads((Path(output) / "mlxfun.json").read_text())
    positions = {int(i): p for p, i in enumerate(provenance["moe_layers"])}
    removed = {positions[int(k)]: v for k, v in provenance["removed"].items()}
    counts = [layer.num_experts for layer in adapter.moe_layers(pruned)]
    assert counts == provenance["experts_after"]
    unmasked = original(TOKENS)
    with call_hooks(exclude(original, adapter, removed)):
        expected = original(TOKENS)
    got = pruned(TOKENS)
    mx.eval(unmasked, expected, got)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=atol, rtol=1e-4)
    # the removed experts mattered: without excluding them the logits differ
    assert not np.allclose(np.array(got), np.array(unmasked), atol=atol, rtol=1e-4)
    return provenance


@pytest.mark.parametrize("bits", [None, 4], ids=["f32", "4bit"])
@pytest.mark.parametrize("case,model_type,args", CASES, ids=[c[0] for c in CASES])
def test_pruned_logits_equal_masked_original(tmp_path, case, model_type, args, bits):
    args, groups = grouped_args(model_type, args)
    source, adapter = write_dir(tmp_path / "model", model_type, args, bits)
    stats = write_stats(source, tmp_path / "stats.npz")
    out = tmp_path / "uniform"
    summary = prune(
        PruneRequest(model=source, stats=stats, output=out, n=2 if groups == 1 else groups)
    )
    assert summary["uniform"] and summary["bytes_saved"] > 0
    pruned_matches_masked(source, out, adapter)

    wide = tmp_path / "wide"
    summary = prune(
        PruneRequest(
            model=source,
            stats=stats,
            output=wide,
            selector="model-wide",
            n=5 if groups == 1 else 3 * groups,
        )
    )
    assert not summary["uniform"], summary["keep"]
    config = json.loads((wide / "config.json").read_text())
    assert config["model_file"] == nonuniform.MODEL_FILE
    provenance = pruned_matches_masked(source, wide, adapter, trust=True)
    if groups > 1:
        size = provenance["experts_before"][0] // groups
        for gone in provenance["removed"].values():
            assert len({sum(1 for e in gone if e // size == g) for g in range(groups)}) == 1
