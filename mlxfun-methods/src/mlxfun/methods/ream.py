"""The ``ream`` compressor: merge experts into the experts a selector keeps (REAM, arXiv
2604.04356), writing an ordinary mlx-lm model directory (definitions in docs/algorithms.md).

The keep map, config and checkpoint layout are exactly prune's (``prune.plan_prune`` and
``prune.write_pruned``): the pruned checkpoint is written first, then, layer by layer, the
rows of the centroid experts whose group has members are overwritten in place with the merged
weights (same dtype, same shape, same byte range). A group that holds only its centroid is
never touched, so it is the prune result byte for byte.

Per MoE layer, in order, on one token sample (``max_tokens``):
1. the layer's input is captured with the merged model so far (earlier layers merged): the
   calibration batches step through the decoder layers once (``mlxfun.core.runner``), each
   layer running after the merges before it, so the whole merge costs one pass through the
   layers (architectures the runner cannot step through run the model up to each block);
2. every expert of the source layer is evaluated on every sampled token, from its dequantized
   float32 weights and the experts module's own activation;
3. similarity = mean of output similarity (cosine of mean_x p_j(x) f_j(x), mapped to [0, 1],
   p_j the adapter's ``router_scores``: the architecture's own probability of expert j before
   the top-k, softmax or sigmoid) and router similarity (1 - half the distance of the
   L2-normalised logit columns);
4. centroids in descending saliency take their most similar unassigned experts up to the
   group size (0: every non-centroid joins its most similar centroid);
5. each member's intermediate neurons are matched to its centroid's (Hungarian algorithm on
   activation-profile plus weight-feature distances, same tokens for every expert) and the
   aligned weights are averaged with saliency weights; quantized experts are requantized.
"""

import json
import os
import time
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

from .prune import PROVENANCE_FILE, PruneRequest, finish_summary, plan_prune, write_pruned

SCIPY_MISSING = "REAM merging needs SciPy: pip install 'mlxfun-methods[merge]'"

# The axis of each expert tensor (one expert, no expert axis) that runs over the intermediate
# neurons; tensors not listed (the output bias) have none.
NEURON_AXIS = {
    "gate_proj.weight": 0,
    "gate_proj.bias": 0,
    "up_proj.weight": 0,
    "up_proj.bias": 0,
    "down_proj.weight": 1,
    "fc1.weight": 0,
    "fc1.bias": 0,
    "fc2.weight": 1,
}
SUPPORTED = (
    "mlx-lm SwitchGLU (down(act(up x, gate x))) and SwitchMLP (fc2(act(fc1 x))) experts with an "
    "elementwise activation, called on the block's input"
)
SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I32": "int32",
}


@attrs.define(kw_only=True)
class MergeRequest(PruneRequest):
    """What ``mlxfun merge`` asks for: prune's options (which experts are the centroids) plus
    the calibration text and the merge settings."""

    dataset: list = attrs.field(factory=list, converter=lambda v: [Path(p) for p in v])
    group_size: int = 16
    max_tokens: int = 2048
    max_samples: int | None = None
    align_tokens: int = 1024
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    # Explicit groups (``mlxfun apply``): {decoder layer index: {centroid: [members]}}, every
    # kept expert a centroid; removed experts in no group are dropped. None: REAM's grouping.
    groups: dict | None = None
    plan: dict | None = None  # recorded in mlxfun.json as "plan" (``mlxfun apply``)

    def prune_request(self) -> PruneRequest:
        return PruneRequest(**{f.name: getattr(self, f.name) for f in attrs.fields(PruneRequest)})


# ---------------------------------------------------------------------------------------------
# Similarity and grouping (numpy)


def output_similarity(gated_means: np.ndarray) -> np.ndarray:
    """Cosine similarity of the experts' mean gated outputs (E, hidden), mapped to [0, 1]."""
    norms = np.linalg.norm(gated_means, axis=1, keepdims=True)
    unit = gated_means / np.where(norms > 0, norms, 1.0)
    return (np.clip(unit @ unit.T, -1.0, 1.0) + 1.0) / 2.0


def router_similarity(logits: np.ndarray) -> np.ndarray:
    """1 - half the Euclidean distance between the L2-normalised logit columns (tokens, E)."""
    columns = logits.T.astype(np.float64)
    norms = np.linalg.norm(columns, axis=1, keepdims=True)
    unit = columns / np.where(norms > 0, norms, 1.0)
    squared = np.sum(unit * unit, 1)[:, None] + np.sum(unit * unit, 1)[None] - 2 * unit @ unit.T
    return 1.0 - np.sqrt(np.maximum(squared, 0.0)) / 2.0


def expert_similarity(gated_means: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return (output_similarity(gated_means) + router_similarity(logits)) / 2.0


def saliency_order(experts, saliency: np.ndarray) -> list[int]:
    """Descending saliency, ties by expert id."""
    return sorted(experts, key=lambda e: (-float(saliency[e]), e))


def group_experts(
    similarity: np.ndarray, saliency: np.ndarray, centroids, group_size: int
) -> dict[int, list[int]]:
    """``{centroid: sorted members}``. Centroids in descending saliency each take the most
    similar still unassigned non-centroids (ties by id) until their group holds
    ``group_size`` experts; whatever is left is dropped. ``group_size`` 0: every non-centroid
    joins its most similar centroid (ties: the more salient centroid)."""
    num_experts = similarity.shape[0]
    order = saliency_order(centroids, saliency)
    groups: dict[int, list[int]] = {c: [] for c in order}
    free = [e for e in range(num_experts) if e not in groups]
    if group_size == 0:
        for e in free:
            best = max(order, key=lambda c: (similarity[c, e], -order.index(c)))
            groups[best].append(e)
    else:
        unassigned = set(free)
        for c in order:
            ranked = sorted(unassigned, key=lambda e: (-similarity[c, e], e))
            chosen = ranked[: max(group_size - 1, 0)]
            groups[c].extend(chosen)
            unassigned.difference_update(chosen)
    return {c: sorted(groups[c]) for c in sorted(groups)}


# ---------------------------------------------------------------------------------------------
# Neuron alignment and merging (numpy; one expert = {tensor name: array without expert axis})


def _pairwise_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def neuron_features(expert: dict) -> np.ndarray:
    """Per intermediate neuron: its rows/columns of every projection (and its input-side bias
    entries), concatenated and L2-normalised; shape (neurons, features)."""
    parts = []
    for name in sorted(expert):
        axis = NEURON_AXIS.get(name)
        if axis is None:
            continue
        value = np.asarray(expert[name], dtype=np.float64)
        value = np.moveaxis(value, axis, 0)
        parts.append(value.reshape(value.shape[0], -1))
    features = np.concatenate(parts, axis=1)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def alignment_cost(profile_a, profile_b, features_a, features_b) -> np.ndarray:
    """Cost of matching neuron i of a with neuron j of b: distance of their activation profiles
    (neurons, tokens) plus distance of their weight features, each divided by its mean."""
    cost = np.zeros((profile_a.shape[0], profile_b.shape[0]))
    for a, b in ((profile_a, profile_b), (features_a, features_b)):
        distance = _pairwise_distance(np.asarray(a, np.float64), np.asarray(b, np.float64))
        mean = distance.mean()
        cost += distance / mean if mean > 0 else distance
    return cost


def align(cost: np.ndarray) -> np.ndarray:
    """``perm`` with member neuron ``perm[i]`` matched to centroid neuron ``i``."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise MlxfunError(SCIPY_MISSING) from None
    rows, columns = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = columns
    return perm


def permute_expert(expert: dict, perm: np.ndarray) -> dict:
    """The same function with its intermediate neurons reordered: neuron i becomes perm[i]."""
    result = {}
    for name, value in expert.items():
        axis = NEURON_AXIS.get(name)
        result[name] = value if axis is None else np.take(value, perm, axis=axis)
    return result


def merge_weights(experts: list[dict], saliency) -> dict:
    """Saliency-weighted average (float64) of aligned experts; negative saliencies count as 0,
    all-zero saliencies as equal weights."""
    weights = np.maximum(np.asarray(saliency, dtype=np.float64), 0.0)
    weights = (
        weights / weights.sum() if weights.sum() > 0 else np.full(len(experts), 1 / len(experts))
    )
    merged = {}
    for name in experts[0]:
        total = np.zeros(np.shape(experts[0][name]), dtype=np.float64)
        for weight, expert in zip(weights, experts):
            total += weight * np.asarray(expert[name], dtype=np.float64)
        merged[name] = total
    return merged


def merge_group(centroid: dict, members: list[dict], saliency, profiles) -> tuple[dict, list]:
    """Align every member to the centroid and average. ``saliency`` lists the centroid's first;
    ``profiles`` are the activation profiles (neurons, tokens), centroid first. Returns the
    merged expert and each member's permutation."""
    features = neuron_features(centroid)
    aligned, perms = [centroid], []
    for member, profile in zip(members, profiles[1:]):
        cost = alignment_cost(profiles[0], profile, features, neuron_features(member))
        perm = align(cost)
        perms.append(perm)
        aligned.append(permute_expert(member, perm))
    return merge_weights(aligned, saliency), perms


# ---------------------------------------------------------------------------------------------
# Expert evaluation (MLX, float32)


def expert_kind(experts) -> str:
    from mlxfun.core.adapter import expert_projections

    names = set(expert_projections(experts))
    if {"gate_proj", "up_proj", "down_proj"} <= names and callable(
        getattr(experts, "activation", None)
    ):
        return "glu"
    if {"fc1", "fc2"} <= names and callable(getattr(experts, "activation", None)):
        return "mlp"
    raise MlxfunError(f"cannot merge {type(experts).__name__} experts; ream supports {SUPPORTED}")


def hidden_activations(kind: str, activation, expert: dict, x):
    """Intermediate activations (tokens, neurons) of one expert (mx float32 arrays)."""

    def linear(name):
        out = x @ expert[f"{name}.weight"].T
        bias = expert.get(f"{name}.bias")
        return out if bias is None else out + bias

    if kind == "glu":
        return activation(linear("up_proj"), linear("gate_proj"))
    return activation(linear("fc1"))


def expert_output(kind: str, activation, expert: dict, x):
    down = "down_proj" if kind == "glu" else "fc2"
    out = hidden_activations(kind, activation, expert, x) @ expert[f"{down}.weight"].T
    bias = expert.get(f"{down}.bias")
    return out if bias is None else out + bias


def _check_elementwise(kind: str, activation, neurons: int) -> None:
    import mlx.core as mx

    rng = np.random.default_rng(0)
    a, b = (mx.array(rng.normal(0, 2, (4, neurons)).astype(np.float32)) for _ in range(2))
    perm = mx.array(rng.permutation(neurons))
    if kind == "glu":
        plain, permuted = activation(a, b)[:, perm], activation(a[:, perm], b[:, perm])
    else:
        plain, permuted = activation(a)[:, perm], activation(a[:, perm])
    if not np.allclose(np.array(plain), np.array(permuted), atol=1e-6):
        raise MlxfunError(
            f"the experts' activation {type(activation).__name__} is not elementwise; "
            f"ream supports {SUPPORTED}"
        )


# ---------------------------------------------------------------------------------------------
# Checkpoint access


def _source_tensors(source: Path, headers: dict, names) -> dict:
    """Named tensors of the source checkpoint (mx arrays; ``mx.load`` reads lazily)."""
    from mlxfun.core.slicing import load_shard

    where = {name: shard for shard, infos in headers.items() for name in infos}
    loaded: dict = {}
    result = {}
    for name in names:
        shard = where[name]
        if shard not in loaded:
            loaded[shard] = load_shard(source / shard)
        result[name] = loaded[shard][name]
    return result


def _dequantized_experts(tensors: dict, prefix: str, experts) -> dict:
    """``{"gate_proj.weight": (E, out, in) float32, "gate_proj.bias": ..., ...}``."""
    import mlx.core as mx
    from mlxfun.core.adapter import expert_projections

    result = {}
    for proj in expert_projections(experts):
        module = getattr(experts, proj)
        weight = tensors[f"{prefix}.{proj}.weight"]
        if f"{prefix}.{proj}.scales" in tensors:
            weight = mx.dequantize(
                weight,
                tensors[f"{prefix}.{proj}.scales"],
                tensors.get(f"{prefix}.{proj}.biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=getattr(module, "mode", "affine"),
            )
        result[f"{proj}.weight"] = weight.astype(mx.float32)
        if f"{prefix}.{proj}.bias" in tensors:
            result[f"{proj}.bias"] = tensors[f"{prefix}.{proj}.bias"].astype(mx.float32)
    mx.eval(result)
    return result


def _quantization(experts) -> dict | None:
    from mlxfun.core.adapter import expert_projections

    for proj in expert_projections(experts):
        module = getattr(experts, proj)
        if "scales" in module:
            return {
                "bits": module.bits,
                "group_size": module.group_size,
                "mode": getattr(module, "mode", "affine"),
            }
    return None


def _stored_tensors(experts, merged: dict, dtypes: dict) -> dict:
    """Merged float experts (name -> (n, ...) float64 numpy) as the tensors the checkpoint
    stores (requantized where the projection is quantized), in the stored dtypes."""
    import mlx.core as mx

    result = {}
    for name, value in merged.items():
        proj, _, param = name.rpartition(".")
        module = getattr(experts, proj)
        value = mx.array(value.astype(np.float32))
        if param == "weight" and "scales" in module:
            parts = mx.quantize(
                value,
                group_size=module.group_size,
                bits=module.bits,
                mode=getattr(module, "mode", "affine"),
            )
            for key, part in zip(("weight", "scales", "biases"), parts):
                result[f"{proj}.{key}"] = part.astype(dtypes[f"{proj}.{key}"])
        else:
            result[name] = value.astype(dtypes[name])
    mx.eval(result)
    return result


def _as_bytes(value) -> bytes:
    import mlx.core as mx

    if value.dtype == mx.bfloat16:
        value = value.view(mx.uint16)
    return np.array(value).tobytes()


def _patch_rows(directory: Path, headers: dict, rows: dict) -> None:
    """Overwrite expert rows in place: ``rows[(name, position)] = bytes``."""
    from mlxfun.core import slicing

    where = {name: shard for shard, infos in headers.items() for name in infos}
    by_shard: dict = {}
    for (name, position), data in rows.items():
        by_shard.setdefault(where[name], []).append((name, position, data))
    for shard, items in sorted(by_shard.items()):
        header, start = slicing.read_header(directory / shard)
        fd = os.open(directory / shard, os.O_WRONLY)
        try:
            for name, position, data in sorted(items, key=lambda i: (i[0], i[1])):
                begin, end = header[name]["data_offsets"]
                per_expert = (end - begin) // header[name]["shape"][0]
                if len(data) != per_expert:
                    raise MlxfunError(f"merged {name} has {len(data)} bytes, expected {per_expert}")
                os.pwrite(fd, data, start + begin + position * per_expert)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# The model side: token sample, layer inputs, router logits


class _Stop(Exception):
    pass


def token_sample(sequences, max_tokens: int) -> list[list[int]]:
    """The sequences in order, the last one cut, so that they hold at most ``max_tokens``."""
    result, total = [], 0
    for seq in sequences:
        if total >= max_tokens:
            break
        piece = list(seq[: max_tokens - total])
        result.append(piece)
        total += len(piece)
    return result


def layer_inputs(model, block, sequences, batch_size: int):
    """The block's input on every real token of ``sequences`` (tokens, hidden) float32; the
    forward stops at the block (for architectures the layer runner cannot step through)."""
    import mlx.core as mx
    from mlxfun.core.datasets import batches
    from mlxfun.core.hooks import call_hooks

    pieces = []
    for tokens, mask in batches(sequences, batch_size):
        seen = {}

        def stop(module, call, x, *args, _seen=seen, **kwargs):
            _seen["x"] = x
            raise _Stop

        with call_hooks([(block, stop)]):
            try:
                model(mx.array(tokens))
            except _Stop:
                pass
        if "x" not in seen:
            raise MlxfunError("the MoE block was not called in the forward")
        x = seen["x"].astype(mx.float32)
        x = x.reshape(-1, x.shape[-1])[mx.array(np.flatnonzero(mask.reshape(-1)))]
        mx.eval(x)
        pieces.append(x)
    return mx.concatenate(pieces, axis=0)


class BlockInputs:
    """The input of each MoE block on every real token of ``sequences`` (tokens, hidden)
    float32, the layers before it as they are now (merged). Call it for the MoE layers in
    order: the runner steps the batches through the decoder layers between two calls, once."""

    def __init__(self, model, adapter, sequences, batch_size: int):
        import mlx.core as mx
        from mlxfun.core.datasets import batches
        from mlxfun.core.runner import LayerRunner

        self.model, self.sequences, self.batch_size = model, sequences, batch_size
        self.masks = [mask for _, mask in batches(sequences, batch_size)]
        tokens = [mx.array(t) for t, _ in batches(sequences, batch_size)]
        try:
            self.runner = LayerRunner(model, adapter, tokens)
        except MlxfunError:  # not steppable: the model up to each block (quadratic in depth)
            self.runner = None
        self.next = 0

    def __call__(self, layer):
        import mlx.core as mx

        if self.runner is None:
            return layer_inputs(self.model, layer.block, self.sequences, self.batch_size)
        while self.next < layer.index:
            self.runner.run(self.next)
            self.next += 1
        pieces = []
        for x, mask in zip(self.runner.module_inputs(layer.index, layer.block), self.masks):
            x = x.astype(mx.float32)
            x = x.reshape(-1, x.shape[-1])[mx.array(np.flatnonzero(mask.reshape(-1)))]
            mx.eval(x)
            pieces.append(x)
        return mx.concatenate(pieces, axis=0)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


def full_router_scores(model, adapter, layer, plan, tensors: dict, x):
    """``(logits, probs)`` of every source expert, each (tokens, E) float32: the router logits
    and the adapter's ``router_scores`` of them (each expert's probability before the top-k, as
    the architecture scores it). The block's router tensors are swapped for the source's full
    ones while the adapter computes them, then restored."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    experts_prefix = plan.prefixes[0] + "."
    router = {n: v for n, v in tensors.items() if not n.startswith(experts_prefix)}
    current = dict(tree_flatten(model.parameters()))
    saved = [(name, current[name]) for name in router]
    model.update(tree_unflatten(list(router.items())), strict=False)
    try:
        logits = adapter.router_logits(layer.block, x).astype(mx.float32)
        probs = adapter.router_scores(layer.block, logits).astype(mx.float32)
        mx.eval(logits, probs)
    finally:
        model.update(tree_unflatten(saved), strict=False)
    return logits, probs


# ---------------------------------------------------------------------------------------------
# One layer


def layer_statistics(kind, activation, weights: dict, x, logits, probs, num_experts: int):
    """``(gated means (E, hidden), logits (tokens, E))`` as float64 numpy: every expert on every
    token, weighted by its router probability ``probs`` (tokens, E), the adapter's
    ``router_scores``."""
    import mlx.core as mx

    means = []
    for e in range(num_experts):
        expert = {name: value[e] for name, value in weights.items()}
        out = expert_output(kind, activation, expert, x)
        means.append(mx.mean(probs[:, e : e + 1] * out, axis=0))
        if e % 8 == 7:
            mx.eval(means)
    means = mx.stack(means)
    mx.eval(means)
    return np.array(means, dtype=np.float64), np.array(logits, dtype=np.float64)


def merge_layer(kind, activation, weights: dict, groups: dict, saliency, x_align, on_group=None):
    """Merged float64 experts for every centroid with members: ``{centroid: {name: array}}``,
    and the members' permutations ``{centroid: [perm, ...]}``."""
    import mlx.core as mx

    merged, perms = {}, {}
    for centroid, members in groups.items():
        if not members:
            continue
        ids = [centroid, *members]
        experts = [{n: np.array(v[e], dtype=np.float64) for n, v in weights.items()} for e in ids]
        profiles = []
        for e in ids:
            expert = {name: value[e] for name, value in weights.items()}
            h = hidden_activations(kind, activation, expert, x_align)
            profiles.append(np.array(h.astype(mx.float32), dtype=np.float64).T)
        merged[centroid], perms[centroid] = merge_group(
            experts[0], experts[1:], [saliency[e] for e in ids], profiles
        )
        if on_group is not None:
            on_group(1)
    return merged, perms


def _check_formula(adapter, mem_layer, kind, activation, weights, keep, x) -> None:
    """Our expert evaluation must equal the block's experts (the output model's layer, before
    it is patched) on a few tokens, or the architecture does something else."""
    import mlx.core as mx

    probe = x[:16]
    expected = np.array(adapter.all_expert_outputs(mem_layer, probe).astype(mx.float32))
    try:
        got = []
        for e in keep:
            expert = {name: value[e] for name, value in weights.items()}
            got.append(np.array(expert_output(kind, activation, expert, probe)))
        got = np.stack(got, axis=1)
    except (ValueError, TypeError):  # e.g. experts that run on a projection of the input
        got = None
    scale = float(np.abs(expected).max()) or 1.0
    if (
        got is None
        or expected.shape != got.shape
        or not np.allclose(got, expected, atol=2e-3 * scale, rtol=1e-2)
    ):
        raise MlxfunError(
            f"{adapter.name}: the experts of layer {mem_layer.index} compute something else than "
            f"their weights say (an input scale or per-expert factor); ream supports {SUPPORTED}"
        )


# ---------------------------------------------------------------------------------------------
# The compressor


def _check_request(request: MergeRequest) -> None:
    if request.group_size < 0:
        raise MlxfunError(f"--group-size must be 0 or positive, got {request.group_size}")
    if request.max_tokens <= 0 or request.batch_size <= 0 or request.align_tokens <= 0:
        raise MlxfunError("--max-tokens, --batch-size and the alignment tokens must be positive")
    if not request.dry_run and not request.dataset:
        raise MlxfunError("pass --dataset: REAM measures the experts on calibration text")


def merge(request: MergeRequest) -> dict:
    """Merge experts as ``request`` says and write the model (or, with ``dry_run``, only plan).
    Returns prune's summary plus ``groups`` per layer and the timings."""
    _check_request(request)
    if not request.dry_run:
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            raise MlxfunError(SCIPY_MISSING) from None
    plan = plan_prune(request.prune_request(), method="ream")
    if plan.adapter.name in ("llama4",):
        raise MlxfunError(
            f"{plan.adapter.name}: its experts scale their input by the router score; ream "
            f"supports {SUPPORTED}"
        )
    refusal = getattr(plan.adapter, "merge_unsupported", "")
    if refusal:
        raise MlxfunError(f"{plan.adapter.name}: {refusal}; ream supports {SUPPORTED}")
    summary = plan.summary
    summary["method"] = "ream"
    summary["group_size"] = request.group_size
    if request.dry_run:
        return summary
    if request.dataset:
        from mlxfun.core.datasets import load_samples

        samples = load_samples(request.dataset, max_samples=request.max_samples, seed=request.seed)
    from mlxfun.core.outputs import atomic_output_dir

    inputs = (request.model, request.stats, *request.dataset)
    with atomic_output_dir(request.output, force=request.force, inputs=inputs) as tmp:
        written = write_pruned(plan, tmp)
        report = _merge_into(plan, tmp, samples, request)
        provenance = dict(plan.provenance)
        provenance.update(report["provenance"])
        if request.plan is not None:
            provenance["plan"] = request.plan
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    summary = finish_summary(summary, written)
    summary["layers"] = report["rows"]
    summary["groups"] = report["provenance"]["ream"]["groups"]
    summary["tokens"] = report["provenance"]["ream"]["tokens"]
    summary["timings"] = report["timings"]
    if report["provenance"].get("requantized"):
        summary["requantized"] = report["provenance"]["requantized"]
    return summary


def _merge_into(plan, directory: Path, samples, request: MergeRequest) -> dict:
    """Load the pruned model from ``directory``, then merge layer by layer into its shards and
    into the loaded model."""
    from mlxfun.core import slicing
    from mlxfun.core.models import load_model

    model, tokenizer, _ = load_model(directory)
    sequences = _calibration_tokens(samples, tokenizer, request)
    total_tokens = sum(len(s) for s in sequences)
    mem_layers = plan.adapter.moe_layers(model)
    rng = np.random.default_rng(request.seed)
    run = _MergeRun(
        plan=plan,
        request=request,
        model=model,
        directory=directory,
        source_headers=slicing.read_headers(plan.source),
        out_headers=slicing.read_headers(directory),
        block_inputs=BlockInputs(model, plan.adapter, sequences, request.batch_size),
        align_index=np.sort(rng.permutation(total_tokens)[: request.align_tokens]),
    )
    groups_out, saliency_out, rows, timings = {}, {}, [], []
    quantization = None
    for plan_layer, mem_layer in zip(plan.plans, mem_layers):
        keep = plan.selection.keep[plan_layer.position]
        quantization = quantization or _quantization(mem_layer.experts)
        saliency = np.asarray(
            plan.scores[plan_layer.position, : plan_layer.num_experts], dtype=np.float64
        )
        started = time.perf_counter()
        groups = _merge_layer_into(run, plan_layer, mem_layer, saliency)
        elapsed = time.perf_counter() - started
        timings.append(round(elapsed, 4))
        groups_out[str(plan_layer.index)] = {str(c): m for c, m in groups.items()}
        saliency_out[str(plan_layer.index)] = [float(s) for s in saliency]
        rows.append(_layer_row(plan_layer, keep, groups, elapsed))
    run.block_inputs.close()
    del model, run
    provenance = _ream_provenance(request, total_tokens, groups_out, saliency_out, quantization)
    return {"provenance": provenance, "rows": rows, "timings": timings}


@attrs.define(kw_only=True)
class _MergeRun:
    """What every layer's merge reads: the plan and request, the pruned model loaded from the
    output directory, both checkpoints' headers and the blocks' inputs on the calibration
    tokens."""

    plan: object
    request: MergeRequest
    model: object
    directory: Path
    source_headers: dict
    out_headers: dict
    block_inputs: BlockInputs
    align_index: np.ndarray


def _calibration_tokens(samples, tokenizer, request: MergeRequest) -> list[list[int]]:
    from mlxfun.core.datasets import tokenize_samples

    sequences = token_sample(
        tokenize_samples(samples, tokenizer, request.max_tokens), request.max_tokens
    )
    if sum(len(s) for s in sequences) == 0:
        raise MlxfunError("the --dataset text gave no tokens")
    return sequences


def _merge_layer_into(run: _MergeRun, plan_layer, mem_layer, saliency: np.ndarray) -> dict:
    """Group one layer's experts around the kept ones and merge each group into its centroid,
    in the output shards and in the loaded model; returns the groups."""
    import mlx.core as mx
    from tqdm import tqdm

    plan, request, model = run.plan, run.request, run.model
    adapter, keep = plan.adapter, plan.selection.keep[plan_layer.position]
    experts = mem_layer.experts
    kind = expert_kind(experts)
    names = [n for n, p in plan.owner.items() if p is plan_layer]
    bar = tqdm(
        total=3,
        desc=f"merge layer {plan_layer.index}",
        disable=not request.progress,
        dynamic_ncols=True,
        leave=False,
    )
    with bar:
        x = run.block_inputs(mem_layer)
        bar.update(1)
        tensors = _source_tensors(plan.source, run.source_headers, names)
        weights = _dequantized_experts(tensors, plan_layer.prefixes[0], experts)
        activation = experts.activation
        _check_elementwise(kind, activation, int(weights[next(iter(weights))].shape[1]))
        _check_formula(adapter, mem_layer, kind, activation, weights, keep, x)
        bar.update(1)
        if request.groups is not None:
            groups = explicit_groups(request.groups, plan_layer, keep)
        else:
            logits, probs = full_router_scores(model, adapter, mem_layer, plan_layer, tensors, x)
            means, logits_np = layer_statistics(
                kind, activation, weights, x, logits, probs, plan_layer.num_experts
            )
            similarity = expert_similarity(means, logits_np)
            groups = group_experts(similarity, saliency, keep, request.group_size)
        bar.total = 3 + sum(1 for members in groups.values() if members)
        bar.update(1)
        x_align = x[mx.array(run.align_index)] if len(run.align_index) < x.shape[0] else x
        merged, _ = merge_layer(kind, activation, weights, groups, saliency, x_align, bar.update)
        _apply(model, experts, plan_layer, keep, merged, run.directory, run.out_headers)
    return groups


def explicit_groups(groups: dict, plan_layer, keep: list[int]) -> dict[int, list[int]]:
    """``{centroid: sorted members}`` of one layer from ``MergeRequest.groups``: centroids are
    kept experts, members removed ones, each in one group at most."""
    given = groups.get(plan_layer.index, groups.get(str(plan_layer.index), {}))
    result = {c: [] for c in keep}
    seen: set = set()
    for centroid, members in given.items():
        centroid, members = int(centroid), sorted(int(m) for m in members)
        if centroid not in result:
            raise MlxfunError(f"layer {plan_layer.index}: merge target {centroid} is not kept")
        bad = [
            m for m in members if m in result or m in seen or not 0 <= m < plan_layer.num_experts
        ]
        if bad:
            raise MlxfunError(
                f"layer {plan_layer.index}: merge sources {bad} are kept, repeated or not experts"
            )
        seen.update(members)
        result[centroid] = members
    return result


def _layer_row(plan_layer, keep: list[int], groups: dict, elapsed: float) -> dict:
    """One layer of the printed summary."""
    sizes = sorted((len(m) + 1 for m in groups.values()), reverse=True)
    absorbed = sum(len(m) for m in groups.values())
    return {
        "layer": plan_layer.index,
        "experts": plan_layer.num_experts,
        "kept": len(keep),
        "merged_groups": sum(1 for m in groups.values() if m),
        "absorbed": absorbed,
        "dropped": plan_layer.num_experts - len(keep) - absorbed,
        "group_sizes": ",".join(str(s) for s in sizes if s > 1) or "-",
        "seconds": round(elapsed, 2),
    }


def _ream_provenance(request: MergeRequest, total_tokens, groups, saliency, quantization) -> dict:
    """What mlxfun.json adds to prune's provenance for a merge."""
    provenance = {
        "ream": {
            "group_size": request.group_size,
            "explicit_groups": request.groups is not None,
            "tokens": total_tokens,
            "max_tokens": request.max_tokens,
            "align_tokens": int(min(request.align_tokens, total_tokens)),
            "datasets": [str(p) for p in request.dataset],
            "seed": request.seed,
            "similarity": "mean of output cosine (gated by the router's own probabilities, "
            "[0,1]) and router-logit similarity",
            "groups": groups,
            "saliency": saliency,
        }
    }
    if quantization is not None:
        provenance["requantized"] = quantization
    return provenance


def _apply(model, experts, plan_layer, keep, merged: dict, directory: Path, headers) -> None:
    """Write merged centroids into the output shards (their byte rows) and into the loaded
    model, stored exactly as the file stores them."""
    import mlx.core as mx

    if not merged:
        return
    prefix = plan_layer.prefixes[0]
    infos = {name: info for shard in headers.values() for name, info in shard.items()}
    dtypes = {
        name[len(prefix) + 1 :]: getattr(mx, SAFETENSORS_DTYPES[info["dtype"]])
        for name, info in infos.items()
        if name.startswith(prefix + ".")
    }
    centroids = sorted(merged)
    positions = [keep.index(c) for c in centroids]
    stacked = {n: np.stack([merged[c][n] for c in centroids]) for n in merged[centroids[0]]}
    stored = _stored_tensors(experts, stacked, dtypes)
    rows = {}
    for name, value in stored.items():
        for i, position in enumerate(positions):
            rows[(f"{prefix}.{name}", position)] = _as_bytes(value[i])
    _patch_rows(directory, headers, rows)
    index = mx.array(positions)
    for name, value in stored.items():
        proj, _, param = name.rpartition(".")
        module = getattr(experts, proj)
        current = module[param]
        current[index] = value.astype(current.dtype)
        module[param] = current
    mx.eval(experts.parameters())
