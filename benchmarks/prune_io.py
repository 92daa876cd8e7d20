"""Wall time and peak memory of ``mlxfun prune`` on a >= 1 GB multi-shard checkpoint.

    python benchmarks/prune_io.py [--size-gb 1.2] [--shards 4] [--repeats 3] [--dir DIR] [--keep]

Builds a synthetic float16 qwen3_moe mlx-lm model directory (config.json, shards
model-0000X-of-0000N.safetensors, model.safetensors.index.json, the demo model's tokenizer)
shard by shard from the lazily initialised mlx-lm model, so the model is never whole in memory,
and a stats file for it through the library (``model_fingerprint`` + ``save_stats``), in a
spawned child. Then, in one run, it alternates ``cp -r`` of the directory, ``mlxfun prune``
(a quarter of the experts of every layer) and ``mlxfun prune --dry-run`` (start-up and
planning, no writing), each in a fresh subprocess, and reports wall and CPU times and peak
resident memory (``wait4``).

The checkpoint has just been written, so it sits in the page cache for every round; round 1 is
a warm-up and the figures are the medians of rounds 2..N (``--repeats 1``: round 1 itself).
Outputs are deleted and ``sync`` runs between commands, outside the timings.
Targets: prune time <= 1.5x the copy time; prune peak RSS <= 1.25x the largest shard.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_startup import clean_env, mlxfun_command  # benchmarks/ is on sys.path as a script

TIME_TARGET = 1.5
MEMORY_TARGET = 1.25
GB = 1e9
MIB = 1 << 20
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"  # its tokenizer files

BASE_ARGS = dict(
    model_type="qwen3_moe",
    hidden_size=1024,
    intermediate_size=2048,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    num_experts_per_tok=8,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=512,
    rms_norm_eps=1e-6,
    vocab_size=32000,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    norm_topk_prob=True,
)


# ---------------------------------------------------------------------------------------------
# The checkpoint


def skeleton(config: dict):
    """The mlx-lm model, parameters lazily initialised (nothing allocated until evaluated)."""
    from mlx_lm.models import qwen3_moe

    return qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))


def float16_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size * 2 for _, v in tree_flatten(model.parameters()))


def config_for(size_bytes: float) -> dict:
    """The BASE_ARGS model with enough layers for ``size_bytes`` of float16 weights."""
    one = float16_bytes(skeleton({**BASE_ARGS, "num_hidden_layers": 1}))
    two = float16_bytes(skeleton({**BASE_ARGS, "num_hidden_layers": 2}))
    per_layer, base = two - one, 2 * one - two
    layers = max(1, -int(-(size_bytes - base) // per_layer))
    return {**BASE_ARGS, "num_hidden_layers": layers}


def split(weights: list[tuple[str, object]], shards: int) -> list[list[tuple[str, object]]]:
    """Consecutive tensors into ``shards`` groups of about equal bytes (as mlx-lm orders them)."""
    total = sum(v.size * 2 for _, v in weights)
    groups, size = [[]], 0
    for name, value in weights:
        if groups[-1] and size >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, value))
        size += value.size * 2
    return groups


def write_checkpoint(path: Path, size_bytes: float, shards: int, seed: int = 0) -> dict:
    """A float16 qwen3_moe mlx-lm directory written shard by shard; returns its config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, save_config
    from mlxfun.core.io import copy_tokenizer_files

    config = config_for(size_bytes)
    mx.random.seed(seed)
    model = skeleton(config)
    weights = tree_flatten(model.parameters())
    index = {
        "metadata": {
            "total_size": sum(v.size * 2 for _, v in weights),
            "total_parameters": get_total_parameters(model),
        },
        "weight_map": {},
    }
    groups = split(weights, shards)
    del weights, model  # each shard's arrays are evaluated, written and freed in turn
    for i in range(len(groups)):
        shard = {name: value.astype(mx.float16) for name, value in groups[i]}
        groups[i] = None
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
        del shard
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    save_config(config, path / "config.json")
    copy_tokenizer_files(DEMO_MODEL, path)
    return config


def write_stats(model_dir: Path, stats_path: Path, seed: int = 0) -> int:
    """Random REAP scores with the model's real fingerprint; returns the experts per layer."""
    import numpy as np
    from mlxfun.core import plugins, slicing
    from mlxfun.core.io import read_config
    from mlxfun.core.stats import model_fingerprint, save_stats

    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    plans = slicing.layer_plans(slicing.model_skeleton(model_dir)[0], adapter)
    experts = max(p.num_experts for p in plans)
    scores = np.random.default_rng(seed).random((len(plans), experts))
    metadata = {
        "fingerprint": model_fingerprint(config, plans),
        "moe_layers": [p.index for p in plans],
    }
    save_stats(stats_path, {"reap": scores}, {}, np.zeros(len(plans), dtype=np.int64), metadata)
    return experts


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(command: list[str]) -> tuple[float, float, int]:
    """``(wall seconds, CPU seconds, peak RSS bytes)`` of ``command`` in a fresh child process.

    Linux starts a child's peak RSS at this process's own peak (the exec records the parent's
    high-water mark), so this process never imports MLX: the checkpoint is built in a spawned
    child and the floor this leaves is printed with the results."""
    os.sync()  # earlier rounds' dirty pages are flushed outside the timing
    start = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env()
    )
    errors = child.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stderr.close()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{errors}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux: KiB


def file_sizes(model_dir: Path) -> tuple[int, int]:
    """``(total bytes, largest shard bytes)`` of a model directory."""
    files = [p for p in model_dir.iterdir() if p.is_file()]
    shards = [p.stat().st_size for p in files if p.suffix == ".safetensors"]
    return sum(p.stat().st_size for p in files), max(shards)


def rounds(model_dir: Path, stats: Path, work: Path, remove: int, repeats: int) -> dict:
    copy_out, prune_out = work / "copy", work / "pruned"
    copy = ["cp", "-r", str(model_dir), str(copy_out)]
    prune = mlxfun_command() + [
        "prune",
        "--model",
        str(model_dir),
        "--stats",
        str(stats),
        "--n",
        str(remove),
        "--output",
        str(prune_out),
    ]
    dry_run = prune[: prune.index("--output")] + ["--dry-run"]
    results = {"copy": [], "prune": [], "dry-run": []}
    for number in range(1, repeats + 1):
        for label, command, output in (
            ("copy", copy, copy_out),
            ("prune", prune, prune_out),
            ("dry-run", dry_run, None),
        ):
            if output is not None:
                shutil.rmtree(output, ignore_errors=True)
            seconds, cpu, rss = measure(command)
            results[label].append((seconds, cpu, rss))
            print(
                f"  round {number} {label:7}: {seconds:7.2f} s wall, {cpu:6.2f} s CPU, "
                f"peak RSS {rss / MIB:7.1f} MiB"
            )
    results["pruned_bytes"] = file_sizes(prune_out)[0]
    shutil.rmtree(copy_out, ignore_errors=True)
    shutil.rmtree(prune_out, ignore_errors=True)
    return results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict, total: int, largest: int, shards: int, remove: int, experts: int):
    counted = slice(1, None) if len(results["copy"]) > 1 else slice(None)

    def median(label: str, field: int) -> float:
        return statistics.median(r[field] for r in results[label][counted])

    copy_s, prune_s, fixed_s = median("copy", 0), median("prune", 0), median("dry-run", 0)
    copy_cpu, prune_cpu, fixed_cpu = median("copy", 1), median("prune", 1), median("dry-run", 1)
    prune_rss = max(r[2] for r in results["prune"])
    time_ratio, memory_ratio = prune_s / copy_s, prune_rss / largest
    rounds_used = "round 1" if counted.start is None else f"rounds 2..{len(results['copy'])}"
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"checkpoint    : {total / GB:.2f} GB in {shards} shards, largest {largest / MIB:.1f} MiB"
    )
    print(
        f"prune         : {remove} of {experts} experts per layer; output "
        f"{results['pruned_bytes'] / GB:.2f} GB"
    )
    print(f"timing        : warm page cache, median of {rounds_used} (round 1 is a warm-up)")
    print(f"copy (cp -r)  : {copy_s:7.2f} s wall, {copy_cpu:6.2f} s CPU")
    print(f"mlxfun prune  : {prune_s:7.2f} s wall, {prune_cpu:6.2f} s CPU")
    print(
        f"  --dry-run   : {fixed_s:7.2f} s wall, {fixed_cpu:6.2f} s CPU (start-up and planning only)"
    )
    print(
        f"time ratio prune/copy: {time_ratio:.2f}  (target <= {TIME_TARGET}) "
        f"{verdict(time_ratio <= TIME_TARGET)}"
    )
    print(f"  writing only, (prune - dry-run)/copy: {(prune_s - fixed_s) / copy_s:.2f}")
    print(
        f"peak RSS prune / largest shard: {prune_rss / MIB:.1f} MiB / {largest / MIB:.1f} MiB "
        f"= {memory_ratio:.2f}  (target <= {MEMORY_TARGET}) {verdict(memory_ratio <= MEMORY_TARGET)}"
        f"  [floor inherited from this script: {floor / MIB:.1f} MiB]"
    )
    return time_ratio <= TIME_TARGET and memory_ratio <= MEMORY_TARGET


def build(model_dir: Path, stats: Path, size_bytes: float, shards: int) -> None:
    """The checkpoint and its stats file (run in a spawned child: MLX stays out of this one)."""
    model_dir.mkdir(parents=True)
    write_checkpoint(model_dir, size_bytes, shards)
    write_stats(model_dir, stats)


def ensure_checkpoint(work: Path, size_bytes: float, shards: int) -> dict:
    """Build the checkpoint in ``work`` unless a kept one is there; returns its config."""
    model_dir, stats = work / "model", work / "stats.npz"
    if (model_dir / "config.json").is_file() and stats.is_file():
        print(f"reusing {model_dir}")
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=build, args=(model_dir, stats, size_bytes, shards)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the checkpoint failed (exit code {child.exitcode})")
        print(f"built {model_dir} in {time.perf_counter() - start:.1f} s")
    return json.loads((model_dir / "config.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size (1e9 bytes)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="copy/prune rounds (first: warm-up)")
    parser.add_argument(
        "--dir",
        type=Path,
        help="work directory (default: a new one under /tmp); a checkpoint "
        "kept there by --keep is reused",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and stats file")
    options = parser.parse_args()

    work = options.dir or Path(tempfile.mkdtemp(prefix="mlxfun-prune-io-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = ensure_checkpoint(work, options.size_gb * GB, options.shards)
        experts, layers = config["num_experts"], config["num_hidden_layers"]
        total, largest = file_sizes(work / "model")
        print(f"model         : qwen3_moe float16, {layers} layers x {experts} experts")
        remove = experts // 4
        results = rounds(work / "model", work / "stats.npz", work, remove, max(1, options.repeats))
        shards = len(list((work / "model").glob("*.safetensors")))
        ok = report(results, total, largest, shards, remove, experts)
    finally:
        if options.keep:
            print(f"kept {work}")
        elif options.dir:
            shutil.rmtree(work / "model", ignore_errors=True)
            (work / "stats.npz").unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
