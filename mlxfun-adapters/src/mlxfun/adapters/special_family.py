"""Adapters for architectures whose routing or experts do not fit the common families: llama4
(the router score scales the expert *input*), gemma4 (a router on its own normalised input,
beside a dense MLP), deepseek_v41 (experts inside an ``Experts`` wrapper, a choice of score
function), dbrx (experts as a list of separate MLPs, called one token at a time) and
longcat_flash(_ngram) (zero-computation experts); plus the reason muse_spark is not supported.

Every route below repeats the installed ``mlx_lm/models/<type>.py`` router operation by
operation (same ``argpartition`` form, casts, epsilons), so the adapter selects exactly the
experts the block selected; the observer checks this on every token.

What g_j and f_j mean here, where it is not the usual "router weight times expert(x)":

* llama4 computes ``experts(x * sigmoid(z_j), j)`` for the top-1 expert j and adds nothing
  else from the router. The reported gate weight is g_j = 1 and the raw output is
  f_j = expert_j(sigmoid(z_j(x)) * x), the expert evaluated on its scaled input, which is what
  the block adds to the residual stream. So REAP = mean ||f_j|| is the mean norm of the expert's
  real contribution (the quantity REAP estimates for ordinary routers, ||g_j f_j||), and
  weighted frequency equals frequency. The alternative g_j = sigmoid(z_j), f_j = expert_j(x)
  would not add up to the block's output (SwiGLU is not homogeneous:
  expert(s x) != s expert(x)) and is not what the observer records (the experts call receives
  the scaled input). The sigmoid scores remain available as ``logits`` (the router's logits).
  ``all_expert_outputs`` evaluates every expert on its own scaled input, sigmoid(z_j) x.
* gemma4: g_j = softmax over the top-k logits times ``per_expert_scale[j]``, f_j = the GeGLU
  expert on ``pre_feedforward_layernorm_2(h)``; the weighted sum then goes through
  ``post_feedforward_layernorm_2`` before it is added to the dense MLP's output, so REAP
  measures the contributions before that norm.

gemma4 has no MoE block module: the decoder layer calls ``router(h)`` and ``experts(...)``
itself, on the post-attention h, while its own input is the pre-attention stream. The core
observer routes from the block's input, so the MoE layers' block (and path) is the router; the
experts are ``<decoder>.experts.switch_glu``. Until the core can hook a router input separately
from the block, ``mlxfun inspect`` counts gemma4's experts under "other" (it looks for them
at ``<path>.<experts_attr>``).

dbrx (``ListExpertsAdapter``): the block (in eval mode, as ``mlx_lm.load`` leaves it) calls
``experts[e](x_t)`` for each token t and each of its k experts in turn. The observer hooks every
expert module; the calls, in order, are the block's own selection and raw outputs, one
(token, slot) each. In training mode the block calls each expert once on all its tokens, which
cannot be attributed to slots: observing it is refused. Pruning drops the removed experts'
tensors (``<ffn>.experts.<e>.{w1,v1,w2}``) and renumbers the kept ones (``slicing``).

longcat_flash (``ZeroExpertsAdapter``): the router picks top-k of n_routed_experts +
zero_expert_num experts; ids >= n_routed_experts are "zero-computation" experts whose output is
the block's input (``zero_expert_type`` identity, the only type mlx-lm runs): the block adds
weight * x for them, and passes expert 0 with weight 0 to the SwitchGLU in their slots. They are
experts like the others for observation: the selection is the router module's own output
(not the SwitchGLU's indices, where a zero slot looks like expert 0), f_j = x for a zero expert
j (so sum_j w_j f_j is the block's output), and every statistic counts them (their frequency is
the share of slots the model spends on no computation). They are not pruned: they hold no
weights (only their router row and correction bias), so removing one saves nothing, sends the
tokens that chose it to experts that compute, and changes the compute budget the model was
trained for (its correction bias holds the average number of computing experts per token).
``MoELayer.zero_experts`` marks them; prune selects among the stored experts only and keeps
every zero expert, so ``zero_expert_num`` stays and ``n_routed_experts`` counts the kept
stored experts.

MLX is imported inside the functions so that listing plugins does not import it.
"""

import re
from typing import Any

import attrs
from mlxfun.core.adapter import (
    MoEAdapter,
    MoELayer,
    expert_projections,
    get_path,
    sigmoid_scores,
    softmax_scores,
    with_scores,
)
from mlxfun.core.errors import MlxfunError

from .softmax_family import RoutedAdapter

LLAMA4_FAMILY = "special: top-1 sigmoid score scales the expert input"
GEMMA4_FAMILY = "special: top-k logits on a normalised input, softmax over k, per-expert scale"
DEEPSEEK_V41_FAMILY = "D: sigmoid|softmax|sqrt-softplus + bias, top-k, renorm, scaled"
DBRX_FAMILY = "B: softmax-all, top-k, renorm"
LONGCAT_FAMILY = "B: softmax-all + bias, top-k, renorm, scaled; zero experts"


# ---------------------------------------------------------------------------------------------
# llama4


def llama4_route(block, logits):
    """llama4 ``MoE``: the top-k (always 1) logits, chosen with ``argpartition(-logits)``; the
    gate weight is 1 because the block applies the sigmoid score to the expert's input."""
    import mlx.core as mx

    k = block.top_k
    indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    return indices, mx.ones(indices.shape, dtype=mx.float32)


@attrs.define(kw_only=True, frozen=True)
class InputScaledAdapter(MoEAdapter):
    """An adapter for blocks that multiply the expert *input* by the sigmoid of the router
    logit, ``experts(x * sigmoid(z_j), j)`` (llama4). Raw expert outputs are computed on that
    scaled input, as the block computes them; the gate weights are 1 (see the module
    docstring)."""

    def expert_outputs(self, layer: MoELayer, x, indices):
        import mlx.core as mx

        logits = self.router_logits(layer.block, x)
        scores = mx.take_along_axis(logits, indices, axis=-1)
        scores = mx.sigmoid(scores.astype(mx.float32)).astype(x.dtype)
        # one scaled copy of x per slot: (..., k, H); each slot is its own "token" of one expert
        scaled = mx.expand_dims(x, -2) * mx.expand_dims(scores, -1)
        return layer.experts(scaled, mx.expand_dims(indices, -1)).squeeze(-2)


# ---------------------------------------------------------------------------------------------
# gemma4


def gemma4_logits(router, x):
    """gemma4 ``Router``: RMS-normalise x with weight ``scale * hidden_size**-0.5``, project."""
    import mlx.core as mx

    return router.proj(mx.fast.rms_norm(x, router.scale * router._root_size, router.eps))


def gemma4_route(router, logits):
    """gemma4 ``Router``: top-k logits (``argpartition(z, kth=-k)[..., -k:]``), softmax over
    the k, times the chosen experts' ``per_expert_scale``."""
    import mlx.core as mx

    k = router.config.top_k_experts
    indices = mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
    weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1)
    return indices, weights * router.per_expert_scale[indices]


def gemma4_scores(router, logits):
    """gemma4's dense scores: the softmax over all experts times ``per_expert_scale`` (the
    route's weights are the same softmax renormalised over the k, times the scale)."""
    import mlx.core as mx

    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    return probs * router.per_expert_scale.astype(mx.float32)


@attrs.define
class DecoderMoELayer(MoELayer):
    """An MoE layer whose router is a sibling of the experts inside a decoder layer.

    ``block`` is the router module (its input is what the router sees, which is what the
    observer records), ``path`` the router's path; ``decoder`` is the decoder layer that holds
    the router, the experts and ``expert_input`` (the norm the decoder applies to the router's
    input before the experts)."""

    decoder: Any = attrs.field(default=None, repr=False)
    decoder_path: str = ""


@attrs.define(kw_only=True, frozen=True)
class DecoderRouterAdapter(MoEAdapter):
    """For decoder layers that run the router and the experts themselves, with no MoE block
    module (gemma4): ``<decoder>.<router_module>`` routes the post-attention hidden state h,
    ``<decoder>.<experts_attr>`` holds the stacked experts and receives ``<decoder>.
    <expert_input_attr>(h)``.

    ``moe_layers`` returns ``DecoderMoELayer``s whose block is the router, because the core
    observer records the block's input as the router's input and the decoder layer's input is
    the pre-attention stream. ``router_attr``, ``top_k_attrs`` and ``per_expert_attrs`` are
    relative to the router, ``experts_attr`` to the decoder layer. ``per_expert_attrs`` are
    (experts,) vectors on the router besides the projection rows, to slice when pruning.

    ``enable_key`` names the config flag (in ``text_config`` when present) without which
    mlx-lm builds dense layers: such configs do not match."""

    router_module: str = "router"
    expert_input_attr: str = "pre_feedforward_layernorm_2"
    per_expert_attrs: tuple[str, ...] = ()
    enable_key: str = "enable_moe_block"

    def matches(self, config: dict) -> bool:
        if config.get("model_type") not in self.model_types:
            return False
        text = config.get("text_config") or config
        if self.enable_key not in text and "hidden_size" not in text:
            return True  # a bare {"model_type": ...}
        return bool(text.get(self.enable_key))

    def moe_layers(self, model) -> list[MoELayer]:
        layers = []
        suffix = "." + self.experts_attr
        for path, module in model.named_modules():
            if not path.endswith(suffix):
                continue
            names = expert_projections(module)
            if not names or any(get_path(module, f"{n}.weight").ndim != 3 for n in names):
                continue
            decoder_path = path[: -len(suffix)]
            decoder = get_path(model, decoder_path)
            block = get_path(decoder, self.router_module)
            numbers = re.findall(r"\.(\d+)(?:\.|$)", decoder_path)
            layers.append(
                DecoderMoELayer(
                    position=0,
                    index=int(numbers[-1]) if numbers else 0,
                    path=f"{decoder_path}.{self.router_module}",
                    block=block,
                    experts=module,
                    num_experts=get_path(module, names[0] + ".weight").shape[0],
                    decoder=decoder,
                    decoder_path=decoder_path,
                )
            )
        layers.sort(key=lambda layer: layer.index)
        for position, layer in enumerate(layers):
            layer.position = position
            layer.top_k = self.top_k(layer.block, model)
        return layers

    def expert_outputs(self, layer: MoELayer, x, indices):
        """Raw outputs on the router's input ``x``: the decoder's expert-input norm first."""
        return layer.experts(get_path(layer.decoder, self.expert_input_attr)(x), indices)


# ---------------------------------------------------------------------------------------------
# deepseek_v41


def deepseek_v41_logits(block, x):
    """deepseek_v41 ``MoE``: tokens flattened to (tokens, H), float32 x @ float32 router
    weight (a raw array, never quantized)."""
    import mlx.core as mx

    flat = x.reshape(-1, x.shape[-1])
    return flat.astype(mx.float32) @ block.gate.weight.astype(mx.float32).T


def deepseek_v41_route(block, logits):
    """deepseek_v41 ``Router``: logits / gate_temp; sigmoid, softmax or (any other
    scoring_func) sqrt(softplus) scores; plus the selection-only correction bias; top-k; the
    un-biased scores renormalised (+1e-20, when top-k > 1 and norm_topk_prob) times
    routed_scaling_factor."""
    import mlx.core as mx

    gate = block.gate
    scores = deepseek_v41_scores(block, logits)
    biased = scores + gate.e_score_correction_bias
    chosen = mx.argpartition(-biased, gate.top_k - 1, axis=-1)[..., : gate.top_k]
    weights = mx.take_along_axis(scores, chosen, axis=-1)
    if gate.norm_topk_prob and gate.top_k > 1:
        weights = weights / (mx.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return chosen, weights * gate.route_scale


def deepseek_v41_scores(block, logits):
    """deepseek_v41's dense scores: logits / gate_temp through sigmoid, softmax or
    sqrt(softplus), without the correction bias."""
    import mlx.core as mx
    import mlx.nn as nn

    gate = block.gate
    logits = logits / gate.gate_temp
    if gate.score_func == "sigmoid":
        return mx.sigmoid(logits)
    if gate.score_func == "softmax":
        return mx.softmax(logits, axis=-1)
    return mx.sqrt(nn.softplus(logits))


# ---------------------------------------------------------------------------------------------
# dbrx


def dbrx_logits(block, x):
    """dbrx ``SparseMoeBlock``: tokens flattened to (tokens, H), then ``router`` (a Linear)."""
    return block.router(x.reshape(-1, x.shape[-1]))


def dbrx_route(block, logits):
    """dbrx ``SparseMoeBlock``: softmax of the float32 logits,
    ``argpartition(-gates, kth=k-1)[:, :k]``, the k scores divided by their L1 norm."""
    import mlx.core as mx

    k = block.num_experts_per_tok
    gates = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    scores = mx.take_along_axis(gates, indices, axis=-1)
    return indices, scores / mx.linalg.norm(scores, ord=1, axis=-1, keepdims=True)


@attrs.define(kw_only=True, frozen=True)
class ListExpertsAdapter(RoutedAdapter):
    """Experts kept as a Python list of separate modules, ``<block>.<experts_attr>[e]``, that the
    block calls one token at a time (dbrx; see the module docstring). ``MoELayer.experts`` is
    the list."""

    merge_unsupported = "its experts are separate modules, not stacked SwitchGLU weights"

    def moe_layers(self, model) -> list[MoELayer]:
        import mlx.nn as nn

        layers = []
        for path, module in model.named_modules():
            experts = module.get(self.experts_attr) if isinstance(module, dict) else None
            if not (isinstance(experts, list) and experts):
                continue
            if not all(isinstance(e, nn.Module) for e in experts):
                continue
            numbers = re.findall(r"\.(\d+)(?:\.|$)", path)
            index = int(numbers[-1]) if numbers else 0
            layers.append(MoELayer(0, index, path, module, experts, len(experts), 0))
        layers.sort(key=lambda layer: layer.index)
        for position, layer in enumerate(layers):
            layer.position = position
            layer.top_k = self.top_k(layer.block, model)
        return layers

    def observe_hooks(self, layer: MoELayer, record) -> list:
        if layer.block.training:
            raise MlxfunError(
                f"{self.name}: the model is in training mode, where the block runs each expert "
                "once on all its tokens and the calls cannot be matched to tokens; call "
                "model.eval() first (mlx_lm.load does)"
            )

        def hook(expert):
            def wrapper(module, call, x):
                out = call(x)
                if record.indices is None:
                    record.indices, record.outputs = [], []
                record.indices.append(expert)
                record.outputs.append(out)
                return out

            return wrapper

        return [(module, hook(e)) for e, module in enumerate(layer.experts)]

    def expert_outputs(self, layer: MoELayer, x, indices):
        """Every expert on all of ``x`` (batched, not token by token), then the chosen ones."""
        import mlx.core as mx

        every = mx.stack([expert(x) for expert in layer.experts], axis=-2)
        return mx.take_along_axis(every, mx.expand_dims(indices, -1), axis=-2)


# ---------------------------------------------------------------------------------------------
# longcat_flash


def longcat_route(block, logits):
    """longcat_flash ``LongcatFlashTopkRouter`` on ``classifier`` logits: softmax over the
    n_routed_experts + zero_expert_num experts, plus the selection-only correction bias, top-k
    (``argpartition(z, kth=-k)[..., -k:]``), optional renormalisation (+1e-20), times
    routed_scaling_factor. Indices >= n_routed_experts are identity ("zero") experts."""
    import mlx.core as mx

    router = block.router
    scores = mx.softmax(logits, axis=-1)
    corrected = scores + router.e_score_correction_bias
    k = router.top_k
    indices = mx.argpartition(corrected, kth=-k, axis=-1)[..., -k:]
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if router.norm_topk_prob:
        weights = weights / (mx.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return indices, weights * router.routed_scaling_factor


@attrs.define(kw_only=True, frozen=True)
class ZeroExpertsAdapter(RoutedAdapter):
    """A router over the stored experts plus ``<block>.<zero_attr>`` parameter-free identity
    experts after them (longcat_flash; see the module docstring). ``router_module`` is the
    module whose call returns the block's ``(indices, weights)``."""

    router_module: str = "router"
    zero_attr: str = "zero_expert_num"
    merge_unsupported = "its zero (identity) experts have no weights to merge"

    def moe_layers(self, model) -> list[MoELayer]:
        layers = super().moe_layers(model)
        for layer in layers:
            layer.zero_experts = int(get_path(layer.block, self.zero_attr))
            layer.num_experts += layer.zero_experts
        return layers

    def observe_hooks(self, layer: MoELayer, record) -> list:
        import mlx.core as mx

        stored = layer.num_experts - layer.zero_experts

        def router(module, call, x, *args, **kwargs):
            out = call(x, *args, **kwargs)
            record.indices = out[0]
            return out

        def experts(module, call, x, indices, *args, **kwargs):
            out = call(x, indices, *args, **kwargs)
            zero = mx.expand_dims(record.indices >= stored, -1)
            record.outputs = mx.where(zero, mx.expand_dims(x, -2), out)
            return out

        return [(get_path(layer.block, self.router_module), router), (layer.experts, experts)]

    def expert_outputs(self, layer: MoELayer, x, indices):
        """Stored experts through the SwitchGLU, zero experts the input itself."""
        import mlx.core as mx

        zero = indices >= layer.num_experts - layer.zero_experts
        out = layer.experts(x, mx.where(zero, 0, indices))
        return mx.where(mx.expand_dims(zero, -1), mx.expand_dims(x, -2), out)


_MUSE_SPARK_REASON = (
    "its forward (routing in mlx_lm.kernels.expert_routing, norm_add_norm, "
    "post_expert_norm_combine, ...) runs mx.fast.metal_kernel kernels with no fallback, so it "
    "runs only on Apple-silicon Metal GPUs: not on the CPU or CUDA backends where mlxfun is "
    "tested, so no adapter can be verified against the block's own selection"
)

_DENSE_GEMMA4 = (
    "this config has enable_moe_block false (or absent, mlx-lm's default), so mlx-lm builds a "
    "dense Gemma 4 with no MoE layers (nothing to observe or prune)"
)


# ---------------------------------------------------------------------------------------------
# Declarations

ADAPTERS = [
    InputScaledAdapter(
        name="llama4",
        model_types=("llama4",),
        description="Llama 4: top-1 router logit; sigmoid score scales the expert input; shared expert",
        router_family=LLAMA4_FAMILY,
        experts_attr="experts",
        router_attr="router",
        route=llama4_route,
        scores=sigmoid_scores,
        shared_attrs=("shared_expert",),
        num_experts_keys=("text_config.num_local_experts",),
        top_k_keys=("text_config.num_experts_per_tok",),
        notes="MoE layers are i % interleave_moe_layer_step == step - 1 "
        "(language_model.model.layers[i].feed_forward); mlx-lm asserts top-1. Reported gate "
        "weights are 1 and raw outputs are expert_j(sigmoid(z_j) * x), the expert's real "
        "contribution, so REAP is its mean norm and weighted_frequency equals frequency; the "
        "router logits carry the scores. The ungated shared_expert (intermediate_size) is added "
        "on the unscaled x.",
    ),
    DecoderRouterAdapter(
        name="gemma4",
        model_types=("gemma4", "gemma4_text", "gemma4_unified"),
        description="Gemma 4 MoE: router on RMS-normalised h, top-k, softmax over k x per-expert scale",
        router_family=GEMMA4_FAMILY,
        experts_attr="experts.switch_glu",
        router_attr="proj",
        logits=gemma4_logits,
        route=gemma4_route,
        scores=gemma4_scores,
        per_expert_attrs=("per_expert_scale",),
        # gemma4/gemma4_unified configs nest the text model in text_config, gemma4_text is flat:
        # edit the keys that are present.
        num_experts_keys=("text_config.num_experts", "num_experts"),
        top_k_attrs=("config.top_k_experts",),
        top_k_keys=("top_k_experts", "text_config.top_k_experts"),
        unsupported={t: _DENSE_GEMMA4 for t in ("gemma4", "gemma4_text", "gemma4_unified")},
        notes="No MoE block module: each decoder layer (model.layers[i], or "
        "language_model.model.layers[i]) runs router(h) and experts(pre_feedforward_layernorm_2"
        "(h)) in parallel with its dense mlp (separate norms) and sums both after "
        "post_feedforward_layernorm_1/_2. MoE layer paths point at the router (the module whose "
        "input the router sees); experts_attr is relative to the decoder layer, router_attr "
        "and per_expert_attrs to the router. Prune router.proj rows, router.per_expert_scale "
        "and experts.switch_glu.*; router.scale is per hidden unit. The dense mlp is not a "
        "shared expert of the router's input. gemma4_unified is mlx-lm's alias of gemma4.",
    ),
    MoEAdapter(
        name="deepseek_v41",
        model_types=("deepseek_v41", "deepseek_v41_text"),
        description="DeepSeek-V4.1: sqrt-softplus (or sigmoid/softmax) + bias top-k, renorm, scaled",
        router_family=DEEPSEEK_V41_FAMILY,
        experts_attr="experts.switch_mlp",
        router_attr="gate.weight",
        logits=deepseek_v41_logits,
        route=deepseek_v41_route,
        scores=deepseek_v41_scores,
        correction_bias_attr="gate.e_score_correction_bias",
        shared_attrs=("shared_experts",),
        # ModelArgs reads text_config when the config has one: edit the keys that are present.
        num_experts_keys=("text_config.n_routed_experts", "n_routed_experts"),
        top_k_keys=("num_experts_per_tok", "text_config.num_experts_per_tok"),
        unsupported={"muse_spark": _MUSE_SPARK_REASON},
        notes="Experts sit in an Experts wrapper (mlp.experts.switch_mlp, clamped SwiGLU "
        "swiglu_limit); self_attn.o_a_proj is a grouped-output SwitchLinear, not an expert. The "
        "router is a raw float32 (E, H) array (gate.weight) with a float32 "
        "e_score_correction_bias; scoring_func sigmoid, softmax or sqrtsoftplus (the default "
        "and any other value), divided by gate_temp first. The shared expert is ungated. "
        "deepseek_v41_text is mlx-lm's alias.",
    ),
    ListExpertsAdapter(
        name="dbrx",
        model_types=("dbrx",),
        description="DBRX: softmax over all experts, top-k, L1-renormalised; experts as a list of MLPs",
        router_family=DBRX_FAMILY,
        experts_attr="experts",
        router_attr="router.layer",
        logits=dbrx_logits,
        route=with_scores(dbrx_route, softmax_scores),
        num_experts_keys=("ffn_config.moe_num_experts",),
        top_k_keys=("ffn_config.moe_top_k",),
        weights_in_input_dtype=True,
        notes="Blocks are transformer.blocks[i].ffn; experts[e] is an MLP (w1 gate, v1 up, w2 "
        "down, separate Linear layers, one tensor each in the checkpoint: mlx-lm's sanitize "
        "splits Hugging Face's stacked experts.mlp.{w1,v1,w2}). The block calls the experts one "
        "token at a time in eval mode (observed through a hook on every expert module) and "
        "casts the weights to the input dtype. Pruning drops the removed experts' tensors and "
        "renumbers the kept ones.",
    ),
    ZeroExpertsAdapter(
        name="longcat_flash",
        model_types=("longcat_flash", "longcat_flash_ngram"),
        description="LongCat-Flash: softmax + bias top-k over experts and identity zero experts, scaled",
        router_family=LONGCAT_FAMILY,
        router_attr="router.classifier",
        route=with_scores(longcat_route, softmax_scores),
        correction_bias_attr="router.e_score_correction_bias",
        num_experts_keys=("n_routed_experts",),
        top_k_keys=("moe_topk",),
        weights_in_input_dtype=True,
        notes="Experts 0..n_routed_experts-1 are the SwitchGLU's (model.layers[i].mlp.switch_mlp), "
        "the zero_expert_num after them are identity experts (output = the block's input); "
        "they are observed and scored, never pruned (MoELayer.zero_experts; see the module "
        "docstring). The router (router.classifier, 8-bit in mlx-lm's quantization, optional "
        "bias) and the float32 e_score_correction_bias have n_routed_experts + zero_expert_num "
        "rows. The MoE block runs beside the decoder layer's two dense MLPs (not shared "
        "experts: they are in series with the attention). longcat_flash_ngram has the same "
        "layers under an n-gram embedding.",
    ),
]
