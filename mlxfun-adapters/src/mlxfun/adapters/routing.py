"""Routing functions: ``route(block, logits) -> (indices, weights)``, written as each mlx-lm
block computes them. Factories take the block attribute names that hold top-k and flags, and
declare the route's dense scores (``route.scores``, read by ``MoEAdapter.router_scores``).

MLX is imported inside the functions so that listing plugins does not import it."""

from mlxfun.core.adapter import get_path, softmax_scores, with_scores


def _attr(block, path, default=None):
    try:
        return get_path(block, path)
    except (AttributeError, KeyError, IndexError):
        return default


def softmax_topk(top_k="top_k", norm="norm_topk_prob", precise=True):
    """Softmax over all experts, top-k, optional renormalisation (qwen3_moe, olmoe, ...)."""

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        probs = mx.softmax(logits, axis=-1, precise=precise)
        inds = mx.argpartition(probs, kth=-k, axis=-1)[..., -k:]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if norm is not None and _attr(block, norm, False):
            scores = scores / mx.sum(scores, axis=-1, keepdims=True)
        return inds, scores

    return with_scores(route, softmax_scores)


def topk_softmax(top_k="num_experts_per_tok"):
    """Top-k of the logits, softmax over the k (mixtral). The dense scores are the softmax over
    all experts (the weights are those renormalised over the k)."""

    def route(block, logits):
        import mlx.core as mx

        k = _attr(block, top_k)
        inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        scores = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
        return inds, scores

    return with_scores(route, softmax_scores)
