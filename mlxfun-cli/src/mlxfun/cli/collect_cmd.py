"""``mlxfun collect``: routing statistics on calibration text, written to a stats file."""

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
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        pipeline: bool = typer.Option(
            False,
            "--pipeline",
            help="Under mlx.launch: each rank holds and observes its own decoder layers (models "
            "mlx-lm can pipeline) instead of taking a share of the data.",
        ),
        rank_timeout: float = typer.Option(
            600.0,
            "--rank-timeout",
            help="Under mlx.launch: seconds a rank waits for the others before it gives up.",
        ),
    ):
        """Collect routing statistics (REAP, EAN, frequency, ...) in one pass."""
        from mlxfun.core import distributed, plugins
        from mlxfun.core.collect import collect_stats, layer_summary, with_seed
        from mlxfun.core.config import read_config
        from mlxfun.core.datasets import load_samples, tokenize_samples
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.models import load_model
        from mlxfun.core.outputs import check_output_file
        from mlxfun.core.stats import model_fingerprint, save_stats

        if max_tokens <= 0 or batch_size <= 0:
            raise MlxfunError("--max-tokens and --batch-size must be positive")
        ranks = distributed.join(rank_timeout)
        if ranks.writes:
            check_output_file(output, inputs=[model, *dataset])
        config = read_config(model)
        adapter = plugins.adapter_for_config(config)
        names = (
            [n.strip() for n in scorers.split(",") if n.strip()]
            if scorers
            else plugins.plugin_names("scorer")
        )
        chosen = with_seed([plugins.get_scorer(n) for n in names], seed)
        samples = load_samples(dataset, max_samples=max_samples, seed=seed)
        loaded, tokenizer, config = load_model(model, lazy=pipeline)
        sequences = tokenize_samples(samples, tokenizer, max_tokens)
        options = {"scorers": names, "seed": seed, "batch_size": batch_size, "pipeline": pipeline}
        distributed.check_same_run(
            ranks, distributed.run_fingerprint(model, config, sequences, options)
        )
        if pipeline:
            distributed.pipeline(loaded, ranks)
            collector, fingerprint = distributed.collect_pipelined(
                loaded, config, adapter, sequences, chosen, batch_size, ranks
            )
        else:
            mine = distributed.share(sequences, batch_size, ranks)
            collector, layers = collect_stats(
                loaded, adapter, mine, chosen, batch_size, progress=ranks.writes
            )
            distributed.combine_ranks(ranks, collector, chosen)
            fingerprint = model_fingerprint(config, layers)
        if not ranks.writes:
            return
        scores = collector.scores()
        tokens_seen = int(sum(len(s) for s in sequences))
        metadata = {
            "fingerprint": fingerprint,
            "moe_layers": fingerprint["moe_layers"],
            "model": str(model),
            "adapter": adapter.name,
            "datasets": [str(p) for p in dataset],
            "samples": len(sequences),
            "tokens_seen": tokens_seen,
            "max_samples": max_samples,
            "max_tokens": max_tokens,
            "seed": seed,
        }
        if ranks.size > 1:
            metadata["ranks"] = ranks.size
            metadata["ranks_split"] = "layers" if pipeline else "data"
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
