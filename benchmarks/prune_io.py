"""Wall time and peak memory of ``mlxfun prune`` against ``cp -r`` on multi-shard checkpoints of
two sizes, separating the fixed start-up from the cost per byte.

    python benchmarks/prune_io.py [--sizes-gb 1.25,2.5] [--shard-gb 0.5] [--repeats 4] \
        [--dir DIR] [--keep]

For each size it builds a synthetic float16 qwen3_moe mlx-lm model directory (config.json,
shards model-0000X-of-0000N.safetensors of about ``--shard-gb`` each,
model.safetensors.index.json, the demo model's tokenizer) shard by shard from the lazily
initialised mlx-lm model, so the model is never whole in memory, and a stats file for it through
the library (``model_fingerprint`` + ``save_stats``), in a spawned child. Then it runs ``cp -r``
of the directory, ``mlxfun prune`` (a quarter of the experts of every layer) and ``mlxfun prune
--dry-run`` (start-up and planning, no writing) ``--repeats`` times, each in a fresh subprocess,
rotating their order every round so that no command always follows the same one, and reports
wall and CPU times and peak resident memory (``wait4``).

The checkpoints have just been written, so they sit in the page cache; round 1 is a warm-up and
the figures are the medians of rounds 2..N (``--repeats 1``: round 1 itself). Outputs are deleted
and ``sync`` runs between commands, outside the timings. With two sizes or more, ``time = a + b *
GB`` is fitted to the medians of copy and prune (least squares): ``a`` is the fixed cost, ``b``
the cost per GB of checkpoint, and the fit gives the ratio for checkpoints of tens of GB.
The load average before and after is printed: on a shared machine judge the ratios, not the times.
Targets, on the largest size (at least 2 GB): prune time <= 1.5x the copy time; prune peak RSS
<= 1.25x the largest shard.
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


def write_checkpoint(
    path: Path,
    size_bytes: float,
    shards: int,
    seed: int = 0,
    dtype: str = "float16",
    config: dict | None = None,
) -> dict:
    """A qwen3_moe mlx-lm directory (``dtype`` weights; ``config``, else BASE_ARGS with enough
    layers for ``size_bytes`` of float16) written shard by shard; returns its config."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters, save_config
    from mlxfun.core.models import copy_tokenizer_files

    config = config or config_for(size_bytes)
    dtype, itemsize = getattr(mx, dtype), getattr(mx, dtype).size
    mx.random.seed(seed)
    model = skeleton(config)
    weights = tree_flatten(model.parameters())
    index = {
        "metadata": {
            "total_size": sum(v.size * itemsize for _, v in weights),
            "total_parameters": get_total_parameters(model),
        },
        "weight_map": {},
    }
    groups = split(weights, shards)
    del weights, model  # each shard's arrays are evaluated, written and freed in turn
    for i in range(len(groups)):
        shard = {name: value.astype(dtype) for name, value in groups[i]}
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
    from mlxfun.core.config import read_config
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
    """``{command: [(wall, CPU, peak RSS), ...]}`` over ``repeats`` rounds, the order rotating."""
    copy_out, prune_out = work / "copy", work / "pruned"
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
    commands = [
        ("copy", ["cp", "-r", str(model_dir), str(copy_out)], copy_out),
        ("prune", prune, prune_out),
        ("dry-run", prune[: prune.index("--output")] + ["--dry-run"], None),
    ]
    results = {label: [] for label, _, _ in commands}
    for number in range(1, repeats + 1):
        shift = (number - 1) % len(commands)
        for label, command, output in commands[shift:] + commands[:shift]:
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


def medians(results: dict) -> dict:
    """``{command: (wall, CPU)}``: medians over rounds 2..N (round 1 if it is the only one)."""
    counted = slice(1, None) if len(results["copy"]) > 1 else slice(None)
    return {
        label: tuple(
            statistics.median(r[field] for r in results[label][counted]) for field in (0, 1)
        )
        for label in ("copy", "prune", "dry-run")
    }


def fit(sizes: list[float], times: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``time = a + b * size``."""
    mean_size, mean_time = statistics.fmean(sizes), statistics.fmean(times)
    spread = sum((x - mean_size) ** 2 for x in sizes)
    b = sum((x - mean_size) * (y - mean_time) for x, y in zip(sizes, times)) / spread
    return mean_time - b * mean_size, b


def report_size(run: dict) -> tuple[float, float]:
    """Print one checkpoint's figures; returns ``(time ratio, memory ratio)``."""
    m, results = run["medians"], run["results"]
    copy_s, prune_s, fixed_s = m["copy"][0], m["prune"][0], m["dry-run"][0]
    prune_rss = max(r[2] for r in results["prune"])
    time_ratio, memory_ratio = prune_s / copy_s, prune_rss / run["largest"]
    rounds_used = "round 1" if len(results["copy"]) == 1 else f"rounds 2..{len(results['copy'])}"
    print(
        f"checkpoint {run['total'] / GB:.2f} GB in {run['shards']} shards (largest "
        f"{run['largest'] / MIB:.1f} MiB); prune removes {run['remove']} of {run['experts']} "
        f"experts per layer, output {results['pruned_bytes'] / GB:.2f} GB; median of {rounds_used}"
    )
    for label, name in (("copy", "cp -r"), ("prune", "mlxfun prune"), ("dry-run", "--dry-run")):
        print(f"  {name:13}: {m[label][0]:7.2f} s wall, {m[label][1]:6.2f} s CPU")
    print(
        f"  time ratio prune/copy {time_ratio:.2f} (CPU {m['prune'][1] / m['copy'][1]:.2f}); "
        f"writing only, (prune - dry-run)/copy {(prune_s - fixed_s) / copy_s:.2f}"
    )
    print(
        f"  peak RSS prune / largest shard: {prune_rss / MIB:.1f} / {run['largest'] / MIB:.1f} MiB "
        f"= {memory_ratio:.2f}"
    )
    return time_ratio, memory_ratio


def report_fit(runs: list[dict]) -> None:
    sizes = [run["total"] / GB for run in runs]
    print("fit time = a + b * GB over the sizes (medians):")
    fits = {}
    for label, name in (("copy", "cp -r"), ("prune", "mlxfun prune")):
        for field, kind in ((0, "wall"), (1, "CPU")):
            a, b = fit(sizes, [run["medians"][label][field] for run in runs])
            fits[label, field] = (a, b)
            print(f"  {name:13} {kind:4}: a = {a:6.2f} s, b = {b:5.3f} s/GB")
    dry = statistics.fmean(run["medians"]["dry-run"][0] for run in runs)
    print(f"  --dry-run wall (the fixed cost measured directly): {dry:.2f} s")
    (a_copy, b_copy), (a_prune, b_prune) = fits["copy", 0], fits["prune", 0]
    if b_copy > 0:
        print(f"  per byte, prune/copy (wall): {b_prune / b_copy:.2f}")
        for size in (10, 50):
            ratio = (a_prune + b_prune * size) / (a_copy + b_copy * size)
            print(f"  ratio prune/copy the fit gives for {size} GB: {ratio:.2f}")


def build(model_dir: Path, stats: Path, size_bytes: float, shards: int) -> None:
    """The checkpoint and its stats file (run in a spawned child: MLX stays out of this one)."""
    model_dir.mkdir(parents=True)
    write_checkpoint(model_dir, size_bytes, shards)
    write_stats(model_dir, stats)


def ensure_checkpoint(model_dir: Path, stats: Path, size_bytes: float, shards: int) -> dict:
    """Build the checkpoint unless a kept one is there; returns its config."""
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


def check_room(work: Path, sizes: list[float]) -> None:
    """The checkpoints, a copy and a pruned output of the largest must fit (10% spare)."""
    needed = 1.1 * (sum(sizes) + 2 * max(sizes))
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(
            f"{work} has {free / GB:.1f} GB free; this run needs about {needed / GB:.1f} GB "
            "(the checkpoints, a copy and a pruned output): use --dir or smaller --sizes-gb"
        )


def measure_size(work: Path, size_bytes: float, shard_bytes: float, repeats: int) -> dict:
    label = f"{size_bytes / GB:g}gb"
    model_dir, stats = work / f"model-{label}", work / f"stats-{label}.npz"
    shards = max(1, round(size_bytes / shard_bytes))
    config = ensure_checkpoint(model_dir, stats, size_bytes, shards)
    experts, layers = config["num_experts"], config["num_hidden_layers"]
    total, largest = file_sizes(model_dir)
    remove = experts // 4
    print(
        f"{total / GB:.2f} GB: qwen3_moe float16, {layers} layers x {experts} experts, "
        f"{len(list(model_dir.glob('*.safetensors')))} shards"
    )
    results = rounds(model_dir, stats, work, remove, repeats)
    return {
        "total": total,
        "largest": largest,
        "shards": len(list(model_dir.glob("*.safetensors"))),
        "remove": remove,
        "experts": experts,
        "results": results,
        "medians": medians(results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes-gb",
        default="1.25,2.5",
        help="checkpoint sizes, comma-separated (1e9 bytes); the largest is checked against "
        "the targets",
    )
    parser.add_argument("--shard-gb", type=float, default=0.5, help="about this much per shard")
    parser.add_argument("--repeats", type=int, default=4, help="rounds per size (first: warm-up)")
    parser.add_argument(
        "--dir",
        type=Path,
        help="work directory (default: a new one under /tmp); checkpoints kept there by --keep "
        "are reused",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and stats files")
    options = parser.parse_args()
    sizes = sorted(float(x) * GB for x in options.sizes_gb.split(","))

    work = options.dir or Path(tempfile.mkdtemp(prefix="mlxfun-prune-io-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        check_room(work, sizes)
        load_before = os.getloadavg()
        for size in sizes:
            runs.append(measure_size(work, size, options.shard_gb * GB, max(1, options.repeats)))
        load_after = os.getloadavg()
        print()
        print(
            f"load average (1, 5, 15 min): before {[round(x, 2) for x in load_before]}, after "
            f"{[round(x, 2) for x in load_after]}; {os.cpu_count()} cores; timings on a warm "
            "page cache"
        )
        ratios = [report_size(run) for run in runs]
        if len(runs) > 1:
            report_fit(runs)
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak RSS floor inherited from this script: {floor / MIB:.1f} MiB")
        time_ratio, memory_ratio = ratios[-1]
        big_enough = runs[-1]["total"] >= 2 * GB
        print(
            f"targets on the {runs[-1]['total'] / GB:.2f} GB checkpoint"
            f"{'' if big_enough else ' (under 2 GB: start-up weighs more than for real models)'}: "
            f"time prune/copy {time_ratio:.2f} <= {TIME_TARGET} "
            f"{verdict(time_ratio <= TIME_TARGET)}; peak RSS / largest shard {memory_ratio:.2f} "
            f"<= {MEMORY_TARGET} {verdict(memory_ratio <= MEMORY_TARGET)}"
        )
        ok = time_ratio <= TIME_TARGET and memory_ratio <= MEMORY_TARGET
    finally:
        if options.keep:
            print(f"kept {work}")
        elif options.dir:
            for size in sizes:
                label = f"{size / GB:g}gb"
                shutil.rmtree(work / f"model-{label}", ignore_errors=True)
                (work / f"stats-{label}.npz").unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
