"""``slicing.slice_shard`` and ``slice_checkpoint`` write the same bytes whichever way the data
is copied: the kernel copy (``os.copy_file_range``), no ``copy_file_range`` at all (macOS: a
buffered copy) or one that fails (another file system); the kept rows are the source's rows,
read back by MLX, and shards without experts are copied byte for byte."""

import os

import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core import slicing
from mlxfun.core.errors import MlxfunError

KEEP = [0, 2, 3, 5]  # of 6 experts: two runs, so two ranges per tensor


def write_shard(path, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    """A shard whose tensors have odd byte sizes, so no range starts on a page boundary."""
    rng = np.random.default_rng(seed)
    tensors = {
        f"{prefix}experts.weight": rng.standard_normal((6, 5, 7)).astype(np.float16),
        f"{prefix}router.weight": rng.standard_normal((6, 3)).astype(np.float32),
        f"{prefix}norm.weight": rng.standard_normal(11).astype(np.float32),
    }
    arrays = {name: mx.array(value) for name, value in tensors.items()}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    return tensors


def no_copy_file_range(monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)


def failing_copy_file_range(monkeypatch):
    def fail(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)


def kernel_copy(monkeypatch):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no os.copy_file_range on this system")


COPIES = [kernel_copy, no_copy_file_range, failing_copy_file_range]


@pytest.mark.parametrize("copy", COPIES, ids=lambda f: f.__name__)
def test_slice_shard_keeps_the_source_rows(tmp_path, monkeypatch, copy):
    tensors = write_shard(tmp_path / "in.safetensors")
    copy(monkeypatch)
    monkeypatch.setattr(slicing, "_COPY_CHUNK", 64)  # several buffer fills per range
    cut = {"experts.weight": KEEP, "router.weight": KEEP}
    written = slicing.slice_shard(tmp_path / "in.safetensors", tmp_path / "out.safetensors", cut)
    loaded = mx.load(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        expected = value[KEEP] if name in cut else value
        np.testing.assert_array_equal(np.array(loaded[name]), expected)
    assert written == sum(
        (value[KEEP] if name in cut else value).nbytes for name, value in tensors.items()
    )


def test_every_copy_writes_the_same_bytes(tmp_path, monkeypatch):
    write_shard(tmp_path / "in.safetensors")
    cut = {"experts.weight": KEEP, "router.weight": KEEP}
    outputs = []
    for copy in COPIES:
        with monkeypatch.context() as patch:
            if copy is kernel_copy and not hasattr(os, "copy_file_range"):
                continue
            copy(patch)
            patch.setattr(slicing, "_COPY_CHUNK", 64)
            out = tmp_path / f"{copy.__name__}.safetensors"
            slicing.slice_shard(tmp_path / "in.safetensors", out, cut)
            outputs.append(out.read_bytes())
    assert len(outputs) >= 2 and all(data == outputs[0] for data in outputs)


def test_a_truncated_shard_is_an_error(tmp_path, monkeypatch):
    write_shard(tmp_path / "in.safetensors")
    data = (tmp_path / "in.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-40])
    no_copy_file_range(monkeypatch)
    cut = {"experts.weight": KEEP, "router.weight": KEEP}
    with pytest.raises(MlxfunError, match="truncated"):
        slicing.slice_shard(tmp_path / "short.safetensors", tmp_path / "out.safetensors", cut)


PLAN = slicing.LayerPlan(
    position=0,
    index=0,
    path="",
    module="",
    num_experts=6,
    top_k=1,
    prefixes=["experts"],
    names=["router.weight"],
    shared=[],
    expert_parameters=5 * 7 + 3,
)


@pytest.mark.parametrize("copy", COPIES, ids=lambda f: f.__name__)
def test_slice_checkpoint_copies_shards_without_experts_whole(tmp_path, monkeypatch, copy):
    source, output = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    output.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    tensors = write_shard(source / first, seed=0)
    write_shard(source / second, seed=1, prefix="shared.")  # no expert tensors
    copy(monkeypatch)
    owner = {"experts.weight": PLAN, "router.weight": PLAN}
    counts = slicing.slice_checkpoint(source, output, owner, {0: KEEP})
    assert (output / second).read_bytes() == (source / second).read_bytes()
    sliced = mx.load(str(output / first))
    for name, value in tensors.items():
        expected = value[KEEP] if name in owner else value
        np.testing.assert_array_equal(np.array(sliced[name]), expected)
    assert counts["shards"] == 2
    assert counts["bytes_before"] - counts["bytes_after"] == 2 * (6 * 35 * 2 + 6 * 3 * 4) // 6
