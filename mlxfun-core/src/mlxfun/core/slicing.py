"""Remove experts from an mlx-lm checkpoint, shard by shard, without loading the model.

Parameter names in mlx-lm checkpoints are module paths (``model.layers.3.mlp.switch_mlp.
gate_proj.weight``), so which tensors carry an expert axis follows from the module tree: a
*skeleton* of the model is built from config.json (modules only; MLX never evaluates its lazily
initialised parameters) and the adapter's ``moe_layers`` names, for every MoE layer, the experts
module, the router and the correction bias. Every tensor under the experts module (weights,
quantization scales and biases, expert biases), every tensor of a router module (``Linear`` or
``QuantizedLinear``: weight, bias, scales, biases), a raw router array, the correction bias and
an adapter's ``per_expert_attrs`` have the expert axis first and lose the rows of the removed
experts; shared experts and everything else are copied unchanged. Two layouts differ:

- experts kept as a list of separate modules (dbrx: ``<experts>.<e>.w1.weight``, one tensor
  per expert and projection) lose the removed experts' tensors; the kept ones are renumbered
  0, 1, ... in order (names change, bytes do not), and the index's weight map with them;
- a layer with zero experts (``MoELayer.zero_experts``: parameter-free experts after the
  stored ones, longcat_flash) has router rows for every expert but expert tensors for the
  stored ones only; the zero experts are never removed.

The shards are rewritten at the byte level: a safetensors file is a JSON header followed by
the raw row-major bytes of each tensor, so the kept experts of a tensor are contiguous byte
ranges that are copied straight from the input file (``os.copy_file_range`` where the system
has it: the kernel copies, nothing passes through Python). Dtypes and quantization stay exactly
as they were, and the process holds one 1 MiB copy buffer at most, never a shard or the model.
Shards without experts are copied whole (``shutil.copyfile``: sendfile on Linux, fcopyfile on
macOS). Each shard's header is read once.
"""

import json
import math
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


# An interrupted download or conversion leaves a short or garbled shard; mlx then fails deep
# inside its loader with a message that names no file.
CORRUPT_FIX = "re-download the model or convert it again with mlx_lm.convert"
_MAX_HEADER = 100 << 20  # the safetensors format's own limit


def _corrupt(path, problem: str) -> MlxfunError:
    return MlxfunError(f"{path} {problem}; {CORRUPT_FIX}")


def read_header(path) -> tuple[dict, int]:
    """``(header, data_start)``: the JSON header of a safetensors file (``__metadata__``
    included) and the file offset where the tensor data begins. A file too short for its
    header or for the tensors the header lists, or with a malformed header, is refused."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if len(raw) != 8:
                raise _corrupt(path, f"is {file_size} bytes long, too short for safetensors")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise _corrupt(path, f"is not a safetensors file (header of {size} bytes)")
            if 8 + size > file_size:
                raise _corrupt(
                    path,
                    f"is truncated: its header needs {8 + size} bytes, the file has {file_size}",
                )
            text = handle.read(size)
    except OSError as exc:
        raise MlxfunError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"has an unreadable safetensors header ({exc})") from None
    _check_layout(path, header, file_size - 8 - size)
    return header, 8 + size


# Bytes per element of the safetensors dtypes mlx reads; others (sub-byte formats) are left
# to mlx to judge.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def _check_layout(path, header, data_size: int) -> None:
    """Every tensor entry is well formed, holds as many bytes as its shape and dtype say, and
    lies inside the file."""
    if not isinstance(header, dict):
        raise _corrupt(path, "has an unreadable safetensors header (not a JSON object)")
    end = 0
    for name, info in tensor_infos(header).items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(x) is int for x in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and isinstance(shape, list)
            and all(type(x) is int and x >= 0 for x in shape)
            and isinstance(info.get("dtype"), str)
        ):
            raise _corrupt(path, f"has an unreadable safetensors header (tensor {name!r})")
        itemsize = DTYPE_BYTES.get(info["dtype"])
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise _corrupt(
                path,
                f"has a corrupt safetensors header: tensor {name!r} of shape {shape} "
                f"{info['dtype']} spans {offsets[1] - offsets[0]} bytes",
            )
        end = max(end, offsets[1])
    if end > data_size:
        raise _corrupt(
            path,
            f"is truncated: its tensors need {end} bytes of data, the file has {data_size}",
        )


def check_weights(model_dir) -> None:
    """Refuse a truncated or corrupt ``model*.safetensors`` (what mlx-lm loads) before mlx
    reads it: each header must parse and place its tensors inside the file."""
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        read_header(path)


def load_shard(path) -> dict:
    """``mx.load`` of one safetensors file (lazy); mlx's error for a file it cannot read,
    which names no file, becomes a one-line error that does."""
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _corrupt(path, f"cannot be read by mlx ({reason})") from None


def check_weights_mlx(model_dir) -> None:
    """Open every ``model*.safetensors`` with mlx (lazily: it reads only the header) and
    raise the one-line error of the first it refuses: behind ``check_weights``, for damage
    only mlx sees (an unsupported dtype, say)."""
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        load_shard(path)


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
        try:
            mapped = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise _corrupt(index, f"is not a readable weight index ({exc})") from None
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
    zero_experts: int = 0  # parameter-free experts after the stored ones: router rows only
    numbered: bool = False  # separate expert modules: expert e's tensors are <prefixes[0]>.<e>.*

    def owns(self, name: str) -> bool:
        return name in self.names or any(name.startswith(p + ".") for p in self.prefixes)

    def in_experts(self, name: str) -> bool:
        return name.startswith(self.prefixes[0] + ".")

    def axis_size(self, name: str) -> int:
        """The length of an owned stacked tensor's expert axis."""
        return self.num_experts - self.zero_experts if self.in_experts(name) else self.num_experts

    def rows(self, name: str, keep) -> list[int]:
        """The rows of an owned stacked tensor that stay: the kept experts it has."""
        return [e for e in keep if e < self.axis_size(name)]

    def expert_of(self, name: str) -> int | None:
        """The expert of a tensor of a numbered experts list, else ``None``."""
        if not (self.numbered and self.in_experts(name)):
            return None
        head = name[len(self.prefixes[0]) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def renamed(self, name: str, keep) -> str | None:
        """A numbered expert tensor's name after pruning (``None``: removed)."""
        expert = self.expert_of(name)
        if expert not in keep:
            return None
        rest = name[len(self.prefixes[0]) + 1 :].split(".", 1)[1]
        return f"{self.prefixes[0]}.{list(keep).index(expert)}.{rest}"


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


def _parameter_count(value) -> int:
    """Parameters of a module, an array or a list of modules."""
    from mlx.utils import tree_flatten

    if _is_array(value):
        return value.size
    if isinstance(value, list):
        return sum(_parameter_count(v) for v in value)
    return sum(v.size for _, v in tree_flatten(value.parameters()))


def layer_plans(model, adapter) -> list[LayerPlan]:
    """One ``LayerPlan`` per MoE layer of a (skeleton) model, in the adapter's order."""
    import mlx.nn as nn

    paths = {id(module): path for path, module in model.named_modules()}
    plans = []
    for layer in adapter.moe_layers(model):
        numbered = isinstance(layer.experts, list)
        if numbered:  # separate expert modules: the list's path, from its first expert's
            first = paths.get(id(layer.experts[0])) if layer.experts else None
            experts_path = first.rpartition(".")[0] if first else None
        else:
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
        zero = getattr(layer, "zero_experts", 0)
        stored = max(layer.num_experts - zero, 1)
        experts = _parameter_count(get_path(model, prefixes[0]))
        routers = sum(_parameter_count(get_path(model, p)) for p in [*prefixes[1:], *names])
        if zero:  # the router has rows for the zero experts, the experts module does not
            per_expert = experts // stored + routers // layer.num_experts
        else:
            per_expert = (experts + routers) // max(layer.num_experts, 1)
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
                expert_parameters=per_expert,
                zero_experts=zero,
                numbered=numbered,
            )
        )
    return plans


def _check_owned(plan: LayerPlan, name: str, shape) -> None:
    if plan.numbered and plan.in_experts(name):
        expert = plan.expert_of(name)
        if expert is None or expert >= plan.num_experts:
            raise MlxfunError(
                f"{name} is not a tensor of experts 0..{plan.num_experts - 1} under "
                f"{plan.prefixes[0]}; this checkpoint does not match its config"
            )
        return
    expected = plan.axis_size(name)
    if not shape or shape[0] != expected:
        raise MlxfunError(
            f"{name} has shape {shape}, expected {expected} experts on its first axis; this "
            "checkpoint does not match its config"
        )


def assign_tensors(plans: list[LayerPlan], headers: dict[str, dict]) -> dict[str, LayerPlan]:
    """Map every expert-axis tensor of the checkpoint to its layer, checking shapes; refuse
    checkpoints that do not look like the plan (not mlx-lm format, or a tensor under a block
    that looks per-expert but that no rule covers)."""
    owner: dict[str, LayerPlan] = {}
    for infos in headers.values():
        for name, info in infos.items():
            for plan in plans:
                if plan.owns(name):
                    _check_owned(plan, name, info["shape"])
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
            raise _corrupt(src.name, "ended early while it was copied")
        _write_all(dst, view[:got])
        length -= got


def slice_shard(
    source,
    destination,
    keep_by_name: dict[str, list[int]],
    renames: dict | None = None,
    header=None,
) -> int:
    """Write ``source`` to ``destination`` with each named tensor cut to the experts in
    ``keep_by_name[name]`` (axis 0) and the tensors in ``renames`` renamed (to ``None``:
    left out); ``header``: ``read_header(source)`` if the caller has read it already. Returns
    the bytes of tensor data written."""
    renames = renames or {}
    header, data_start = read_header(source) if header is None else header
    metadata = header.get("__metadata__")
    entries = sorted(tensor_infos(header).items(), key=lambda kv: kv[1]["data_offsets"][0])
    new_header: dict = {} if metadata is None else {"__metadata__": metadata}
    pieces: list[list[int]] = []  # [source offset, length], merged when contiguous
    offset = 0
    for name, info in entries:
        new_name = renames.get(name, name)
        if new_name is None:
            continue
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
        new_header[new_name] = {
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
    renames: dict[str, str | None] = {}
    for shard in shards:
        header = read_header(source_dir / shard)
        infos = tensor_infos(header[0])
        cut, moved = {}, {}
        for name in infos:
            plan = owner.get(name)
            if plan is None:
                continue
            kept = keep[plan.position]
            if plan.expert_of(name) is not None:
                moved[name] = plan.renamed(name, kept)
            else:
                cut[name] = plan.rows(name, kept)
        renames.update(moved)
        before += sum(tensor_bytes(i) for i in infos.values())
        if cut or moved:
            after += slice_shard(source_dir / shard, output_dir / shard, cut, moved, header=header)
        else:
            shutil.copyfile(source_dir / shard, output_dir / shard)
            after += sum(tensor_bytes(i) for i in infos.values())
    index = source_dir / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text())
        if renames and isinstance(data.get("weight_map"), dict):
            data["weight_map"] = {
                renames.get(name, name): shard
                for name, shard in data["weight_map"].items()
                if renames.get(name, name) is not None
            }
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
            if plan is None:
                after += size
            elif plan.expert_of(name) is not None:
                after += size if plan.expert_of(name) in keep[plan.position] else 0
            else:
                after += size * len(plan.rows(name, keep[plan.position])) // plan.axis_size(name)
    return before, after


# ---------------------------------------------------------------------------------------------
# The skeleton


def model_skeleton(model_dir, config: dict | None = None):
    """The model's module tree built from its config.json, parameters never evaluated
    (so nothing is loaded or allocated), by the classes mlxfun loads it with
    (``model_files.model_classes``: a plugin's architecture, mlxfun's non-uniform models rebuilt
    from their recorded per-layer expert counts). Returns ``(model, config)``. Imports only
    model modules, never mlx-lm's loaders (and transformers): see ``mlxlm_models``."""
    from . import mlxlm_models, model_files

    config = mlxlm_models.load_config(model_dir) if config is None else config
    model_class, args_class = model_files.model_classes(model_dir, config)
    try:
        model = model_class(args_class.from_dict(config))
    except Exception as exc:
        raise MlxfunError(
            f"cannot build {config.get('model_type')!r} from {model_dir}/config.json "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return model, config
