"""``mlxfun prune-neurons``: remove whole intermediate neurons from MLPs and experts."""

from pathlib import Path

import typer

from .output import print_json, print_table
from .sparsify_cmd import build_request, option


def register(app: typer.Typer) -> None:
    @app.command("prune-neurons")
    def prune_neurons(
        model: Path = option("model"),
        dataset: list[Path] = option("dataset"),
        output: Path = option("output"),
        method: str = option("method"),
        ratio: float = typer.Option(
            0.25, "--ratio", help="Share of every MLP's (every expert's) neurons to remove."
        ),
        last: int = option("last"),
        experts: bool = typer.Option(
            True, "--experts/--no-experts", help="Also the experts (same count in each)."
        ),
        sequential: bool = typer.Option(
            True,
            "--sequential/--no-sequential",
            help="Later layers' statistics see the earlier layers cut.",
        ),
        tfidf_mode: str = typer.Option("doc", "--tfidf-mode", help="doc or topic."),
        topics: int = option("topics"),
        classes: int = typer.Option(32, "--classes", help="Token classes (neuronrank_fisher)."),
        max_tokens: int = option("max_tokens"),
        max_samples: int = option("max_samples"),
        batch_size: int = option("batch_size"),
        seed: int = option("seed"),
        force: bool = option("force"),
        json_output: bool = option("json_output"),
    ):
        """Remove the lowest-scored MLP and expert neurons and write the smaller model."""
        options = dict(locals())
        from mlxfun.methods.prune_neurons import PruneNeuronsRequest, prune_neurons

        request = build_request(PruneNeuronsRequest, options)
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
