"""A model directory's config.json, read with one-line errors for what is missing or broken."""

import json
from pathlib import Path

from .errors import MlxfunError


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
