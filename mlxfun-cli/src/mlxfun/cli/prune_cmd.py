"""``mlxfun prune``: remove experts chosen from a stats file, writing an mlx-lm model directory."""

from pathlib import Path

import typer

from .output import print_json, print_table


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return str(nbytes)


# The options merge shares with this command: name -> (flag, help); all default to None.
OPTIONS = dict(
    protect_from=(
        "--protect-from",
        "Also protect the experts of a scan report: REPORT.json[:GROUP] (default: "
        "every group but the twins, which prefer the reference set; checked against this "
        "model); repeatable.",
    ),
    target_from=("--target-from", "Also target a scan report's experts; as --protect-from."),
    min_keep=("--min-keep", "Experts every layer keeps at least (default: top-k)."),
)


def option(name: str):
    flag, help_text = OPTIONS[name]
    return typer.Option(None, flag, help=help_text)


NONUNIFORM_HINT = (
    "load it with mlx_lm.load(path, trust_remote_code=True) or "
    "mlx_lm.generate --trust-remote-code; mlxfun loads it as it is"
)
MODEL_FILE_HINT = (
    "model_file {}: a copy of the plugin's model module; stock mlx-lm loads it with "
    "mlx_lm.load(path, trust_remote_code=True), mlxfun with the installed plugin"
)
MODEL_FILE_HELP = (
    "Copy the adapter plugin's model module into the output as its model_file, so that stock "
    "mlx-lm loads it with trust_remote_code=True (a snapshot: it misses the plugin's later "
    "fixes)."
)


def model_file_hint(summary: dict) -> str | None:
    """How to load what was written, when it ships a model_file."""
    if not summary["uniform"]:
        return NONUNIFORM_HINT
    if summary.get("model_file"):
        return MODEL_FILE_HINT.format(summary["model_file"])
    return None


def saving_line(summary: dict) -> str:
    """``weights A -> B (saves C, D%)`` from a prune or merge summary."""
    saved = summary["bytes_saved"]
    share = saved / summary["bytes_before"] if summary["bytes_before"] else 0.0
    return (
        f"weights {_size(summary['bytes_before'])} -> {_size(summary['bytes_after'])} "
        f"(saves {_size(saved)}, {share:.1%})"
    )


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        stats: Path = typer.Option(
            ..., "--stats", help="Stats file of this model (mlxfun collect)."
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Directory to write."),
        scorer: str = typer.Option("reap", "--scorer", help="Which statistic ranks the experts."),
        selector: str = typer.Option(
            "bottom", "--selector", help="bottom, strided, model-wide, or a plugin's selector."
        ),
        n: int = typer.Option(
            None, "--n", help="Experts to remove per layer (model-wide: in total)."
        ),
        ratio: float = typer.Option(
            None, "--ratio", help="Share of experts to remove, instead of --n (e.g. 0.25)."
        ),
        protect: list[str] = typer.Option(
            None,
            "--protect",
            help="Never remove: 'layer:expert[,expert...]' (ranges a..b, layer '*' = all; "
            "several separated by ';' or repeated) or a JSON file mapping layers to lists of "
            "expert ids. Layers are decoder layer indices, as mlxfun stats shows them.",
        ),
        target: list[str] = typer.Option(
            None, "--target", help="Always remove (counts towards --n); same forms as --protect."
        ),
        protect_from: list[str] = option("protect_from"),
        target_from: list[str] = option("target_from"),
        min_keep: int = option("min_keep"),
        normalize: str = typer.Option(
            "none",
            "--normalize",
            help="model-wide: compare layers on raw scores (none) or divided by each layer's "
            "mean or max.",
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the keep map and size saving; write nothing."
        ),
        model_file: bool = typer.Option(False, "--model-file", help=MODEL_FILE_HELP),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Remove the least important experts (REAP pruning) and write the smaller model."""
        from mlxfun.core import plugins
        from mlxfun.methods.prune import PruneRequest
        from mlxfun.methods.scan_report import expert_option

        request = PruneRequest(
            model=model,
            stats=stats,
            output=output,
            scorer=scorer,
            selector=selector,
            n=n,
            ratio=ratio,
            protect=expert_option(protect, protect_from, model, "--protect"),
            target=expert_option(target, target_from, model, "--target"),
            min_keep=min_keep,
            normalize=normalize,
            force=force,
            dry_run=dry_run,
            model_file=model_file,
        )
        summary = plugins.get_compressor("prune").compress(request)
        if json_output:
            print_json(summary)
            return
        columns = ["layer", "experts", "kept", "removed", "removed_ids", "removed_score_share"]
        print_table(summary["layers"], columns)
        shape = "uniform" if summary["uniform"] else "non-uniform (ships a model_file)"
        print(
            f"\n{summary['selector']} on {summary['scorer']}: removed {summary['removed']} of "
            f"{summary['experts_before']} experts, {shape}"
        )
        print(saving_line(summary))
        if summary["dry_run"]:
            print("dry run: nothing written")
        else:
            print(f"wrote {summary['output']}")
            if hint := model_file_hint(summary):
                print(hint)
