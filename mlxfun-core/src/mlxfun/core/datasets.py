"""Calibration and evaluation datasets: reading JSONL and text files into samples, tokenizing
them and batching the token ids."""

import json
import random
from pathlib import Path

import attrs

from .errors import MlxfunError

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".json"}


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
