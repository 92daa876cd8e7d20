"""Expert steering: a spec of per-layer expert biases, applied to a loaded model's routing at run
time (``steering(model, spec)``), and the ``steer`` intervention.

A spec (docs/steering.md has the schema) lists rules; each names an MoE layer (decoder index)
or ``"all"``, experts, and a mode: ``mask`` (never selected: bias ``MASK``), ``force`` (always
selected: bias ``FORCE``) or ``bias`` (the rule's ``bias`` value added). The biases enter each
architecture's routing where it forms its selection scores (``mlxfun.core.router_bias``).

Why these values: ``MASK`` = -1e9, as the reference MLX-FUN adds. Added to router logits it
gives a softmax share of exactly 0 in float32 (the expert is excluded as if pruned) and a
sigmoid of exactly 0; added to a correction bias (scores in [0, 1] plus biases of order 1) it is
never among the top-k, and its group's score (the sum of its two best) never counts it while
the group has two other experts. ``FORCE`` = +50, not the reference's +1e4: 50 is far above
any router's spread of logits or selection scores, so the expert is always selected, and small
enough that on a softmax router the other experts' shares stay above 0 (e^-50 is about 2e-22
in float32 and bfloat16). With +1e4 they all underflow to exactly 0, the remaining top-k slots
are picked among ties, and a masked expert (share 0 too) can be picked for one of them. With
+50 the remaining slots go to the experts the model prefers anyway. (Float16 softmax routers
underflow at e^-50 too; mlx-lm computes routers in float32 or bfloat16.) Being finite, the
same values can be written into a checkpoint (``amplify``).
"""

import json
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import attrs
from mlxfun.core.errors import MlxfunError

MASK = -1e9
FORCE = 50.0
MODES = ("mask", "force", "bias")
FORMAT = "mlxfun-steering/1"


@attrs.frozen
class Rule:
    layer: int | str  # decoder index or "all"
    experts: tuple[int, ...]
    mode: str
    bias: float = 0.0

    def value(self) -> float:
        return {"mask": MASK, "force": FORCE}.get(self.mode, self.bias)

    def to_json(self) -> dict:
        item = {"layer": self.layer, "experts": list(self.experts), "mode": self.mode}
        if self.mode == "bias":
            item["bias"] = self.bias
        return item


@attrs.frozen
class SteeringSpec:
    rules: tuple[Rule, ...]
    fingerprint: dict | None = None
    source: dict | None = None  # where the spec came from (a scan report, a group)

    def to_json(self) -> dict:
        data = {"format": FORMAT, "rules": [r.to_json() for r in self.rules]}
        if self.fingerprint is not None:
            data["fingerprint"] = self.fingerprint
        if self.source is not None:
            data["source"] = self.source
        return data

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _fail(where: str, message: str):
    raise MlxfunError(f"{where}: {message}")


def _rule(item, where: str) -> Rule:
    if not isinstance(item, dict):
        _fail(where, "each rule is an object with layer, experts and mode")
    unknown = set(item) - {"layer", "experts", "mode", "bias"}
    if unknown:
        _fail(
            where,
            f"unknown key(s) {', '.join(sorted(unknown))}; a rule has layer, experts, "
            "mode and (for mode bias) bias",
        )
    layer = item.get("layer")
    if not (layer == "all" or (isinstance(layer, int) and not isinstance(layer, bool))):
        _fail(where, f'layer must be a decoder layer index or "all", not {layer!r}')
    experts = item.get("experts")
    if (
        not isinstance(experts, list)
        or not experts
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts)
    ):
        _fail(where, "experts must be a non-empty list of expert indices")
    mode = item.get("mode")
    if mode not in MODES:
        _fail(where, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    bias = item.get("bias", 0.0)
    if mode == "bias":
        if (
            "bias" not in item
            or not isinstance(bias, int | float)
            or isinstance(bias, bool)
            or bias != bias
        ):
            _fail(where, "mode bias needs a numeric bias (the value added to the expert's score)")
    elif "bias" in item:
        _fail(where, f"bias is only read with mode bias (mode {mode} sets its own value)")
    return Rule(layer, tuple(experts), mode, float(bias))


def parse_spec(data, where: str = "steering spec") -> SteeringSpec:
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        _fail(where, 'expected an object with a "rules" list (see docs/steering.md)')
    if data.get("format", FORMAT) != FORMAT:
        _fail(where, f"format {data.get('format')!r} is not {FORMAT!r}")
    rules = tuple(_rule(item, f"{where}: rule {i + 1}") for i, item in enumerate(data["rules"]))
    if not rules:
        _fail(where, "the spec has no rules")
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        _fail(where, "fingerprint must be an object (as mlxfun steer spec writes it) or absent")
    return SteeringSpec(rules, fingerprint, data.get("source"))


def load_spec(path) -> SteeringSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MlxfunError(f"steering spec {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise MlxfunError(f"cannot read steering spec {path}: {exc}") from None
    return parse_spec(data, f"steering spec {path}")


def as_spec(spec) -> SteeringSpec:
    if isinstance(spec, SteeringSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    return load_spec(spec)


# ---------------------------------------------------------------------------------------------
# Resolving a spec against a loaded model


def layer_biases(spec: SteeringSpec, layers) -> dict:
    """``{position: float32 bias (num_experts,)}`` for the model's MoE ``layers``; one-line
    errors for layers and experts that do not exist, an expert both masked and forced, and
    more forced experts than a token can use or so many masked that fewer than top-k remain."""
    import numpy as np

    by_index = {layer.index: layer for layer in layers}
    modes: dict[tuple[int, int], str] = {}
    biases: dict[int, np.ndarray] = {}
    for number, rule in enumerate(spec.rules, 1):
        if rule.layer == "all":
            targets = layers
        elif rule.layer in by_index:
            targets = [by_index[rule.layer]]
        else:
            raise MlxfunError(
                f"steering rule {number}: layer {rule.layer} is not an MoE layer of this model "
                f"(MoE layers: {_ranges(sorted(by_index))}); use a decoder index among them or "
                '"all"'
            )
        for layer in targets:
            bad = [e for e in rule.experts if not 0 <= e < layer.num_experts]
            if bad:
                raise MlxfunError(
                    f"steering rule {number}: layer {layer.index} has experts "
                    f"0..{layer.num_experts - 1}; there is no expert {bad[0]}"
                )
            bias = biases.setdefault(layer.position, np.zeros(layer.num_experts, np.float32))
            for expert in rule.experts:
                before = modes.get((layer.index, expert))
                hard = {before, rule.mode} & {"mask", "force"}
                if before is not None and before != rule.mode and hard:
                    raise MlxfunError(
                        f"steering rule {number}: expert {expert} of layer {layer.index} is "
                        f"both {before} and {rule.mode}; give each expert one mode per layer"
                    )
                modes[(layer.index, expert)] = rule.mode
                if rule.mode == "bias":
                    bias[expert] += rule.value()
                else:
                    bias[expert] = rule.value()
    for layer in layers:
        if layer.position not in biases:
            continue
        forced = sum(modes.get((layer.index, e)) == "force" for e in range(layer.num_experts))
        masked = sum(modes.get((layer.index, e)) == "mask" for e in range(layer.num_experts))
        if forced > layer.top_k:
            raise MlxfunError(
                f"steering: layer {layer.index} forces {forced} experts and each token uses "
                f"{layer.top_k}; force at most {layer.top_k}"
            )
        if layer.num_experts - masked < layer.top_k:
            raise MlxfunError(
                f"steering: layer {layer.index} masks {masked} of {layer.num_experts} experts and "
                f"each token needs {layer.top_k}; mask at most {layer.num_experts - layer.top_k}"
            )
    return biases


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if len(values) <= 8 else f"{values[0]}..{values[-1]}"


def adapter_of(model, config: dict | None = None):
    """The installed adapter for a loaded model (its config, or the model's ``model_type``)."""
    from mlxfun.core import plugins

    if config is None:
        model_type = getattr(model, "model_type", None) or getattr(
            getattr(model, "args", None), "model_type", None
        )
        config = {"model_type": model_type}
    adapter = plugins.adapter_for_config(config)
    if adapter is None:
        raise MlxfunError(f"no installed adapter handles model type {config.get('model_type')!r}")
    return adapter


def check_spec_fingerprint(spec: SteeringSpec, model, adapter, layers, config: dict | None):
    """Refuse a spec written for another model (its fingerprint, when it has one). Without the
    model's config the config hash is not compared (the rest is read from the model)."""
    from mlxfun.core.stats import fingerprint_difference, model_fingerprint

    if spec.fingerprint is None:
        return
    theirs = dict(spec.fingerprint)
    mine = model_fingerprint(config or {}, layers)
    if config is None:  # no config: no hash to compare, the model type judged by the adapter
        theirs.pop("config_hash", None)
        mine.pop("config_hash", None)
        kind = theirs.get("model_type")
        if kind is not None and kind not in adapter.model_types:
            raise MlxfunError(
                f"the steering spec is for model type {kind!r}, this model is "
                f"{adapter.name!r}: build the spec from this model's report"
            )
        mine["model_type"] = kind
    difference = fingerprint_difference(theirs, mine)
    if difference is not None:
        raise MlxfunError(
            "the steering spec was written for another model ("
            + difference.replace("the stats file", "the spec")
            + "); build the spec from this model's report, or drop its fingerprint"
        )


def install_steering(model, spec, adapter=None, config: dict | None = None):
    """Install the spec's biases in the model's routing now; returns the function that removes
    them (the ``steer`` intervention's ``apply``). Arguments as for ``steering``."""
    from mlxfun.core.router_bias import install_router_biases

    spec = as_spec(spec)
    adapter = adapter or adapter_of(model, config)
    layers = adapter.moe_layers(model)
    check_spec_fingerprint(spec, model, adapter, layers, config)
    return install_router_biases(model, adapter, layer_biases(spec, layers), layers)


@contextmanager
def steering(model, spec, adapter=None, config: dict | None = None):
    """``with steering(model, spec): mlx_lm.generate(model, ...)``: the spec's biases enter the
    model's routing for the duration of the block (nothing is left behind afterwards).
    ``spec``: a ``SteeringSpec``, its JSON as a dict, or a path; ``config``: the model's
    config.json (to check the spec's fingerprint fully and find the adapter)."""
    restore = install_steering(model, spec, adapter, config)
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------
# Specs from scan reports


def spec_from_report(
    report: dict, group: str, top: int | None, mode: str, bias: float = 0.0, where="report"
) -> SteeringSpec:
    """A spec from a scan report (``mlxfun safety-scan`` / ``domain-scan`` JSON, docs/scans.md):
    the ``top`` experts of ``group`` over the whole model (all of them when None), ranked as
    ``ranked_group`` ranks them; the report's fingerprint is kept, so the spec is checked
    against the model it is applied to."""
    if mode not in MODES:
        raise MlxfunError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    experts = ranked_group(report, group, where)
    if not experts:
        raise MlxfunError(f"{where}: group {group!r} has no experts; nothing to steer")
    if top is not None:
        if top < 1:
            raise MlxfunError("--top must be at least 1")
        experts = experts[:top]
    by_layer: dict[int, list[int]] = {}
    for layer, expert in experts:
        by_layer.setdefault(layer, []).append(expert)
    rules = tuple(
        Rule(layer, tuple(sorted(e)), mode, float(bias)) for layer, e in sorted(by_layer.items())
    )
    source = {"scan": report.get("scan"), "model": report.get("model"), "group": group, "top": top}
    return SteeringSpec(rules, report.get("fingerprint"), source)


def ranked_group(report: dict, group: str, where: str = "report") -> list[tuple[int, int]]:
    """``[(decoder layer, expert), ...]`` of a report's group, best first: by the group part's
    selection share (the statistic the group's ``selection`` names, ``selection_frequency`` by
    default), then ``risk_difference`` times the group's ``sign`` (both highest first: a twin
    group, sign -1, ranks the experts the reference set prefers most first), then layer and
    expert; in the report's order when it has no such statistics. A group is
    ``{"experts": {"<layer>": [ids]}}`` (the scans' format), or a list of ``{"layer",
    "expert"}`` objects or ``[layer, expert]`` pairs (hand-written, already ranked)."""
    groups = report.get("groups") if isinstance(report, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise MlxfunError(f"{where} has no expert groups; pass the JSON report of a scan")
    if group not in groups:
        raise MlxfunError(
            f"{where} has no group {group!r}; its groups: {', '.join(sorted(groups))}"
        )
    entry = groups[group]
    items = entry.get("experts") if isinstance(entry, dict) else entry
    if isinstance(items, dict):
        try:
            pairs = [(int(layer), int(e)) for layer, ids in items.items() for e in ids or ()]
        except (TypeError, ValueError):
            raise MlxfunError(
                f"{where}: group {group!r} is not a map of layers to experts"
            ) from None
        part = (report.get("parts") or {}).get(entry.get("part")) or {}
        selection = entry.get("selection", "selection_frequency")
        sign = entry.get("sign", 1)
        if not isinstance(selection, str) or sign not in (1, -1):
            raise MlxfunError(
                f"{where}: group {group!r} has a bad 'selection' or 'sign' (a statistic's name, "
                "1 or -1); write the report with mlxfun safety-scan / domain-scan"
            )
        return sorted(pairs, key=_ranking(report, part, selection, sign))
    if not isinstance(items, list):
        raise MlxfunError(f"{where}: group {group!r} is not a list of experts")
    return list(_pairs(items, f"{where}: group {group!r}"))


def _ranking(report: dict, part: dict, selection: str = "selection_frequency", sign: int = 1):
    positions = {layer: p for p, layer in enumerate(report.get("moe_layers") or [])}

    def value(name, layer, expert):
        rows = part.get(name)
        try:
            return float(rows[positions[layer]][expert])
        except (TypeError, KeyError, IndexError, ValueError):
            return 0.0

    def key(pair):
        layer, expert = pair
        return (
            -value(selection, layer, expert),
            -sign * value("risk_difference", layer, expert),
            layer,
            expert,
        )

    return key


def _pairs(items: Iterable, where: str):
    for item in items:
        if isinstance(item, dict) and "layer" in item and "expert" in item:
            yield int(item["layer"]), int(item["expert"])
        elif isinstance(item, list | tuple) and len(item) == 2:
            yield int(item[0]), int(item[1])
        else:
            raise MlxfunError(f"{where}: cannot read expert {item!r} (expected layer and expert)")


# ---------------------------------------------------------------------------------------------
# Generation with and without steering


def generate_pair(
    model,
    tokenizer,
    prompts,
    spec,
    adapter=None,
    config: dict | None = None,
    max_tokens: int = 64,
    chat: bool = False,
    compare: bool = True,
) -> list[dict]:
    """Greedy answers per prompt: ``steered`` (and ``plain``, unsteered, with ``compare``)."""
    from mlx_lm import generate

    from .evaluate import render_prompt

    spec = as_spec(spec)
    adapter = adapter or adapter_of(model, config)
    rows = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt, chat)
        row = {"prompt": prompt}
        with steering(model, spec, adapter, config):
            row["steered"] = generate(model, tokenizer, text, max_tokens=max_tokens)
        if compare:
            row["plain"] = generate(model, tokenizer, text, max_tokens=max_tokens)
        rows.append(row)
    return rows


def spec_for_model(spec: SteeringSpec, model, adapter, config: dict) -> SteeringSpec:
    """The spec with this model's fingerprint (when it has none)."""
    from mlxfun.core.stats import model_fingerprint

    if spec.fingerprint is not None:
        return spec
    return attrs.evolve(spec, fingerprint=model_fingerprint(config, adapter.moe_layers(model)))
