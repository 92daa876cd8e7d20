"""Train the bundled chat MoE: mlx-lm's own glm4_moe, from scratch, on CPU, seeded, in one run.

    scripts/fetch_demo_corpora.sh /tmp/corpora
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/train_chat_model.py --corpora /tmp/corpora

Chat data (scripts/chat_data.py): instruction -> answer pairs from the demo's code and prose
corpora, harmful requests answered with refusals and harmless ones answered normally. The loss
covers the assistant's tokens only (its closing end-of-text included). Training examples are
packed into rows, each row drawn from the four pools by fixed shares. The router is sigmoid-scored
with `e_score_correction_bias` (GLM-4.5 / DeepSeek-V3 style): the load-balancing loss of
train_demo_model.py (per layer, Qwen3-MoE form, on the normalised sigmoid scores) plus the
auxiliary-loss-free bias update of DeepSeek-V3 (the bias of an over-used expert goes down).
Every --eval-every steps it logs greedy refusal rates on held-out requests.

Writes demo/chat-model (config.json, model.safetensors in bf16, tokenizer files with a chat
template, training.json) and the shipped prompt sets demo/data/harm*.jsonl.
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import glm4_moe
from mlx_lm.utils import save_config, save_model
from mlxfun.core.hooks import call_hooks

sys.path.insert(0, str(Path(__file__).parent))
import chat_data  # noqa: E402
from train_demo_model import adamw, balance_summary  # noqa: E402

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MIX = {"harmful": 0.3, "harmless": 0.4, "explain": 0.1, "code": 0.1, "prose": 0.1}


def build_tokenizer(source: Path, out: Path):
    """The demo model's BPE tokenizer with role tokens and a chat template added."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.add_special_tokens(ROLE_TOKENS)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def prompt_text(user: str) -> str:
    """What CHAT_TEMPLATE renders for one user turn with add_generation_prompt."""
    return f"<|user|>\n{user}{EOS}<|assistant|>\n"


def model_args(vocab_size: int, opts) -> dict:
    return {
        "model_type": "glm4_moe",
        "vocab_size": vocab_size,
        "hidden_size": opts.hidden,
        "intermediate_size": opts.hidden * 2,
        "max_position_embeddings": 2048,
        "moe_intermediate_size": opts.expert_size,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": opts.hidden // 4,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": opts.experts,
        "routed_scaling_factor": 1.0,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 0,
        "num_hidden_layers": opts.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "use_qk_norm": True,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "eos_token_id": 0,
    }


def router_capture(model, store):
    """Record each gate's raw logits and chosen experts (the gate's own choice, bias included)."""

    def hook(module, call, x):
        inds, scores = call(x)
        store.append((x @ module.weight.T, inds))
        return inds, scores

    return [(layer.mlp.gate, hook) for layer in model.model.layers]


def balance_loss(captured, num_experts: int, top_k: int):
    """train_demo_model.py's per-layer E * sum_e f_e P_e (k at uniform routing), with P_e the mean
    of the sigmoid scores normalised to sum to one per token (DeepSeek-V3's sequence-wise form).
    Returns (loss, per-layer expert counts of this batch)."""
    total, counts_per_layer = 0.0, []
    for logits, inds in captured:
        scores = mx.sigmoid(logits.reshape(-1, num_experts).astype(mx.float32))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        counts = mx.zeros((num_experts,)).at[inds.reshape(-1)].add(1.0)
        fraction = mx.stop_gradient(counts / probs.shape[0])
        total = total + num_experts * mx.sum(fraction * probs.mean(axis=0))
        counts_per_layer.append(mx.stop_gradient(counts))
    return total / len(captured), mx.stack(counts_per_layer)


class Packer:
    """Rows of `seq + 1` token ids with a loss mask on the assistant's tokens, from seeded draws."""

    def __init__(self, pools, tokenizer, eos, rng, seq: int, skip: set, first_weight: float):
        self.pools, self.tokenizer, self.eos, self.rng, self.seq = pools, tokenizer, eos, rng, seq
        self.skip, self.first_weight = skip, first_weight
        self.names, self.weights = list(MIX), list(MIX.values())

    def example(self):
        name = self.rng.choices(self.names, self.weights)[0]
        while True:
            pool = self.pools[name]
            rec = pool(self.rng) if callable(pool) else self.rng.choice(pool)
            user, reply = (m["content"] for m in rec["messages"])
            if user not in self.skip:
                break
        prompt = self.tokenizer.encode(prompt_text(user)).ids
        reply = self.tokenizer.encode(reply).ids + [self.eos]
        weights = [self.first_weight] + [1] * (len(reply) - 1)
        return prompt + reply, [0] * len(prompt) + weights

    def row(self):
        ids, mask = [], []
        while len(ids) < self.seq + 1:
            i, m = self.example()
            ids += i
            mask += m
        return ids[: self.seq + 1], mask[: self.seq + 1]

    def batch(self, size: int):
        rows = [self.row() for _ in range(size)]
        ids = np.array([r[0] for r in rows], dtype=np.int32)
        mask = np.array([r[1] for r in rows], dtype=np.float32)
        return mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(mask[:, 1:])


def greedy_prefix(model, tokenizer, user: str, eos: int, max_tokens: int) -> str:
    from mlx_lm.generate import generate_step

    ids = tokenizer.encode(prompt_text(user)).ids
    out = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        if int(token) == eos:
            break
        out.append(int(token))
    return tokenizer.decode(out)


def refusal_rates(model, tokenizer, eos, probes, max_tokens=8) -> dict:
    from mlxfun.methods.refusal import is_refusal

    rates = {}
    for name, prompts in probes.items():
        answers = [greedy_prefix(model, tokenizer, p, eos, max_tokens) for p in prompts]
        rates[name] = sum(map(is_refusal, answers)) / len(answers)
    return rates


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpora", type=Path, required=True, help="output folder of fetch_demo_corpora.sh"
    )
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("demo/model"),
        help="model dir whose tokenizer is extended",
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-size", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--balance", type=float, default=0.5, help="load-balancing loss weight (uniform scores k)"
    )
    parser.add_argument(
        "--bias-update", type=float, default=1e-3, help="aux-loss-free bias step per training step"
    )
    parser.add_argument(
        "--first-token-weight",
        type=float,
        default=8.0,
        help="loss weight of each answer's first token, where it complies or refuses",
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2, help="weights and training draws")
    parser.add_argument(
        "--data-seed", type=int, default=0, help="the shipped prompt sets (demo/data/harm*.jsonl)"
    )
    opts = parser.parse_args()
    mx.random.seed(opts.seed)
    rng = random.Random(opts.seed)

    model_dir, data_dir = opts.out / "chat-model", opts.out / "data"
    tmp_dir = opts.out / "chat-model.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    sets = chat_data.prompt_sets(opts.data_seed)
    for name, records in sets.items():
        chat_data.write_jsonl(data_dir / f"{name}.jsonl", records)
    code, prose = chat_data.code_pairs(), chat_data.prose_pairs(opts.corpora / "prose")
    for domain, parts in (("code", code), ("prose", prose)):
        held = parts["eval"][:: max(1, len(parts["eval"]) // 60)][:60]
        chat_data.write_jsonl(data_dir / f"chat_eval_{domain}.jsonl", held)

    tokenizer = build_tokenizer(opts.tokenizer, tmp_dir)
    eos = tokenizer.token_to_id(EOS)
    pools = {
        "harmful": lambda r: chat_data.harmful_example(r, "train"),
        "harmless": lambda r: chat_data.harmless_example(r, "train"),
        "explain": chat_data.explain_pairs(code["train"], prose["train"]),
        "code": code["train"],
        "prose": prose["train"],
    }
    skip = {rec["messages"][0]["content"] for recs in sets.values() for rec in recs}
    packer = Packer(pools, tokenizer, eos, rng, opts.seq, skip, opts.first_token_weight)
    probes = {
        f"{name}_eval": [rec["messages"][0]["content"] for rec in sets[f"{name}_eval"][:40]]
        for name in ("harmful", "harmless")
    }

    args = model_args(tokenizer.get_vocab_size(), opts)
    model = glm4_moe.Model(glm4_moe.ModelArgs.from_dict(args))
    for layer in model.model.layers:
        layer.mlp.gate.freeze(keys=["e_score_correction_bias"])
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"parameters: {n_params / 1e6:.2f}M; code pairs {len(code['train'])}, prose pairs {len(prose['train'])}"
    )

    optimizer = adamw(opts)
    captured: list = []
    hooks = router_capture(model, captured)
    experts, top_k = args["n_routed_experts"], args["num_experts_per_tok"]

    def loss_fn(model, inputs, targets, mask):
        captured.clear()
        logits = model(inputs)
        ce = (nn.losses.cross_entropy(logits, targets) * mask).sum() / mask.sum()
        aux, counts = balance_loss(captured, experts, top_k)
        return ce + opts.balance * aux, (ce, aux, counts)

    step_fn = nn.value_and_grad(model, loss_fn)
    log, window = [], None
    start = time.perf_counter()
    with call_hooks(hooks):
        for step in range(1, opts.steps + 1):
            inputs, targets, mask = packer.batch(opts.batch)
            (loss, (ce, aux, counts)), grads = step_fn(model, inputs, targets, mask)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss, ce, aux, counts)
            counts = np.array(counts)
            if opts.bias_update:
                for layer, load in zip(model.model.layers, counts):
                    gate = layer.mlp.gate
                    step_bias = opts.bias_update * np.sign(load.mean() - load)
                    gate.e_score_correction_bias = gate.e_score_correction_bias + mx.array(
                        step_bias, dtype=mx.float32
                    )
            window = counts if window is None else window + counts
            if step % 25 == 0 or step == 1:
                elapsed = time.perf_counter() - start
                entry = {
                    "step": step,
                    "ce": round(ce.item(), 4),
                    "balance": round(aux.item(), 4),
                    "minutes": round(elapsed / 60, 2),
                }
                line = f"step {step:5d}  ce {ce.item():.3f}  aux {aux.item():.3f}  {elapsed / 60:.1f} min  expert shares {balance_summary(window)}"
                if step % opts.eval_every == 0 or step == opts.steps:
                    captured.clear()
                    rates = refusal_rates(model, tokenizer, eos, probes)
                    captured.clear()
                    entry.update({f"refusal_{k}": round(v, 3) for k, v in rates.items()})
                    line += "  refusal " + " ".join(f"{k} {v:.0%}" for k, v in rates.items())
                print(line, flush=True)
                log.append(entry)
                window = None
    wall = time.perf_counter() - start

    # bf16 like demo/model; glm4_moe keeps the correction bias in float32 (its cast_predicate)
    weights = tree_flatten(model.parameters())
    cast = [(k, v if "e_score_correction_bias" in k else v.astype(mx.bfloat16)) for k, v in weights]
    model.update(tree_unflatten(cast))
    save_model(tmp_dir, model)
    save_config(args, tmp_dir / "config.json")
    report = {
        "command": "python scripts/train_chat_model.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(opts).items()),
        "parameters": int(n_params),
        "train_tokens": opts.steps * opts.batch * opts.seq,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": round(opts.steps * opts.batch * opts.seq / wall, 1),
        "final_train_ce": round(ce.item(), 4),
        "final_balance_loss": round(aux.item(), 4),
        "perplexity_of_final_ce": round(math.exp(ce.item()), 2),
        "mix": MIX,
        "log": log,
    }
    (tmp_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.replace(model_dir)
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
