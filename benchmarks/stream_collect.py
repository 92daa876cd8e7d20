"""Peak memory and time of ``mlxfun collect --stream`` against the in-memory ``mlxfun collect`` on
a multi-shard checkpoint.

    python benchmarks/stream_collect.py [--layers 6] [--samples 32] [--max-tokens 256] \
        [--repeats 2] [--dir DIR] [--keep]

Builds a float32 qwen3_moe mlx-lm directory (prune_io.py's BASE_ARGS: hidden 1024, 64 experts
top-8, vocab 32000; ``--layers`` decoder layers, shards of about ``--shard-gb``) shard by shard
in a spawned child, so it is never whole in memory, and a JSONL of seeded word salad. Then runs,
each in a fresh subprocess, rotating the order every round: ``collect`` (in memory), ``collect
--stream``, ``collect --stream --spill DIR``, and a floor: a process that imports what collect
imports, loads the tokenizer and tokenizes the dataset (its peak RSS is what collect needs
before any weight; it also reports the activation buffer: the padded batches' tokens x hidden x
4 bytes). float32 weights, so the bytes a layer holds in memory are its bytes on disk.

Reported: peak RSS (wait4) of each, the largest decoder layer's bytes (safetensors headers), and
- memory: (stream peak - floor) / (largest layer + activation buffer), target <= 1.5;
- time: median stream wall / median in-memory wall, target <= 1.3.
Round 1 warms the page cache; the figures are medians of rounds 2..N (``--repeats 1``: round 1).
This process never imports MLX (a child starts with its parent's peak RSS on Linux).
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from cli_startup import clean_env, mlxfun_command  # benchmarks/ is on sys.path as a script
from prune_io import BASE_ARGS, measure, write_checkpoint

MEMORY_TARGET = 1.5
TIME_TARGET = 1.3
GB = 1e9
MIB = 1 << 20
WORDS = (
    "the river cat sang def return value function model layer expert router token stream "
    "memory shard weight array batch mountain light quiet number seven import class while"
).split()

FLOOR = """
import json, sys
import mlx.core, mlx_lm.utils, numpy as np
from mlxfun.core import plugins
from mlxfun.core.collect import collect_stats
from mlxfun.core.datasets import batches, load_samples, tokenize_samples
from mlxfun.core.models import load_model
model_dir, dataset, max_tokens, batch_size, hidden = sys.argv[1:6]
from mlx_lm.utils import load_tokenizer
plugins.load_plugins()
tokenizer = load_tokenizer(model_dir)
sequences = tokenize_samples(load_samples([dataset]), tokenizer, int(max_tokens))
ordered = sorted(sequences, key=len, reverse=True)
padded = sum(t.size for t, _ in batches(ordered, int(batch_size)))
print(json.dumps({"tokens": sum(map(len, sequences)), "buffer": padded * int(hidden) * 4}))
"""


def build(model_dir: Path, config: dict, shards: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(model_dir, 0, shards, dtype="float32", config=config)


def layer_bytes(model_dir: Path) -> dict[int, int]:
    """Bytes per decoder layer, from the safetensors headers."""
    sizes: dict[int, int] = {}
    for shard in model_dir.glob("*.safetensors"):
        with open(shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            parts = name.split(".")
            if name != "__metadata__" and parts[:2] == ["model", "layers"]:
                begin, end = info["data_offsets"]
                sizes[int(parts[2])] = sizes.get(int(parts[2]), 0) + end - begin
    return sizes


def write_dataset(path: Path, samples: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 400))) for _ in range(samples)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard-gb", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="work directory (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    opts = parser.parse_args()
    work = opts.dir or Path(tempfile.mkdtemp(prefix="mlxfun-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, dataset, spill = work / "model", work / "text.jsonl", work / "spill"
    config = {**BASE_ARGS, "num_hidden_layers": opts.layers}
    try:
        if not (model_dir / "config.json").is_file():
            total = opts.layers * 420e6 + 270e6  # about, for the shard count
            child = multiprocessing.get_context("spawn").Process(
                target=build, args=(model_dir, config, max(1, round(total / (opts.shard_gb * GB))))
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit("building the checkpoint failed")
        write_dataset(dataset, opts.samples)
        spill.mkdir(exist_ok=True)
        layers = layer_bytes(model_dir)
        largest = max(layers.values())
        total = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        shards = len(list(model_dir.glob("*.safetensors")))
        common = ["--model", str(model_dir), "--dataset", str(dataset)]
        common += ["--max-tokens", str(opts.max_tokens), "--batch-size", str(opts.batch_size)]
        collect = mlxfun_command() + ["collect", *common]
        commands = {
            "in-memory": collect + ["-o", str(work / "a.npz")],
            "stream": collect + ["-o", str(work / "b.npz"), "--stream"],
            "stream+spill": collect
            + ["-o", str(work / "c.npz"), "--stream", "--spill", str(spill)],
        }
        floor_cmd = [sys.executable, "-c", FLOOR, str(model_dir), str(dataset)]
        floor_cmd += [str(opts.max_tokens), str(opts.batch_size), str(config["hidden_size"])]
        info = json.loads(
            subprocess.run(floor_cmd, capture_output=True, text=True, env=clean_env()).stdout
        )
        commands["floor"] = floor_cmd
        load_before = os.getloadavg()
        results: dict = {name: [] for name in commands}
        names = list(commands)
        for round_ in range(max(1, opts.repeats)):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                results[name].append(measure(commands[name]))
        load_after = os.getloadavg()
        kept = {n: r[1:] or r for n, r in results.items()}
        med = {
            n: (statistics.median(x[0] for x in r), max(x[2] for x in r)) for n, r in kept.items()
        }
        same = [
            subprocess.run(
                [sys.executable, "-c", COMPARE, str(work / "a.npz"), str(work / f)],
                capture_output=True,
                text=True,
            ).stdout.strip()
            for f in ("b.npz", "c.npz")
        ]
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    floor = med["floor"][1]
    budget = largest + info["buffer"]
    print(
        f"checkpoint: qwen3_moe float32, {opts.layers} layers x {config['num_experts']} experts, "
        f"hidden {config['hidden_size']}, {total / GB:.2f} GB in {shards} shards; largest "
        f"decoder layer {largest / MIB:.0f} MiB"
    )
    print(
        f"data: {info['tokens']} tokens ({opts.samples} samples, batch {opts.batch_size}); "
        f"activation buffer {info['buffer'] / MIB:.1f} MiB"
    )
    for name, (wall, peak) in med.items():
        print(f"{name:13s} wall {wall:7.2f} s   peak RSS {peak / MIB:8.0f} MiB")
    memory = (med["stream"][1] - floor) / budget
    spill_memory = (med["stream+spill"][1] - floor) / budget
    ratio = med["stream"][0] / med["in-memory"][0]
    print(f"statistics equal to in-memory (stream, stream+spill): {same}")
    print(
        f"load average before {[round(x, 2) for x in load_before]}, after "
        f"{[round(x, 2) for x in load_after]}; {os.cpu_count()} cores"
    )
    print(
        f"stream peak above the floor / (largest layer + buffer): {memory:.2f} "
        f"(target <= {MEMORY_TARGET}); with --spill {spill_memory:.2f}; raw stream peak / "
        f"(layer + buffer) {med['stream'][1] / budget:.2f}; in-memory peak / stream peak "
        f"{med['in-memory'][1] / med['stream'][1]:.2f}"
    )
    print(f"time stream / in-memory: {ratio:.2f} (target <= {TIME_TARGET})")
    return 0 if memory <= MEMORY_TARGET and ratio <= TIME_TARGET else 1


COMPARE = """
import sys, numpy as np
a, b = (np.load(p, allow_pickle=False) for p in sys.argv[1:3])
keys = [k for k in a.files if k.startswith("acc.") or k == "token_counts"]
print(all(np.allclose(a[k], b[k], rtol=1e-9, atol=0) for k in keys)
      and str(a["metadata"]) .split('"fingerprint"')[1][:400] == str(b["metadata"]).split('"fingerprint"')[1][:400])
"""


if __name__ == "__main__":
    sys.exit(main())
