"""Adapters for routers without expert groups: family A (top-k of the logits, softmax over the
k), family B (softmax over all experts, top-k, optional renormalisation), family D (sigmoid
scores, a selection-only bias, top-k, renormalisation, scaling) and phimoe's sparsemixer.

Every route function below is written from the installed ``mlx_lm/models/<type>.py`` block and
repeats its operations in the same order (which ``argpartition`` form, float32 casts, epsilons),
so the adapter selects exactly the experts the block selected. Each route also declares its
dense scores (``router_scores``: every expert's probability before the top-k): the softmax over
all experts for families A and B and phimoe, the sigmoid (or laguna's score function) without
the selection-only bias for family D.

The weights an adapter reports are the factors that multiply each expert's raw output in the
block's sum: renormalisation, ``routed_scaling_factor``-style scaling (also when the block applies
it to the summed output, as laguna does) and Klear's per-token mixing coefficient are included.

MLX is imported inside the functions so that listing plugins does not import it.
"""

from collections.abc import Callable

import attrs
from mlxfun.core.adapter import (
    MoEAdapter,
    get_path,
    sigmoid_scores,
    softmax_scores,
    with_scores,
)

from .routing import softmax_topk, topk_softmax


def _attr(block, path, default=None):
    try:
        return get_path(block, path)
    except (AttributeError, KeyError, IndexError, ValueError):
        return default


def _flag(block, spec) -> bool:
    """``spec`` is True/False/None or the attribute path of a boolean flag on the block."""
    if isinstance(spec, str):
        return bool(_attr(block, spec, False))
    return bool(spec)


def _top_k_indices(scores, k, largest_last):
    """The two ``argpartition`` forms mlx-lm blocks use; both give the k largest, unsorted."""
    import mlx.core as mx

    if largest_last:
        return mx.argpartition(scores, kth=-k, axis=-1)[..., -k:]
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


# ---------------------------------------------------------------------------------------------
# Routing functions: route(block, logits) -> (indices, weights)


def logits_topk_softmax(top_k="num_experts_per_tok", largest_last=True, fp32=False, precise=True):
    """Family A with ``argpartition(logits, kth=-k)[..., -k:]`` (granitemoe(+hybrid), gpt_oss);
    ``fp32`` casts the k logits to float32 before the softmax (granitemoe)."""

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        inds = _top_k_indices(logits, k, largest_last)
        top = mx.take_along_axis(logits, inds, axis=-1)
        if fp32:
            top = top.astype(mx.float32)
        if precise:
            return inds, mx.softmax(top, axis=-1, precise=True)
        return inds, mx.softmax(top, axis=-1)

    return with_scores(route, softmax_scores)


def softmax_all_topk(top_k="top_k", norm=None, largest_last=False):
    """Family B with ``argpartition(-probs, kth=k-1)[..., :k]`` (qwen2_moe, olmoe, hunyuan,
    deepseek); ``norm`` is None (never), True (always) or the block's flag attribute."""

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        probs = mx.softmax(logits, axis=-1, precise=True)
        inds = _top_k_indices(probs, k, largest_last)
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if _flag(block, norm):
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores

    return with_scores(route, softmax_scores)


def ernie_route(block, logits):
    """ernie4_5_moe: the block's own gate activation (softmax or sigmoid) on float32 logits,
    top-k, always renormalised with a 1e-12 floor."""
    import mlx.core as mx

    gates = block.gate_act(logits.astype(mx.float32))
    k = block.k
    inds = _top_k_indices(gates, k, largest_last=False)
    scores = mx.take_along_axis(gates, inds, axis=-1)
    scores = scores / mx.maximum(scores.sum(axis=-1, keepdims=True), 1e-12)
    return inds, scores


def ernie_scores(block, logits):
    """ernie4_5_moe's dense scores: the block's gate activation (softmax or sigmoid) on the
    float32 logits."""
    import mlx.core as mx

    return block.gate_act(logits.astype(mx.float32))


def sparsemixer(top_k="top_k", jitter_eps="jitter_eps"):
    """phimoe's sparsemixer (inference path): k rounds of argmax; each weight is a softmax over
    the logits within a relative band of 2 * jitter_eps of that round's maximum, excluding the
    experts already picked; no renormalisation. The dense scores are the softmax over all
    experts: each weight is that softmax restricted to the round's band (the closest dense
    score; a weight equals it when the band holds every expert not yet picked)."""

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        eps = _attr(block, jitter_eps)
        masked = logits
        inds, scores = [], []
        for _ in range(k):
            top = masked.max(axis=-1, keepdims=True)
            ind = mx.argmax(masked, axis=-1, keepdims=True)
            factor = mx.maximum(mx.abs(logits), top)
            band = mx.where((top - logits) / factor > 2 * eps, -mx.inf, masked)
            band = mx.softmax(band, axis=-1, precise=True)
            scores.append(mx.take_along_axis(band, ind, axis=-1))
            inds.append(ind)
            masked = mx.put_along_axis(masked, ind, mx.array(-mx.inf, masked.dtype), axis=-1)
        return mx.concatenate(inds, axis=-1), mx.concatenate(scores, axis=-1)

    return with_scores(route, softmax_scores)


def sigmoid_topk(
    top_k="top_k",
    bias=None,
    norm=True,
    eps=None,
    scale=None,
    largest_last=False,
    fp32=True,
):
    """Family D without groups: sigmoid scores (of float32 logits when ``fp32``), plus the
    block's selection-only bias when it has one, top-k, weights from the un-biased scores,
    renormalised (``norm`` True/None/flag attribute; ``eps`` added to the sum when the block
    adds one), times the block's ``scale`` attribute (minimax, minimax_m3_vl, Klear, lfm2_moe).
    """

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        scores = mx.sigmoid(logits.astype(mx.float32) if fp32 else logits)
        correction = _attr(block, bias) if bias is not None else None
        # the blocks add the bias in float32 (lfm2_moe casts bf16 scores up first)
        chosen_by = scores if correction is None else scores.astype(mx.float32) + correction
        inds = _top_k_indices(chosen_by, k, largest_last)
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if _flag(block, norm):
            total = weights.sum(axis=-1, keepdims=True)
            weights = weights / (total if eps is None else total + eps)
        if scale is not None:
            weights = weights * _attr(block, scale)
        return inds, weights

    return with_scores(route, sigmoid_scores)


def laguna_route(block, logits):
    """laguna: float32 logits, optional tanh soft-cap, sigmoid or sqrt(softplus) scores, plus the
    selection-only correction bias, top-k, always renormalised; the block multiplies the summed
    routed output by ``routed_scaling_factor``, which is folded into the weights here."""
    import mlx.core as mx

    gate = block.gate
    scores = laguna_scores(block, logits)
    inds = _top_k_indices(scores + gate.e_score_correction_bias, gate.top_k, largest_last=False)
    weights = mx.take_along_axis(scores, inds, axis=-1)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return inds, weights * block.routed_scaling_factor


def laguna_scores(block, logits):
    """laguna's dense scores: the soft-capped float32 logits through sigmoid or
    sqrt(softplus), without the correction bias."""
    import mlx.core as mx
    import mlx.nn as nn

    gate = block.gate
    logits = logits.astype(mx.float32)
    if gate.softcap > 0.0:
        logits = mx.tanh(logits / gate.softcap) * gate.softcap
    if gate.score_func == "sigmoid":
        return mx.sigmoid(logits)
    if gate.score_func == "sqrtsoftplus":
        return mx.sqrt(nn.softplus(logits))
    raise ValueError(f"laguna: unknown moe_router_score_func {gate.score_func!r}")


_step3p5_select = None


def step3p5_route(block, logits):
    """step3p5: the block's ``mx.compile``d selection, repeated with the same graph (a compiled
    graph fuses its element-wise ops, so an uncompiled copy may round differently)."""
    global _step3p5_select
    import mlx.core as mx

    if _step3p5_select is None:

        @mx.compile
        def select(gates, router_bias, top_k, routed_scaling_factor, norm_topk_prob):
            scores = mx.sigmoid(gates.astype(mx.float32))
            corrected_scores = scores + router_bias
            topk_indices = mx.argpartition(-corrected_scores, kth=top_k - 1, axis=-1)[..., :top_k]
            topk_indices = mx.stop_gradient(topk_indices)
            topk_weights = mx.take_along_axis(scores, topk_indices, axis=-1)
            if norm_topk_prob:
                topk_weights = topk_weights / (mx.sum(topk_weights, axis=-1, keepdims=True) + 1e-20)
            return topk_indices, topk_weights * routed_scaling_factor

        _step3p5_select = select

    gate = block.gate
    return _step3p5_select(
        logits, gate.router_bias, gate.top_k, gate.routed_scaling_factor, gate.norm_topk_prob
    )


# ---------------------------------------------------------------------------------------------
# Router-logit functions: logits(block, x), where the router is not simply applied to x


def _float32_input_logits(router_attr):
    """The router applied to the block input cast to float32 (minimax)."""

    def logits(block, x):
        import mlx.core as mx

        return get_path(block, router_attr)(x.astype(mx.float32))

    return logits


def _klear_coefficient(block, x):
    """Klear mixes routed and shared outputs per token: y = c0 * sum_j w_j f_j + c1 * shared."""
    import mlx.core as mx

    return mx.softmax(block.coefficient(x), axis=-1, precise=True)[..., :1]


# ---------------------------------------------------------------------------------------------
# Adapter classes


@attrs.define(kw_only=True, frozen=True)
class RoutedAdapter(MoEAdapter):
    """An ``MoEAdapter`` whose weights follow the block to the end of its routed sum.

    ``weights_in_input_dtype``: the block casts its weights to the input's dtype before
    multiplying (so a bf16 model's weights are bf16-rounded). ``output_scale(block, x)``: a
    per-token factor the block applies to the summed routed output (Klear's coefficient).
    """

    weights_in_input_dtype: bool = False
    output_scale: Callable | None = attrs.field(default=None, repr=False)

    def routing(self, block, x):
        indices, weights, logits = super().routing(block, x)
        if self.weights_in_input_dtype:
            weights = weights.astype(x.dtype)
        if self.output_scale is not None:
            weights = weights * self.output_scale(block, x)
        return indices, weights, logits


@attrs.define(kw_only=True, frozen=True)
class ExpertCountAdapter(RoutedAdapter):
    """Matches its model types only when the config (or its ``text_config``) has at least
    ``min_experts`` experts under ``experts_key``: the same model type also names dense
    checkpoints (qwen3_5 with ``num_experts`` 0, mlx-lm's default; Granite 4.0-H dense models;
    jamba and hunyuan with one expert). A config that describes a model (has ``hidden_size``)
    without the key has no experts; a bare ``{"model_type": ...}`` matches."""

    experts_key: str = "num_experts"
    min_experts: int = 1

    def matches(self, config: dict) -> bool:
        if config.get("model_type") not in self.model_types:
            return False
        text = config.get("text_config") or config
        if self.experts_key not in text and "hidden_size" not in text:
            return True
        return (text.get(self.experts_key) or 0) >= self.min_experts


def _dense(what: str) -> str:
    return (
        f"this config has {what}, so mlx-lm builds a dense model with no MoE layers "
        "(nothing to observe or prune)"
    )


_DENSE_QWEN3_5 = _dense("no experts (num_experts is 0 or absent, mlx-lm's default for Qwen3.5)")


ADAPTERS = [
    # ----- family A: top-k of the router logits, softmax over the k -----
    MoEAdapter(
        name="mixtral",
        model_types=("mixtral",),
        description="Mixtral: top-k of router logits, softmax over the k",
        router_family="A: top-k logits, softmax over k",
        route=topk_softmax(),
        num_experts_keys=("num_local_experts",),
    ),
    ExpertCountAdapter(
        name="jamba",
        model_types=("jamba",),
        description="Jamba (Mamba/attention hybrid): top-k of router logits, softmax over the k",
        router_family="A: top-k logits, softmax over k",
        experts_attr="switch_mlp",
        router_attr="router",
        route=topk_softmax(),
        num_experts_keys=("num_experts",),
        experts_key="num_experts",
        min_experts=2,
        unsupported={"jamba": _dense("num_experts 1")},
        notes="MoE blocks are layers[i].feed_forward where (i + expert_layer_offset) % "
        "expert_layer_period == 0; mlx-lm builds no MoE layer at all when num_experts is 1, so "
        "pruning must keep at least 2 experts.",
    ),
    MoEAdapter(
        name="phixtral",
        model_types=("phixtral", "phi-msft"),
        description="Phixtral: top-k of router logits, softmax over the k; GELU SwitchMLP experts",
        router_family="A: top-k logits, softmax over k",
        experts_attr="switch_mlp",
        router_attr="gate",
        route=topk_softmax(),
        num_experts_keys=("num_local_experts",),
        notes="Blocks are transformer.h[i].moe (parallel attention + MoE); experts are "
        "SwitchMLP fc1/fc2 with biases. Config alias phi-msft.",
    ),
    MoEAdapter(
        name="granitemoe",
        model_types=("granitemoe",),
        description="GraniteMoE: top-k of router logits, float32 softmax over the k",
        router_family="A: top-k logits, softmax over k",
        experts_attr="switch_mlp",
        router_attr="router.layer",
        route=logits_topk_softmax(top_k="router.top_k", fp32=True, precise=False),
        num_experts_keys=("num_local_experts",),
    ),
    ExpertCountAdapter(
        name="granitemoehybrid",
        model_types=("granitemoehybrid",),
        description="Granite 4 hybrid (Mamba2/attention): top-k of router logits, softmax over k",
        router_family="A: top-k logits, softmax over k",
        experts_attr="switch_mlp",
        router_attr="router.layer",
        route=logits_topk_softmax(top_k="router.top_k"),
        num_experts_keys=("num_local_experts",),
        experts_key="num_local_experts",
        unsupported={"granitemoehybrid": _dense("no num_local_experts (a dense Granite 4.0-H)")},
        notes="The ungated shared expert is a sibling of the block, layers[i].shared_mlp "
        "(fused input_linear gate|up, output_linear), not an attribute of block_sparse_moe, so "
        "it is not in shared_attrs (those are block-relative).",
    ),
    MoEAdapter(
        name="gpt_oss",
        model_types=("gpt_oss",),
        description="gpt-oss: top-k of biased router logits, softmax over the k; SwiGLU-OAI experts",
        router_family="A: top-k logits, softmax over k",
        experts_attr="experts",
        router_attr="router",
        route=logits_topk_softmax(top_k="num_experts_per_tok"),
        num_experts_keys=("num_local_experts",),
        notes="The router Linear has a bias (slice it with the router rows); experts have biases.",
    ),
    # ----- family B: softmax over all experts, top-k, optional renormalisation -----
    MoEAdapter(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        description="Qwen3-MoE: softmax over all experts, top-k, optional renormalisation",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        num_experts_keys=("num_experts",),
    ),
    MoEAdapter(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        description="Qwen3-VL-MoE (text model): the Qwen3-MoE block under language_model",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        num_experts_keys=("text_config.num_experts",),
        top_k_keys=("text_config.num_experts_per_tok",),
    ),
    MoEAdapter(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        description="Qwen2-MoE: softmax over all experts, top-k, no renormalisation; gated shared expert",
        router_family="B: softmax-all, top-k, no renorm",
        route=softmax_all_topk(top_k="top_k"),
        shared_attrs=("shared_expert",),
        num_experts_keys=("num_experts",),
        notes="The shared expert is gated by sigmoid(shared_expert_gate(x)), a Linear(H, 1).",
    ),
    MoEAdapter(
        name="qwen3_next",
        model_types=("qwen3_next",),
        description="Qwen3-Next: softmax over all experts, top-k, optional renorm; gated shared expert",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        shared_attrs=("shared_expert",),
        num_experts_keys=("num_experts",),
        notes="The shared expert is gated by sigmoid(shared_expert_gate(x)), a Linear(H, 1).",
    ),
    ExpertCountAdapter(
        name="qwen3_5",
        model_types=("qwen3_5", "qwen3_5_moe", "prism_hadamard_qwen35"),
        description="Qwen3.5 (MoE checkpoints): the Qwen3-Next block under language_model",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        shared_attrs=("shared_expert",),
        # The config is either {text_config: {...}} or flat (mlx-lm accepts both): edit the
        # keys that are present.
        num_experts_keys=("text_config.num_experts", "num_experts"),
        top_k_keys=("text_config.num_experts_per_tok", "num_experts_per_tok"),
        unsupported={
            "qwen3_5": _DENSE_QWEN3_5,
            "qwen3_5_moe": _DENSE_QWEN3_5,
            "prism_hadamard_qwen35": _DENSE_QWEN3_5,
        },
        notes="Every layer is MoE when num_experts > 0 (decoder_sparse_step and mlp_only_layers "
        "are ignored); norm_topk_prob defaults to True. The shared expert is gated by "
        "sigmoid(shared_expert_gate(x)). prism_hadamard_qwen35 is Qwen3.5 with some Linear layers "
        "(possibly the router) replaced by 2-bit HadamardQuantizedLinear, which rotates its "
        "input: read such a router through its own call, and slice its weight/scales/biases "
        "rows (the rotation acts on the input axis).",
    ),
    MoEAdapter(
        name="olmoe",
        model_types=("olmoe",),
        description="OLMoE: softmax over all experts, top-k, optional renormalisation",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_all_topk(top_k="top_k", norm="norm_topk_prob"),
        num_experts_keys=("num_experts",),
        notes="The block flattens tokens to (B*L, H) before routing and the experts call.",
    ),
    MoEAdapter(
        name="mellum",
        model_types=("mellum",),
        description="Mellum: softmax over all experts, top-k, optional renormalisation",
        router_family="B: softmax-all, top-k, renorm",
        route=softmax_topk(),
        num_experts_keys=("num_experts",),
    ),
    ExpertCountAdapter(
        name="hunyuan",
        model_types=("hunyuan",),
        description="Hunyuan: softmax over all experts, top-k, no renormalisation; ungated shared MLP",
        router_family="B: softmax-all, top-k, no renorm",
        router_attr="gate.wg",
        route=softmax_all_topk(top_k="top_k"),
        shared_attrs=("shared_mlp",),
        num_experts_keys=("num_experts",),
        top_k_keys=("moe_topk",),
        experts_key="num_experts",
        min_experts=2,
        unsupported={"hunyuan": _dense("num_experts 1")},
        notes="moe_topk may be a per-layer list; mlx-lm builds a dense MLP when num_experts is 1, "
        "so pruning must keep at least 2 experts. shared_mlp exists only with use_mixed_mlp_moe.",
    ),
    ExpertCountAdapter(
        name="deepseek",
        model_types=("deepseek",),
        description="DeepSeek-MoE (v1): softmax over all experts, top-k, no renorm; shared experts",
        router_family="B: softmax-all, top-k, no renorm",
        router_attr="gate.weight",
        route=softmax_all_topk(top_k="gate.top_k"),
        shared_attrs=("shared_experts",),
        num_experts_keys=("n_routed_experts",),
        experts_key="n_routed_experts",
        unsupported={"deepseek": _dense("no n_routed_experts")},
        notes="The router is a raw (E, H) array (MoEGate.weight, never quantized); MoE layers "
        "are i >= first_k_dense_replace with i % moe_layer_freq == 0.",
    ),
    MoEAdapter(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        description="ERNIE 4.5 MoE: softmax (or sigmoid) over all experts, top-k, always renormalised",
        router_family="B: softmax-all, top-k, renorm",
        route=ernie_route,
        scores=ernie_scores,
        shared_attrs=("shared_experts",),
        num_experts_keys=("moe_num_experts",),
        top_k_attrs=("k",),
        top_k_keys=("moe_k",),
        notes="moe_gate_act picks softmax or sigmoid; mlx-lm's sanitize drops "
        "e_score_correction_bias, so there is no correction bias (moe_use_aux_free is ignored).",
    ),
    # ----- phimoe: sparsemixer -----
    MoEAdapter(
        name="phimoe",
        model_types=("phimoe",),
        description="PhiMoE: sparsemixer routing (iterative argmax, softmax within a jitter band)",
        router_family="sparsemixer",
        route=sparsemixer(),
        num_experts_keys=("num_local_experts",),
        notes="The weights are not renormalised; router_jitter_noise sets the band width.",
    ),
    # ----- family D: sigmoid + selection-only bias, no groups -----
    RoutedAdapter(
        name="minimax",
        model_types=("minimax", "minimax_m2"),
        description="MiniMax M2: sigmoid scores of float32 router, bias for selection, top-k, renorm",
        router_family="D: sigmoid + bias, top-k, renorm",
        logits=_float32_input_logits("gate"),
        route=sigmoid_topk(top_k="num_experts_per_tok", bias="e_score_correction_bias", eps=1e-20),
        correction_bias_attr="e_score_correction_bias",
        num_experts_keys=("num_local_experts",),
        weights_in_input_dtype=True,
        notes="The router sees x cast to float32; scoring_func is ignored by mlx-lm (always "
        "sigmoid); shared_intermediate_size is unused. Config alias minimax_m2.",
    ),
    RoutedAdapter(
        name="minimax_m3_vl",
        model_types=("minimax_m3_vl",),
        description="MiniMax M3 (text model): sigmoid + bias top-k, renorm, x routed_scaling_factor",
        router_family="D: sigmoid + bias, top-k, renorm, scaled",
        route=sigmoid_topk(
            top_k="num_experts_per_tok",
            bias="e_score_correction_bias",
            eps=1e-20,
            scale="routed_scaling_factor",
        ),
        correction_bias_attr="e_score_correction_bias",
        shared_attrs=("shared_experts",),
        num_experts_keys=("text_config.num_local_experts",),
        top_k_keys=("text_config.num_experts_per_tok",),
        weights_in_input_dtype=True,
        notes="MoE layers follow text_config.mlp_layer_types / moe_layer_freq; the block "
        "flattens tokens before routing. The shared expert is ungated.",
    ),
    RoutedAdapter(
        name="Klear",
        model_types=("Klear",),
        description="Klear: sigmoid + expert_bias top-k, optional renorm; routed/shared mix per token",
        router_family="D: sigmoid + bias, top-k, renorm",
        experts_attr="experts",
        route=sigmoid_topk(top_k="top_k", bias="expert_bias", norm="norm_topk_prob"),
        correction_bias_attr="expert_bias",
        shared_attrs=("shared_experts",),
        num_experts_keys=("num_experts",),
        weights_in_input_dtype=True,
        output_scale=_klear_coefficient,
        notes="y = c0 * sum_j w_j f_j + c1 * shared(x) with c = softmax(coefficient(x)); the "
        "reported weights include c0.",
    ),
    RoutedAdapter(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        description="LFM2-MoE: sigmoid (+ expert_bias) top-k, optional renorm, x routed_scaling_factor",
        router_family="D: sigmoid + bias, top-k, renorm, scaled",
        route=sigmoid_topk(
            top_k="top_k",
            bias="expert_bias",
            norm="norm_topk_prob",
            eps=1e-6,
            scale="routed_scaling_factor",
            largest_last=True,
            fp32=False,
        ),
        correction_bias_attr="expert_bias",
        num_experts_keys=("num_experts",),
        weights_in_input_dtype=True,
        notes="expert_bias exists only with use_expert_bias; MoE layers are i >= "
        "num_dense_layers (layers[i].feed_forward).",
    ),
    MoEAdapter(
        name="laguna",
        model_types=("laguna",),
        description="Laguna: soft-capped sigmoid|sqrtsoftplus + bias top-k, renorm, scaled; shared expert",
        router_family="D: sigmoid + bias, top-k, renorm, scaled",
        router_attr="gate.proj",
        route=laguna_route,
        scores=laguna_scores,
        correction_bias_attr="gate.e_score_correction_bias",
        shared_attrs=("shared_expert",),
        num_experts_keys=("num_experts",),
        notes="moe_routed_scaling_factor multiplies the summed routed output (folded into the "
        "weights); MoE layers follow mlp_layer_types (default: layer 0 dense).",
    ),
    MoEAdapter(
        name="step3p5",
        model_types=("step3p5",),
        description="Step 3.5: sigmoid + router_bias top-k, optional renorm, x scaling; shared expert",
        router_family="D: sigmoid + bias, top-k, renorm, scaled",
        router_attr="gate.gate",
        route=step3p5_route,
        scores=sigmoid_scores,
        correction_bias_attr="gate.router_bias",
        shared_attrs=("share_expert",),
        num_experts_keys=("moe_num_experts",),
        top_k_keys=("moe_top_k",),
        notes="MoE layers from moe_layers_enum (default 1..N-1); experts may use a clamped SwiGLU.",
    ),
]
