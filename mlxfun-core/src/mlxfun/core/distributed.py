"""Data-parallel collection over MLX's own distributed layer (``mx.distributed``, started by
``mlx.launch``): every rank runs the same ``mlxfun collect``, takes its share of the batches,
and the ranks' accumulators are gathered and combined before rank 0 writes the stats file.

Exactness: each rank's float64 accumulators travel as raw bytes (an ``all_gather`` of uint8, so
no backend arithmetic touches them and no backend needs float64 support), and every rank combines
them in rank order with the scorer's own ``combine`` (the rule ``stats merge`` uses). The shares
are whole batches of the single-process run, so every batch, and every float32 value observed in
it, is the one a single process computes; only the order of the float64 additions across
batches differs.

A blocking collective cannot be interrupted from Python, so each one runs under a watchdog
process: a rank that waits longer than ``timeout`` seconds for the others prints one error line
and is stopped (a rank that died closes its connections, which the backend reports at once).
"""

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import attrs
import numpy as np

from .errors import MlxfunError
from .stats import combine_accumulators, model_fingerprint


@attrs.define
class Ranks:
    """This process's place in the launched group (``group`` is None for a single process)."""

    group: object | None = None
    rank: int = 0
    size: int = 1
    timeout: float = 600.0

    @property
    def writes(self) -> bool:
        return self.rank == 0


def join(timeout: float = 600.0) -> Ranks:
    """The group ``mlx.launch`` (or another ``mx.distributed`` launcher) started this process
    in; a single process when none did."""
    if timeout <= 0:
        raise MlxfunError(f"--rank-timeout must be positive, got {timeout:g}")
    if not _launched():
        return Ranks(timeout=timeout)
    import mlx.core as mx

    with _deadline(timeout, "connecting to the other ranks", os.environ.get("MLX_RANK")):
        group = mx.distributed.init()
    if group.size() == 1:
        return Ranks(timeout=timeout)
    return Ranks(group, group.rank(), group.size(), timeout)


def _launched() -> bool:
    # mlx.launch sets MLX_RANK (ring, jaccl, nccl); mpirun sets its own rank variables.
    keys = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    return any(key in os.environ for key in keys)


def share(sequences, batch_size: int, ranks: Ranks) -> list:
    """This rank's sequences: the single-process batches (longest first, as ``collect_stats``
    orders them) dealt round robin by batch index, so rank r gets batches r, r + size, ...
    Batching this share again gives exactly those batches."""
    ordered = sorted(sequences, key=len, reverse=True)
    mine = []
    for start in range(ranks.rank * batch_size, len(ordered), ranks.size * batch_size):
        mine.extend(ordered[start : start + batch_size])
    return mine


def run_fingerprint(model_dir, config: dict, sequences, options: dict) -> dict:
    """Digests of what every rank must share: the model (its config and a sample of every
    weight file's bytes, not its path: hosts may keep it in different places), the tokenized
    data and the options."""
    model = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        model.update(path.name.encode())
        model.update(_sampled_digest(path))
    data = hashlib.sha256()
    for seq in sequences:
        data.update(np.asarray(seq, dtype=np.int64).tobytes())
        data.update(b"|")
    return {
        "model": model.digest(),
        "data": data.digest(),
        "options": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).digest(),
    }


def _sampled_digest(path: Path, blocks: int = 16, block: int = 4096) -> bytes:
    """sha256 of a file's size, its first 64 KiB (the safetensors header) and ``blocks``
    evenly spaced blocks: a checkpoint of hundreds of GB is not read whole to tell it apart
    from another."""
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(65536))
            for i in range(blocks):
                handle.seek(size * i // blocks)
                digest.update(handle.read(block))
    except OSError as exc:
        raise MlxfunError(f"cannot read the weight file {path}: {exc.strerror or exc}") from None
    return digest.digest()


_MISMATCH_FIX = {
    "model": "give every rank the same model (config.json and weight files)",
    "data": "give every rank the same --dataset files, tokenizer, --max-samples and --max-tokens",
    "options": "run the same command (--scorers, --seed, --batch-size) on every rank",
}


def check_same_run(ranks: Ranks, fingerprint: dict) -> None:
    """Every rank compares every rank's fingerprint with rank 0's and stops with the same
    one-line error on a difference, before any collection."""
    if ranks.group is None:
        return
    keys = sorted(fingerprint)
    mine = np.frombuffer(b"".join(fingerprint[k] for k in keys), dtype=np.uint8)
    rows = _gather_bytes(ranks, mine, "comparing the runs").reshape(ranks.size, -1)
    width = len(fingerprint[keys[0]])
    for rank in range(1, ranks.size):
        for position, key in enumerate(keys):
            part = slice(position * width, (position + 1) * width)
            if not np.array_equal(rows[rank, part], rows[0, part]):
                raise MlxfunError(
                    f"rank {rank}'s {key} differs from rank 0's (sha256 "
                    f"{rows[rank, part].tobytes().hex()[:12]} vs "
                    f"{rows[0, part].tobytes().hex()[:12]}); {_MISMATCH_FIX[key]}"
                )


def combine_ranks(ranks: Ranks, collector, scorers) -> None:
    """Replace ``collector``'s accumulators and token counts by those of every rank, combined
    in rank order (the ``stats merge`` rule per scorer, token counts added)."""
    if ranks.group is None:
        return
    names = sorted(collector.accumulators)
    parts = [("token_counts", np.asarray(collector.token_counts, dtype=np.int64))]
    for name in names:
        for key in sorted(collector.accumulators[name]):
            value = np.ascontiguousarray(collector.accumulators[name][key], dtype=np.float64)
            parts.append((f"{name}.{key}", value))
    mine = np.concatenate([value.view(np.uint8).reshape(-1) for _, value in parts])
    rows = _gather_bytes(ranks, mine, "gathering the statistics").reshape(ranks.size, -1)
    per_rank = [_unpack(row, parts) for row in rows]
    collector.token_counts = np.sum([r["token_counts"] for r in per_rank], axis=0)
    by_name = {s.name: s for s in scorers}
    for name in names:
        keys = collector.accumulators[name]
        accs = [{key: r[f"{name}.{key}"] for key in keys} for r in per_rank]
        collector.accumulators[name] = combine_accumulators(by_name[name], accs)


def _unpack(row: np.ndarray, parts) -> dict:
    out, offset = {}, 0
    for name, like in parts:
        size = like.nbytes
        out[name] = row[offset : offset + size].copy().view(like.dtype).reshape(like.shape)
        offset += size
    return out


def _gather_bytes(ranks: Ranks, mine: np.ndarray, what: str) -> np.ndarray:
    """Every rank's ``mine`` (uint8, the same length on every rank) in rank order."""
    rows = _gather_varied(ranks, mine, what)
    if len({row.size for row in rows}) != 1:
        raise MlxfunError(
            f"rank {ranks.rank}: the ranks' statistics differ in size "
            f"({[row.size for row in rows]} bytes); run the same command on every rank"
        )
    return np.stack(rows)


def _gather_varied(ranks: Ranks, mine: np.ndarray, what: str) -> list[np.ndarray]:
    """Every rank's ``mine`` (uint8, any length) in rank order."""
    import mlx.core as mx

    with _deadline(ranks.timeout, what, ranks.rank), _lost_ranks(ranks, what):
        sizes = mx.distributed.all_gather(
            mx.array([mine.size], dtype=mx.int32), group=ranks.group, stream=mx.cpu
        )
        mx.eval(sizes)
        sizes = np.array(sizes).tolist()
        padded = np.zeros(max(sizes), dtype=np.uint8)
        padded[: mine.size] = mine
        gathered = mx.distributed.all_gather(mx.array(padded), group=ranks.group, stream=mx.cpu)
        mx.eval(gathered)
    rows = np.array(gathered, dtype=np.uint8).reshape(ranks.size, -1)
    return [row[:size] for row, size in zip(rows, sizes)]


_PER_LAYER = ("moe_layers", "experts_per_layer", "top_k", "expert_shapes")


def _whole_fingerprint(ranks: Ranks, mine: dict) -> dict:
    """The ``model_fingerprint`` of the whole model from every rank's fingerprint of its own
    layers: the per-layer lists joined in layer order."""
    if ranks.group is None:
        return mine
    text = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    parts = [json.loads(row.tobytes()) for row in _gather_varied(ranks, text, "joining layers")]
    keys = [k for k in _PER_LAYER if all(k in p for p in parts if p["moe_layers"])]
    entries = sorted(
        (entry for p in parts if p["moe_layers"] for entry in zip(*(p[k] for k in keys))),
        key=lambda entry: entry[0],
    )
    whole = {k: v for k, v in parts[0].items() if k not in _PER_LAYER}
    for position, key in enumerate(keys):
        whole[key] = [entry[position] for entry in entries]
    return whole


@contextmanager
def _lost_ranks(ranks: Ranks, what: str):
    """The backend's error when a peer closed its connections, as one line."""
    try:
        yield
    except RuntimeError as exc:
        raise MlxfunError(
            f"rank {ranks.rank}: lost the other ranks while {what} ({exc}); "
            "see the failing rank's error above"
        ) from None


def pipeline(model, ranks: Ranks) -> None:
    """Keep only this rank's decoder layers (mlx-lm's ``model.model.pipeline``, as its
    ``sharded_load`` does: the last rank runs the first layers, rank 0 the last ones) and read
    their weights; ``model`` was loaded lazily, so the other layers are never read."""
    import mlx.core as mx

    inner = getattr(model, "model", None)
    if not hasattr(inner, "pipeline"):
        raise MlxfunError(
            f"mlx-lm cannot pipeline {type(model).__module__.rsplit('.', 1)[-1]} models "
            "(no model.pipeline); collect without --pipeline: each rank then takes a share "
            "of the data"
        )
    if ranks.group is not None:
        try:
            inner.pipeline(ranks.group)
        except ValueError as exc:
            raise MlxfunError(f"cannot split the model over {ranks.size} ranks: {exc}") from None
    mx.eval(model.parameters())


def collect_pipelined(
    model, config: dict, adapter, sequences, scorers, batch_size: int, ranks: Ranks
):
    """Collect on a pipelined model: every rank runs every batch through its own layers and
    observes its own MoE layers, at their place among all the model's MoE layers; the other
    layers' accumulators stay empty, so combining the ranks (``combine_ranks``) fills each
    layer with the one rank that saw it. Returns ``(collector, fingerprint)``, the
    fingerprint of the whole model (``model_fingerprint`` of every rank's layers)."""
    import mlx.core as mx

    from .datasets import batches
    from .observe import Observer
    from .stats import StatsCollector

    layers = adapter.moe_layers(model)
    fingerprint = _whole_fingerprint(ranks, model_fingerprint(config, layers))
    order = fingerprint["moe_layers"]
    collector = StatsCollector(scorers, len(order), max(fingerprint["experts_per_layer"]))
    observer = Observer(model, adapter, collector.needs) if layers else None
    where = [order.index(layer.index) for layer in layers]
    ordered = sorted(sequences, key=len, reverse=True)
    with observer if observer is not None else nullcontext():
        for tokens, mask in batches(ordered, batch_size):
            hidden = model.model(mx.array(tokens))  # no LM head: statistics do not need it
            with _deadline(ranks.timeout, "running a batch", ranks.rank):
                with _lost_ranks(ranks, "running a batch"):
                    mx.eval(hidden)
            if observer is None:
                continue
            observations = observer.observations(mask)
            for obs in observations:
                obs.layer = where[obs.layer]
            collector.update(observations)
    combine_ranks(ranks, collector, scorers)
    return collector, fingerprint


# A separate process, because a blocked collective may hold the GIL (``mx.distributed.init``
# waiting for a peer does), so no Python thread of this process would run.
_WATCHDOG = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
done, _, _ = select.select([sys.stdin], [], [], seconds)
if not done:
    sys.stderr.write(message + chr(10))
    sys.stderr.flush()
    os.kill(pid, signal.SIGTERM)
"""


@contextmanager
def _deadline(seconds: float, what: str, rank):
    """Stop this process with one error line if the block takes longer than ``seconds``: a
    collective waiting on a rank that hangs (or never started) would otherwise block forever,
    in C++ where no Python exception can reach it."""
    who = "" if rank is None else f"rank {rank}: "
    message = (
        f"error: {who}no answer from the other ranks after {seconds:g} s while {what} "
        "(a rank died, hangs or never started); nothing was written. Check every host's "
        "output, or raise --rank-timeout if a rank is just slower"
    )
    command = [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(seconds)]
    watchdog = subprocess.Popen([*command, message], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watchdog.stdin.close()  # the watchdog sees end of file and exits quietly
        watchdog.wait()
