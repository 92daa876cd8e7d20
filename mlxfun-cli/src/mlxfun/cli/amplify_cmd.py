"""``mlxfun amplify``: a steering spec written into a checkpoint's router weights, so that stock
mlx-lm applies it with no mlxfun. Definitions in ``mlxfun.methods.amplify``."""

from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("amplify")
    def amplify(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        spec: Path = typer.Option(..., "--spec", help="The steering spec (JSON)."),
        output: Path = typer.Option(..., "--output", "-o", help="The amplified model directory."),
        force: bool = typer.Option(
            False, "--force", help="Replace an existing mlxfun output at --output."
        ),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Write the spec's expert biases into the routers (correction bias, router bias, or a
        model file for routers without a bias): stock mlx-lm loads the output and steers."""
        from mlxfun.methods.amplify import amplify as run_amplify

        summary = run_amplify(model, spec, output, force=force)
        if json_output:
            print_json(summary)
            return
        print_table(
            [
                {"tensor": e["tensor"], "new": e["new"], "experts": len(e["experts"])}
                for e in summary["edits"]
            ],
            ["tensor", "new", "experts"],
        )
        how = (
            f"mlx_lm.load(path, trust_remote_code=True) (model file {summary['model_file']})"
            if summary["model_file"]
            else "mlx_lm.load(path)"
        )
        print(f"\nwrote {output}; load it with {how}")
