"""Tiny mlx-lm models with seeded random weights, for adapter tests."""

import numpy as np


def build_tiny_model(model_type: str, args: dict, seed: int = 0, module: str | None = None):
    """A tiny mlx-lm model with seeded random weights, for adapter tests.

    ``module`` is the ``mlx_lm.models`` module to build (default: ``model_type``). Parameters that
    mlx-lm initialises to a constant (zero routers or correction biases) are re-drawn so the
    routing really depends on the input.
    """
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    from ..mlxlm_models import model_module

    models = model_module(module or model_type)
    mx.random.seed(seed)
    model = models.Model(models.ModelArgs.from_dict({"model_type": model_type, **args}))
    rng = np.random.default_rng(seed)

    def redraw(path, value):
        if not isinstance(value, mx.array) or not mx.issubdtype(value.dtype, mx.floating):
            return value
        flat = np.array(value)
        if flat.size and np.all(flat == flat.reshape(-1)[0]) and "norm" not in path:
            return mx.array(rng.normal(0.0, 0.3, value.shape).astype(np.float32))
        return value

    model.update(tree_map_with_path(redraw, model.parameters()))
    mx.eval(model.parameters())
    return model
