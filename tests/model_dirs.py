"""Write tiny mlx-lm model directories (weights, config, a byte-level tokenizer) for tests."""

import json
from pathlib import Path

from mlx_lm.utils import save_config, save_model

from .adapters.harness import build_tiny


def write_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level BPE tokenizer with no merges (token id = byte value)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    eos = sorted(alphabet, key=lambda c: ord(c))[0]
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos,
                "model_max_length": 4096,
            }
        )
    )


def write_model_dir(
    path, model_type: str, args: dict, seed: int = 0, bits: int | None = None, group_size: int = 32
):
    """Build a tiny seeded model and save it as an ordinary mlx-lm directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny(model_type, args, seed=seed, bits=bits, group_size=group_size)
    save_model(path, model)
    config = {"model_type": model_type, **args}
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    save_config(config, path / "config.json")
    write_byte_tokenizer(path)
    return path
