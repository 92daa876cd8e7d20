"""The built-in interventions as the plugin registers them: a name, a description and
``apply(model, adapter, **options)``, which imports its implementation when it runs (listing
plugins imports neither MLX nor numpy).

``apply`` changes the loaded model in place and returns a function that undoes the change, or
None when the change is permanent (``mlxfun.core.types.Intervention``).
"""

import attrs
from mlxfun.core.errors import MlxfunError


def _spec(name: str, options: dict):
    spec = options.get("spec")
    if spec is None:
        raise MlxfunError(f"{name}: pass spec= (a steering spec, its JSON as a dict, or its path)")
    return spec


@attrs.define(frozen=True)
class SteerIntervention:
    """Installs a steering spec's biases in the model's routing; the returned function removes
    them (``mlxfun.methods.steer.steering`` is the same as a context manager)."""

    name: str = "steer"
    description: str = (
        "run-time expert steering: mask, force or bias experts where each router forms its "
        "selection scores (hooks; undone by the returned function)"
    )

    def apply(self, model, adapter, **options):
        from .steer import install_steering

        return install_steering(model, _spec(self.name, options), adapter, options.get("config"))


@attrs.define(frozen=True)
class AmplifyIntervention:
    """Writes a steering spec's biases into the loaded model's router weights (correction
    biases, router biases); permanent, so ``apply`` returns None. ``mlxfun amplify`` writes the
    same edits into a checkpoint."""

    name: str = "amplify"
    description: str = (
        "gate amplification: a steering spec written into the router weights (correction or "
        "router bias), applied by stock mlx-lm with no hooks"
    )

    def apply(self, model, adapter, **options):
        from .amplify import amplify_in_memory

        amplify_in_memory(model, _spec(self.name, options), adapter, options.get("config"))
        return None


@attrs.define(frozen=True)
class AbliterateIntervention:
    """``apply(model, adapter, direction=d, scale=1.0, skip_experts=False)``: remove the unit
    direction ``d`` (hidden,) from every weight of ``model`` that writes the residual stream,
    in place (``mlxfun.methods.residual.orthogonalize``); permanent, so it returns None. The
    adapter is not needed (dense models have none): the writers are declared per architecture."""

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
        orthogonalize(
            model,
            options["direction"],
            scale=float(options.get("scale", 1.0)),
            skip_experts=bool(options.get("skip_experts", False)),
        )
        return None

    def find_direction(self, model, tokenizer, request, progress=None) -> dict:
        """The candidate search of ``mlxfun abliterate`` (``abliterate.find_direction``)."""
        from .abliterate import find_direction

        return find_direction(model, tokenizer, request, progress)

    def ablation(self, model, direction, scale: float = 1.0, skip_experts: bool = False):
        """``with intervention.ablation(model, d): ...``: the run-time hooks."""
        from .residual import ablation

        return ablation(model, direction, scale, skip_experts)


INTERVENTIONS = [SteerIntervention(), AmplifyIntervention(), AbliterateIntervention()]
