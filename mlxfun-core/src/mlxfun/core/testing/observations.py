"""Synthetic observations shaped like the observer's, for scorer tests."""

import numpy as np

from ..types import OBSERVABLES, LayerObservation

ALL_NEEDS = frozenset(OBSERVABLES)


def make_observation(
    layer: int = 0,
    num_experts: int = 8,
    num_tokens: int = 16,
    top_k: int = 2,
    needs=ALL_NEEDS,
    hidden: int = 8,
    seed: int = 0,
    never_routed: tuple[int, ...] = (),
) -> LayerObservation:
    """A synthetic ``LayerObservation`` shaped like the observer's.

    ``selected`` holds ``top_k`` distinct experts per token sorted by id, uint32 (as the observer reports
    them), ``weights`` are positive float32 gate weights summing to 1 per token, ``norms`` are
    the norms of ``outputs``. Only ``selected``, ``weights`` and the fields in ``needs`` are set,
    as in a real collect. Experts in ``never_routed`` are never selected.
    """
    rng = np.random.default_rng(seed)
    allowed = np.array([e for e in range(num_experts) if e not in set(never_routed)])
    if len(allowed) < top_k:
        raise ValueError("top_k is larger than the experts that may be routed to")
    selected = np.stack(
        [np.sort(rng.choice(allowed, top_k, replace=False)) for _ in range(num_tokens)]
    )
    selected = selected.reshape(num_tokens, top_k).astype(np.uint32)  # the observer's dtype
    raw = rng.random((num_tokens, top_k)) + 0.1
    weights = (raw / raw.sum(-1, keepdims=True)).astype(np.float32)
    outputs = rng.normal(size=(num_tokens, top_k, hidden)).astype(np.float32)
    obs = LayerObservation(layer=layer, num_experts=num_experts, selected=selected, weights=weights)
    if "norms" in needs:
        obs.norms = np.linalg.norm(outputs, axis=-1).astype(np.float32)
    if "outputs" in needs:
        obs.outputs = outputs
    if "logits" in needs:
        obs.logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    return obs
