"""The adapter for ``example_moe``, a made-up architecture laid out like Qwen3-MoE, whose model
classes are in ``example_moe.py`` (mlx-lm has no such model type).

Each decoder layer ``model.layers[i].mlp`` is an MoE block with a Linear router ``gate`` and
stacked experts ``switch_mlp`` (a ``SwitchGLU``). The block takes a softmax over all experts,
keeps the top-k and renormalises them when ``norm_topk_prob`` is set. ``route`` repeats exactly
those operations, so mlxfun can check on every token that it selects what the block selected.
"""

from mlxfun.core.adapter import MoEAdapter


def softmax_topk(block, logits):
    """``route(block, logits) -> (indices, weights)``, computed as the block computes them."""
    import mlx.core as mx  # imported when a model runs, not when plugins are listed

    k = block.top_k
    probs = mx.softmax(logits, axis=-1, precise=True)
    indices = mx.argpartition(probs, kth=-k, axis=-1)[..., -k:]
    weights = mx.take_along_axis(probs, indices, axis=-1)
    if block.norm_topk_prob:
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    return indices, weights


EXAMPLE_MOE = MoEAdapter(
    name="example_moe",
    model_types=("example_moe",),
    description="example_moe (example plugin): softmax over all experts, top-k, renormalised",
    router_family="B: softmax-all, top-k, renorm",
    experts_attr="switch_mlp",  # <block>.switch_mlp holds the stacked experts
    router_attr="gate",  # <block>.gate(x) gives the router logits
    route=softmax_topk,
    num_experts_keys=("num_experts",),  # config keys to edit when experts are removed
    top_k_keys=("num_experts_per_tok",),
    model_module="mlxfun_example_plugin.example_moe",  # Model and ModelArgs for example_moe
)
