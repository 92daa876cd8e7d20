"""Abliteration of the bundled chat MoE (the abliteration section of benchmarks/RESULTS.md).

    python benchmarks/abliterate.py [--model demo/chat-model] [--work /tmp/abl] [--max-tokens 32]

Runs ``mlxfun abliterate`` (``--layer auto`` on the shipped calibration prompt sets) and, with the
direction it chose, the same edit with ``--skip-experts`` (dense writers only: embeddings,
attention outputs, dense and shared-expert down projections), then a 4-bit copy of the chat model
(mlx-lm's quantizer, group size 64) edited with the same direction. For each model it prints:

- refusal rate (``methods.refusal``, greedy, ``--max-tokens``) on the held-out harmful_eval and
  harmless_eval prompts;
- KL(P_original || P_model) of the next token after each harmless_eval prompt, against the
  unedited model of the same precision;
- perplexity on demo/data eval_code and eval_prose (``methods.evaluate``), change against the
  unedited model of the same precision.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mlxfun.core.models import load_model
from mlxfun.methods.abliterate import last_logprobs, load_prompts, mean_kl
from mlxfun.methods.evaluate import evaluate
from mlxfun.methods.refusal import refusal_rate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo" / "data"


def mlxfun(*args, reuse=None):
    if reuse is not None and (reuse / "mlxfun.json").is_file():
        return 0.0
    cmd = [sys.executable, "-m", "mlxfun.cli", *[str(a) for a in args]]
    print("$ mlxfun " + " ".join(str(a) for a in args), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def quantize(source: Path, out: Path, bits=4, group_size=64) -> None:
    """A 4-bit copy as mlx_lm.convert writes one (every layer whose input size the group size
    divides, gates included)."""
    import mlx.nn as nn
    from mlx_lm.utils import save_model
    from mlxfun.core.models import copy_tokenizer_files

    if out.exists():
        return
    model, _, config = load_model(source)
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: (
            hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
        ),
    )
    out.mkdir(parents=True)
    save_model(out, model)
    config = dict(config, quantization={"group_size": group_size, "bits": bits})
    (out / "config.json").write_text(json.dumps(config, indent=4))
    copy_tokenizer_files(source, out)


def measure(model_dir, reference, harmful, harmless, max_tokens):
    model, tokenizer, _ = load_model(model_dir)
    bad = refusal_rate(model, tokenizer, harmful, max_tokens=max_tokens)
    good = refusal_rate(model, tokenizer, harmless, max_tokens=max_tokens)
    logp = last_logprobs(model, tokenizer, harmless)
    row = {
        "harmful_refusal": bad.rate,
        "harmless_refusal": good.rate,
        "kl": 0.0 if reference is None else mean_kl(reference, logp),
        "example": bad.answers[0][:80],
    }
    return row, logp


def eval_set(data: Path, domain: str) -> Path:
    """The chat-formatted evaluation set where there is one (the chat model's own format),
    else the plain text one."""
    chat = data / f"chat_eval_{domain}.jsonl"
    return chat if chat.is_file() else data / f"eval_{domain}.jsonl"


def perplexities(dirs, data, max_samples):
    out = {}
    for domain in ("code", "prose"):
        result = evaluate(dirs, [eval_set(data, domain)], max_samples=max_samples)
        out[domain] = [m["perplexity"] for m in result["models"]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "chat-model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlxfun-abliterate-bench"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ppl-samples", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the prompt sets")
    parser.add_argument("--limit", type=int, default=None, help="first N eval prompts only")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the edited models already in --work"
    )
    opts = parser.parse_args()
    data = opts.data
    work = opts.work
    work.mkdir(parents=True, exist_ok=True)
    harmful = load_prompts(data / "harmful_eval.jsonl", "harmful_eval")[: opts.limit]
    harmless = load_prompts(data / "harmless_eval.jsonl", "harmless_eval")[: opts.limit]
    full, skip = work / "abliterated", work / "skip-experts"
    q4, q4_full = work / "q4", work / "q4-abliterated"
    seconds = {}
    seconds["auto"] = mlxfun(
        "abliterate", "--model", opts.model, "-o", full, "--force",
        "--eval-prompts", opts.eval_prompts, "--harmful", data / "harmful_calib.jsonl",
        "--harmless", data / "harmless_calib.jsonl", reuse=full if opts.reuse else None,
    )  # fmt: skip
    direction = full / "refusal_direction.npy"
    seconds["skip"] = mlxfun(
        "abliterate", "--model", opts.model, "--direction", direction, "--skip-experts",
        "-o", skip, "--force", reuse=skip if opts.reuse else None,
    )  # fmt: skip
    quantize(opts.model, q4)
    seconds["q4"] = mlxfun(
        "abliterate", "--model", q4, "--direction", direction, "-o", q4_full, "--force",
        reuse=q4_full if opts.reuse else None,
    )  # fmt: skip
    record = json.loads((full / "mlxfun.json").read_text())
    q4_record = json.loads((q4_full / "mlxfun.json").read_text())
    print("\ncandidates (held-out calib prompts):")
    print("| layer | refusal rate | KL |\n|---:|---:|---:|")
    for r in record["candidates"]:
        rate = "n/a" if r["refusal_rate"] is None else f"{r['refusal_rate']:.2f}"
        kl = "n/a" if r["kl"] is None else f"{r['kl']:.3f}"
        print(f"| {r['layer']} | {rate} | {kl} |")
    print(f"chosen layer {record['layer']}: {record['rule']}")

    rows = {}
    base_row, base_logp = measure(opts.model, None, harmful, harmless, opts.max_tokens)
    rows["original"] = base_row
    rows["abliterated"], _ = measure(full, base_logp, harmful, harmless, opts.max_tokens)
    rows["abliterated --skip-experts"], _ = measure(
        skip, base_logp, harmful, harmless, opts.max_tokens
    )
    q4_row, q4_logp = measure(q4, None, harmful, harmless, opts.max_tokens)
    rows["4-bit"] = q4_row
    rows["4-bit abliterated"], _ = measure(q4_full, q4_logp, harmful, harmless, opts.max_tokens)
    ppl = perplexities([opts.model, full, skip], data, opts.ppl_samples)
    ppl_q4 = perplexities([q4, q4_full], data, opts.ppl_samples)
    order = ["original", "abliterated", "abliterated --skip-experts", "4-bit", "4-bit abliterated"]
    ppls = {name: (ppl["code"][i], ppl["prose"][i]) for i, name in enumerate(order[:3])}
    ppls.update({name: (ppl_q4["code"][i], ppl_q4["prose"][i]) for i, name in enumerate(order[3:])})
    base = {"original": "original", "abliterated": "original"}
    base.update({"abliterated --skip-experts": "original", "4-bit": "4-bit"})
    base["4-bit abliterated"] = "4-bit"
    print(
        f"\n{len(harmful)} harmful_eval, {len(harmless)} harmless_eval prompts, greedy "
        f"{opts.max_tokens} tokens; perplexity on {opts.ppl_samples} samples of "
        f"{eval_set(data, 'code').name} and {eval_set(data, 'prose').name}"
    )
    print("| model | harmful refused | harmless refused | KL harmless | code ppl | prose ppl |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in order:
        r = rows[name]
        code, prose = ppls[name]
        b_code, b_prose = ppls[base[name]]
        print(
            f"| {name} | {r['harmful_refusal']:.0%} | {r['harmless_refusal']:.0%} | {r['kl']:.4f} "
            f"| {code:.1f} ({(code / b_code - 1):+.1%}) | {prose:.1f} ({(prose / b_prose - 1):+.1%}) |"
        )
    q = q4_record["edit"].get("requantization_error", {})
    print(
        f"\n4-bit requantization added a relative weight error of {q.get('mean', 0):.4f} "
        f"(max {q.get('max', 0):.4f}); times: auto search + edit {seconds['auto']:.0f} s, "
        f"--skip-experts {seconds['skip']:.0f} s, 4-bit {seconds['q4']:.0f} s"
    )
    for name in order:
        print(f"{name}: {rows[name]['example']!r}")
    print(json.dumps({"rows": rows, "ppl": ppls, "seconds": seconds, "layer": record["layer"]}))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
