"""Abliteration: find the refusal direction and remove it from the weights.

Candidates: for every decoder layer l, ``d_l = normalize(mean_harmful(x_l) - mean_harmless(x_l))``
where ``x_l`` is the residual stream entering layer l at one position of the prompt rendered
with the chat template (``position`` -1: its last token, the end of the generation prompt;
-2 the one before, ...), read with call hooks on the decoder layers during ordinary forwards.

``--layer auto`` holds out ``eval_prompts`` harmful and harmless prompts (seeded) and scores
every candidate with the run-time ablation (``residual.ablation``): the refusal rate of greedy
answers to the held-out harmful prompts (``refusal.refusal_rate``) and the mean KL divergence
KL(P_original || P_ablated) of the next-token distribution at the last prompt token of the
held-out harmless prompts. Rule: among candidates whose KL is at most ``kl_threshold``, the
lowest refusal rate, ties by the lower KL, then the earlier layer; when none is under the
threshold, the same order over all candidates (and the summary says so). The direction is then
removed from every residual writer's weights (``residual.orthogonalize``).
"""

import datetime
import json
import random
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

from .residual import ablation, decoder_layers, orthogonalize, unit, writers_for

DIRECTION_FILE = "refusal_direction.npy"
MIN_PROMPTS = 2


# --- prompts --------------------------------------------------------------------------------


def sample_prompt(sample) -> str:
    """The user's request of a dataset sample: the last user message of ``messages`` (the
    trained answer after it is dropped), else ``prompt``, else ``text``."""
    if sample.messages is not None:
        users = [m["content"] for m in sample.messages if m.get("role") == "user"]
        if not users:
            raise MlxfunError(f"{sample.source}: no user message to use as a prompt")
        return str(users[-1])
    if sample.prompt is not None:
        return sample.prompt
    return sample.text or ""


def load_prompts(path, what: str) -> list[str]:
    from mlxfun.core.datasets import load_samples

    path = Path(path)
    if not path.exists():
        raise MlxfunError(f"{what} {path} does not exist; pass a JSONL file of prompts")
    try:
        samples = load_samples([path])
    except MlxfunError as exc:
        if str(exc).startswith("no samples"):
            raise MlxfunError(f"{what} {path} has no prompts; pass a non-empty JSONL") from None
        raise
    prompts = [p for p in (sample_prompt(s) for s in samples) if p.strip()]
    if not prompts:
        raise MlxfunError(f"{what} {path} has no prompts; pass a non-empty JSONL")
    return prompts


def split_prompts(prompts: list[str], held_out: int, seed: int, what: str):
    """``(direction prompts, held-out prompts)``: a seeded draw of ``held_out`` for scoring,
    the rest for the direction (at least ``MIN_PROMPTS`` each)."""
    if len(prompts) < MIN_PROMPTS + held_out:
        need = MIN_PROMPTS + held_out
        raise MlxfunError(
            f"{what} has {len(prompts)} prompts; a direction needs at least {need} "
            f"({MIN_PROMPTS} for the mean{f' + {held_out} held out by --eval-prompts' if held_out else ''}): "
            "pass more prompts or a smaller --eval-prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:held_out])
    rest = sorted(order[held_out:])
    return [prompts[i] for i in rest], [prompts[i] for i in held]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    from .evaluate import render_prompt

    return tokenizer.encode(render_prompt(tokenizer, prompt, True), add_special_tokens=False)


# --- directions -----------------------------------------------------------------------------


def residual_means(model, tokenizer, prompts, position: int = -1, progress=None) -> np.ndarray:
    """Mean residual stream entering each decoder layer at ``position`` of the rendered
    prompts: float64 (layers, hidden)."""
    import mlx.core as mx
    from mlxfun.core.hooks import call_hooks

    from .residual import model_type_of

    layers = decoder_layers(model, writers_for(model_type_of(model)))
    seen: list = [None] * len(layers)

    def recorder(index):
        def wrapper(module, call, x, *args, **kwargs):
            seen[index] = x[:, position, :]
            return call(x, *args, **kwargs)

        return wrapper

    total = None
    with call_hooks([(layer, recorder(i)) for i, layer in enumerate(layers)]):
        for prompt in progress(prompts) if progress else prompts:
            ids = prompt_ids(tokenizer, prompt)
            if len(ids) < -position:
                raise MlxfunError(
                    f"a prompt has {len(ids)} tokens, fewer than --position {position} needs"
                )
            model(mx.array(ids)[None])
            rows = mx.concatenate(seen, axis=0).astype(mx.float32)
            mx.eval(rows)
            rows = np.array(rows, dtype=np.float64)
            total = rows if total is None else total + rows
    return total / len(prompts)


def candidate_directions(harmful_means, harmless_means, tolerance=1e-6):
    """``(directions, norms)``: the unit difference of means per layer, and the norm of each
    difference relative to the harmless mean's (a zero row where the means agree, as at
    layer 0 when every prompt ends with the same template token)."""
    diff = harmful_means - harmless_means
    norms = np.linalg.norm(diff, axis=1)
    scale = np.maximum(np.linalg.norm(harmless_means, axis=1), 1e-30)
    relative = norms / scale
    directions = np.zeros_like(diff)
    ok = relative > tolerance
    directions[ok] = diff[ok] / norms[ok, None]
    return directions, relative


# --- scoring --------------------------------------------------------------------------------


def last_logprobs(model, tokenizer, prompts) -> list:
    """Log-probabilities of the next token after each rendered prompt (float64 numpy)."""
    import mlx.core as mx

    out = []
    for prompt in prompts:
        logits = model(mx.array(prompt_ids(tokenizer, prompt))[None])[0, -1].astype(mx.float32)
        logp = logits - mx.logsumexp(logits)
        mx.eval(logp)
        out.append(np.array(logp, dtype=np.float64))
    return out


def mean_kl(reference: list, other: list) -> float:
    """Mean KL(P || Q) over prompts, from log-probabilities."""
    kls = [float(np.sum(np.exp(p) * (p - q))) for p, q in zip(reference, other)]
    return float(np.mean(kls))


def choose(rows: list[dict], kl_threshold: float) -> tuple[dict, bool]:
    """The stated rule (module doc): ``(row, under_threshold)``."""
    valid = [r for r in rows if r.get("refusal_rate") is not None]
    if not valid:
        raise MlxfunError(
            "no layer gives a direction (harmful and harmless means are equal everywhere); "
            "check that the two prompt sets differ"
        )
    eligible = [r for r in valid if r["kl"] <= kl_threshold]
    pool = eligible or valid
    best = min(pool, key=lambda r: (r["refusal_rate"], r["kl"], r["layer"]))
    return best, bool(eligible)


def score_candidates(
    model,
    tokenizer,
    directions,
    relative,
    harmful_eval,
    harmless_eval,
    *,
    scale: float = 1.0,
    skip_experts: bool = False,
    max_tokens: int = 24,
    layers=None,
    progress=None,
) -> dict:
    """The candidate table: per layer its refusal rate on ``harmful_eval`` and KL on
    ``harmless_eval`` under run-time ablation, plus the unablated baseline."""
    from .refusal import refusal_rate

    base = refusal_rate(model, tokenizer, harmful_eval, max_tokens=max_tokens)
    reference = last_logprobs(model, tokenizer, harmless_eval)
    layers = range(len(directions)) if layers is None else layers
    rows = []
    for layer in progress(list(layers)) if progress else layers:
        row = {"layer": int(layer), "relative_norm": float(relative[layer])}
        if not np.any(directions[layer]):
            rows.append({**row, "refusal_rate": None, "kl": None})
            continue
        with ablation(model, directions[layer], scale, skip_experts):
            refused = refusal_rate(model, tokenizer, harmful_eval, max_tokens=max_tokens)
            kl = mean_kl(reference, last_logprobs(model, tokenizer, harmless_eval))
        rows.append({**row, "refusal_rate": refused.rate, "kl": kl})
    return {"baseline_refusal_rate": base.rate, "candidates": rows}


# --- the command ----------------------------------------------------------------------------


@attrs.define
class AbliterateRequest:
    model: Path = attrs.field(converter=Path)
    output: Path = attrs.field(converter=Path)
    harmful: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    harmless: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    layer: str = "auto"
    position: int = -1
    scale: float = 1.0
    skip_experts: bool = False
    direction: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    eval_prompts: int = 16
    max_tokens: int = 24
    kl_threshold: float = 0.1
    seed: int = 0
    force: bool = False


def parse_layer(value: str, layers: int) -> int | None:
    """``auto`` -> None; else a layer index in range (negative counts from the end)."""
    if value == "auto":
        return None
    try:
        index = int(value)
    except ValueError:
        raise MlxfunError(f"--layer {value}: pass auto or a decoder layer index") from None
    if not -layers <= index < layers:
        raise MlxfunError(
            f"--layer {value} is out of range: the model has {layers} decoder layers (0..{layers - 1})"
        )
    return index % layers


def _check_request(request: AbliterateRequest) -> None:
    from mlxfun.core.outputs import check_output

    if not request.model.is_dir():
        raise MlxfunError(f"--model {request.model} is not a model directory")
    if request.position >= 0:
        raise MlxfunError(
            f"--position {request.position}: pass last or a negative offset from the end (-1, -2, ...)"
        )
    if request.eval_prompts < 1 or request.max_tokens < 1:
        raise MlxfunError("--eval-prompts and --max-tokens must be at least 1")
    if request.direction is not None and not request.direction.is_file():
        raise MlxfunError(f"--direction {request.direction} does not exist; pass a .npy file")
    if request.direction is None and (request.harmful is None or request.harmless is None):
        raise MlxfunError("pass --harmful and --harmless prompt sets, or a saved --direction")
    inputs = (request.model, request.harmful, request.harmless, request.direction)
    check_output(request.output, request.force, inputs)


def read_direction(path, hidden: int) -> np.ndarray:
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MlxfunError(f"--direction {path}: not a .npy array ({exc})") from None
    if d.shape != (hidden,):
        raise MlxfunError(
            f"--direction {path} has shape {d.shape}; this model's hidden size is {hidden}"
        )
    return unit(d)


def find_direction(model, tokenizer, request: AbliterateRequest, progress=None) -> dict:
    """The direction and how it was chosen (``--layer`` N or auto)."""
    from .residual import model_type_of

    layers = len(decoder_layers(model, writers_for(model_type_of(model))))
    layer = parse_layer(request.layer, layers)
    harmful = load_prompts(request.harmful, "--harmful")
    harmless = load_prompts(request.harmless, "--harmless")
    held = 0 if layer is not None else request.eval_prompts
    harmful_dir, harmful_eval = split_prompts(harmful, held, request.seed, "--harmful")
    harmless_dir, harmless_eval = split_prompts(harmless, held, request.seed, "--harmless")
    bar = progress("directions") if progress else None
    means_h = residual_means(model, tokenizer, harmful_dir, request.position, bar)
    means_b = residual_means(model, tokenizer, harmless_dir, request.position, bar)
    directions, relative = candidate_directions(means_h, means_b)
    info = {
        "prompts": {
            "harmful": len(harmful_dir),
            "harmless": len(harmless_dir),
            "harmful_held_out": len(harmful_eval),
            "harmless_held_out": len(harmless_eval),
        }
    }
    if layer is not None:
        if not np.any(directions[layer]):
            raise MlxfunError(
                f"--layer {layer}: the harmful and harmless means are equal there (every prompt "
                "ends with the same tokens before layer 0); pass a later --layer or auto"
            )
        return {**info, "layer": layer, "direction": directions[layer], "selection": "given"}
    table = score_candidates(
        model,
        tokenizer,
        directions,
        relative,
        harmful_eval,
        harmless_eval,
        scale=request.scale,
        skip_experts=request.skip_experts,
        max_tokens=request.max_tokens,
        progress=progress("candidates") if progress else None,
    )
    best, under = choose(table["candidates"], request.kl_threshold)
    rule = (
        f"lowest refusal rate among candidates with KL <= {request.kl_threshold}, ties by KL"
        if under
        else f"no candidate has KL <= {request.kl_threshold}: lowest refusal rate of all, ties by KL"
    )
    return {
        **info,
        **table,
        "layer": best["layer"],
        "direction": directions[best["layer"]],
        "selection": "auto",
        "rule": rule,
        "kl_threshold": request.kl_threshold,
        "max_tokens": request.max_tokens,
    }


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _stored_dtypes(model_dir) -> dict:
    """Tensor name -> the float dtype name the checkpoint stores it in."""
    from mlxfun.core.slicing import read_headers

    dtypes = {}
    for infos in read_headers(model_dir).values():
        for name, info in infos.items():
            if info.get("dtype") in _SAFETENSORS_DTYPES:
                dtypes[name] = _SAFETENSORS_DTYPES[info["dtype"]]
    return dtypes


def save_model_dir(model, source: Path, directory: Path, config: dict) -> None:
    """The model's weights in the dtypes the source stored them in (the loader may have cast
    half-precision experts to float32 for the CPU), config.json and the tokenizer files: an
    ordinary mlx-lm directory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import save_model
    from mlxfun.core.models import copy_tokenizer_files

    stored = _stored_dtypes(source)
    embed = next((v for k, v in stored.items() if k.endswith("embed_tokens.weight")), None)
    cast = []
    for name, value in tree_flatten(model.parameters()):
        dtype = stored.get(name, embed if name.endswith("lm_head.weight") else None)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            if value.dtype != getattr(mx, dtype):
                cast.append((name, value.astype(getattr(mx, dtype))))
    if cast:
        model.update(tree_unflatten(cast))
    save_model(directory, model, donate_model=False)
    (directory / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    copy_tokenizer_files(source, directory)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlxfun-core", "mlxfun-methods", "mlx", "mlx-lm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def progress_bars(enabled: bool):
    """``bars(desc)(items)``: a tqdm bar over ``items`` (on stderr), or the items themselves."""

    def bars(desc):
        def wrap(items):
            from tqdm import tqdm

            return tqdm(items, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)

        return wrap

    return bars


def abliterate(request: AbliterateRequest, progress=None) -> dict:
    """Find (or read) the direction, orthogonalise the weights, write ``request.output``
    atomically with ``mlxfun.json`` and the direction as ``refusal_direction.npy``."""
    from mlxfun.core.config import read_config
    from mlxfun.core.models import load_model
    from mlxfun.core.outputs import PROVENANCE_FILE, atomic_output_dir

    _check_request(request)
    config = read_config(request.model)
    writers_for(config.get("model_type", ""))  # refuse an unknown architecture before loading
    model, tokenizer, _ = load_model(request.model)
    if request.direction is not None:
        hidden = int(get_hidden_size(model))
        found = {"selection": "file", "direction": read_direction(request.direction, hidden)}
    else:
        found = find_direction(model, tokenizer, request, progress)
    direction = unit(found.pop("direction")).astype(np.float32)
    edit = orthogonalize(model, direction, request.scale, request.skip_experts)
    new_config = dict(config)
    if edit["untied_embeddings"]:
        new_config["tie_word_embeddings"] = False
    provenance = {
        "mlxfun_version": _versions().get("mlxfun-core"),
        "method": "abliterate",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_model": str(request.model.resolve()),
        "options": {
            "harmful": str(request.harmful) if request.harmful else None,
            "harmless": str(request.harmless) if request.harmless else None,
            "layer": request.layer,
            "position": request.position,
            "scale": request.scale,
            "skip_experts": request.skip_experts,
            "direction": str(request.direction) if request.direction else None,
            "eval_prompts": request.eval_prompts,
            "seed": request.seed,
        },
        "direction_file": DIRECTION_FILE,
        **found,
        "edit": edit,
        "versions": _versions(),
    }
    inputs = (request.model, request.harmful, request.harmless, request.direction)
    with atomic_output_dir(request.output, request.force, inputs) as tmp:
        save_model_dir(model, request.model, tmp, new_config)
        np.save(tmp / DIRECTION_FILE, direction)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return {**provenance, "output": str(request.output)}


def get_hidden_size(model) -> int:
    from .residual import model_type_of

    embed = writers_for(model_type_of(model)).embed
    from mlxfun.core.adapter import get_path

    module = get_path(model, embed)
    if "scales" in module:
        return int(module.scales.shape[-1] * module.group_size)
    return int(module.weight.shape[-1])
