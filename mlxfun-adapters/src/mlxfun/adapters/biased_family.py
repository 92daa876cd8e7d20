"""Adapters for router family C: sigmoid (or softmax) scores, a correction bias that steers the
selection only, optional group-limited selection (``n_group`` groups of contiguous experts, only
the best ``topk_group`` groups compete), gate weights from the un-biased scores, renormalised
and multiplied by ``routed_scaling_factor``; shared experts are ungated.

Covers deepseek_v2/v3/v32 (and the kimi_k2, joyai_llm_flash aliases), glm_moe_dsa, glm4_moe,
glm4_moe_lite, solar_open, kimi_vl, kimi_k25, kimi_linear, kimi_k3, dots1, exaone_moe,
mimo_v2_flash, nemotron_h, bailing_moe(_linear), bailing_hybrid, bailing_moe_v3, afmoe, mistral4
and mistral3 checkpoints wrapping a mistral4 text model.

Where the mlx-lm block calls a module-level selection function (deepseek_v3's
``group_expert_select`` and its copies, kimi's and bailing's ``_group_expert_select``,
``mistral4_expert_select``) the route calls that same function, found in the module that
defines the gate or block class, so the selection is the block's bit for bit (most of them are
``mx.compile``d). Where the block does the selection inline (deepseek_v2, bailing_hybrid,
afmoe), ``grouped_select`` below repeats its operations in the same order.

Quirk kept on purpose: most of these blocks zero the scores of the dropped groups instead of
setting them to -inf (bailing_hybrid and bailing_moe_v3 use -inf). With a negative correction
bias a kept expert can score below 0, and then a dropped-group expert (score 0) is picked
instead; the adapters reproduce what the block does.

Every adapter declares its dense scores (``router_scores``: every expert's probability before
the selection): the sigmoid or softmax of the logits that the selection starts from, without
the correction bias.

MLX is imported inside the functions so that listing plugins does not import it.
"""

import sys
from collections.abc import Callable

import attrs
from mlxfun.core.adapter import (
    SCORE_FUNCTIONS,
    MoEAdapter,
    get_path,
    has_path,
    sigmoid_scores,
    softmax_scores,
)

FAMILY = "C: sigmoid + correction bias, group-limited top-k, renorm, scaled"
SOFTMAX_FAMILY = "C: softmax, group-limited top-k, scaled"

# mlx_lm.utils.MODEL_ARCHITECTURE_REMAPPING, repeated here so that matching a config does not
# import MLX: these config model types load a different mlx-lm module.
ARCHITECTURE_REMAPPING = {("bailing_hybrid", "BailingMoeV3ForCausalLM"): "bailing_moe_v3"}

_GROUP_NOTE = (
    "Group-limited selection splits the experts into {n_group} groups of contiguous indices: "
    "pruning must keep {experts} divisible by {n_group} (prune the same number from "
    "every group to keep the groups' meaning), and topk_group groups must still hold at least "
    "top-k experts."
)


def group_note(experts_key: str = "n_routed_experts", n_group_key: str = "n_group") -> str:
    return _GROUP_NOTE.format(experts=experts_key, n_group=n_group_key)


# ---------------------------------------------------------------------------------------------
# Routing functions: route(block, logits) -> (indices, weights)


def grouped_select(
    logits,
    top_k: int,
    *,
    bias=None,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
    renormalize: bool = True,
    score: str = "sigmoid",
    float32: bool = True,
    precise: bool = False,
    group_score: str = "top2",
    masked: float = 0.0,
    eps: float = 0.0,
    out_dtype=None,
):
    """Family-C selection in MLX, in the operation order of the mlx-lm blocks.

    ``score`` (sigmoid|softmax) on the logits (cast to float32 first when ``float32``); the
    selection adds ``bias``; with ``n_group > 1`` the ``n_group - topk_group`` groups with the
    lowest group score (sum of the top-2 scores, or the max) get the score ``masked``; top-k by
    ``argpartition(-scores, kth=k-1)``; the weights are the un-biased scores of the chosen
    experts, divided by their sum (+ ``eps``) when ``renormalize`` and k > 1, times ``scaling``.
    """
    import mlx.core as mx

    gates = logits.astype(mx.float32) if float32 else logits
    if score == "sigmoid":
        scores = mx.sigmoid(gates)
    elif score == "softmax":
        scores = mx.softmax(gates, axis=-1, precise=precise)
    else:
        raise ValueError(f"unknown router score function {score!r}")
    original = scores
    if bias is not None:
        scores = scores + bias
    drop = n_group - topk_group
    if n_group > 1 and drop > 0:
        scores = mx.unflatten(scores, axis=-1, shape=(n_group, -1))
        if group_score == "top2":
            group_scores = mx.topk(scores, 2, axis=-1).sum(axis=-1, keepdims=True)
        elif group_score == "max":
            group_scores = scores.max(axis=-1, keepdims=True)
        else:
            raise ValueError(f"unknown group score {group_score!r}")
        group_idx = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
        scores = mx.put_along_axis(
            scores, mx.stop_gradient(group_idx), mx.array(masked, scores.dtype), axis=-2
        )
        scores = mx.flatten(scores, -2, -1)
    inds = mx.stop_gradient(mx.argpartition(-scores, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(original, inds, axis=-1)
    if renormalize and top_k > 1:
        denominator = weights.sum(axis=-1, keepdims=True)
        if eps:
            denominator = denominator + eps
        weights = weights / denominator
    weights = weights * scaling
    if out_dtype is not None:
        weights = weights.astype(out_dtype)
    return inds, weights


def _module_function(holder, name: str):
    """``name`` from the module that defines ``holder``'s class (skipping mlxfun's hook
    subclasses), or from a base class's module."""
    for cls in type(holder).__mro__:
        if "_mlxfun_hooked" in cls.__dict__:
            continue
        function = getattr(sys.modules.get(cls.__module__), name, None)
        if callable(function):
            return function
    raise AttributeError(f"no {name}() in the module of {type(holder).__name__}")


def block_select(function: str, arguments: Callable, holder: str | None = "gate"):
    """Route by calling the block's own module-level selection function
    ``function(logits, *arguments(block))``; it is looked up in the module that defines the
    class of ``block.<holder>`` (the block itself when ``holder`` is None)."""

    def route(block, logits):
        owner = block if holder is None else get_path(block, holder)
        return _module_function(owner, function)(logits, *arguments(block))

    return route


def _moe_gate_arguments(block):
    """deepseek_v3-style ``MoEGate``: group_expert_select(gates, bias, top_k, n_group,
    topk_group, routed_scaling_factor, norm_topk_prob)."""
    gate = block.gate
    return (
        gate.e_score_correction_bias,
        gate.top_k,
        gate.n_group,
        gate.topk_group,
        gate.routed_scaling_factor,
        gate.norm_topk_prob,
    )


def _bailing_v3_arguments(block):
    """bailing_moe_v3 ``BailingGate``: _group_expert_select(logits, expert_bias, top_k,
    n_group, topk_group, routed_scaling_factor)."""
    gate = block.gate
    return (gate.expert_bias, gate.top_k, gate.n_group, gate.topk_group, gate.routed_scaling_factor)


def _bailing_gate_arguments(block):
    """bailing_moe(_linear) gates: group_expert_select(gates, expert_bias, top_k, n_group,
    topk_group, routed_scaling_factor, norm_topk_prob, score_function)."""
    gate = block.gate
    return (*_bailing_v3_arguments(block), gate.norm_topk_prob, gate.score_function)


def _kimi_arguments(with_activation: bool):
    def arguments(block):
        args = block.args
        values = (
            block.e_score_correction_bias,
            args.num_experts_per_token,
            args.num_expert_group,
            args.topk_group,
            args.routed_scaling_factor,
            args.moe_renormalize,
        )
        return (*values, args.moe_router_activation_func) if with_activation else values

    return arguments


def _mistral4_arguments(block):
    args = block.args
    return (
        block.num_experts_per_tok,
        args.n_group,
        args.topk_group,
        args.routed_scaling_factor,
        args.norm_topk_prob,
    )


def deepseek_v2_route(block, logits):
    """deepseek_v2 ``MoEGate``: precise softmax in the logits' dtype; with ``topk_method ==
    "group_limited_greedy"`` the groups with the lowest max score are zeroed; top-k; no
    renormalisation; times routed_scaling_factor."""
    gate = block.gate
    grouped = gate.topk_method == "group_limited_greedy"
    return grouped_select(
        logits,
        gate.top_k,
        n_group=gate.n_group if grouped else 1,
        topk_group=gate.topk_group if grouped else 1,
        scaling=gate.routed_scaling_factor,
        renormalize=False,
        score="softmax",
        float32=False,
        precise=True,
        group_score="max",
    )


def bailing_hybrid_route(block, logits):
    """bailing_hybrid ``Gate``: sigmoid|softmax on float32 logits, + expert_bias, dropped groups
    set to -inf, renormalised (+1e-20) when norm_topk_prob, scaled, cast back."""
    gate = block.gate
    return grouped_select(
        logits,
        gate.top_k,
        bias=gate.expert_bias,
        n_group=gate.n_group,
        topk_group=gate.topk_group,
        scaling=gate.routed_scaling_factor,
        renormalize=gate.norm_topk_prob,
        score=gate.score_function,
        masked=-float("inf"),
        eps=1e-20,
        out_dtype=logits.dtype,
    )


def afmoe_route(block, logits):
    """afmoe ``AfmoeMoE``: sigmoid|softmax on float32 logits, + expert_bias (on the block),
    dropped groups zeroed, renormalised when route_norm, times route_scale."""
    return grouped_select(
        logits,
        block.num_experts_per_tok,
        bias=block.expert_bias,
        n_group=block.n_group,
        topk_group=block.topk_group,
        scaling=block.route_scale,
        renormalize=block.route_norm,
        score=block.score_func,
    )


def named_scores(path: str, otherwise: str | None = None):
    """Dense scores ``scores(block, logits)`` of routers whose score function is named by the
    block attribute at ``path`` ("sigmoid" or "softmax"; any other name is ``otherwise``, or an
    error when None)."""

    def scores(block, logits):
        name = get_path(block, path)
        function = SCORE_FUNCTIONS.get(name) or SCORE_FUNCTIONS.get(otherwise)
        if function is None:
            raise ValueError(f"unknown router score function {name!r}")
        return function(block, logits)

    return scores


def _float32_logits(block, x):
    """bailing_moe_v3 ``BailingGate``: the logits are computed in float32."""
    import mlx.core as mx

    return x.astype(mx.float32) @ block.gate.weight.astype(mx.float32).T


# ---------------------------------------------------------------------------------------------
# Config matching


def mlx_lm_model_type(config: dict) -> str | None:
    """The mlx-lm module a config loads, for configs remapped by their architecture."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for architecture in architectures:
        remapped = ARCHITECTURE_REMAPPING.get((model_type, architecture))
        if remapped is not None:
            return remapped
    return model_type


def _wraps_mistral4(config: dict) -> bool:
    """mistral3 (and its alias llava) hold a ministral3, mistral4 or llama text model: only the
    mistral4 one is MoE."""
    if config.get("model_type") not in ("mistral3", "llava"):
        return True
    text = config.get("text_config")
    return isinstance(text, dict) and text.get("model_type") == "mistral4"


@attrs.define(kw_only=True, frozen=True)
class BiasedAdapter(MoEAdapter):
    """A family-C adapter.

    ``expert_input_attr`` names a projection on the block that maps the block input to the
    experts' input (latent MoE: nemotron_h ``fc1_latent_proj``, kimi_k3
    ``routed_expert_down_proj``); it is applied when the block has it. ``requires`` is an extra
    test on the config (beyond its model type, resolved like mlx-lm resolves architecture
    remappings).
    """

    expert_input_attr: str | None = None
    requires: Callable[[dict], bool] | None = attrs.field(default=None, repr=False)

    def matches(self, config: dict) -> bool:
        if mlx_lm_model_type(config) not in self.model_types:
            return False
        return self.requires is None or self.requires(config)

    def expert_outputs(self, layer, x, indices):
        if self.expert_input_attr is not None and has_path(layer.block, self.expert_input_attr):
            projection = get_path(layer.block, self.expert_input_attr)
            if projection is not None:
                x = projection(x)
        return layer.experts(x, indices)


# ---------------------------------------------------------------------------------------------
# Declarations

_MOE_GATE = dict(
    router_family=FAMILY,
    router_attr="gate.weight",
    correction_bias_attr="gate.e_score_correction_bias",
    route=block_select("group_expert_select", _moe_gate_arguments),
    scores=sigmoid_scores,
    shared_attrs=("shared_experts",),
    num_experts_keys=("n_routed_experts",),
)

_DENSE_MISTRAL3 = (
    "only {model_type} checkpoints whose text_config.model_type is 'mistral4' have MoE layers; "
    "this one wraps a dense text model (ministral3 or llama)"
)

_LATENT_NOTE = (
    "Latent MoE ({attr} set): the experts run in a {size}-wide latent space on {proj}(x) and the "
    "gate weights multiply their latent outputs, so the observed outputs and norms are latent; "
    "{after} maps the weighted sum back to the hidden size. Weight edits that write to the "
    "residual stream must target {after}, not the experts' down projections."
)

ADAPTERS = [
    BiasedAdapter(
        name="deepseek_v3",
        model_types=("deepseek_v3", "kimi_k2", "joyai_llm_flash"),
        description="DeepSeek-V3 / Kimi-K2: sigmoid + correction bias, group-limited top-k, "
        "renorm, routed_scaling_factor",
        notes="noaux_tc routing (mlx-lm asserts topk_method == 'noaux_tc'). " + group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="deepseek_v32",
        model_types=("deepseek_v32", "glm_moe_dsa"),
        description="DeepSeek-V3.2 / GLM-5 (glm_moe_dsa): the DeepSeek-V3 router with sparse "
        "attention",
        notes="glm_moe_dsa loads deepseek_v32's model. " + group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="glm4_moe",
        model_types=("glm4_moe", "solar_open"),
        description="GLM-4.5 / Solar-Open: sigmoid + correction bias, group-limited top-k, "
        "renorm, routed_scaling_factor",
        notes="solar_open loads glm4_moe's model. " + group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="glm4_moe_lite",
        model_types=("glm4_moe_lite",),
        description="GLM-4.7-Flash (glm4_moe_lite): the DeepSeek-V3 router, renorm with +1e-20",
        notes=group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="kimi_vl",
        model_types=("kimi_vl", "kimi_k25"),
        description="Kimi-VL / Kimi-K2.5: a DeepSeek-V3 language model under language_model",
        notes="The config nests the text model under text_config. "
        + group_note("text_config.n_routed_experts"),
        **{**_MOE_GATE, "num_experts_keys": ("text_config.n_routed_experts",)},
    ),
    BiasedAdapter(
        name="mimo_v2_flash",
        model_types=("mimo_v2_flash",),
        description="MiMo-V2-Flash: sigmoid + correction bias, group-limited top-k, renorm, "
        "routed_scaling_factor (None means 1)",
        notes="MoE layers are those with moe_layer_freq[i] == 1; shared experts only when "
        "n_shared_experts is set. " + group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="exaone_moe",
        model_types=("exaone_moe",),
        description="EXAONE-MoE: sigmoid + correction bias, group-limited top-k, renorm, "
        "routed_scaling_factor",
        notes="MoE layers are those with is_moe_layer[i]. " + group_note("num_experts"),
        **{**_MOE_GATE, "num_experts_keys": ("num_experts",)},
    ),
    BiasedAdapter(
        name="dots1",
        model_types=("dots1",),
        description="dots.llm1: sigmoid + correction bias, group-limited top-k, renorm, "
        "routed_scaling_factor; experts under .experts",
        notes=group_note(),
        **{**_MOE_GATE, "experts_attr": "experts"},
    ),
    BiasedAdapter(
        name="nemotron_h",
        model_types=("nemotron_h",),
        description="Nemotron-H: Mamba2/attention hybrid whose 'E' layers are MoE (ReLU^2 "
        "SwitchMLP fc1/fc2), sigmoid + correction bias, group-limited top-k",
        expert_input_attr="fc1_latent_proj",
        notes="Only the 'E' layers of hybrid_override_pattern (or layers_block_type 'moe') are "
        "MoE; the block is backbone.layers[i].mixer. "
        + _LATENT_NOTE.format(
            attr="moe_latent_size",
            size="moe_latent_size",
            proj="fc1_latent_proj",
            after="fc2_latent_proj",
        )
        + " "
        + group_note(),
        **_MOE_GATE,
    ),
    BiasedAdapter(
        name="kimi_linear",
        model_types=("kimi_linear",),
        description="Kimi-Linear: sigmoid|softmax + correction bias on the block, "
        "group-limited top-k, renorm, routed_scaling_factor",
        router_family=FAMILY,
        router_attr="gate",
        correction_bias_attr="e_score_correction_bias",
        route=block_select("_group_expert_select", _kimi_arguments(True), holder=None),
        scores=named_scores("args.moe_router_activation_func"),
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        top_k_attrs=("args.num_experts_per_token",),
        top_k_keys=("num_experts_per_token",),
        notes="use_grouped_topk is ignored by mlx-lm: num_expert_group/topk_group always "
        "apply. " + group_note("num_experts", "num_expert_group"),
    ),
    BiasedAdapter(
        name="kimi_k3",
        model_types=("kimi_k3",),
        description="Kimi-K3: sigmoid + correction bias on the block, group-limited top-k, "
        "renorm, routed_scaling_factor; optional latent experts",
        router_family=FAMILY,
        router_attr="gate",
        correction_bias_attr="e_score_correction_bias",
        route=block_select("_group_expert_select", _kimi_arguments(False), holder=None),
        scores=sigmoid_scores,
        shared_attrs=("shared_experts",),
        expert_input_attr="routed_expert_down_proj",
        # mlx-lm accepts the config flat or under text_config: edit the keys that are present.
        num_experts_keys=("text_config.num_experts", "num_experts"),
        top_k_attrs=("args.num_experts_per_token",),
        top_k_keys=("text_config.num_experts_per_token", "num_experts_per_token"),
        notes=_LATENT_NOTE.format(
            attr="routed_expert_hidden_size",
            size="routed_expert_hidden_size",
            proj="routed_expert_down_proj",
            after="routed_expert_up_proj (after routed_expert_norm when latent_moe_use_norm)",
        )
        + " "
        + group_note("num_experts", "num_expert_group"),
    ),
    BiasedAdapter(
        name="bailing_moe",
        model_types=("bailing_moe", "bailing_moe_linear"),
        description="Ling / Ring (bailing_moe, bailing_moe_linear): sigmoid|softmax + optional "
        "expert bias, group-limited top-k, renorm, routed_scaling_factor",
        router_family=FAMILY,
        router_attr="gate.gate_proj",
        correction_bias_attr="gate.expert_bias",
        route=block_select("group_expert_select", _bailing_gate_arguments),
        # mlx-lm's group_expert_select takes the softmax for any name other than "sigmoid"
        scores=named_scores("gate.score_function", otherwise="softmax"),
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        notes="gate.expert_bias is None unless moe_router_enable_expert_bias; "
        "moe_router_enable_routed_scaling is ignored by mlx-lm (the scaling always applies). "
        + group_note("num_experts"),
    ),
    BiasedAdapter(
        name="bailing_hybrid",
        model_types=("bailing_hybrid",),
        description="Ling-2.5 / Ring-2.5 (bailing_hybrid): sigmoid|softmax + expert bias, "
        "group-limited top-k (dropped groups -inf), renorm, routed_scaling_factor",
        router_family=FAMILY,
        router_attr="gate.gate_proj",
        correction_bias_attr="gate.expert_bias",
        route=bailing_hybrid_route,
        scores=named_scores("gate.score_function"),
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        notes="Configs with architectures ['BailingMoeV3ForCausalLM'] load bailing_moe_v3 "
        "instead (its own adapter). gate.expert_bias is None unless "
        "moe_router_enable_expert_bias. " + group_note("num_experts"),
    ),
    BiasedAdapter(
        name="bailing_moe_v3",
        model_types=("bailing_moe_v3",),
        description="Bailing-MoE-V3 (bailing_hybrid + BailingMoeV3ForCausalLM): float32 "
        "sigmoid + expert bias, group-limited top-k (-inf), renorm, routed_scaling_factor",
        router_family=FAMILY,
        router_attr="gate.weight",
        correction_bias_attr="gate.expert_bias",
        logits=_float32_logits,
        route=block_select("_group_expert_select", _bailing_v3_arguments),
        scores=sigmoid_scores,
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        notes="Matched from config model_type 'bailing_hybrid' with architectures "
        "['BailingMoeV3ForCausalLM'], as mlx-lm remaps it. The group limit always applies "
        "and the weights are always renormalised. " + group_note("num_experts"),
    ),
    BiasedAdapter(
        name="afmoe",
        model_types=("afmoe",),
        description="AFMoE (Trinity): sigmoid|softmax + expert bias on the block, "
        "group-limited top-k, renorm (route_norm), route_scale; experts under .experts",
        router_family=FAMILY,
        experts_attr="experts",
        router_attr="router.gate",
        correction_bias_attr="expert_bias",
        route=afmoe_route,
        scores=named_scores("score_func"),
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        notes="MoE layers are i >= num_dense_layers; post_mlp_layernorm normalises the block "
        "output outside the block. " + group_note("num_experts"),
    ),
    BiasedAdapter(
        name="mistral4",
        model_types=("mistral4", "mistral3", "llava"),
        description="Mistral-4 (also under mistral3 / llava): softmax over all experts, group-limited "
        "top-k, renorm, routed_scaling_factor; no correction bias",
        router_family="C: softmax, group-limited top-k, renorm, scaled",
        router_attr="gate",
        route=block_select("mistral4_expert_select", _mistral4_arguments, holder=None),
        scores=softmax_scores,
        shared_attrs=("shared_experts",),
        num_experts_keys=("n_routed_experts", "text_config.n_routed_experts"),
        requires=_wraps_mistral4,
        unsupported={
            "mistral3": _DENSE_MISTRAL3.format(model_type="mistral3"),
            "llava": _DENSE_MISTRAL3.format(model_type="llava (loaded as mistral3)"),
        },
        notes="mistral3 / llava configs nest the text model under text_config (matched only "
        "when its model_type is 'mistral4'). Renormalises even when top-k is 1. " + group_note(),
    ),
    BiasedAdapter(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        description="DeepSeek-V2: softmax over all experts, optional group-limited greedy "
        "top-k (group score = max), routed_scaling_factor, no renormalisation",
        router_family=SOFTMAX_FAMILY,
        router_attr="gate.weight",
        route=deepseek_v2_route,
        scores=softmax_scores,
        shared_attrs=("shared_experts",),
        num_experts_keys=("n_routed_experts",),
        notes="Groups apply only with topk_method 'group_limited_greedy'; norm_topk_prob is "
        "not read by mlx-lm. " + group_note(),
    ),
]
