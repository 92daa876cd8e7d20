"""``mlxfun analyze``: per MoE layer, expert similarities, merge and prune candidates,
specialists, mergeable groups and a recommended target; the model's size breakdown."""

import json
from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory."),
        stats: Path = typer.Option(
            ..., "--stats", help="Stats file of this model (mlxfun collect): the utilisation."
        ),
        dataset: list[Path] = typer.Option(
            None,
            "--dataset",
            help="Calibration text for the output similarity and the specialists (several "
            "files: each file is a token class); repeatable.",
        ),
        domain_report: list[str] = typer.Option(
            None,
            "--domain-report",
            help="REPORT[:GROUP] of mlxfun domain-scan / safety-scan: its experts are the "
            "specialists (instead of the class entropy); repeatable.",
        ),
        scorer: str = typer.Option("reap", "--scorer", help="Which statistic is utilisation."),
        similarity: str = typer.Option(
            "ream",
            "--similarity",
            help="What groups and pairs use: ream (needs --dataset), output, router_logits, "
            "router_weights or weights.",
        ),
        threshold: float = typer.Option(
            0.6, "--threshold", help="Mergeable groups: every pair at least this similar."
        ),
        low: float = typer.Option(
            0.5, "--low", help="Prune candidates: utilisation below this x the layer's mean."
        ),
        max_tokens: int = typer.Option(
            2048, "--max-tokens", help="Calibration tokens (in total, files taken in turn)."
        ),
        max_samples: int = typer.Option(None, "--max-samples", help="Seeded subsample."),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling."),
        output: Path = typer.Option(
            None, "--output", "-o", help="Write the full analysis (JSON) for mlxfun plan."
        ),
        plot: Path = typer.Option(None, "--plot", help="Write similarity heatmaps (PNG)."),
        json_output: bool = typer.Option(False, "--json", help="Print the analysis as JSON."),
    ):
        """Analyse every MoE layer's compression potential."""
        from mlxfun.methods.analysis import AnalyzeRequest, Thresholds, analyse

        if output is not None:
            from mlxfun.core.outputs import check_output_file

            check_output_file(output, inputs=(model, stats, *(dataset or [])))
        if plot is not None:
            _check_plot()
        request = AnalyzeRequest(
            model=model,
            stats=stats,
            dataset=dataset or [],
            scorer=scorer,
            max_tokens=max_tokens,
            max_samples=max_samples,
            batch_size=batch_size,
            seed=seed,
            thresholds=Thresholds(similarity=similarity, threshold=threshold, low=low),
            domain_reports=domain_report or [],
            progress=not json_output,
        )
        result = analyse(request)
        data = result.as_dict()
        if output is not None:
            _write_json(output, data)
        if plot is not None:
            _plot(result, plot)
        if json_output:
            data = dict(data, summary=result.summary())
            for layer in data["layers"]:
                layer.pop("similarity")  # the file (--output) keeps the matrices
            print_json(data)
            return
        _print(result)
        if output is not None:
            print(f"wrote {output}")
        if plot is not None:
            print(f"wrote {plot}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def _groups(groups) -> str:
    return " ".join("[" + ",".join(str(e) for e in g) + "]" for g in groups) or "-"


def _print(result) -> None:
    rows = []
    for layer in result.layers:
        f = layer.findings
        pairs = " ".join(f"{a}&{b}:{s:.0%}" for a, b, s in f["merge_candidates"][:3])
        rows.append(
            {
                "layer": layer.layer,
                "experts": layer.num_experts,
                "top_k": layer.top_k,
                "most similar": pairs or "-",
                "prune cand.": ",".join(map(str, f["prune_candidates"])) or "-",
                "specialists": ",".join(map(str, f["specialists"])) or "-",
                "generalists": ",".join(map(str, f["generalists"])) or "-",
                "mergeable groups": _groups(f["mergeable_groups"]),
                "potential": f["potential_reduction"],
                "recommended": f["recommended_target"],
            }
        )
    print_table(rows)
    s = result.summary()
    settings = result.settings
    print(
        f"\n{s['moe_layers']} MoE layers, {s['experts']} experts; similarity "
        f"{settings['similarity']} (groups at {settings['threshold']}), utilisation "
        f"{result.scorer} (prune below {settings['low']} x mean)"
        + (f", {settings['tokens']} calibration tokens" if settings["tokens"] else "")
        + f"; specialists from {settings['specialists_from']}"
    )
    print(
        f"potential reduction {s['potential_reduction']} experts; recommended "
        f"{s['recommended_experts']} experts: {_mb(s['bytes_total'])} -> "
        f"{_mb(s['bytes_recommended'])}\n"
    )
    print_table(
        [
            {"part": r["part"], "parameters": r["parameters"], "MB": r["bytes"] / 1e6,
             "share": f"{r['share']:.1%}"}
            for r in result.sizes
        ]
    )  # fmt: skip


def _mb(value: int) -> str:
    return f"{value / 1e6:.2f} MB"


def _check_plot() -> None:
    from mlxfun.core.errors import MlxfunError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MlxfunError("--plot needs matplotlib: pip install 'mlxfun-cli[plot]'") from None


def _plot(result, path: Path) -> None:
    """One similarity heatmap per MoE layer (the similarity the groups use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = result.settings["similarity"]
    count = len(result.layers)
    cols = min(count, 4)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, result.layers):
        image = ax.imshow(np.array(layer.similarity[name]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer.layer}", fontsize=9)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"{name} similarity")
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
