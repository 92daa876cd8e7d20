"""The ``token_share`` scorer: the fraction of a layer's tokens routed to each expert.

mlxfun imports this module to list the plugins, so numpy is imported inside the methods that
compute (importing it costs every ``mlxfun`` start 0.1-0.25 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TokenShare:
    """score[l, e] = tokens of layer l routed to expert e / tokens layer l saw.

    This is the expert's load: a layer's shares sum to its top-k, and an expert never routed to
    scores 0. Unlike the raw count it does not grow with the calibration set, so scores from
    collects of different sizes can be compared. The accumulators are float64 counts, so the
    default ``combine`` (a sum) merges two collects exactly.
    """

    name: str = "token_share"
    description: str = (
        "fraction of the layer's tokens routed to the expert (its load; sums to top-k)"
    )
    needs: frozenset = frozenset({"selected"})

    def init(self, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
        import numpy as np

        return {
            "routed": np.zeros((num_layers, num_experts)),
            "tokens": np.zeros((num_layers, 1)),
        }

    def update(self, acc: dict[str, np.ndarray], obs) -> None:
        import numpy as np

        np.add.at(acc["routed"][obs.layer], obs.selected.reshape(-1), 1.0)
        acc["tokens"][obs.layer] += obs.num_tokens

    def finalize(self, acc: dict[str, np.ndarray]) -> np.ndarray:
        import numpy as np

        routed, tokens = acc["routed"], acc["tokens"]
        return np.divide(routed, tokens, out=np.zeros_like(routed), where=tokens > 0)
