"""Loading mlx-lm model directories (never running their Python), and copying model files.

mlxfun's own non-uniform outputs carry a ``model_file``; they are built from mlxfun's template
(``nonuniform``), never from the file on disk; any other ``model_file`` is refused.
"""

import shutil
import sys
from pathlib import Path

from .config import read_config
from .errors import MlxfunError
from .slicing import check_weights, check_weights_mlx


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
