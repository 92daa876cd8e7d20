"""Loading model directories through mlx-lm (never running their Python), and copying model
files.

The model classes come from ``model_classes``: an installed adapter's ``model_module`` or
mlx-lm's own module (``architectures``); a ``model_file`` only when mlxfun wrote it, and then
built from installed code, never from the file (``model_files``).
"""

import contextlib
import logging
import shutil
import sys
from pathlib import Path

from .config import read_config
from .errors import MlxfunError
from .model_files import model_classes
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


def load_mlx_model(model_dir, lazy: bool = False):
    """``(model, config)`` as ``mlx_lm.utils.load_model`` builds them, with the classes of
    ``model_classes`` as its ``get_model_classes`` (never running a ``model_file`` from disk);
    mlx-lm's refusals and missing files become one-line errors."""
    from mlx_lm.utils import load_model as mlx_load_model

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    classes = model_classes(model_dir, config)
    options = {"get_model_classes": lambda config: classes}
    if config.get("model_file") is not None:
        # mlx-lm imports config["model_file"] whenever it is set: hide it so that it asks
        # get_model_classes, which answers with installed code.
        options["model_config"] = {"model_file": None}
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


# transformers' AutoTokenizer reads config.json through AutoConfig; for a model type it does not
# know (a plugin's architecture) it falls back to a bare config and logs this warning on every
# load, although the tokenizer does not depend on the model type.
UNKNOWN_MODEL_TYPE_WARNING = "You are using a model of type "


def _drop_unknown_model_type_warning(record) -> bool:
    return not str(record.msg).startswith(UNKNOWN_MODEL_TYPE_WARNING)


@contextlib.contextmanager
def _without_unknown_model_type_warning():
    """Drop exactly that warning (a filter on transformers' configuration logger), nothing
    else, while the tokenizer loads."""
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addFilter(_drop_unknown_model_type_warning)
    try:
        yield
    finally:
        logger.removeFilter(_drop_unknown_model_type_warning)


def load_model(model_dir, lazy: bool = False):
    """Load a model directory: ``(model, tokenizer, config)``, the model built by
    ``model_classes`` (a plugin's architecture included; a ``model_file`` never run).
    ``lazy``: no weight is read until it is used (``mlxfun collect --stream``)."""
    config = read_config(model_dir)
    from mlx_lm.utils import load_tokenizer

    model, loaded_config = load_mlx_model(model_dir, lazy=lazy)
    try:
        with _without_unknown_model_type_warning():
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
