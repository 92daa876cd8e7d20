"""Write tiny mlx-lm model directories (weights, config, a byte-level tokenizer) for tests:
``mlxfun.core.testing.save_tiny_checkpoint`` under the names the tests use."""

from mlxfun.core.testing import save_tiny_checkpoint, write_byte_tokenizer

__all__ = ["write_byte_tokenizer", "write_model_dir"]


def write_model_dir(
    path, model_type: str, args: dict, seed: int = 0, bits: int | None = None, group_size: int = 32
):
    """Build a tiny seeded model and save it as an ordinary mlx-lm directory."""
    return save_tiny_checkpoint(path, model_type, args, seed=seed, bits=bits, group_size=group_size)
