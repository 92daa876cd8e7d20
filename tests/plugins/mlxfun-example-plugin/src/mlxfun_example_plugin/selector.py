"""The ``example_bottom`` selector: each layer's lowest-scoring experts, written from the
documented types of ``select`` (docs/plugins.md, "Types")."""

from dataclasses import dataclass

from mlxfun.core.errors import MlxfunError
from mlxfun.core.types import Selection


@dataclass(frozen=True)
class ExampleBottom:
    """Per layer: the targeted experts, then the lowest-scoring unprotected ones (ties by id),
    until ``n`` (or ``ratio`` of the layer's experts) are gone, the same number from each router
    group.

    The keyword arguments are ``mlxfun.core.types.SelectOptions``, as ``mlxfun prune`` passes
    them: ``num_experts`` and ``min_keep`` hold one int per MoE layer position, ``protect`` and
    ``target`` map layer positions to expert ids, and only one of ``n`` and ``ratio`` is given.
    A request it cannot meet raises ``MlxfunError``, which mlxfun prints as one ``error:`` line.
    """

    name: str = "example_bottom"
    description: str = "each layer's n lowest-scoring experts (example plugin)"

    def select(
        self,
        scores,
        *,
        num_experts: list[int],
        min_keep: list[int],
        protect: dict[int, list[int]],
        target: dict[int, list[int]],
        layer_indices: list[int],
        groups: int = 1,
        normalize: str = "none",
        n: int | None = None,
        ratio: float | None = None,
        **options,  # top_k (min_keep is never below it), and what later versions add
    ) -> Selection:
        if normalize != "none":
            raise MlxfunError("example_bottom compares experts within a layer: drop --normalize")
        keep, removed = {}, {}
        for layer, count in enumerate(num_experts):
            wanted = n if n is not None else int(ratio * count) // groups * groups
            where = f"layer {layer_indices[layer]}"
            if wanted % groups or count - wanted < min_keep[layer]:
                raise MlxfunError(
                    f"example_bottom cannot remove {wanted} of the {count} experts of {where} "
                    f"(it keeps at least {min_keep[layer]}, the same number from each of its "
                    f"{groups} router groups); choose a smaller --n"
                )
            size, per_group, gone = count // groups, wanted // groups, []
            for group in range(groups):
                members = range(group * size, (group + 1) * size)
                doomed = [e for e in members if e in target.get(layer, [])]
                free = sorted(
                    (e for e in members if e not in doomed and e not in protect.get(layer, [])),
                    key=lambda e: (scores[layer, e], e),
                )
                if len(doomed) > per_group or len(doomed) + len(free) < per_group:
                    raise MlxfunError(
                        f"example_bottom: {where} cannot lose exactly {per_group} experts from "
                        f"router group {group} with these --protect / --target experts"
                    )
                gone += doomed + free[: per_group - len(doomed)]
            removed[layer] = sorted(gone)
            keep[layer] = [e for e in range(count) if e not in gone]
        return Selection(keep, removed, list(num_experts))
