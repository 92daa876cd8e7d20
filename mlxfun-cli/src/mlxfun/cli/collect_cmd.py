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
        from mlxfun.core.collect import CollectRequest
        from mlxfun.core.collect import collect as run_collect

        request = CollectRequest(
            model=model,
            datasets=dataset,
            output=output,
            scorers=[n.strip() for n in scorers.split(",") if n.strip()] if scorers else None,
            max_samples=max_samples,
            max_tokens=max_tokens,
            batch_size=batch_size,
            seed=seed,
            stream=stream,
            spill=spill,
            pipeline=pipeline,
            rank_timeout=rank_timeout,
        )
        summary = run_collect(request)
        if summary is None:  # a rank other than 0 under mlx.launch: rank 0 reports
            return
        if json_output:
            print_json(
                {key: summary[key] for key in ("output", "tokens_seen", "scorers", "layers")}
            )
            return
        print_table(summary["layers"])
        print(
            f"\n{summary['tokens_seen']} tokens from {summary['samples']} samples; scorers: "
            f"{', '.join(summary['scorers'])}"
        )
        print(f"wrote {summary['output']}")
