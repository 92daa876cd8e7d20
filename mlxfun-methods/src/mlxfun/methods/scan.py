"""Expert scans: which experts two prompt sets route to differently (definitions in
docs/scans.md).

``safety-scan`` compares harmful with harmless prompts, ``domain-scan`` a domain with general
text; both are one machinery. Each prompt becomes one token sequence split into prompt tokens
and response tokens (the assistant part of a chat record, or a greedy continuation of a plain
prompt); the last ``decision_tokens`` prompt tokens (the generation prompt, whose output is the
answer's first token) are a third part, ``decision``, counted in ``prompt`` too. One forward per
batch, observed router-faithfully (``mlxfun.core.observe``), counts per prompt, layer and expert
how many of the prompt's tokens of each part routed to the expert among their top-k. Everything
else is computed from these counts: activation frequencies, their risk difference (SteerMoE)
and the bootstrap stability selection, which resamples prompts without running the model
again. Every part names two groups: the experts the first set prefers, and their twin at the
other end of the ranking, the experts the reference set prefers.
"""

import json
import os
from pathlib import Path

import attrs
import numpy as np
from mlxfun.core.errors import MlxfunError

PARTS = ("prompt", "response", "decision")
# 2: the decision part, twin groups (preferring the reference set) and the statistics that rank
# them; format 1 reports (no decision part, every group preferring the first set) still load
REPORT_FORMAT = 2


@attrs.frozen
class ScanKind:
    name: str
    sets: tuple[str, str]  # (set the groups prefer, the reference set)
    groups: dict  # group name -> part: experts the first set prefers
    twins: dict  # group name -> part: experts the reference set prefers (the ranking's other end)

    def all_groups(self) -> list[tuple[str, str, bool]]:
        """``(group, part, twin)`` of every group, the first set's groups first."""
        return [(g, p, False) for g, p in self.groups.items()] + [
            (g, p, True) for g, p in self.twins.items()
        ]


SAFETY = ScanKind(
    "safety-scan",
    ("harmful", "harmless"),
    {"detection": "prompt", "control": "response", "decision": "decision"},
    {
        "harmless_detection": "prompt",
        "harmless_control": "response",
        "harmless_decision": "decision",
    },
)
DOMAIN = ScanKind(
    "domain-scan",
    ("domain", "general"),
    {"domain_prompt": "prompt", "domain_response": "response", "domain_decision": "decision"},
    {"general_prompt": "prompt", "general_response": "response", "general_decision": "decision"},
)
KINDS = {kind.name: kind for kind in (SAFETY, DOMAIN)}


@attrs.define
class ScanRequest:
    kind: ScanKind
    model: Path = attrs.field(converter=Path)
    sets: tuple  # (path of the preferred set, path of the reference set)
    output: Path | None = attrs.field(default=None)
    response_tokens: int = 32
    decision_tokens: int = 1
    max_tokens: int = 256
    max_samples: int | None = None
    resamples: int = 200
    top: int = 2
    threshold: float = 0.8
    seed: int = 0
    batch_size: int = 8
    chat: bool = True
    progress: bool = False


# ---------------------------------------------------------------------------------------------
# Prompt / response split


@attrs.define
class Sequence:
    """One prompt's tokens; ``ids[:prompt_len]`` are prompt tokens, the rest response tokens."""

    ids: list
    prompt_len: int
    source: str

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len

    def part_masks(self, decision_tokens: int) -> dict:
        """``{part: bool (len(ids),)}``: which positions belong to each part; the decision
        positions are the last ``decision_tokens`` prompt positions (all of a shorter prompt)."""
        position = np.arange(len(self.ids))
        prompt = position < self.prompt_len
        start = self.prompt_len - min(decision_tokens, self.prompt_len)
        return {"prompt": prompt, "response": ~prompt, "decision": prompt & (position >= start)}


def _encode(tokenizer, text: str, templated: bool) -> list[int]:
    # a rendered chat template carries its own special tokens
    return list(tokenizer.encode(text, add_special_tokens=not templated))


def _render_text(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _render_chat(tokenizer, messages, generation_prompt: bool) -> list[int]:
    return _encode(tokenizer, _render_text(tokenizer, messages, generation_prompt), True)


def _common_suffix(a, b, limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def chat_split(messages: list, tokenizer, source: str) -> Sequence:
    """The conversation up to its last assistant message as tokens, the assistant content being
    the response. The prompt is the rendering of the messages before it with the generation
    prompt; the template's tokens after the content (end of turn) are those the full rendering
    shares at its end with a rendering whose answer is empty, and are dropped. Token level when
    the prompt's tokens are a prefix of the full rendering's; otherwise (a tokenizer that merges
    across the boundary) text level: the prompt text and the answer's text tokenized apart."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    empty_turn = [*before, {"role": "assistant", "content": ""}]
    prefix = _render_chat(tokenizer, before, True)
    full = _render_chat(tokenizer, messages[: last + 1], False)
    if full[: len(prefix)] == prefix:
        empty = _render_chat(tokenizer, empty_turn, False)
        trailer = 0
        if empty[: len(prefix)] == prefix:
            trailer = _common_suffix(full, empty, min(len(full), len(empty)) - len(prefix))
        return Sequence(ids=full[: len(full) - trailer], prompt_len=len(prefix), source=source)
    prefix_text = _render_text(tokenizer, before, True)
    full_text = _render_text(tokenizer, messages[: last + 1], False)
    empty_text = _render_text(tokenizer, empty_turn, False)
    if not full_text.startswith(prefix_text):
        raise MlxfunError(
            f"{source}: the chat template renders the conversation without the prompt as its "
            "prefix, so the assistant's tokens cannot be told apart; pass plain 'prompt' records"
        )
    trailer = 0
    if empty_text.startswith(prefix_text):
        limit = min(len(full_text), len(empty_text)) - len(prefix_text)
        trailer = _common_suffix(full_text, empty_text, limit)
    answer = full_text[len(prefix_text) : len(full_text) - trailer]
    ids = prefix + _encode(tokenizer, answer, True)
    return Sequence(ids=ids, prompt_len=len(prefix), source=source)


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_tokens(sample, tokenizer, chat: bool) -> tuple[list[int], list[int] | None]:
    """``(prompt ids, response ids or None)`` of one dataset record; None: to be generated."""
    templated = chat and _has_template(tokenizer)
    if sample.messages is not None:
        if not _has_template(tokenizer):
            raise MlxfunError(
                f"{sample.source}: 'messages' need a chat template and this model's tokenizer "
                "has none; use 'prompt' or 'text' records"
            )
        if any(m["role"] == "assistant" for m in sample.messages):
            seq = chat_split(sample.messages, tokenizer, sample.source)
            return seq.ids[: seq.prompt_len], seq.ids[seq.prompt_len :]
        return _render_chat(tokenizer, sample.messages, True), None
    text = sample.text if sample.text is not None else sample.prompt
    if templated:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = _encode(tokenizer, rendered, True)
    else:
        ids = _encode(tokenizer, text, False)
    if sample.completion:
        return ids, _encode(tokenizer, sample.completion, True)
    return ids, None


def greedy_ids(model, ids: list[int], max_tokens: int, eos: set) -> list[int]:
    """Greedy continuation of ``ids``, stopped before an end-of-sequence token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    if max_tokens <= 0:
        return out
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        token = int(token)
        if token in eos:
            break
        out.append(token)
        if len(out) == max_tokens:
            break
    return out


def build_sequences(samples, model, tokenizer, request: ScanRequest, desc: str) -> list:
    """One ``Sequence`` per record: chat records (and prompt/completion records) keep their
    answer, the whole sequence cut to ``max_tokens``; plain prompts are cut to ``max_tokens``
    and continued greedily for up to ``response_tokens`` more."""
    from tqdm import tqdm

    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    sequences = []
    for sample in tqdm(samples, desc=desc, disable=not request.progress, dynamic_ncols=True):
        prompt, response = prompt_tokens(sample, tokenizer, request.chat)
        if not prompt:
            raise MlxfunError(f"{sample.source}: the prompt has no tokens")
        if response is None:
            prompt = prompt[: request.max_tokens]
            ids = prompt + greedy_ids(model, prompt, request.response_tokens, eos)
        else:
            ids = (prompt + response)[: request.max_tokens]
        sequences.append(
            Sequence(ids=ids, prompt_len=min(len(prompt), len(ids)), source=sample.source)
        )
    return sequences


# ---------------------------------------------------------------------------------------------
# Routing counts


@attrs.define
class SetCounts:
    """Per prompt, layer and expert: tokens of each part that routed to the expert (top-k)."""

    name: str
    path: str
    counts: dict  # part -> int64 (prompts, layers, width)
    tokens: dict  # part -> int64 (prompts,)


def routed_counts(
    model, adapter, sequences, batch_size: int, progress: bool = False, decision_tokens: int = 1
) -> dict:
    """``{part: (counts, tokens)}`` over ``sequences``, observed with the model's own routing."""
    import mlx.core as mx
    from mlxfun.core.datasets import batches
    from mlxfun.core.observe import Observer
    from tqdm import tqdm

    layers = adapter.moe_layers(model)
    width = max(layer.num_experts for layer in layers)
    n = len(sequences)
    counts = {part: np.zeros((n, len(layers), width), np.int64) for part in PARTS}
    tokens = {part: np.zeros(n, np.int64) for part in PARTS}
    observer = Observer(model, adapter, {"selected"}, layers=layers)
    bar = tqdm(total=n, desc="routing", disable=not progress, dynamic_ncols=True)
    start = 0
    for batch, mask in batches([s.ids for s in sequences], batch_size):
        chunk = sequences[start : start + len(batch)]
        with observer:
            mx.eval(model(mx.array(batch)))
        observations = observer.observations(mask)
        # row-major over the real tokens: sequence id and parts of every observed token
        seq_id = np.concatenate([np.full(len(s.ids), start + i) for i, s in enumerate(chunk)])
        masks = [s.part_masks(decision_tokens) for s in chunk]
        for part in PARTS:
            rows = np.concatenate([m[part] for m in masks])
            tokens[part] += np.bincount(seq_id[rows], minlength=n)
            for position, obs in enumerate(observations):
                selected = obs.selected[rows]
                flat = np.repeat(seq_id[rows], selected.shape[1]) * width + selected.reshape(-1)
                counts[part][:, position, :] += np.bincount(flat, minlength=n * width).reshape(
                    n, width
                )
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    return {part: (counts[part], tokens[part]) for part in PARTS}


# ---------------------------------------------------------------------------------------------
# Statistics


def frequency(counts: np.ndarray, tokens: np.ndarray, weights=None) -> np.ndarray:
    """Share of the (weighted) prompts' tokens whose top-k includes each expert: (layers, width).
    ``weights``: how often each prompt counts (a bootstrap resample); 1 each by default."""
    if weights is None:
        total, routed = tokens.sum(), counts.sum(axis=0)
    else:
        total = weights @ tokens
        routed = np.tensordot(weights, counts, axes=1)
    return routed / total if total else np.zeros(counts.shape[1:])


def prompt_mean_frequency(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mean over the prompts that have tokens of the part of each prompt's own frequency (every
    prompt weighs the same, however long)."""
    used = tokens > 0
    if not used.any():
        return np.zeros(counts.shape[1:])
    return (counts[used] / tokens[used, None, None]).mean(axis=0)


def top_mask(scores: np.ndarray, top: int, num_experts) -> np.ndarray:
    """Per layer, the ``top`` experts of highest positive score (ties: lower expert id)."""
    scores = np.where(_existing(scores.shape, num_experts), scores, -np.inf)
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[-1])[None, :], axis=-1)
    return (ranks < top) & (scores > 0)


def _existing(shape, num_experts) -> np.ndarray:
    return np.arange(shape[-1])[None, :] < np.asarray(num_experts)[:, None]


def selection_frequencies(a, b, top: int, resamples: int, seed: int, num_experts) -> tuple:
    """``(preferred, reversed)``: share of ``resamples`` bootstrap resamples (each set's prompts
    drawn with replacement, seeded) in which each expert ranks in its layer's ``top`` by risk
    difference (above 0), and by the reversed difference (reference minus preferred: the twin
    groups), from the same draws. ``a``, ``b``: ``(counts, tokens)`` of the preferred and the
    reference set."""
    rng = np.random.default_rng(seed)
    (ca, ta), (cb, tb) = a, b
    hits = np.zeros(ca.shape[1:], np.int64)
    twin_hits = np.zeros(ca.shape[1:], np.int64)
    for _ in range(resamples):
        wa = np.bincount(rng.integers(0, len(ta), len(ta)), minlength=len(ta))
        wb = np.bincount(rng.integers(0, len(tb), len(tb)), minlength=len(tb))
        difference = frequency(ca, ta, wa) - frequency(cb, tb, wb)
        hits += top_mask(difference, top, num_experts)
        twin_hits += top_mask(-difference, top, num_experts)
    return hits / max(resamples, 1), twin_hits / max(resamples, 1)


def selection_frequency(a, b, top: int, resamples: int, seed: int, num_experts) -> np.ndarray:
    """The preferred set's share of ``selection_frequencies``."""
    return selection_frequencies(a, b, top, resamples, seed, num_experts)[0]


def part_scores(a, b, request: ScanRequest, num_experts) -> dict:
    """Every statistic of one part (arrays of shape (layers, width))."""
    (ca, ta), (cb, tb) = a, b
    fa, fb = frequency(ca, ta), frequency(cb, tb)
    selected, reverse = selection_frequencies(
        a, b, request.top, request.resamples, request.seed, num_experts
    )
    return {
        "frequency_a": fa,
        "frequency_b": fb,
        "risk_difference": fa - fb,
        "prompt_mean_difference": prompt_mean_frequency(ca, ta) - prompt_mean_frequency(cb, tb),
        "selection_frequency": selected,
        "reverse_selection_frequency": reverse,
    }


# ---------------------------------------------------------------------------------------------
# The scan


def _check_options(request: ScanRequest) -> None:
    checks = [
        (request.resamples >= 1, f"--resamples must be at least 1, got {request.resamples}"),
        (request.top >= 1, f"--top must be at least 1, got {request.top}"),
        (
            0 < request.threshold <= 1,
            f"--threshold must be in (0, 1], got {request.threshold}",
        ),
        (request.response_tokens >= 0, "--response-tokens must be 0 or more"),
        (
            request.decision_tokens >= 1,
            "--decision-tokens must be at least 1 (the last N prompt tokens; 1: the one whose "
            f"output is the answer's first token), got {request.decision_tokens}",
        ),
        (request.max_tokens >= 1, "--max-tokens must be at least 1"),
        (request.batch_size >= 1, "--batch-size must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise MlxfunError(message)


def _load_set(path, request: ScanRequest, option: str):
    from mlxfun.core.datasets import load_samples

    path = Path(path)
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
        raise MlxfunError(f"{option} {path} is empty; it needs one JSON record per line")
    return load_samples([path], request.max_samples, request.seed)


def _check_response_tokens(sets, names, options, request: ScanRequest) -> list[str]:
    """Parts that have tokens in both sets; a set without response tokens is bad input unless
    ``--response-tokens 0`` turned responses off."""
    for counts, name, option in zip(sets, names, options):
        if counts["prompt"][1].sum() == 0:
            raise MlxfunError(f"{option}: the {name} prompts have no prompt tokens")
        if counts["response"][1].sum() == 0 and request.response_tokens > 0:
            raise MlxfunError(
                f"{option}: the {name} prompts have no response tokens (the chat answers are "
                "empty or every greedy continuation ended at once); give chat records with "
                "assistant answers, or --response-tokens 0 to scan the prompts only"
            )
    return [p for p in PARTS if all(counts[p][1].sum() > 0 for counts in sets)]


def _nested(array: np.ndarray, num_experts, digits: int = 6) -> list:
    return [[round(float(v), digits) for v in row[:n]] for row, n in zip(array, num_experts)]


def scan(request: ScanRequest) -> dict:
    """Run one scan and return its report (a dict ready for JSON); write it to
    ``request.output`` when given."""
    from mlxfun.core import plugins
    from mlxfun.core.models import load_model
    from mlxfun.core.outputs import check_output_file
    from mlxfun.core.stats import model_fingerprint

    _check_options(request)
    kind = request.kind
    options = [f"--{name}" for name in kind.sets]
    if request.output is not None:
        check_output_file(request.output, inputs=(request.model, *request.sets))
    samples = [_load_set(p, request, o) for p, o in zip(request.sets, options)]
    model, tokenizer, config = load_model(request.model)
    adapter = plugins.adapter_for_config(config)
    layers = adapter.moe_layers(model)
    if not layers:
        raise MlxfunError(f"{adapter.name}: found no MoE layers in {request.model}")
    num_experts = [layer.num_experts for layer in layers]
    routed = []
    for name, set_samples in zip(kind.sets, samples):
        sequences = build_sequences(set_samples, model, tokenizer, request, f"{name} prompts")
        routed.append(
            (
                routed_counts(
                    model,
                    adapter,
                    sequences,
                    request.batch_size,
                    request.progress,
                    request.decision_tokens,
                ),
                sequences,
            )
        )
    counts = [r[0] for r in routed]
    parts = _check_response_tokens(counts, kind.sets, options, request)
    scores = {p: part_scores(counts[0][p], counts[1][p], request, num_experts) for p in parts}
    report = _report(request, model_fingerprint(config, layers), layers, routed, scores)
    if request.output is not None:
        write_report(report, request.output)
    return report


def _report(request, fingerprint, layers, routed, scores) -> dict:
    from mlxfun.core import __version__

    kind = request.kind
    num_experts = [layer.num_experts for layer in layers]
    a, b = kind.sets
    sets = {}
    for name, path, (counts, sequences) in zip(kind.sets, request.sets, routed):
        sets[name] = {
            "path": str(path),
            "prompts": len(sequences),
            "tokens": {part: int(counts[part][1].sum()) for part in PARTS},
        }
    parts = {}
    for part, values in scores.items():
        parts[part] = {
            f"frequency_{a}": _nested(values["frequency_a"], num_experts),
            f"frequency_{b}": _nested(values["frequency_b"], num_experts),
            "risk_difference": _nested(values["risk_difference"], num_experts),
            "prompt_mean_difference": _nested(values["prompt_mean_difference"], num_experts),
            "selection_frequency": _nested(values["selection_frequency"], num_experts, 4),
            "reverse_selection_frequency": _nested(
                values["reverse_selection_frequency"], num_experts, 4
            ),
        }
    groups = {}
    for group, part, twin in kind.all_groups():
        if part not in scores:
            continue
        # what ranks the group (steer.ranked_group): its selection share, then its sign of the
        # risk difference
        selection = "reverse_selection_frequency" if twin else "selection_frequency"
        chosen = scores[part][selection] >= request.threshold - 1e-12
        groups[group] = {
            "part": part,
            "prefers": b if twin else a,
            "selection": selection,
            "sign": -1 if twin else 1,
            "experts": {
                str(layer.index): [int(e) for e in np.flatnonzero(row[: layer.num_experts])]
                for layer, row in zip(layers, chosen)
            },
        }
    return {
        "format": REPORT_FORMAT,
        "scan": kind.name,
        "model": str(request.model),
        "fingerprint": fingerprint,
        "moe_layers": [layer.index for layer in layers],
        "num_experts": num_experts,
        "sets": sets,
        "options": {
            "response_tokens": request.response_tokens,
            "decision_tokens": request.decision_tokens,
            "max_tokens": request.max_tokens,
            "max_samples": request.max_samples,
            "resamples": request.resamples,
            "top": request.top,
            "threshold": request.threshold,
            "seed": request.seed,
            "chat": request.chat,
        },
        "parts": parts,
        "groups": groups,
        "mlxfun_version": __version__,
    }


def write_report(report: dict, path) -> None:
    """Write the report JSON under a temporary name, then move it into place."""
    from mlxfun.core.outputs import remove_stale_siblings, run_tag

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{run_tag()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise MlxfunError(f"cannot write the report {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
