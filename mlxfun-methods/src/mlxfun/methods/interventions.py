"""The built-in interventions as the plugin registers them: a name, a description and
``apply``. ``mlxfun plugins`` lists them without importing their implementations (numpy, MLX):
``apply`` imports its module when it runs."""

import attrs


@attrs.define(frozen=True)
class AbliterateIntervention:
    """``apply(model, adapter, direction=d, scale=1.0, skip_experts=False)``: remove the unit
    direction ``d`` (hidden,) from every weight of ``model`` that writes the residual stream,
    in place (``mlxfun.methods.residual.orthogonalize``); returns its summary. The adapter is
    not needed (dense models have none): the writers are declared per architecture."""

    name: str = "abliterate"
    description: str = (
        "remove a refusal direction from every weight that writes the residual stream "
        "(embeddings, attention outputs, dense, routed and shared experts' down projections)"
    )

    def apply(self, model, adapter=None, **options):
        from mlxfun.core.errors import MlxfunError

        from .residual import orthogonalize

        if options.get("direction") is None:
            raise MlxfunError("abliterate needs a direction: apply(model, adapter, direction=d)")
        return orthogonalize(
            model,
            options["direction"],
            scale=float(options.get("scale", 1.0)),
            skip_experts=bool(options.get("skip_experts", False)),
        )

    def find_direction(self, model, tokenizer, request, progress=None) -> dict:
        """The candidate search of ``mlxfun abliterate`` (``abliterate.find_direction``)."""
        from .abliterate import find_direction

        return find_direction(model, tokenizer, request, progress)

    def ablation(self, model, direction, scale: float = 1.0, skip_experts: bool = False):
        """``with intervention.ablation(model, d): ...``: the run-time hooks."""
        from .residual import ablation

        return ablation(model, direction, scale, skip_experts)


INTERVENTIONS = (AbliterateIntervention(),)
