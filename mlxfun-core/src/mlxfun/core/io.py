"""Model and dataset I/O: loading with mlx-lm, calibration text, atomic output directories."""

import glob
import json
import os
import random
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import attrs

from .errors import MlxfunError
from .slicing import check_weights, check_weights_mlx

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
    except (OSError, UnicodeDecodeError) as exc:
        raise MlxfunError(f"cannot read {path}: {exc}") from None


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


def model_classes(model_dir, config: dict):
    """``(Model, ModelArgs)`` for a config with a ``model_file``, or ``None`` without one.

    mlxfun never runs a model directory's own Python: the only ``model_file`` it accepts is
    its own non-uniform one (``nonuniform.is_nonuniform``), and that is built from mlxfun's
    template (``nonuniform.load_module``), not from the file on disk. Any other ``model_file``
    is refused.
    """
    model_file = config.get("model_file")
    if model_file is None:
        return None
    from . import nonuniform

    if not nonuniform.is_nonuniform(config):
        raise MlxfunError(
            f"{model_dir} builds its architecture from its own Python file model_file="
            f"{model_file!r}; mlxfun never runs a model directory's code and only knows the "
            f"{nonuniform.MODEL_FILE} it writes: use a model that stock mlx-lm builds"
        )
    module = nonuniform.load_module(config)
    return module.Model, module.ModelArgs


def load_mlx_model(model_dir, lazy: bool = False):
    """``(model, config)`` as ``mlx_lm.utils.load_model`` builds them, never running a
    ``model_file`` from disk (see ``model_classes``); mlx-lm's refusals and missing files
    become one-line errors."""
    from mlx_lm.utils import load_model as mlx_load_model

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    classes = model_classes(model_dir, config)
    options = {}
    if classes is not None:
        # mlx-lm imports config["model_file"] whenever it is set: hide it so that it asks
        # get_model_classes, which answers with mlxfun's own template.
        options = {
            "model_config": {"model_file": None},
            "get_model_classes": lambda config: classes,
        }
    check_weights(model_dir)
    try:
        return mlx_load_model(model_dir, lazy=lazy, **options)
    except RuntimeError:
        check_weights_mlx(model_dir)  # names the file mlx cannot read
        raise
    except OSError as exc:
        if not any(model_dir.glob("model*.safetensors")):
            raise MlxfunError(
                f"{model_dir} has no model*.safetensors weights; pass a complete mlx-lm model "
                "directory (weights next to config.json)"
            ) from None
        raise MlxfunError(f"cannot read {model_dir}: {exc}") from None
    except ValueError as exc:
        raise MlxfunError(f"mlx-lm cannot load {model_dir}: {exc}") from None


def load_model(model_dir):
    """Load an mlx-lm model directory: ``(model, tokenizer, config)``.

    mlxfun's own non-uniform outputs carry a ``model_file`` (see ``nonuniform``); they are
    built from mlxfun's template, never from the file; any other ``model_file`` is refused.
    """
    config = read_config(model_dir)
    from mlx_lm.utils import load_tokenizer

    model, loaded_config = load_mlx_model(model_dir)
    try:
        tokenizer = load_tokenizer(
            Path(model_dir), eos_token_ids=loaded_config.get("eos_token_id", None)
        )
    except (OSError, ValueError) as exc:
        raise MlxfunError(
            f"cannot load the tokenizer of {model_dir} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) next to config.json"
        ) from None
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


# Every mlxfun model output has it; config.json alone is any model.
MODEL_OUTPUT_MARKERS = ("mlxfun.json",)
_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>\w+)-(?P<pid>\d+)(?:\.npz|\.probe)?")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def run_tag() -> str:
    """``HOST-PID`` for temporary names: a pid means something only on its own machine (an
    output folder may be shared between machines), so only this host's leftovers are judged."""
    return f"{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def remove_stale_siblings(output) -> list[Path]:
    """Remove what killed runs of this machine left next to ``output``:
    ``.<name>.tmp-<host>-<pid>`` (and ``.old-``, ``.tmp-...npz``) whose process is no longer
    running; other machines' leftovers are left alone.
    A run still going (its pid alive) is left alone, and so is an ``.old`` directory while
    ``output`` is missing (a run killed between its two renames). Returns what was removed."""
    output = Path(output)
    removed = []
    try:
        siblings = list(output.parent.glob(f".{glob.escape(output.name)}.*-*"))
    except OSError:
        return removed
    for path in siblings:
        match = _STALE.fullmatch(path.name)
        if not match or match["name"] != output.name or match["host"] != _host():
            continue
        if _pid_alive(int(match["pid"])):
            continue
        if ".old-" in path.name and not (output.exists() or output.is_symlink()):
            continue  # killed while replacing: this is the only copy of the previous output
        try:
            _remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _same(a: Path, b: Path) -> bool:
    """The same file or folder: by identity where both exist (case-insensitive file systems,
    bind mounts and links make different strings name one folder), else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _inside(path: Path, directory: Path) -> bool:
    """``path`` is ``directory`` or lies below it (both resolved)."""
    return any(_same(p, directory) for p in (path, *path.parents))


def _check_not_an_input(output: Path, inputs) -> None:
    where = output.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if _inside(source, where):
            what = "is" if _same(source, where) else "contains"
            raise MlxfunError(
                f"--output {output} {what} the input {item}; mlxfun never modifies its inputs "
                "(nor deletes them with --force): choose an --output outside them"
            )
        if _inside(where, source):
            raise MlxfunError(
                f"--output {output} is inside the input {item}; mlxfun never modifies its "
                "inputs: choose an --output outside them"
            )


def check_output(output, force: bool = False, inputs=()) -> Path:
    """Refuse (one line) an ``--output`` that would destroy an input or something that is not
    a previous model output:

    - an input (model, stats, dataset) may not be the output, lie inside it or contain it;
    - an existing output is replaced only with ``force``, and only if it is a directory that
      is a previous mlxfun model output (has ``mlxfun.json``).
    """
    output = Path(output)
    _check_not_an_input(output, inputs)
    if output.exists() or output.is_symlink():
        if not force:
            raise MlxfunError(f"{output} already exists; choose another --output or pass --force")
        if output.is_symlink() or not output.is_dir():
            raise MlxfunError(
                f"{output} exists and is not a model directory; --force only replaces a "
                "previous model output: remove it yourself or choose another --output"
            )
        if not any((output / name).is_file() for name in MODEL_OUTPUT_MARKERS):
            raise MlxfunError(
                f"{output} exists and is not an mlxfun output (no mlxfun.json); --force only "
                "replaces a previous mlxfun output: remove it yourself or choose another --output"
            )
    return output


def check_output_file(path, what: str = "--output", inputs=()) -> Path:
    """Refuse (one line) an output file that cannot be written, before hours of work: an input
    (model, dataset, stats file) or a file inside one, a directory, or a folder where no file
    can be created (probed with a temporary file)."""
    path = Path(path)
    _check_not_an_input(path, inputs)
    if path.is_dir():
        raise MlxfunError(f"{what} {path} is a directory; pass a file name")
    probe = path.parent / f".{path.name}.tmp-{run_tag()}.probe"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MlxfunError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path


@contextmanager
def atomic_output_dir(output, force: bool = False, inputs=()):
    """Yield a temporary directory next to ``output``; move it into place only on success.

    ``check_output`` runs first (``inputs``: the paths the run reads, which must survive).
    An interrupted run leaves only a ``.<name>.tmp-<pid>`` directory, never something that
    looks like a finished model; later runs writing the same output remove such leftovers
    whose process is gone (``remove_stale_siblings``).
    """
    output = check_output(output, force, inputs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(output)
        tmp = output.parent / f".{output.name}.tmp-{run_tag()}"
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise MlxfunError(f"cannot write --output {output}: {exc}") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise MlxfunError(f"{output} was not written: {exc}") from None
        try:
            if output.exists() or output.is_symlink():
                check_output(output, force, inputs)  # it may have appeared meanwhile
                old = output.parent / f".{output.name}.old-{run_tag()}"
                os.replace(output, old)
                os.replace(tmp, output)
            else:
                old = None
                os.replace(tmp, output)
        except OSError as exc:
            raise MlxfunError(f"cannot write --output {output}: {exc}") from None
        if old is not None:
            try:
                _remove(old)
            except OSError:
                pass  # a later run removes it (remove_stale_siblings)
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
