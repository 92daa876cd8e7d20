"""``mlxfun sparsify``: zero the least important weights of a model's linear layers.

A neuron scorer (``neuron_scorers``) scores every weight from the calibration statistics of its
input channel (``linear_inputs``, one decoder layer at a time); within every output row (of
every expert, for stacked experts) the lowest ``sparsity`` share is zeroed (Wanda's comparison
group: ``int(in * sparsity)`` weights per row), or with an N:M pattern the N lowest of every M
consecutive inputs of a row. With ``sequential`` (the default, as Wanda) each layer is pruned
before its outputs feed the next one. The LM head (``lm_head``) is pruned by magnitude.

The output is an ordinary mlx-lm directory of the same shapes and dtypes: MLX has no sparse
kernels, so the zeros save neither memory nor time until the model is compressed or pruned
structurally (``prune_neurons``).
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

from .linear_inputs import Calibration, check_not_quantized, layer_targets, run_layers
from .neuron_stats import StatOptions

PATTERNS = ("unstructured", "2:4", "4:8")


@attrs.define(kw_only=True)
class SparsifyRequest:
    model: Path = attrs.field(converter=Path)
    dataset: list = attrs.field(factory=list)
    output: Path | None = None
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    attention: bool = False
    lm_head: bool = False
    last: int | None = None
    experts: bool = True
    mlp: bool = True
    sequential: bool = True
    max_tokens: int = 256
    max_samples: int | None = 64
    batch_size: int = 4
    seed: int = 0
    tfidf_mode: str = "doc"
    topics: int = 16
    classes: int = 32
    weight_exp: float = 1.0
    tf_exp: float = 1.0
    idf_exp: float = 1.5
    force: bool = False
    progress: bool = False

    def score_options(self) -> dict:
        return {"weight_exp": self.weight_exp, "tf_exp": self.tf_exp, "idf_exp": self.idf_exp}

    def stat_options(self) -> StatOptions:
        return StatOptions(tfidf_mode=self.tfidf_mode, topics=self.topics, seed=self.seed)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for unstructured, else ``(n, m)``: n of every m consecutive inputs zeroed."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise MlxfunError(
            f"--pattern {pattern!r} is not a pattern; use unstructured or N:M with 0 < N < M "
            "(2:4, 4:8)"
        )
    return n, m


def prune_mask(scores: np.ndarray, sparsity: float, nm: tuple[int, int] | None) -> np.ndarray:
    """True where a weight is zeroed: per output row (the last axis is the input), the
    ``int(in * sparsity)`` lowest scores, or the ``n`` lowest of every ``m`` inputs."""
    inputs = scores.shape[-1]
    mask = np.zeros(scores.shape, dtype=bool)
    if nm is None:
        count = int(inputs * sparsity)
        order = np.argsort(scores, axis=-1, kind="stable")[..., :count]
        np.put_along_axis(mask, order, True, axis=-1)
        return mask
    n, m = nm
    grouped = scores.reshape(*scores.shape[:-1], inputs // m, m)
    order = np.argsort(grouped, axis=-1, kind="stable")[..., :n]
    grouped_mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(grouped_mask, order, True, axis=-1)
    return grouped_mask.reshape(scores.shape)


def check_request(request: SparsifyRequest, nm) -> None:
    if nm is None and not 0.0 <= request.sparsity < 1.0:
        raise MlxfunError(f"--sparsity must be in [0, 1), got {request.sparsity}")
    if request.last is not None and request.last < 1:
        raise MlxfunError(f"--last must be at least 1, got {request.last}")
    if request.tfidf_mode not in ("doc", "topic"):
        raise MlxfunError(f"--tfidf-mode must be doc or topic, got {request.tfidf_mode!r}")
    if request.batch_size < 1 or request.max_tokens < 2:
        raise MlxfunError("--batch-size must be at least 1 and --max-tokens at least 2")
    if request.output is None:
        raise MlxfunError("pass an --output directory")


def load_calibration(request, tokenizer) -> Calibration:
    from mlxfun.core.datasets import batches, load_samples, tokenize_samples

    samples = load_samples(request.dataset, max_samples=request.max_samples, seed=request.seed)
    sequences = tokenize_samples(samples, tokenizer, request.max_tokens)
    if not sequences:
        raise MlxfunError("the calibration dataset has no non-empty sample")
    return Calibration.build(batches(sequences, request.batch_size), classes=request.classes)


def calibrate(model, request, tokenizer, targets_of, on_layer, progress=None) -> Calibration:
    """Load the request's calibration set and run it through the decoder layers (``run_layers``),
    handing each layer's statistics to ``on_layer``; returns the calibration set."""
    calibration = load_calibration(request, tokenizer)
    run_layers(
        model,
        calibration,
        targets_of,
        on_layer,
        options=request.stat_options(),
        sequential=request.sequential,
        progress=progress,
    )
    return calibration


def _check_inputs(target, nm) -> None:
    inputs = target.module.weight.shape[-1]
    if nm is not None and inputs % nm[1]:
        raise MlxfunError(
            f"{target.name} has {inputs} inputs, not a multiple of {nm[1]}; "
            f"--pattern {nm[0]}:{nm[1]} needs whole groups: choose another pattern"
        )


def apply_scores(target, stats, scorer, options, sparsity, nm) -> dict:
    """Zero the lowest-scored weights of ``target`` in place; returns its report row."""
    import mlx.core as mx

    weight = target.module.weight
    w = np.array(weight.astype(mx.float32))
    if target.stacked:
        per_expert = [None] * w.shape[0] if stats is None else stats
        scores = np.stack([scorer.score(w[e], per_expert[e], **options) for e in range(len(w))])
    else:
        scores = scorer.score(w, stats, **options)
    mask = prune_mask(np.asarray(scores), sparsity, nm)
    target.module.weight = mx.where(mx.array(mask), mx.zeros((), weight.dtype), weight)
    mx.eval(target.module.weight)
    return {
        "module": target.name,
        "group": target.group,
        "weights": int(mask.size),
        "zeroed": int(mask.sum()),
        "sparsity": round(float(mask.mean()), 6),
    }


def sparsify(request: SparsifyRequest) -> dict:
    from mlxfun.core import plugins
    from mlxfun.core.models import load_model
    from mlxfun.core.outputs import atomic_output_dir, check_output

    nm = parse_pattern(request.pattern)
    check_request(request, nm)
    scorer = plugins.get_neuron_scorer(request.method)
    if scorer.stats and not request.dataset:
        raise MlxfunError(
            f"--method {request.method} needs a calibration --dataset (JSONL, text file or "
            "directory)"
        )
    inputs = [request.model, *request.dataset]
    check_output(request.output, request.force, inputs)
    start = time.perf_counter()
    model, tokenizer, config = load_model(request.model)
    check_not_quantized(model)
    lm_head = _lm_head(model, config) if request.lm_head else None
    layers = _layer_count(model)
    first = 0 if request.last is None else max(0, layers - request.last)
    sparsity = 0.5 if nm is not None else request.sparsity

    def targets_of(index, layer, prefix):
        if index < first:
            return []
        found = layer_targets(
            layer,
            prefix,
            mlp=request.mlp,
            attention=request.attention,
            experts=request.experts,
        )
        for target in found:
            _check_inputs(target, nm)
        return found

    rows: list[dict] = []
    options = request.score_options()

    def on_layer(index, targets, stats):
        for target in targets:
            rows.append(apply_scores(target, stats.get(target.name), scorer, options, sparsity, nm))

    calibration = None
    if scorer.stats:
        bar = _Progress(layers if request.progress else 0)
        try:
            calibration = calibrate(model, request, tokenizer, targets_of, on_layer, bar.step)
        finally:
            bar.close()
    else:  # magnitude: no calibration forward
        from mlxfun.core.runner import all_decoder_layers

        path, decoder = all_decoder_layers(model)
        for index, layer in enumerate(decoder):
            targets = targets_of(index, layer, f"{path}.{index}")
            on_layer(index, targets, {t.name: None for t in targets})
    if lm_head is not None:
        magnitude = plugins.get_neuron_scorer("magnitude")
        rows.append(apply_scores(lm_head, None, magnitude, {}, sparsity, nm))
    if not rows:
        raise MlxfunError(
            "nothing to prune: no linear layer matched (--no-experts on an all-MoE model "
            "with --skip-attention?)"
        )
    summary = _summary(request, rows, calibration, time.perf_counter() - start)
    provenance = _provenance(request, summary)
    with atomic_output_dir(request.output, force=request.force, inputs=inputs) as tmp:
        write_model(tmp, model, request.model, config=None, provenance=provenance)
    summary["output"] = str(request.output)
    return summary


class _Progress:
    """A tqdm bar over the decoder layers, shown from the first finished layer on (so that a
    refusal before any layer ran is a clean error line); ``total`` 0: no bar."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def step(self, index: int) -> None:
        if self.total and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="layers", unit="layer")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _layer_count(model) -> int:
    from mlxfun.core.runner import all_decoder_layers

    path, layers = all_decoder_layers(model)
    if not layers:
        raise MlxfunError(f"{type(model).__name__}: found no list of decoder layers to prune")
    return len(layers)


def _lm_head(model, config):
    from .linear_inputs import Target

    head = getattr(model, "lm_head", None)
    if head is None or config.get("tie_word_embeddings", False):
        raise MlxfunError(
            "--lm-head: this model ties its LM head to the input embeddings, so pruning it would "
            "prune the embeddings too; leave out --lm-head"
        )
    return Target("lm_head", head, "lm_head")


def _summary(request, rows, calibration, seconds) -> dict:
    groups = {}
    for row in rows:
        g = groups.setdefault(row["group"], {"weights": 0, "zeroed": 0})
        g["weights"] += row["weights"]
        g["zeroed"] += row["zeroed"]
    weights = sum(g["weights"] for g in groups.values())
    zeroed = sum(g["zeroed"] for g in groups.values())
    return {
        "method": request.method,
        "pattern": request.pattern,
        "sparsity": request.sparsity if request.pattern == "unstructured" else 0.5,
        "sequential": request.sequential,
        "calibration_tokens": calibration.tokens if calibration else 0,
        "groups": groups,
        "weights": weights,
        "zeroed": zeroed,
        "seconds": round(seconds, 2),
        "modules": rows,
    }


def versions() -> dict:
    import importlib.metadata

    found = {}
    for dist in ("mlxfun-core", "mlxfun-methods", "mlx", "mlx-lm"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _provenance(request: SparsifyRequest, summary: dict) -> dict:
    options = attrs.asdict(request)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    options["dataset"] = [str(Path(p).resolve()) for p in request.dataset]
    options.pop("progress")
    return {
        "mlxfun_version": versions().get("mlxfun-core"),
        "method": "sparsify",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_model": str(request.model.resolve()),
        "options": options,
        "groups": summary["groups"],
        "zeroed": summary["zeroed"],
        "calibration_tokens": summary["calibration_tokens"],
        "versions": versions(),
    }


def write_model(directory: Path, model, source: Path, config: dict | None, provenance) -> None:
    """The model's weights in the source's dtypes, ``config`` (None: the source's config.json
    as it is), the tokenizer files and ``mlxfun.json``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import save_config, save_model
    from mlxfun.core.models import copy_tokenizer_files
    from mlxfun.core.outputs import PROVENANCE_FILE
    from mlxfun.core.slicing import read_headers

    dtypes = {
        name: info["dtype"]
        for shard in read_headers(source).values()
        for name, info in shard.items()
    }
    by_code = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}
    params = []
    for name, value in tree_flatten(model.parameters()):
        want = by_code.get(dtypes.get(name, ""))
        params.append((name, value.astype(want) if want is not None else value))
    model.update(tree_unflatten(params))
    save_model(directory, model)
    if config is None:
        shutil.copy2(source / "config.json", directory / "config.json")
    else:
        save_config(config, directory / "config.json")
    copy_tokenizer_files(source, directory)
    previous = source / PROVENANCE_FILE
    if previous.is_file():
        try:
            provenance["source_provenance"] = json.loads(previous.read_text())
        except json.JSONDecodeError:
            pass
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
