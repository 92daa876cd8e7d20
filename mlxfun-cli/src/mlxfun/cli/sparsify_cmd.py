"""``mlxfun sparsify``: zero the least important weights (Wanda and its variants, NeuronRank)."""

from pathlib import Path

import typer

from .output import print_json, print_table

METHOD_HELP = (
    "Neuron scorer: magnitude, wanda, wanda_idf, wanda_spiky, wanda_select, neuronrank_tfidf, "
    "neuronrank_fisher, or a plugin's."
)


def register(app: typer.Typer) -> None:
    @app.command("sparsify")
    def sparsify(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        dataset: list[Path] = typer.Option(
            None, "--dataset", help="Calibration text: JSONL, text file or directory; repeatable."
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Directory to write."),
        method: str = typer.Option("wanda", "--method", help=METHOD_HELP),
        sparsity: float = typer.Option(
            0.5, "--sparsity", help="Share of every output row's weights to zero (unstructured)."
        ),
        pattern: str = typer.Option(
            "unstructured", "--pattern", help="unstructured, or N:M such as 2:4 or 4:8."
        ),
        attention: bool = typer.Option(
            False,
            "--include-attention/--skip-attention",
            help="Also prune the attention projections.",
        ),
        lm_head: bool = typer.Option(
            False, "--lm-head", help="Also prune the LM head (by magnitude; not tied heads)."
        ),
        last: int = typer.Option(None, "--last", help="Only the last N decoder layers."),
        experts: bool = typer.Option(
            True, "--experts/--no-experts", help="Prune the stacked experts' projections."
        ),
        sequential: bool = typer.Option(
            True,
            "--sequential/--no-sequential",
            help="Later layers' statistics see the earlier layers pruned (Wanda).",
        ),
        tfidf_mode: str = typer.Option(
            "doc", "--tfidf-mode", help="neuronrank_tfidf documents: doc (samples) or topic."
        ),
        topics: int = typer.Option(16, "--topics", help="Topic clusters (--tfidf-mode topic)."),
        classes: int = typer.Option(
            32, "--classes", help="Token classes for neuronrank_fisher (most frequent ids)."
        ),
        weight_exp: float = typer.Option(1.0, "--weight-exp", help="neuronrank_tfidf: |W|^a."),
        tf_exp: float = typer.Option(1.0, "--tf-exp", help="neuronrank_tfidf: tf^b."),
        idf_exp: float = typer.Option(1.5, "--idf-exp", help="neuronrank_tfidf: idf^g."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per calibration sample."),
        max_samples: int = typer.Option(
            64, "--max-samples", help="Seeded random subsample of the samples."
        ),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling and topic clustering."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Zero the lowest-scored weights of every row (Wanda, NeuronRank; no memory saved)."""
        from mlxfun.methods.sparsify import SparsifyRequest, sparsify

        request = SparsifyRequest(
            model=model,
            dataset=list(dataset or []),
            output=output,
            method=method,
            sparsity=sparsity,
            pattern=pattern,
            attention=attention,
            lm_head=lm_head,
            last=last,
            experts=experts,
            sequential=sequential,
            tfidf_mode=tfidf_mode,
            topics=topics,
            classes=classes,
            weight_exp=weight_exp,
            tf_exp=tf_exp,
            idf_exp=idf_exp,
            max_tokens=max_tokens,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            force=force,
            progress=not json_output,
        )
        summary = sparsify(request)
        if json_output:
            print_json(summary)
            return
        rows = [{"group": g, **v} for g, v in summary["groups"].items()]
        for row in rows:
            row["sparsity"] = round(row["zeroed"] / max(row["weights"], 1), 4)
        print_table(rows, ["group", "weights", "zeroed", "sparsity"])
        print(
            f"\n{summary['method']} ({summary['pattern']}): zeroed {summary['zeroed']} of "
            f"{summary['weights']} weights in {len(summary['modules'])} modules; "
            f"{summary['calibration_tokens']} calibration tokens; wrote {summary['output']}"
        )
        print("the zeros save no memory or time in MLX (no sparse kernels) until compressed")
