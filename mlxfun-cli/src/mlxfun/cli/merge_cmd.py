"""``mlxfun merge``: REAM expert merging into the experts a selector keeps."""

from pathlib import Path

import typer

from .output import print_json, print_table
from .prune_cmd import MODEL_FILE_HELP, model_file_hint, option, saving_line


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        stats: Path = typer.Option(
            ..., "--stats", help="Stats file of this model (mlxfun collect)."
        ),
        dataset: list[Path] = typer.Option(
            None,
            "--dataset",
            help="Calibration text for the similarities: JSONL, text file or directory; "
            "repeatable.",
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Directory to write."),
        scorer: str = typer.Option(
            "reap", "--scorer", help="Which statistic is the saliency (centroids, weights)."
        ),
        selector: str = typer.Option(
            "bottom", "--selector", help="bottom, strided, model-wide, or a plugin's selector."
        ),
        n: int = typer.Option(
            None, "--n", help="Experts to merge away per layer (model-wide: in total)."
        ),
        ratio: float = typer.Option(
            None, "--ratio", help="Share of experts to merge away, instead of --n (e.g. 0.25)."
        ),
        protect: list[str] = typer.Option(
            None, "--protect", help="Always a centroid; same forms as in mlxfun prune."
        ),
        target: list[str] = typer.Option(
            None, "--target", help="Never a centroid (counts towards --n); same forms."
        ),
        protect_from: list[str] = option("protect_from"),
        target_from: list[str] = option("target_from"),
        min_keep: int = option("min_keep"),
        normalize: str = typer.Option(
            "none", "--normalize", help="model-wide: none, mean or max (as in prune)."
        ),
        group_size: int = typer.Option(
            16,
            "--group-size",
            help="Experts per group, centroid included (0: every other expert joins its most "
            "similar centroid; 1: no merging, the prune result).",
        ),
        max_tokens: int = typer.Option(
            2048, "--max-tokens", help="Calibration tokens for the similarities (in total)."
        ),
        max_samples: int = typer.Option(
            None, "--max-samples", help="Seeded random subsample of the samples."
        ),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling and alignment tokens."),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the centroids and size saving; write nothing."
        ),
        model_file: bool = typer.Option(False, "--model-file", help=MODEL_FILE_HELP),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Merge experts into the most salient ones (REAM) and write the smaller model."""
        from mlxfun.core import plugins
        from mlxfun.methods.ream import MergeRequest
        from mlxfun.methods.scan_report import expert_option

        request = MergeRequest(
            model=model,
            stats=stats,
            dataset=dataset or [],
            output=output,
            scorer=scorer,
            selector=selector,
            n=n,
            ratio=ratio,
            protect=expert_option(protect, protect_from, model, "--protect"),
            target=expert_option(target, target_from, model, "--target"),
            min_keep=min_keep,
            normalize=normalize,
            group_size=group_size,
            max_tokens=max_tokens,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            force=force,
            dry_run=dry_run,
            model_file=model_file,
            progress=not json_output,
        )
        summary = plugins.get_compressor("ream").compress(request)
        if json_output:
            print_json(summary)
        else:
            _print_summary(summary)


def _print_summary(summary: dict) -> None:
    """The merge summary for people: per-layer table, counts, size saving, what was written."""
    if summary["dry_run"]:
        columns = ["layer", "experts", "kept", "removed", "removed_ids"]
    else:
        columns = ["layer", "experts", "kept", "merged_groups", "absorbed", "dropped"]
        columns += ["group_sizes", "seconds"]
    print_table(summary["layers"], columns)
    shape = "uniform" if summary["uniform"] else "non-uniform (ships a model_file)"
    print(
        f"\nREAM on {summary['scorer']} ({summary['selector']}, group size "
        f"{summary['group_size']}): {summary['experts_before']} -> "
        f"{summary['experts_after']} experts, {shape}"
    )
    print(saving_line(summary))
    if summary["dry_run"]:
        print("dry run: nothing written (the groups need the calibration forward)")
        return
    if summary.get("requantized"):
        q = summary["requantized"]
        print(
            f"merged experts requantized: {q['bits']} bits, group size {q['group_size']}, "
            f"{q['mode']}"
        )
    print(f"similarities on {summary['tokens']} tokens; wrote {summary['output']}")
    if hint := model_file_hint(summary):
        print(hint)
