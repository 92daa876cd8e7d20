"""Do the scans find experts that matter? (the "Expert scans" section of benchmarks/RESULTS.md)

1. Chat model (demo/chat-model, when present): `safety-scan` on harmful_calib vs harmless_calib;
   then disable (mask out of routing) the N experts per layer it ranks highest (N = 1, 2, 4;
   and model-wide, the same totals as N = 1 and 2 per layer), N random experts (mean and spread
   over 10 seeds), the N least-used experts and (per layer) the N it ranks lowest, which the
   other set prefers ("scan-reversed"), and measure the refusal rate on held-out
   harmful prompts (mlxfun.methods.refusal.refusal_rate, greedy) and the perplexity of the
   held-out harmless answers given their prompts; rankings by the prompt, response and decision
   (last prompt token) parts. Then (`--steer`, on by default) SteerMoE's two ends at the
   decision position, with the product's steering (``mlxfun.methods.steer.steering``): mask
   the N experts per layer the `decision` group ranks first, force the N its twin
   `harmless_decision` ranks first, both together, and the same three forms with random
   experts; refusal on held-out harmful and harmless prompts and the harmless answers'
   perplexity.
2. Demo model (demo/model): `domain-scan` on calib_code vs calib_prose; disable the N code
   experts per layer vs N random vs N least-used and measure code and prose perplexity
   (eval_code / eval_prose).

"Disabling" masks an expert out of routing as pruning would remove it: a -inf bias on a Linear
router's logits (qwen3_moe), or -1e9 on the correction bias of a sigmoid router (glm4_moe):
the expert is never among the top-k and the other experts' weights are renormalised as usual.
Every configuration is checked with an observed forward (no disabled expert is routed to).
mlx-lm's group-limited routing (n_group > 1) zeroes dropped groups, so a -1e9 bias there can
drop a whole group and let a zeroed expert win: the check then fails rather than mis-measure.
Runtime is kept modest by subsampling (printed with the results).

    python benchmarks/scans.py [--eval-prompts 30] [--seeds 10] [--part chat|domain|both]
        [--no-steer]
"""

import argparse
import math
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlxfun.core import plugins
from mlxfun.core.datasets import load_samples, tokenize_samples
from mlxfun.core.models import load_model
from mlxfun.methods.refusal import refusal_rate
from mlxfun.methods.scan import DOMAIN, SAFETY, ScanRequest, chat_split, scan
from mlxfun.methods.steer import ranked_group, steering
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "demo" / "data"
DEMO_MODEL = ROOT / "demo" / "model"


# ---------------------------------------------------------------------------------------------
# disabling experts


_ORIGINAL_BIAS: dict = {}  # id(gate) -> its correction bias before any masking


def set_disabled(layers, disabled: dict) -> None:
    """Mask ``{position: [experts]}`` out of routing (an empty dict restores the model)."""
    for layer in layers:
        gate = layer.block.gate
        mask = np.zeros(layer.num_experts, dtype=np.float32)
        if hasattr(gate, "e_score_correction_bias"):
            original = _ORIGINAL_BIAS.setdefault(
                id(gate), np.array(gate.e_score_correction_bias, dtype=np.float32)
            )
            mask[list(disabled.get(layer.position, []))] = -1e9
            gate.e_score_correction_bias = mx.array(original + mask)
        else:
            mask[list(disabled.get(layer.position, []))] = -np.inf
            gate.bias = mx.array(mask)


def check_masked(model, adapter, layers, disabled: dict, ids: list[int]) -> None:
    """The disabled experts are never routed to (observed router-faithfully)."""
    from mlxfun.core.observe import Observer

    with Observer(model, adapter, {"selected"}, layers=layers) as observer:
        mx.eval(model(mx.array([ids])))
    for layer, obs in zip(layers, observer.observations()):
        used = set(np.unique(obs.selected).tolist())
        assert not used & set(disabled.get(layer.position, [])), "masking failed"


def per_layer(ranking: np.ndarray, n: int, num_experts) -> dict:
    """The first ``n`` experts of each layer's ranking (an (layers, width) order array)."""
    return {p: [int(e) for e in row if e < num_experts[p]][:n] for p, row in enumerate(ranking)}


def model_wide(scores: np.ndarray, n: int, num_experts) -> dict:
    """The ``n`` highest scores over all layers."""
    flat = [(float(scores[p, e]), p, e) for p in range(len(scores)) for e in range(num_experts[p])]
    flat.sort(key=lambda t: -t[0])
    chosen: dict = {}
    for _, p, e in flat[:n]:
        chosen.setdefault(p, []).append(e)
    return chosen


def _array(rows, width) -> np.ndarray:
    out = np.full((len(rows), width), -np.inf)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# ---------------------------------------------------------------------------------------------
# measures


def answer_perplexity(model, sequences) -> float:
    """Perplexity of the response tokens given everything before them."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = mx.array([seq.ids])
        logits = model(ids[:, :-1]).astype(mx.float32)
        losses = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")[0]
        start = max(seq.prompt_len - 1, 0)
        total += losses[start:].sum().item()
        count += seq.response_len
    return math.exp(total / max(count, 1))


def text_perplexity(model, windows: np.ndarray, batch_size: int = 8) -> float:
    total = 0.0
    for start in range(0, len(windows), batch_size):
        tokens = mx.array(windows[start : start + batch_size])
        logits = model(tokens[:, :-1])
        total += nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def eval_windows(tokenizer, path, budget: int, length: int = 129) -> np.ndarray:
    ids = [t for s in tokenize_samples(load_samples([path]), tokenizer, 10**9) for t in s][:budget]
    count = len(ids) // length
    return np.array(ids[: count * length], dtype=np.int32).reshape(count, length)


def _records(path, limit: int, seed: int = 0):
    samples = load_samples([path])
    rng = np.random.default_rng(seed)
    if limit and limit < len(samples):
        samples = [samples[i] for i in sorted(rng.choice(len(samples), limit, replace=False))]
    return samples


# ---------------------------------------------------------------------------------------------
# experiments


def rankings(report: dict, part: str, group_sets) -> tuple:
    """(scan order, scan score, least-used order, use) per layer from a report's part; use is
    the frequency on both sets together."""
    width = max(report["num_experts"])
    values = report["parts"][part]
    share = _array(values["selection_frequency"], width)
    diff = _array(values["risk_difference"], width)
    score = share + 1e-3 * diff  # selection share first, risk difference breaks ties
    a, b = group_sets
    use = _array(values[f"frequency_{a}"], width) + _array(values[f"frequency_{b}"], width)
    use = np.where(np.isfinite(use), use, np.inf)
    least = np.argsort(use, axis=1, kind="stable")
    return np.argsort(-score, axis=1, kind="stable"), score, least, use


def configurations(report, part, sets, seeds: int, per_layer_n=(1, 2, 4), wide=(1, 2)):
    """(label, N, kind, disabled map) for every configuration."""
    num_experts = report["num_experts"]
    layers = len(num_experts)
    order, score, least, use = rankings(report, part, sets)
    configs = [("none", 0, "baseline", {})]
    for n in per_layer_n:
        configs.append((f"{n}/layer", n, "scan", per_layer(order, n, num_experts)))
        reverse = per_layer(order[:, ::-1], n, num_experts)  # preferred by the other set
        configs.append((f"{n}/layer", n, "scan-reversed", reverse))
        configs.append((f"{n}/layer", n, "least-used", per_layer(least, n, num_experts)))
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            perm = np.stack([rng.permutation(max(num_experts)) for _ in range(layers)])
            configs.append((f"{n}/layer", n, f"random:{seed}", per_layer(perm, n, num_experts)))
    for per in wide:
        n = per * layers
        label = f"{n} model-wide"
        configs.append((label, n, "scan", model_wide(score, n, num_experts)))
        configs.append((label, n, "least-used", model_wide(-use, n, num_experts)))
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            configs.append(
                (label, n, f"random:{seed}", model_wide(rng.random(score.shape), n, num_experts))
            )
    return configs


def summarise(results: list[dict], metrics: list[str]) -> list[dict]:
    """Random rows folded into mean and [min, max] per setting."""
    rows, randoms = [], {}
    for r in results:
        if r["kind"].startswith("random"):
            randoms.setdefault(r["setting"], []).append(r)
        else:
            rows.append(dict(r))
    for setting, runs in randoms.items():
        row = {"setting": setting, "kind": f"random x{len(runs)}"}
        for m in metrics:
            values = [r[m] for r in runs if m in r]
            row[m] = (
                f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else "-"
            )
        rows.append(row)
    order = {s: i for i, s in enumerate(dict.fromkeys(r["setting"] for r in results))}
    kinds = {"baseline": 0, "scan": 1, "scan-reversed": 1.5, "least-used": 3}
    rows.sort(key=lambda r: (order[r["setting"]], kinds.get(r["kind"], 2)))
    return rows


def print_markdown(rows, metrics):
    print("| setting | experts | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for r in rows:
        cells = [r[m] if isinstance(r[m], str) else f"{r[m]:.3f}" for m in metrics]
        cells = [c if c else "-" for c in cells]
        print(f"| {r['setting']} | {r['kind']} | " + " | ".join(cells) + " |")


def group_order(report: dict, group: str) -> np.ndarray:
    """Per layer, every expert ranked by ``steer.ranked_group`` as if the group held them all
    (its selection share, then its sign of the risk difference, then expert id)."""
    everyone = {
        str(layer): list(range(n)) for layer, n in zip(report["moe_layers"], report["num_experts"])
    }
    entry = {**report["groups"][group], "experts": everyone}
    ranked = ranked_group({**report, "groups": {group: entry}}, group)
    width = max(report["num_experts"])  # narrower layers: their missing ids last (never chosen)
    return np.array(
        [
            [e for layer_index, e in ranked if layer_index == layer] + list(range(n, width))
            for layer, n in zip(report["moe_layers"], report["num_experts"])
        ]
    )


def steering_spec(layers, masked: dict, forced: dict) -> dict:
    """A steering spec (docs/steering.md) from ``{position: [experts]}`` to mask and to force."""
    rules = []
    for mode, chosen in (("mask", masked), ("force", forced)):
        for position, experts in chosen.items():
            if experts:
                rules.append({"layer": layers[position].index, "experts": experts, "mode": mode})
    return {"rules": rules}


def steer_configurations(report, layers, seeds: int, per_layer_n=(1, 2)):
    """(setting, kind, masked, forced) for SteerMoE's ends at the decision position: mask the
    ``decision`` group's first N per layer, force ``harmless_decision``'s first N, both; the
    same forms with N random experts per layer (masked and forced ones distinct). Forcing as
    many experts as a token uses (N = top-k) fixes every token's routing in the layer: the mask
    then changes nothing, and the two rows agree."""
    num_experts = report["num_experts"]
    orders = group_order(report, "decision"), group_order(report, "harmless_decision")
    configs = [("none", "baseline", {}, {})]
    for n in per_layer_n:
        masked = per_layer(orders[0], n, num_experts)
        # an expert both ranked first for masking and for forcing (a layer with fewer than N
        # positive differences) is masked only
        forced = per_layer(orders[1], n + n, num_experts)
        forced = {p: [e for e in ids if e not in masked[p]][:n] for p, ids in forced.items()}
        draws = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            perm = [rng.permutation(count).tolist() for count in num_experts]
            draws.append(
                (
                    {p: r[:n] for p, r in enumerate(perm)},
                    {p: r[n : 2 * n] for p, r in enumerate(perm)},
                )
            )
        for form in ("mask", "force", "both"):
            setting = {"mask": f"mask {n}/layer", "force": f"force {n}/layer"}.get(
                form, f"mask {n} + force {n}/layer"
            )
            for kind, (m, f) in [("scan", (masked, forced))] + [
                (f"random:{seed}", draw) for seed, draw in enumerate(draws)
            ]:
                configs.append(
                    (setting, kind, {} if form == "force" else m, {} if form == "mask" else f)
                )
    return configs


def steer_table(args, report, model, tokenizer, layers, harmful, harmless, harmless_prompts):
    """Refusals and harmless perplexity under each steering configuration (printed)."""
    configs = steer_configurations(report, layers, args.seeds, args.steer_per_layer)
    results = []
    for setting, kind, masked, forced in tqdm(configs, desc="steering"):
        spec = steering_spec(layers, masked, forced)
        with steering(model, spec) if spec["rules"] else nullcontext():
            results.append(
                {
                    "setting": setting,
                    "kind": kind,
                    "refusal": refusal_rate(
                        model, tokenizer, harmful, max_tokens=args.answer_tokens
                    ).rate,
                    "harmless_refusal": refusal_rate(
                        model, tokenizer, harmless_prompts, max_tokens=args.answer_tokens
                    ).rate,
                    "harmless_ppl": answer_perplexity(model, harmless),
                }
            )
    top = max(args.steer_per_layer)
    for group in ("decision", "harmless_decision"):
        first = {
            layers[p].index: row[:top].tolist() for p, row in enumerate(group_order(report, group))
        }
        print(f"{group}: first {top} experts per layer {first}")
    print("\n### chat model: steering at the decision position (mask one end, force the other)")
    metrics = ["refusal", "harmless_refusal", "harmless_ppl"]
    print_markdown(summarise(results, metrics), metrics)


def chat_benchmark(args) -> None:
    started = time.perf_counter()
    request = ScanRequest(
        kind=SAFETY,
        model=args.chat_model,
        sets=(args.chat_data / "harmful_calib.jsonl", args.chat_data / "harmless_calib.jsonl"),
        max_samples=args.calib_prompts,
        resamples=args.resamples,
        top=args.top,
        progress=True,
    )
    report = scan(request)
    scanned = time.perf_counter() - started
    model, tokenizer, config = load_model(args.chat_model)
    adapter = plugins.adapter_for_config(config)
    layers = adapter.moe_layers(model)
    harmful = [
        next(m["content"] for m in s.messages if m["role"] == "user")
        for s in _records(args.chat_data / "harmful_eval.jsonl", args.eval_prompts)
    ]
    harmless_records = _records(args.chat_data / "harmless_eval.jsonl", args.eval_prompts)
    harmless = [chat_split(s.messages, tokenizer, s.source) for s in harmless_records]
    harmless_prompts = [
        next(m["content"] for m in s.messages if m["role"] == "user") for s in harmless_records
    ]
    groups = {g: sum(map(len, i["experts"].values())) for g, i in report["groups"].items()}
    print(f"\nsafety-scan: {report['sets']}, selected {groups}, {scanned:.0f} s")
    for part in args.parts:
        results = []
        configs = configurations(
            report, part, SAFETY.sets, args.seeds, args.per_layer, args.model_wide
        )
        for setting, _n, kind, disabled in tqdm(configs, desc=part):
            set_disabled(layers, disabled)
            check_masked(model, adapter, layers, disabled, harmless[0].ids)
            rate = refusal_rate(model, tokenizer, harmful, max_tokens=args.answer_tokens).rate
            ppl = answer_perplexity(model, harmless)
            row = {"setting": setting, "kind": kind, "refusal": rate, "harmless_ppl": ppl}
            if not kind.startswith("random"):  # over-refusal, where it costs little
                row["harmless_refusal"] = refusal_rate(
                    model, tokenizer, harmless_prompts, max_tokens=args.answer_tokens
                ).rate
            results.append(row)
        set_disabled(layers, {})
        print(f"\n### chat model: disabling by the {part}-token ranking")
        metrics = ["refusal", "harmless_ppl", "harmless_refusal"]
        print_markdown(summarise(results, metrics), metrics)
    if args.steer:
        steer_table(args, report, model, tokenizer, layers, harmful, harmless, harmless_prompts)
    print(
        f"\n{len(harmful)} held-out harmful prompts ({args.answer_tokens} greedy tokens), "
        f"{len(harmless)} held-out harmless answers; {time.perf_counter() - started:.0f} s"
    )


def domain_benchmark(args) -> None:
    started = time.perf_counter()
    request = ScanRequest(
        kind=DOMAIN,
        model=DEMO_MODEL,
        sets=(DEMO_DATA / "calib_code.jsonl", DEMO_DATA / "calib_prose.jsonl"),
        response_tokens=0,
        resamples=args.resamples,
        top=args.top,
        progress=True,
    )
    report = scan(request)
    model, tokenizer, config = load_model(DEMO_MODEL)
    adapter = plugins.adapter_for_config(config)
    layers = adapter.moe_layers(model)
    evals = {
        d: eval_windows(tokenizer, DEMO_DATA / f"eval_{d}.jsonl", args.eval_tokens)
        for d in ("code", "prose")
    }
    results = []
    configs = configurations(
        report, "prompt", DOMAIN.sets, args.seeds, args.per_layer, args.model_wide
    )
    for setting, _n, kind, disabled in tqdm(configs, desc="domain"):
        set_disabled(layers, disabled)
        check_masked(model, adapter, layers, disabled, evals["code"][0].tolist())
        row = {"setting": setting, "kind": kind}
        row.update({f"{d}_ppl": text_perplexity(model, w) for d, w in evals.items()})
        results.append(row)
    set_disabled(layers, {})
    groups = {g: sum(map(len, i["experts"].values())) for g, i in report["groups"].items()}
    print(f"\n### demo model: domain-scan code vs prose, selected {groups}")
    print_markdown(summarise(results, ["code_ppl", "prose_ppl"]), ["code_ppl", "prose_ppl"])
    tokens = {d: int(w.size) for d, w in evals.items()}
    print(f"\neval tokens {tokens}; {time.perf_counter() - started:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["chat", "domain", "both"], default="both")
    parser.add_argument("--chat-model", type=Path, default=ROOT / "demo" / "chat-model")
    parser.add_argument("--chat-data", type=Path, default=DEMO_DATA, help="harm*_{calib,eval}")
    parser.add_argument("--seeds", type=int, default=10, help="random draws per setting")
    parser.add_argument("--eval-prompts", type=int, default=30, help="held-out prompts per set")
    parser.add_argument("--calib-prompts", type=int, default=None, help="scan subsample")
    parser.add_argument("--answer-tokens", type=int, default=12, help="greedy refusal tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="per domain")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument(
        "--parts",
        default="response,prompt,decision",
        help="chat: rankings by these parts' scores ('' for none)",
    )
    parser.add_argument(
        "--steer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="chat: the steering table at the decision position (mask decision, force "
        "harmless_decision, both; random forms)",
    )
    parser.add_argument("--steer-per-layer", default="1,2", help="steering: N experts per layer")
    parser.add_argument("--per-layer", default="1,2,4", help="N experts disabled per layer")
    parser.add_argument(
        "--model-wide", default="1,2", help="model-wide totals, in multiples of the layer count"
    )
    args = parser.parse_args()
    args.per_layer = [int(n) for n in args.per_layer.split(",") if n]
    args.model_wide = [int(n) for n in args.model_wide.split(",") if n]
    args.parts = [p for p in args.parts.split(",") if p]
    args.steer_per_layer = [int(n) for n in args.steer_per_layer.split(",") if n]
    print(f"{platform.platform()}, mlx {mx.__version__}")
    if args.part in ("chat", "both"):
        if (args.chat_model / "config.json").is_file():
            chat_benchmark(args)
        else:
            print(f"no chat model at {args.chat_model}: skipped the safety part")
    if args.part in ("domain", "both"):
        domain_benchmark(args)


if __name__ == "__main__":
    main()
