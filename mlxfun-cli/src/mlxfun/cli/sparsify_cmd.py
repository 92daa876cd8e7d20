"""``mlxfun sparsify``: zero the least important weights (Wanda and its variants, NeuronRank)."""

from pathlib import Path

import typer

from .output import print_json, print_table

METHOD_HELP = (
    "Neuron scorer: magnitude, wanda, wanda_idf, wanda_spiky, wanda_select, neuronrank_tfidf, "
    "neuronrank_fisher, or a plugin's."
)

# The options prune-neurons shares with this command: name -> (default, flags, help).
OPTIONS = dict(
    model=(..., ("--model",), "mlx-lm model directory (not modified)."),
    dataset=(None, ("--dataset",), "Calibration text: JSONL, text file or directory; repeatable."),
    output=(None, ("--output", "-o"), "Directory to write."),
    method=("wanda", ("--method",), METHOD_HELP),
    last=(None, ("--last",), "Only the last N decoder layers."),
    topics=(16, ("--topics",), "Topic clusters (--tfidf-mode topic)."),
    max_tokens=(256, ("--max-tokens",), "Tokens per calibration sample."),
    max_samples=(64, ("--max-samples",), "Seeded random subsample of the samples."),
    batch_size=(4, ("--batch-size",), "Samples per forward pass."),
    seed=(0, ("--seed",), "Seed for subsampling and topic clustering."),
    force=(False, ("--force",), "Replace an existing --output."),
    json_output=(False, ("--json",), "Print the summary as JSON."),
)


def option(name: str):
    default, flags, help_text = OPTIONS[name]
    return typer.Option(default, *flags, help=help_text)


def build_request(request_class, options: dict, **extra):
    """The request from a command's options (its parameters, by name), less ``json_output``."""
    fields = {name: value for name, value in options.items() if name != "json_output"}
    fields["dataset"] = list(fields["dataset"] or [])
    return request_class(**fields, **extra)


def register(app: typer.Typer) -> None:
    @app.command("sparsify")
    def sparsify(
        model: Path = option("model"),
        dataset: list[Path] = option("dataset"),
        output: Path = option("output"),
        method: str = option("method"),
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
        last: int = option("last"),
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
        topics: int = option("topics"),
        classes: int = typer.Option(
            32, "--classes", help="Token classes for neuronrank_fisher (most frequent ids)."
        ),
        weight_exp: float = typer.Option(1.0, "--weight-exp", help="neuronrank_tfidf: |W|^a."),
        tf_exp: float = typer.Option(1.0, "--tf-exp", help="neuronrank_tfidf: tf^b."),
        idf_exp: float = typer.Option(1.5, "--idf-exp", help="neuronrank_tfidf: idf^g."),
        max_tokens: int = option("max_tokens"),
        max_samples: int = option("max_samples"),
        batch_size: int = option("batch_size"),
        seed: int = option("seed"),
        force: bool = option("force"),
        json_output: bool = option("json_output"),
    ):
        """Zero the lowest-scored weights of every row (Wanda, NeuronRank; no memory saved)."""
        options = dict(locals())
        from mlxfun.methods.sparsify import SparsifyRequest, sparsify

        request = build_request(SparsifyRequest, options, progress=not json_output)
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
