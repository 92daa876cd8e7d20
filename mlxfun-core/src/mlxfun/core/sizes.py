"""Where a model's parameters and bytes are: experts, routers, shared experts, attention,
embeddings, other (``mlxfun inspect`` and ``mlxfun analyze`` print it)."""


def _part(
    name: str, expert_paths: list[str], router_paths: list[str], shared_paths: list[str]
) -> str:
    if any(name.startswith(p + ".") for p in expert_paths):
        return "experts"
    if any(name.startswith(p + ".") or name == p for p in router_paths):
        return "routers"
    if any(name.startswith(p + ".") for p in shared_paths):
        return "shared experts"
    if "embed" in name or "lm_head" in name or name.startswith("wte") or ".wte." in name:
        return "embeddings"
    if "attn" in name or "attention" in name or ".mixer." in name:
        return "attention/mixer"
    return "other"


def parameter_breakdown(model, adapter, layers) -> list[dict]:
    """Parameters (logical, unquantized count) and stored bytes per part of the model."""
    from mlx.utils import tree_flatten

    expert_paths = [f"{layer.path}.{adapter.experts_attr}" for layer in layers]
    router_paths = [f"{layer.path}.{adapter.router_attr}" for layer in layers]
    shared_paths = [f"{layer.path}.{attr}" for layer in layers for attr in adapter.shared_attrs]
    quantized = _quantized_bits(model)
    totals: dict[str, list[int]] = {}
    for name, value in tree_flatten(model.parameters()):
        part = _part(name, expert_paths, router_paths, shared_paths)
        count = value.size
        if name.endswith(".weight") and name[: -len(".weight")] in quantized:
            count = value.size * 32 // quantized[name[: -len(".weight")]]
        elif name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] in quantized:
            count = 0
        entry = totals.setdefault(part, [0, 0])
        entry[0] += count
        entry[1] += value.nbytes
    all_bytes = sum(b for _, b in totals.values()) or 1
    order = ["experts", "routers", "shared experts", "attention/mixer", "embeddings", "other"]
    rows = [
        {
            "part": part,
            "parameters": totals[part][0],
            "bytes": totals[part][1],
            "share": round(totals[part][1] / all_bytes, 4),
        }
        for part in order
        if part in totals
    ]
    rows.append(
        {
            "part": "total",
            "parameters": sum(p for p, _ in totals.values()),
            "bytes": all_bytes,
            "share": 1.0,
        }
    )
    return rows


def _quantized_bits(model) -> dict[str, int]:
    return {
        name: module.bits
        for name, module in model.named_modules()
        if hasattr(module, "bits") and hasattr(module, "scales")
    }
