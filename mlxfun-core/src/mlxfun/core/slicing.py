"""Remove experts from an mlx-lm checkpoint, shard by shard, without loading the model.

Parameter names in mlx-lm checkpoints are module paths (``model.layers.3.mlp.switch_mlp.
gate_proj.weight``), so which tensors carry an expert axis follows from the module tree: a
*skeleton* of the model is built from config.json (modules only; MLX never evaluates its lazily
initialised parameters) and the adapter's ``moe_layers`` names, for every MoE layer, the experts
module, the router and the correction bias. Every tensor under the experts module (weights,
quantization scales and biases, expert biases), every tensor of a router module (``Linear`` or
``QuantizedLinear``: weight, bias, scales, biases), a raw router array, the correction bias and
an adapter's ``per_expert_attrs`` have the expert axis first and lose the rows of the removed
experts; shared experts and everything else are copied unchanged.

The shards are rewritten at the byte level: a safetensors file is a JSON header followed by
the raw row-major bytes of each tensor, so the kept experts of a tensor are contiguous byte
ranges that are copied straight from the input file (``os.copy_file_range`` where the system
has it: the kernel copies, nothing passes through Python). Dtypes and quantization stay exactly
as they were, and the process holds one 1 MiB copy buffer at most, never a shard or the model.
Shards without experts are copied whole (``shutil.copyfile``: sendfile on Linux, fcopyfile on
macOS). Each shard's header is read once.
"""

import json
import os
import shutil
import struct
from pathlib import Path

import attrs

from .adapter import get_path, has_path
from .errors import MlxfunError

INDEX_FILE = "model.safetensors.index.json"
# The buffer of the copy without copy_file_range (macOS, some file systems): one that stays in
# the CPU cache is copied fastest (on Linux 8 and 64 MiB buffers cost 1.4-2.7x the CPU per byte).
_COPY_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# safetensors headers


def read_header(path) -> tuple[dict, int]:
    """``(header, data_start)``: the JSON header of a safetensors file (``__metadata__``
    included) and the file offset where the tensor data begins."""
    path = Path(path)
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise MlxfunError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise MlxfunError(f"{path} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MlxfunError(f"{path} has an unreadable safetensors header ({exc})") from None
    return header, 8 + size


def tensor_infos(header: dict) -> dict[str, dict]:
    return {k: v for k, v in header.items() if k != "__metadata__"}


def tensor_bytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def checkpoint_shards(model_dir) -> list[str]:
    """The weight files mlx-lm loads (``model*.safetensors``), by name."""
    model_dir = Path(model_dir)
    shards = sorted(p.name for p in model_dir.glob("model*.safetensors"))
    if not shards:
        raise MlxfunError(
            f"{model_dir} has no model*.safetensors weights; pass an mlx-lm model directory"
        )
    index = model_dir / INDEX_FILE
    if index.is_file():
        mapped = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(mapped - set(shards))
        if missing:
            raise MlxfunError(
                f"{index} names shards that are not there: {', '.join(missing)}; "
                "re-download the model"
            )
    return shards


def read_headers(model_dir) -> dict[str, dict]:
    """Every shard's tensor infos, by shard name."""
    return {
        shard: tensor_infos(read_header(Path(model_dir) / shard)[0])
        for shard in checkpoint_shards(model_dir)
    }


# ---------------------------------------------------------------------------------------------
# Which tensors have an expert axis


@attrs.define
class LayerPlan:
    """The tensors of one MoE layer that lose removed experts along axis 0."""

    position: int
    index: int
    path: str  # the block (the adapter's MoE layer path)
    module: str  # the decoder layer holding it: the unit a non-uniform model rebuilds
    num_experts: int
    top_k: int
    prefixes: list[str]  # modules whose every tensor has the expert axis first
    names: list[str]  # single tensors with the expert axis first
    shared: list[str]  # shared-expert modules (kept as they are)
    expert_parameters: int = 0  # parameters per expert (unquantized), for the index metadata

    def owns(self, name: str) -> bool:
        return name in self.names or any(name.startswith(p + ".") for p in self.prefixes)


def decoder_path(path: str) -> str:
    """The decoder layer that holds a block: the path up to its last numeric component."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return path


def _is_array(value) -> bool:
    import mlx.core as mx

    return isinstance(value, mx.array)


def layer_plans(model, adapter) -> list[LayerPlan]:
    """One ``LayerPlan`` per MoE layer of a (skeleton) model, in the adapter's order."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    paths = {id(module): path for path, module in model.named_modules()}
    plans = []
    for layer in adapter.moe_layers(model):
        experts_path = paths.get(id(layer.experts))
        if experts_path is None:
            raise MlxfunError(f"{adapter.name}: cannot locate the experts of layer {layer.index}")
        prefixes, names = [experts_path], []
        if not has_path(layer.block, adapter.router_attr):
            raise MlxfunError(
                f"{adapter.name}: layer {layer.index} has no router at "
                f"{layer.path}.{adapter.router_attr}; this adapter cannot be pruned"
            )
        router = get_path(layer.block, adapter.router_attr)
        if isinstance(router, nn.Module):
            prefixes.append(paths[id(router)])
        elif _is_array(router):
            names.append(f"{layer.path}.{adapter.router_attr}")
        else:
            raise MlxfunError(
                f"{adapter.name}: the router {layer.path}.{adapter.router_attr} is a "
                f"{type(router).__name__}, neither a module nor an array; cannot prune it"
            )
        extra = [adapter.correction_bias_attr, *getattr(adapter, "per_expert_attrs", ())]
        for attr in extra:
            if attr and has_path(layer.block, attr) and _is_array(get_path(layer.block, attr)):
                names.append(f"{layer.path}.{attr}")
        shared = [f"{layer.path}.{s}" for s in adapter.shared_attrs]
        parameters = 0
        for prefix in prefixes:
            module = get_path(model, prefix)
            parameters += sum(v.size for _, v in tree_flatten(module.parameters()))
        for name in names:
            parameters += get_path(model, name).size
        plans.append(
            LayerPlan(
                position=layer.position,
                index=layer.index,
                path=layer.path,
                module=getattr(layer, "decoder_path", "") or decoder_path(layer.path),
                num_experts=layer.num_experts,
                top_k=layer.top_k,
                prefixes=prefixes,
                names=names,
                shared=shared,
                expert_parameters=parameters // max(layer.num_experts, 1),
            )
        )
    return plans


def assign_tensors(plans: list[LayerPlan], headers: dict[str, dict]) -> dict[str, LayerPlan]:
    """Map every expert-axis tensor of the checkpoint to its layer, checking shapes; refuse
    checkpoints that do not look like the plan (not mlx-lm format, or a tensor under a block
    that looks per-expert but that no rule covers)."""
    owner: dict[str, LayerPlan] = {}
    for infos in headers.values():
        for name, info in infos.items():
            for plan in plans:
                if plan.owns(name):
                    shape = info["shape"]
                    if not shape or shape[0] != plan.num_experts:
                        raise MlxfunError(
                            f"{name} has shape {shape}, expected {plan.num_experts} experts "
                            "on its first axis; this checkpoint does not match its config"
                        )
                    owner[name] = plan
                    break
    for plan in plans:
        owned = [n for n, p in owner.items() if p is plan]
        if not any(n.startswith(plan.prefixes[0] + ".") for n in owned):
            raise MlxfunError(
                f"the checkpoint has no tensors under {plan.prefixes[0]} (the experts of layer "
                f"{plan.index}); is it in mlx-lm format? convert it with mlx_lm.convert"
            )
        if len(plan.prefixes) > 1 and not any(n.startswith(plan.prefixes[1] + ".") for n in owned):
            raise MlxfunError(
                f"the checkpoint has no router tensors under {plan.prefixes[1]} (layer "
                f"{plan.index}); is it in mlx-lm format? convert it with mlx_lm.convert"
            )
        for name in plan.names[:1]:
            if name not in owner:
                raise MlxfunError(
                    f"the checkpoint has no {name} (the router of layer {plan.index})"
                )
    stray = []
    for infos in headers.values():
        for name, info in infos.items():
            for plan in plans:
                if (
                    name.startswith(plan.path + ".")
                    and name not in owner
                    and not any(name.startswith(s + ".") for s in plan.shared)
                    and info["shape"]
                    and info["shape"][0] == plan.num_experts
                ):
                    stray.append(name)
    if stray:
        raise MlxfunError(
            f"{', '.join(sorted(stray)[:4])} look per-expert (first axis = the expert count) "
            "but the adapter does not say how to slice them; refusing to prune a model that "
            "would come out inconsistent"
        )
    return owner


# ---------------------------------------------------------------------------------------------
# Writing


def _runs(keep: list[int]) -> list[tuple[int, int]]:
    """Consecutive kept experts as half-open ranges: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[list[int]] = []
    for e in keep:
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return [(a, b) for a, b in runs]


def _write_all(dst, data) -> None:
    view = memoryview(data)
    while len(view):
        view = view[dst.write(view) :]


def _copy_range(src, dst, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst`` (unbuffered files)."""
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while length > 0:
                done = copy_file_range(src.fileno(), dst.fileno(), length, offset)
                if done <= 0:
                    break
                offset += done
                length -= done
        except OSError:
            pass  # another filesystem, an old kernel: copy through a buffer
    if length <= 0:
        return
    src.seek(offset)
    buffer = bytearray(min(_COPY_CHUNK, length))
    view = memoryview(buffer)
    while length > 0:
        got = src.readinto(view[: min(length, len(buffer))])
        if not got:
            raise MlxfunError(f"{src.name} ended early; the shard is truncated")
        _write_all(dst, view[:got])
        length -= got


def slice_shard(source, destination, keep_by_name: dict[str, list[int]], header=None) -> int:
    """Write ``source`` to ``destination`` with each named tensor cut to the experts in
    ``keep_by_name[name]`` (axis 0); ``header``: ``read_header(source)`` if the caller has read
    it already. Returns the bytes of tensor data written."""
    header, data_start = read_header(source) if header is None else header
    metadata = header.get("__metadata__")
    entries = sorted(tensor_infos(header).items(), key=lambda kv: kv[1]["data_offsets"][0])
    new_header: dict = {} if metadata is None else {"__metadata__": metadata}
    pieces: list[list[int]] = []  # [source offset, length], merged when contiguous
    offset = 0
    for name, info in entries:
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        ranges = [(begin, end - begin)]
        if name in keep_by_name:
            keep = keep_by_name[name]
            per_expert, rest = divmod(end - begin, shape[0])
            if rest:
                raise MlxfunError(f"{source}: {name} is not divisible along its expert axis")
            ranges = [(begin + a * per_expert, (b - a) * per_expert) for a, b in _runs(keep)]
            shape[0] = len(keep)
        length = sum(size for _, size in ranges)
        new_header[name] = {
            "dtype": info["dtype"],
            "shape": shape,
            "data_offsets": [offset, offset + length],
        }
        offset += length
        for start, size in ranges:
            start += data_start
            if pieces and pieces[-1][0] + pieces[-1][1] == start:
                pieces[-1][1] += size
            elif size:
                pieces.append([start, size])
    text = json.dumps(new_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(source, "rb", buffering=0) as src, open(destination, "wb", buffering=0) as dst:
        _write_all(dst, struct.pack("<Q", len(text)) + text)
        for start, size in pieces:
            _copy_range(src, dst, start, size)
    return offset


def slice_checkpoint(source_dir, output_dir, owner: dict[str, LayerPlan], keep) -> dict:
    """Write every shard of ``source_dir`` into ``output_dir``, with the tensors in ``owner``
    cut to ``keep[plan.position]``, and a consistent index. Returns byte counts."""
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    shards = checkpoint_shards(source_dir)
    before = after = 0
    for shard in shards:
        header = read_header(source_dir / shard)
        infos = tensor_infos(header[0])
        cut = {name: list(keep[owner[name].position]) for name in infos if name in owner}
        before += sum(tensor_bytes(i) for i in infos.values())
        if cut:
            after += slice_shard(source_dir / shard, output_dir / shard, cut, header=header)
        else:
            shutil.copyfile(source_dir / shard, output_dir / shard)
            after += sum(tensor_bytes(i) for i in infos.values())
    index = source_dir / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        metadata = data.setdefault("metadata", {})
        metadata["total_size"] = after
        if "total_parameters" in metadata:
            removed = 0
            for plan in {id(p): p for p in owner.values()}.values():
                removed += plan.expert_parameters * (plan.num_experts - len(keep[plan.position]))
            metadata["total_parameters"] = int(metadata["total_parameters"]) - removed
        (output_dir / INDEX_FILE).write_text(json.dumps(data, indent=4))
    return {"bytes_before": before, "bytes_after": after, "shards": len(shards)}


def size_after(headers: dict[str, dict], owner: dict[str, LayerPlan], keep) -> tuple[int, int]:
    """``(bytes before, bytes after)`` of the tensor data, without writing anything."""
    before = after = 0
    for infos in headers.values():
        for name, info in infos.items():
            size = tensor_bytes(info)
            before += size
            plan = owner.get(name)
            after += size if plan is None else size * len(keep[plan.position]) // plan.num_experts
    return before, after


# ---------------------------------------------------------------------------------------------
# The skeleton


def model_skeleton(model_dir, config: dict | None = None):
    """The model's module tree built from its config.json, parameters never evaluated
    (so nothing is loaded or allocated); mlxfun's non-uniform models are rebuilt from their
    recorded per-layer expert counts. Returns ``(model, config)``. Imports only mlx-lm's model
    modules, never its loaders (and transformers): see ``mlxlm_models``."""
    from . import mlxlm_models, nonuniform

    config = mlxlm_models.load_config(model_dir) if config is None else config
    if config.get("model_file") is not None:
        if not nonuniform.is_nonuniform(config):
            raise MlxfunError(
                f"{model_dir} builds its architecture from its own model_file "
                f"{config['model_file']!r}; mlxfun only knows the ones it wrote"
            )
        return nonuniform.build_model(config), config
    try:
        model_class, args_class = mlxlm_models.model_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception as exc:
        raise MlxfunError(
            f"mlx-lm cannot build {config.get('model_type')!r} from {model_dir}/config.json "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return model, config
