"""Model and dataset I/O: loading with mlx-lm, calibration text, atomic output directories."""

import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import attrs

from .errors import MlxfunError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".json"}


def read_config(model_dir) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise MlxfunError(
            f"model directory {model_dir} does not exist; pass a local mlx-lm model directory"
        )
    path = model_dir / "config.json"
    if not path.is_file():
        raise MlxfunError(
            f"{model_dir} has no config.json; pass an mlx-lm model directory "
            "(e.g. made by mlx_lm.convert)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MlxfunError(
            f"{path} is not valid JSON ({exc}); fix or re-download the model"
        ) from None


def _needs_float32(model) -> bool:
    """Unquantized half-precision experts cannot run on the CPU backend (gather_mm is f32-only)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if mx.default_device() != mx.cpu:
        return False
    for name, value in tree_flatten(model.parameters()):
        if value.ndim == 3 and value.dtype in (mx.bfloat16, mx.float16) and ".weight" in name:
            return True
    return False


_said_float32 = False


def to_runnable_dtype(model) -> bool:
    """Cast half-precision weights to float32 where the backend needs it; say so once."""
    global _said_float32
    if not _needs_float32(model):
        return False
    import mlx.core as mx
    from mlx.utils import tree_map

    def cast(value):
        if isinstance(value, mx.array) and value.dtype in (mx.bfloat16, mx.float16):
            return value.astype(mx.float32)
        return value

    model.update(tree_map(cast, model.parameters()))
    if not _said_float32:
        print(
            "mlxfun: computing in float32: the MLX CPU backend cannot run half-precision experts",
            file=sys.stderr,
        )
        _said_float32 = True
    return True


def load_model(model_dir, trust_remote_code: bool = True):
    """Load an mlx-lm model directory: ``(model, tokenizer, config)``.

    mlxfun's own non-uniform outputs carry a ``model_file`` (see ``nonuniform``); they are
    trusted here because mlxfun wrote them.
    """
    config = read_config(model_dir)
    from mlx_lm.utils import load

    try:
        model, tokenizer = load(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise MlxfunError(f"mlx-lm cannot load {model_dir}: {exc}") from None
    to_runnable_dtype(model)
    return model, tokenizer, config


@attrs.define
class Sample:
    text: str | None = None
    messages: list | None = None
    prompt: str | None = None
    completion: str | None = None
    source: str = ""

    def render(self, tokenizer) -> str:
        if self.text is not None:
            return self.text
        if self.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise MlxfunError(
                    f"{self.source}: 'messages' need a chat template and this model's tokenizer "
                    "has none; use 'text' or 'prompt'/'completion' records"
                )
            return tokenizer.apply_chat_template(self.messages, tokenize=False)
        return (self.prompt or "") + (self.completion or "")


def _parse_jsonl_line(line: str, where: str) -> Sample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MlxfunError(
            f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object"
        ) from None
    if not isinstance(record, dict):
        raise MlxfunError(f"{where}: expected a JSON object with 'text', 'messages' or 'prompt'")
    if isinstance(record.get("text"), str):
        return Sample(text=record["text"], source=where)
    if isinstance(record.get("messages"), list):
        for message in record["messages"]:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise MlxfunError(f"{where}: every message needs 'role' and 'content'")
        return Sample(messages=record["messages"], source=where)
    if isinstance(record.get("prompt"), str):
        completion = record.get("completion", "")
        if not isinstance(completion, str):
            raise MlxfunError(f"{where}: 'completion' must be a string")
        return Sample(prompt=record["prompt"], completion=completion, source=where)
    raise MlxfunError(
        f"{where}: no 'text', 'messages' or 'prompt'/'completion' field (keys: {', '.join(record)})"
    )


def _read_file(path: Path) -> list[Sample]:
    if path.suffix in JSONL_SUFFIXES:
        samples = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    samples.append(_parse_jsonl_line(line, f"{path}:{number}"))
        return samples
    text = path.read_text(encoding="utf-8", errors="replace")
    return [Sample(text=text, source=str(path))] if text.strip() else []


def _dataset_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES
        )
        if not files:
            raise MlxfunError(f"dataset directory {path} has no .jsonl, .json or text files")
        return files
    if not path.exists():
        raise MlxfunError(
            f"dataset {path} does not exist; pass a .jsonl file, a text file or a directory"
        )
    return [path]


def load_samples(paths, max_samples: int | None = None, seed: int = 0) -> list[Sample]:
    """Read every dataset, then draw a seeded random subsample of ``max_samples``."""
    samples = []
    for path in paths:
        for file in _dataset_files(Path(path)):
            samples.extend(_read_file(file))
    if not samples:
        raise MlxfunError(f"no samples found in {', '.join(str(p) for p in paths)}")
    if max_samples is not None and max_samples < len(samples):
        if max_samples <= 0:
            raise MlxfunError(f"--max-samples must be positive, got {max_samples}")
        samples = random.Random(seed).sample(samples, max_samples)
    return samples


def tokenize_samples(samples, tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids per sample, each cut to ``max_tokens``; empty samples are dropped."""
    sequences = []
    for sample in samples:
        ids = tokenizer.encode(sample.render(tokenizer))
        if ids:
            sequences.append(list(ids[:max_tokens]))
    return sequences


def batches(sequences, batch_size: int, pad_id: int = 0):
    """Yield ``(tokens, mask)`` numpy batches, right-padded; ``mask`` marks real tokens."""
    import numpy as np

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        tokens = np.full((len(chunk), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(chunk), width), dtype=bool)
        for row, seq in enumerate(chunk):
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        yield tokens, mask


@contextmanager
def atomic_output_dir(output, force: bool = False):
    """Yield a temporary directory next to ``output``; move it into place only on success.

    An interrupted run leaves only a ``.<name>.tmp-<pid>`` directory, never something that
    looks like a finished model.
    """
    output = Path(output)
    if output.exists() and not force:
        raise MlxfunError(f"{output} already exists; choose another --output or pass --force")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer_files(source, destination) -> list[str]:
    """Copy tokenizer and generation files (not weights or config) from one model dir to another."""
    copied = []
    for path in Path(source).iterdir():
        if path.is_file() and (
            path.name.startswith("tokenizer")
            or path.name
            in {
                "special_tokens_map.json",
                "generation_config.json",
                "chat_template.jinja",
                "vocab.json",
                "merges.txt",
            }
            or path.suffix in {".model", ".tiktoken"}
        ):
            shutil.copy2(path, Path(destination) / path.name)
            copied.append(path.name)
    return copied
