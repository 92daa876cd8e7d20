"""What a model is made of (``mlxfun inspect``): MoE layers, experts, and where its parameters
and bytes are."""

from mlxfun.core.config import read_config
from mlxfun.core.sizes import parameter_breakdown


def describe_model(model_dir) -> dict:
    from mlxfun.core import plugins
    from mlxfun.core.models import load_mlx_model

    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    model, config = load_mlx_model(model_dir, lazy=True)
    layers = adapter.moe_layers(model)
    num_layers = config.get("num_hidden_layers") or config.get("text_config", {}).get(
        "num_hidden_layers"
    )
    if num_layers is None and isinstance(getattr(model, "layers", None), list):
        num_layers = len(model.layers)  # dbrx (n_layers), longcat_flash (num_layers), ...
    return {
        "model_type": config.get("model_type"),
        "adapter": adapter.name,
        "router_family": adapter.router_family,
        "num_layers": num_layers,
        "shared_experts": list(adapter.shared_attrs),
        "layers": [
            {
                "layer": layer.index,
                "path": layer.path,
                "experts": layer.num_experts,
                "top_k": layer.top_k,
            }
            for layer in layers
        ],
        "sizes": parameter_breakdown(model, adapter, layers),
    }
