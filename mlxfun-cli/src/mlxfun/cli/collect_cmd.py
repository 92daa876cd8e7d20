"""``mlxfun collect``: routing statistics on calibration text, written to a stats file."""

import os
from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("collect")
    def collect(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory."),
        dataset: list[Path] = typer.Option(
            ...,
            "--dataset",
            help="JSONL (text / messages / prompt+completion), text file or directory; repeatable.",
        ),
        output: Path = typer.Option(..., "--output", "-o", help="Stats file to write (.npz)."),
        scorers: str = typer.Option(
            None, "--scorers", help="Comma-separated scorers (default: all installed)."
        ),
        max_samples: int = typer.Option(
            None, "--max-samples", help="Seeded random subsample of the samples."
        ),
        max_tokens: int = typer.Option(
            512, "--max-tokens", help="Tokens per sample (longer ones are cut)."
        ),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling and the random scorer."),
        stream: bool = typer.Option(
            False,
            "--stream",
            help="Read each decoder layer's weights just before it runs and drop them after: "
            "peak memory about one layer plus the hidden states.",
        ),
        spill: Path = typer.Option(
            None,
            "--spill",
            help="Directory for the hidden states (a disk memmap) instead of memory.",
        ),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Collect routing statistics (REAP, EAN, frequency, ...) in one pass."""
        from mlxfun.core import plugins
        from mlxfun.core.collect import collect_stats, layer_summary, with_seed
        from mlxfun.core.config import read_config
        from mlxfun.core.datasets import load_samples, tokenize_samples
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.models import load_model
        from mlxfun.core.outputs import check_output_file
        from mlxfun.core.stats import model_fingerprint, save_stats

        if max_tokens <= 0 or batch_size <= 0:
            raise MlxfunError("--max-tokens and --batch-size must be positive")
        check_output_file(output, inputs=[model, *dataset])
        if spill is not None:
            from mlxfun.core.runner import spill_file

            fd, probe = spill_file(spill)  # one-line error now, not after loading the model
            os.close(fd)
            os.unlink(probe)
        config = read_config(model)
        adapter = plugins.adapter_for_config(config)
        names = (
            [n.strip() for n in scorers.split(",") if n.strip()]
            if scorers
            else plugins.plugin_names("scorer")
        )
        chosen = with_seed([plugins.get_scorer(n) for n in names], seed)
        samples = load_samples(dataset, max_samples=max_samples, seed=seed)
        loaded, tokenizer, config = load_model(model, lazy=stream)
        sequences = tokenize_samples(samples, tokenizer, max_tokens)
        # before the run: --stream drops each layer's weights (and so its shapes) after it ran
        fingerprint = model_fingerprint(config, adapter.moe_layers(loaded))
        collector, layers = collect_stats(
            loaded, adapter, sequences, chosen, batch_size, stream=stream, spill=spill
        )
        scores = collector.scores()
        tokens_seen = int(sum(len(s) for s in sequences))
        metadata = {
            "fingerprint": fingerprint,
            "moe_layers": [layer.index for layer in layers],
            "model": str(model),
            "adapter": adapter.name,
            "datasets": [str(p) for p in dataset],
            "samples": len(sequences),
            "tokens_seen": tokens_seen,
            "max_samples": max_samples,
            "max_tokens": max_tokens,
            "seed": seed,
        }
        save_stats(output, scores, collector.accumulators, collector.token_counts, metadata)
        rows = layer_summary(scores, collector.token_counts, metadata["moe_layers"], None)
        if json_output:
            print_json(
                {
                    "output": str(output),
                    "tokens_seen": tokens_seen,
                    "scorers": sorted(scores),
                    "layers": rows,
                }
            )
            return
        print_table(rows)
        print(
            f"\n{tokens_seen} tokens from {len(sequences)} samples; scorers: {', '.join(sorted(scores))}"
        )
        print(f"wrote {output}")
