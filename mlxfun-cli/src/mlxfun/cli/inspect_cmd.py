"""``mlxfun inspect``: architecture, MoE layers and a size breakdown, before compressing."""

from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        model: Path = typer.Argument(..., help="mlx-lm model directory."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Show MoE layers, experts, top-k, router family, shared experts and sizes."""
        from .inspect_report import describe_model

        report = describe_model(model)
        if json_output:
            print_json(report)
            return
        print(f"model:        {model}")
        family = f": {report['router_family']}" if report["router_family"] else ""
        print(f"architecture: {report['model_type']} (adapter {report['adapter']}{family})")
        print(f"MoE layers:   {len(report['layers'])} of {report['num_layers']}")
        if report["shared_experts"]:
            print(f"shared:       {', '.join(report['shared_experts'])}")
        print()
        print_table(report["layers"], ["layer", "path", "experts", "top_k"])
        print()
        print_table(report["sizes"], ["part", "parameters", "bytes", "share"])
