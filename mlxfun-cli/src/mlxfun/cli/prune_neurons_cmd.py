"""``mlxfun prune-neurons``: remove whole intermediate neurons from MLPs and experts."""

from pathlib import Path

import typer

from .output import print_json, print_table
from .sparsify_cmd import METHOD_HELP


def register(app: typer.Typer) -> None:
    @app.command("prune-neurons")
    def prune_neurons(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        dataset: list[Path] = typer.Option(
            None, "--dataset", help="Calibration text: JSONL, text file or directory; repeatable."
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Directory to write."),
        method: str = typer.Option("wanda", "--method", help=METHOD_HELP),
        ratio: float = typer.Option(
            0.25, "--ratio", help="Share of every MLP's (every expert's) neurons to remove."
        ),
        last: int = typer.Option(None, "--last", help="Only the last N decoder layers."),
        experts: bool = typer.Option(
            True, "--experts/--no-experts", help="Also the experts (same count in each)."
        ),
        sequential: bool = typer.Option(
            True,
            "--sequential/--no-sequential",
            help="Later layers' statistics see the earlier layers cut.",
        ),
        tfidf_mode: str = typer.Option("doc", "--tfidf-mode", help="doc or topic."),
        topics: int = typer.Option(16, "--topics", help="Topic clusters (--tfidf-mode topic)."),
        classes: int = typer.Option(32, "--classes", help="Token classes (neuronrank_fisher)."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per calibration sample."),
        max_samples: int = typer.Option(
            64, "--max-samples", help="Seeded random subsample of the samples."
        ),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling and topic clustering."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Remove the lowest-scored MLP and expert neurons and write the smaller model."""
        from mlxfun.methods.prune_neurons import PruneNeuronsRequest, prune_neurons

        request = PruneNeuronsRequest(
            model=model,
            dataset=list(dataset or []),
            output=output,
            method=method,
            ratio=ratio,
            last=last,
            experts=experts,
            sequential=sequential,
            tfidf_mode=tfidf_mode,
            topics=topics,
            classes=classes,
            max_tokens=max_tokens,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            force=force,
        )
        summary = prune_neurons(request)
        if json_output:
            print_json(summary)
            return
        print_table(summary["layers"], ["layer", "unit", "kind", "neurons", "kept", "removed"])
        saved = summary["bytes_before"] - summary["bytes_after"]
        print(
            f"\n{summary['method']}: weights {summary['bytes_before']} -> "
            f"{summary['bytes_after']} bytes ({saved / max(summary['bytes_before'], 1):.1%} "
            f"saved); config {summary['config_changes']}; wrote {summary['output']}"
        )
