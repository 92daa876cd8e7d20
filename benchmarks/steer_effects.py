"""What steering does on the shipped models, against steering the same number of random experts.

    # demo model: code experts from a domain scan, code vs prose perplexity
    mlxfun domain-scan --model demo/model --domain demo/data/calib_code.jsonl \\
        --general demo/data/calib_prose.jsonl --no-chat --max-samples 64 --resamples 50 -o code.json
    python benchmarks/steer_effects.py domain --report code.json [--group domain_prompt]

    # chat model: the safety scan's control group, refusal rate on held-out harmful prompts
    mlxfun safety-scan --model demo/chat-model -o safety.json
    python benchmarks/steer_effects.py safety --model demo/chat-model --report safety.json

``domain``: held-out code and prose perplexity (demo/data/eval_*.jsonl, ``--samples`` each,
256 tokens) of the plain model, with the group's experts forced, biased (+1, +3) and masked,
and with the same number of random experts per layer (``--seeds`` seeds, not in the group)
under the same spec. ``safety``: greedy refusal rate (``mlxfun.methods.refusal``) on
demo/data/harmful_eval.jsonl (and harmless_eval.jsonl, for over-refusal) of the plain model,
with the group masked or forced, and with as many random experts per layer masked or forced.
Everything seeded.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from mlx_lm import load as mlx_lm_load
from mlxfun.core.datasets import load_samples
from mlxfun.core.models import load_model, to_runnable_dtype
from mlxfun.methods.amplify import amplify
from mlxfun.methods.evaluate import _eval_sequences, _nll
from mlxfun.methods.steer import adapter_of, ranked_group, steering

ROOT = Path(__file__).resolve().parents[1]


def group_layers(
    report: dict, group: str, top: int | None, per_layer: int | None = None
) -> dict[int, list[int]]:
    """The group's experts by layer (its first ``top``), or with ``per_layer`` the N experts of
    each layer with the highest risk difference in the group's part (beyond the group)."""
    if per_layer:
        part = report["parts"][report["groups"][group]["part"]]["risk_difference"]
        return {
            layer: sorted(int(e) for e in np.argsort(-np.asarray(row), kind="stable")[:per_layer])
            for layer, row in zip(report["moe_layers"], part)
        }
    pairs = ranked_group(report, group)[:top] if top else ranked_group(report, group)
    layers: dict[int, list[int]] = {}
    for layer, expert in pairs:
        layers.setdefault(layer, []).append(expert)
    return layers


def random_like(layers: dict, num_experts: dict, seed: int) -> dict[int, list[int]]:
    """As many experts per layer as ``layers`` names, drawn from the others (seeded)."""
    rng = np.random.default_rng(seed)
    result = {}
    for layer, experts in layers.items():
        others = [e for e in range(num_experts[layer]) if e not in experts]
        result[layer] = sorted(int(e) for e in rng.choice(others, len(experts), replace=False))
    return result


def spec(layers: dict, mode: str, bias: float | None = None) -> dict:
    rules = []
    for layer, experts in sorted(layers.items()):
        rule = {"layer": layer, "experts": experts, "mode": mode}
        if mode == "bias":
            rule["bias"] = bias
        rules.append(rule)
    return {"rules": rules}


def perplexity(model, sequences) -> float:
    nll, _ = _nll(model, sequences, 4)
    return float(np.exp(np.concatenate(nll).mean()))


def domain(args):
    model, tokenizer, config = load_model(args.model)
    adapter = adapter_of(model, config)
    counts = {layer.index: layer.num_experts for layer in adapter.moe_layers(model)}
    report = json.loads(Path(args.report).read_text())
    group = group_layers(report, args.group, args.top, args.per_layer)
    data = {
        name: _eval_sequences(
            load_samples([ROOT / f"demo/data/eval_{name}.jsonl"], args.samples, seed=0),
            tokenizer,
            256,
        )
        for name in ("code", "prose")
    }

    def measure(steer_spec):
        if steer_spec is None:
            return {name: perplexity(model, seqs) for name, seqs in data.items()}
        with steering(model, steer_spec, adapter, config):
            return {name: perplexity(model, seqs) for name, seqs in data.items()}

    plain = measure(None)
    print(f"group {args.group}: {group}")
    print(f"{'condition':<22} {'code ppl':>9} {'prose ppl':>10} {'code/prose':>11}")
    print(
        f"{'plain':<22} {plain['code']:9.2f} {plain['prose']:10.2f} "
        f"{plain['code'] / plain['prose']:11.4f}"
    )
    for mode, bias in (("force", None), ("bias", 1.0), ("bias", 3.0), ("mask", None)):
        label = mode if bias is None else f"bias {bias:+g}"
        got = measure(spec(group, mode, bias))
        ratios = []
        for seed in range(args.seeds):
            r = measure(spec(random_like(group, counts, seed), mode, bias))
            ratios.append((r["code"], r["prose"], r["code"] / r["prose"]))
        mean = [statistics.mean(x[i] for x in ratios) for i in range(3)]
        low, high = min(x[2] for x in ratios), max(x[2] for x in ratios)
        print(
            f"{label + ' group':<22} {got['code']:9.2f} {got['prose']:10.2f} "
            f"{got['code'] / got['prose']:11.4f}"
        )
        print(
            f"{label + ' random (mean)':<22} {mean[0]:9.2f} {mean[1]:10.2f} {mean[2]:11.4f}"
            f"   ratio range {low:.4f}..{high:.4f} over {args.seeds} seeds"
        )
    # the same bias +1 written into a checkpoint, loaded by stock mlx-lm
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "amplified"
        amplify(args.model, spec(group, "bias", 1.0), out)
        amplified, _ = mlx_lm_load(str(out), trust_remote_code=True)
        to_runnable_dtype(amplified)
        got = {name: perplexity(amplified, seqs) for name, seqs in data.items()}
    print(
        f"{'amplified bias +1':<22} {got['code']:9.2f} {got['prose']:10.2f} "
        f"{got['code'] / got['prose']:11.4f}   (checkpoint loaded by stock mlx-lm)"
    )


def safety(args):
    from mlxfun.methods.refusal import is_refusal

    model, tokenizer, config = load_model(args.model)
    adapter = adapter_of(model, config)
    counts = {layer.index: layer.num_experts for layer in adapter.moe_layers(model)}
    report = json.loads(Path(args.report).read_text())
    group = group_layers(report, args.group, args.top, args.per_layer)

    def prompts(name):
        lines = (ROOT / f"demo/data/{name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()][: args.samples]
        return [r["messages"][0]["content"] for r in rows]

    sets = {"harmful": prompts("harmful_eval"), "harmless": prompts("harmless_eval")}

    def rates(steer_spec):
        from mlxfun.methods.refusal import greedy_answer

        result = {}
        for name, items in sets.items():
            if steer_spec is None:
                answers = [greedy_answer(model, tokenizer, p, args.max_tokens) for p in items]
            else:
                with steering(model, steer_spec, adapter, config):
                    answers = [greedy_answer(model, tokenizer, p, args.max_tokens) for p in items]
            result[name] = sum(is_refusal(a) for a in answers) / len(answers)
        return result

    print(f"group {args.group}: {group}")
    print(f"{'condition':<22} {'harmful refused':>16} {'harmless refused':>17}")
    plain = rates(None)
    print(f"{'plain':<22} {plain['harmful']:16.3f} {plain['harmless']:17.3f}")
    for mode in args.modes.split(","):
        got = rates(spec(group, mode))
        print(f"{mode + ' group':<22} {got['harmful']:16.3f} {got['harmless']:17.3f}")
        for seed in range(args.seeds):
            r = rates(spec(random_like(group, counts, seed), mode))
            print(f"{f'{mode} random {seed}':<22} {r['harmful']:16.3f} {r['harmless']:17.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("domain", "safety"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--group", default=None)
    parser.add_argument("--top", type=int, default=None, help="the group's first N experts")
    parser.add_argument(
        "--per-layer", type=int, default=None, help="N highest risk-difference experts per layer"
    )
    parser.add_argument("--modes", default="mask,force", help="safety: mask, force or both")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.what == "domain":
        args.model = args.model or ROOT / "demo/model"
        args.group = args.group or "domain_prompt"
        domain(args)
    else:
        args.model = args.model or ROOT / "demo/chat-model"
        args.group = args.group or "control"
        safety(args)


if __name__ == "__main__":
    main()
