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
        from .steer import steering

        context = steering(model, _spec(self.name, options), adapter, options.get("config"))
        context.__enter__()
        return lambda: context.__exit__(None, None, None)


INTERVENTIONS = [SteerIntervention()]
