"""The commands' own path, for the checks: tiny checkpoints and their stats, and ``collect`` and
``prune`` run through the functions the ``mlxfun`` commands call (``mlxfun.core.collect.collect``
and the ``prune`` compressor plugin), with the object under test put in the plugin registry.

The core cannot import the built-in methods (``mlxfun.methods``): the ``prune`` compressor and
the architectures' adapters are reached through the registry, as the commands reach them. The
kit's own scorer and selector (``KitScorer``, ``KitSelector``) stand in for the kinds not under
test, so a check needs no built-in scorer or selector.
"""

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import attrs
import numpy as np

from ..errors import MlxfunError
from ..types import OBSERVABLES, CompressRequest, Selection, SelectOptions
from .plugin_state import substituted_plugin
from .tiny_models import TINY_ARGS, save_tiny_checkpoint

# Qwen3-MoE-like, with a dense first layer: the MoE layers are decoder layers 1 and 2 (MoE layer
# positions 0 and 1), so a plugin that confuses the two fails.
QWEN3_MOE = dict(TINY_ARGS, num_hidden_layers=3, mlp_only_layers=[0])
# DeepSeek-V3's group-limited router: 8 experts in 2 groups of 4, the best group competes.
DEEPSEEK_V3 = dict(
    hidden_size=32,
    vocab_size=256,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    num_hidden_layers=2,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=0,
    moe_layer_freq=1,
    rope_theta=10000.0,
    n_group=2,
    topk_group=1,
)
# Layers 1 and 2 of the Qwen3-MoE model keep 7 and 6 experts: a non-uniform model (model_file).
NONUNIFORM_TARGET = {1: [7], 2: [6, 7]}

# Calibration text of bytes below 64, so that a model with a small vocabulary reads it too.
CALIBRATION = [
    "12 34 567 890",
    "0:1;2<3=4>5?6",
    "(7) +8, -9. /0 #1 $2 %3 &4",
    "98 76 54 32 10 " * 3,
]

KIT_SCORER = "mlxfun-kit-weight"
KIT_SELECTOR = "mlxfun-kit-lowest"


@attrs.frozen
class KitScorer:
    """Each expert's summed gate weight; it asks for every observable, so a collect with it
    exercises everything an adapter provides."""

    name: str = KIT_SCORER
    description: str = "the conformance kit's scorer: each expert's summed gate weight"
    needs: frozenset = OBSERVABLES

    def init(self, num_layers: int, num_experts: int) -> dict:
        return {"weight": np.zeros((num_layers, num_experts))}

    def update(self, acc: dict, obs) -> None:
        experts = obs.selected.reshape(-1).astype(np.int64)
        np.add.at(acc["weight"][obs.layer], experts, obs.weights.reshape(-1).astype(np.float64))

    def finalize(self, acc: dict) -> np.ndarray:
        return acc["weight"].copy()


@attrs.frozen
class KitSelector:
    """Per layer: the targets, then the lowest-scoring unprotected experts up to ``n`` (ties by
    id), never below ``min_keep``; router groups are refused."""

    name: str = KIT_SELECTOR
    description: str = "the conformance kit's selector: targets, then the lowest scores"

    def select(self, scores, **options) -> Selection:
        chosen = SelectOptions(**options)
        if chosen.groups != 1:
            raise MlxfunError("the conformance kit's selector does not split router groups")
        keep, removed = {}, {}
        for position, count in enumerate(chosen.num_experts):
            target = sorted(chosen.target.get(position, []))
            protect = set(chosen.protect.get(position, [])) | set(target)
            free = sorted(
                (e for e in range(count) if e not in protect),
                key=lambda e: (scores[position, e], e),
            )
            extra = max(0, (chosen.n or 0) - len(target))
            extra = min(extra, count - chosen.min_keep[position] - len(target))
            gone = set(target) | set(free[: max(0, extra)])
            removed[position] = sorted(gone)
            keep[position] = [e for e in range(count) if e not in gone]
        return Selection(keep, removed, list(chosen.num_experts))


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints and their stats, made once per process


_cache: dict[str, Path] = {}


def scratch() -> Path:
    """A directory for this process's tiny checkpoints, removed at exit."""
    if "scratch" not in _cache:
        _cache["scratch"] = Path(tempfile.mkdtemp(prefix="mlxfun-kit-"))
        atexit.register(shutil.rmtree, _cache["scratch"], True)
    return _cache["scratch"]


def calibration() -> Path:
    """A JSONL calibration file of four short samples."""
    if "calibration" not in _cache:
        path = scratch() / "calibration.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in CALIBRATION))
        _cache["calibration"] = path
    return _cache["calibration"]


def checkpoint(name: str) -> Path:
    """A tiny checkpoint: ``qwen3_moe`` (``QWEN3_MOE``), ``deepseek_v3`` (``DEEPSEEK_V3``) or
    ``nonuniform`` (the first with 7 and 6 experts, written by ``mlxfun prune``)."""
    if name not in _cache:
        if name == "nonuniform":
            source = checkpoint("qwen3_moe")
            output = scratch() / "nonuniform"
            with kit_plugins():
                prune(
                    model=source,
                    stats=stats("qwen3_moe"),
                    output=output,
                    scorer=KIT_SCORER,
                    selector=KIT_SELECTOR,
                    target=NONUNIFORM_TARGET,
                )
            _cache[name] = output
        else:
            args = QWEN3_MOE if name == "qwen3_moe" else DEEPSEEK_V3
            _cache[name] = save_tiny_checkpoint(scratch() / name, name, args)
    return _cache[name]


def stats(name: str) -> Path:
    """The stats file of ``checkpoint(name)``, collected with ``KitScorer``."""
    key = f"stats-{name}"
    if key not in _cache:
        output = scratch() / f"{name}.npz"
        with kit_plugins():
            collect(checkpoint(name), [KIT_SCORER], output)
        _cache[key] = output
    return _cache[key]


def kit_plugins():
    """A ``with`` block in which the kit's scorer and selector are registered."""
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(substituted_plugin("scorer", KitScorer()))
    stack.enter_context(substituted_plugin("selector", KitSelector()))
    return stack


# ---------------------------------------------------------------------------------------------
# The commands' functions


def collect(model, scorers, output, datasets=None, batch_size: int = 4) -> dict:
    """``mlxfun collect`` (``mlxfun.core.collect.collect``), without the progress bar."""
    from ..collect import CollectRequest
    from ..collect import collect as run_collect

    request = CollectRequest(
        model=model,
        datasets=datasets or [calibration()],
        output=output,
        scorers=list(scorers),
        batch_size=batch_size,
        progress=False,
    )
    return run_collect(request)


def prune(request_type=CompressRequest, compressor: str = "prune", **fields) -> dict:
    """``mlxfun prune``: the compressor plugin's ``compress`` with the request the command builds."""
    from .. import plugins

    return plugins.get_compressor(compressor).compress(request_type(**fields))


def load_and_run(model_dir):
    """Load a model directory as mlxfun's commands do and run a forward: ``(model, adapter)``."""
    import mlx.core as mx

    from .. import plugins
    from ..config import read_config
    from ..models import load_model

    model, _, config = load_model(model_dir)
    logits = model(mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32))
    mx.eval(logits)
    if not np.all(np.isfinite(np.array(logits.astype(mx.float32)))):
        raise AssertionError(f"the model in {model_dir} gives NaN or inf logits")
    return model, plugins.adapter_for_config(read_config(model_dir))


def run_step(label: str, step: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``; any failure but an ``AssertionError`` becomes one naming
    ``label``, the step and, when a plugin's code raised, that plugin."""
    try:
        return function(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as exc:
        from .. import plugins

        culprit = plugins.failed_plugin(exc)
        where = f" in {culprit.kind} {culprit.name!r} ({culprit.distribution})" if culprit else ""
        raise AssertionError(f"{label}: {step} failed{where}: {type(exc).__name__}: {exc}") from exc


def files_of(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, to check that nothing changed."""
    directory = Path(directory)
    if directory.is_file():
        return {directory.name: directory.read_bytes()}
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
