"""``mlxfun apply``: execute a compression plan (merges and prunes in one pass), or write only
its expert mapping."""

from pathlib import Path

import typer

from .output import print_json
from .prune_cmd import MODEL_FILE_HELP, model_file_hint, saving_line


def register(app: typer.Typer) -> None:
    @app.command("apply")
    def apply(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        plan: Path = typer.Option(..., "--plan", help="Plan file (mlxfun plan -o)."),
        output: Path = typer.Option(
            ..., "--output", "-o", help="Directory to write (with --mapping-only: a JSON file)."
        ),
        stats: Path = typer.Option(None, "--stats", help="Stats file (default: the plan's)."),
        dataset: list[Path] = typer.Option(
            None, "--dataset", help="Calibration text for merging (default: the plan's)."
        ),
        mapping_only: bool = typer.Option(
            False,
            "--mapping-only",
            help="Write the expert mapping (old -> new, -1 pruned) and merged-from lists only.",
        ),
        model_file: bool = typer.Option(False, "--model-file", help=MODEL_FILE_HELP),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Apply a compression plan to a model."""
        from mlxfun.methods.plan_apply import ApplyRequest, apply_plan
        from mlxfun.methods.plans import load_plan

        request = ApplyRequest(
            model=model,
            plan=load_plan(plan),
            output=output,
            stats=stats,
            dataset=dataset or None,
            mapping_only=mapping_only,
            force=force,
            model_file=model_file,
            progress=not json_output,
        )
        summary = apply_plan(request)
        if json_output:
            print_json(summary)
        elif mapping_only:
            print(f"wrote the expert mapping of {summary['layers']} MoE layers to {output}")
        else:
            print(
                f"{summary['method']}: {summary['experts_before']} -> "
                f"{summary['experts_after']} experts"
            )
            print(saving_line(summary))
            print(f"wrote {summary['output']}")
            if hint := model_file_hint(summary):
                print(hint)
