"""Train the bundled demo MoE: mlx-lm's own qwen3_moe, from scratch, on CPU, seeded.

    scripts/fetch_demo_corpora.sh /tmp/corpora
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python scripts/train_demo_model.py --corpora /tmp/corpora --out demo

Two domains: Python code (this interpreter's standard library) and English prose (public-domain
texts from Debian packages). Code is split by file and prose by contiguous chunk into train /
calibration / evaluation, so no calibration or evaluation text is trained on. Writes
demo/model (config.json, model.safetensors in bf16, tokenizer files), demo/data (calib_*.jsonl,
eval_*.jsonl) and demo/model/training.json (what was run and measured).
"""

import argparse
import hashlib
import json
import math
import re
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import qwen3_moe
from mlx_lm.utils import save_config, save_model
from mlxfun.core.hooks import call_hooks

CHUNK_CHARS = 1500
SET_BYTES = 50_000


def split_of(key: str) -> str:
    """Deterministic 90/5/5 split by a hash of the key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "calib" if bucket < 5 else "eval" if bucket < 10 else "train"


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    out, current = [], []
    length = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        length += len(para)
        if length >= size:
            out.append("\n\n".join(current))
            current, length = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def read_code() -> dict[str, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = {"train": [], "calib": [], "eval": []}
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[split_of(path.name)].extend(chunks(text))
    return parts


def clean_prose(name: str, text: str) -> str:
    if name == "kjv.txt":  # "Ge1:1 In the beginning..." -> paragraphs per chapter
        text = re.sub(r"^\S+?(\d+):1 ", "\n", text, flags=re.M)
        text = re.sub(r"^\S+?\d+:\d+ ", "", text, flags=re.M)
    if name == "fortunes.txt":
        text = text.replace("\n%\n", "\n\n")
    return re.sub(r"[ \t]+", " ", text)


def read_prose(folder: Path) -> dict[str, list[str]]:
    parts = {"train": [], "calib": [], "eval": []}
    for path in sorted(folder.glob("*.txt")):
        for i, chunk in enumerate(chunks(clean_prose(path.name, path.read_text(errors="replace")))):
            # contiguous blocks of 20 chunks share a split, so held-out text is not interleaved
            parts[split_of(f"{path.name}:{i // 20}")].append(chunk)
    return parts


def capped(items: list[str], limit: int) -> list[str]:
    out, total = [], 0
    for item in items:
        if total + len(item) > limit:
            break
        out.append(item)
        total += len(item)
    return out


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    return tokenizer


def model_args(vocab_size: int, expert_size: int) -> dict:
    return {
        "model_type": "qwen3_moe",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": expert_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
    }


def router_capture(model, store):
    def hook(module, call, x):
        logits = call(x)
        store.append(logits)
        return logits

    return [(layer.mlp.gate, hook) for layer in model.model.layers]


def balance_loss(logits_list, num_experts: int, top_k: int):
    """The auxiliary load-balancing loss of Switch Transformer in the form of Qwen3-MoE's
    `router_aux_loss_coef` term, per MoE layer and averaged over layers:
    E * sum_e f_e * P_e, with f_e the fraction of tokens that pick expert e among their top-k
    (sum_e f_e = k) and P_e the mean router probability of e. It is k when routing is uniform.
    Hugging Face concatenates all layers' logits first, which lets one layer collapse while the
    total stays balanced; per layer, every layer is balanced on its own.
    Returns (loss, per-layer expert counts of this batch) for the balance monitor."""
    total, counts_per_layer = 0.0, []
    for logits in logits_list:
        probs = mx.softmax(logits.reshape(-1, num_experts).astype(mx.float32), axis=-1)
        chosen = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k]
        counts = mx.zeros((num_experts,)).at[chosen.reshape(-1)].add(1.0)
        fraction = mx.stop_gradient(counts / probs.shape[0])
        total = total + num_experts * mx.sum(fraction * probs.mean(axis=0))
        counts_per_layer.append(mx.stop_gradient(counts))
    return total / len(logits_list), mx.stack(counts_per_layer)


def router_z_loss(logits_list):
    """ST-MoE's router z-loss: keeps router logits small, so that no expert's probability
    underflows to where the balancing gradient can no longer revive it."""
    total = 0.0
    for logits in logits_list:
        z = mx.logsumexp(logits.astype(mx.float32), axis=-1)
        total = total + mx.mean(z * z)
    return total / len(logits_list)


def adamw(opts):
    """AdamW with linear warm-up to ``opts.lr`` then cosine decay to a tenth of it."""
    schedule = optim.cosine_decay(opts.lr, opts.steps - opts.warmup, opts.lr / 10)
    if opts.warmup:
        warm = optim.linear_schedule(opts.lr / opts.warmup, opts.lr, opts.warmup)
        schedule = optim.join_schedules([warm, schedule], [opts.warmup])
    return optim.AdamW(learning_rate=schedule, weight_decay=0.01)


def balance_summary(counts: np.ndarray) -> str:
    """Per layer: the smallest and largest expert share of the routed slots, e.g. 2.1-11.0%."""
    shares = counts / counts.sum(axis=1, keepdims=True) * 100
    return " ".join(f"{row.min():.1f}-{row.max():.1f}%" for row in shares)


def batches_from(streams, rng, batch: int, seq: int):
    while True:
        rows = []
        for b in range(batch):
            stream = streams[b % len(streams)]
            start = rng.integers(0, len(stream) - seq - 1)
            rows.append(stream[start : start + seq + 1])
        data = np.stack(rows)
        yield mx.array(data[:, :-1]), mx.array(data[:, 1:])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpora", type=Path, required=True, help="output folder of fetch_demo_corpora.sh"
    )
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--balance",
        type=float,
        default=0.5,
        help="router_aux_loss_coef: weight of the load-balancing loss (uniform routing scores k)",
    )
    parser.add_argument(
        "--z-loss",
        type=float,
        default=0.0,
        help="router z-loss weight (ST-MoE): mean squared logsumexp of the router logits",
    )
    parser.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    parser.add_argument(
        "--expert-size",
        type=int,
        default=128,
        help="moe_intermediate_size (128 keeps bf16 < 20 MB)",
    )
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    mx.random.seed(opts.seed)
    rng = np.random.default_rng(opts.seed)

    code, prose = read_code(), read_prose(opts.corpora / "prose")
    model_dir, data_dir = opts.out / "model", opts.out / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        "calib_code": capped(code["calib"], SET_BYTES),
        "calib_prose": capped(prose["calib"], SET_BYTES),
        "eval_code": capped(code["eval"], SET_BYTES),
        "eval_prose": capped(prose["eval"], SET_BYTES),
    }
    sets["calib_mixed"] = sets["calib_code"] + sets["calib_prose"]
    for name, texts in sets.items():
        with open(data_dir / f"{name}.jsonl", "w") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")

    sample = capped(code["train"], 3_000_000) + capped(prose["train"], 3_000_000)
    tokenizer = train_tokenizer(sample, opts.vocab, model_dir)
    eos = tokenizer.token_to_id("<|endoftext|>")

    def stream(texts):
        ids = []
        for encoding in tokenizer.encode_batch(texts):
            ids.extend(encoding.ids + [eos])
        return np.array(ids, dtype=np.int32)

    streams = [stream(code["train"]), stream(prose["train"])]
    args = model_args(tokenizer.get_vocab_size(), opts.expert_size)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"parameters: {n_params / 1e6:.2f}M; train tokens available: code {streams[0].size}, prose {streams[1].size}"
    )

    optimizer = adamw(opts)
    captured: list = []
    hooks = router_capture(model, captured)

    def loss_fn(model, inputs, targets):
        captured.clear()
        logits = model(inputs)
        ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
        aux, counts = balance_loss(captured, args["num_experts"], args["num_experts_per_tok"])
        loss = ce + opts.balance * aux
        if opts.z_loss:
            loss = loss + opts.z_loss * router_z_loss(captured)
        return loss, (ce, aux, counts)

    step_fn = nn.value_and_grad(model, loss_fn)
    data = batches_from(streams, rng, opts.batch, opts.seq)
    start = time.perf_counter()
    window = None  # routed-slot counts per layer and expert since the last printed step
    with call_hooks(hooks):
        for step in range(1, opts.steps + 1):
            inputs, targets = next(data)
            (loss, (ce, aux, counts)), grads = step_fn(model, inputs, targets)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss, ce, aux, counts)
            window = np.array(counts) if window is None else window + np.array(counts)
            if step % 25 == 0 or step == 1:
                elapsed = time.perf_counter() - start
                tps = step * opts.batch * opts.seq / elapsed
                print(
                    f"step {step:5d}  loss {loss.item():.3f}  ce {ce.item():.3f}  aux {aux.item():.3f}"
                    f"  {tps:.0f} tok/s  {elapsed / 60:.1f} min  expert shares {balance_summary(window)}",
                    flush=True,
                )
                window = None
    wall = time.perf_counter() - start

    model.update(tree_map(lambda v: v.astype(mx.bfloat16), model.parameters()))
    save_model(model_dir, model)
    save_config(args, model_dir / "config.json")
    report = {
        "command": "python scripts/train_demo_model.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(opts).items()),
        "parameters": int(n_params),
        "train_tokens": opts.steps * opts.batch * opts.seq,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": round(opts.steps * opts.batch * opts.seq / wall, 1),
        "final_train_ce": round(ce.item(), 4),
        "final_balance_loss": round(aux.item(), 4),
        "perplexity_of_final_ce": round(math.exp(ce.item()), 2),
    }
    (model_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
