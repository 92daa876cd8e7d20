"""``mlxfun stats show`` and ``mlxfun stats merge``."""

from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    stats_app = typer.Typer(help="Inspect and combine stats files.", no_args_is_help=True)
    app.add_typer(stats_app, name="stats")

    @stats_app.command("show")
    def show(
        stats: Path = typer.Argument(..., help="Stats file from `mlxfun collect`."),
        scorer: str = typer.Option("reap", "--scorer", help="Which statistic to summarise."),
        plot: Path = typer.Option(None, "--plot", help="Write a (layer x expert) heatmap PNG."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Per-layer summary of one statistic; optionally a heatmap picture."""
        import numpy as np
        from mlxfun.core.stats import layer_expert_counts, load_stats

        data = load_stats(stats)
        scores = data.score(scorer)
        layers = data.metadata.get("moe_layers", list(range(scores.shape[0])))
        counts = layer_expert_counts(data, scores.shape[1])
        rows = []
        for position, index in enumerate(layers):
            row_scores = scores[position, : counts[position]]  # padded columns are no experts
            order = np.argsort(row_scores, kind="stable")
            rows.append(
                {
                    "layer": index,
                    "tokens": int(data.token_counts[position]),
                    "min": float(row_scores.min()),
                    "median": float(np.median(row_scores)),
                    "max": float(row_scores.max()),
                    "lowest": [int(e) for e in order[:4]],
                    "highest": [int(e) for e in order[::-1][:4]],
                }
            )
        if plot is not None:
            _heatmap(scores, layers, scorer, plot, counts)
        if json_output:
            print_json({"scorer": scorer, "metadata": data.metadata, "layers": rows})
            return
        meta = data.metadata
        print(
            f"{stats}: {meta.get('fingerprint', {}).get('model_type')} model, {meta.get('tokens_seen')} tokens"
        )
        print(f"scorers: {', '.join(sorted(data.scores))}; showing {scorer}\n")
        print_table(rows)
        if plot is not None:
            print(f"\nwrote {plot}")

    @stats_app.command("merge")
    def merge(
        inputs: list[Path] = typer.Argument(..., help="Stats files of the same model."),
        output: Path = typer.Option(..., "--output", "-o", help="Merged stats file."),
        mode: str = typer.Option(
            "sum",
            "--mode",
            help=(
                "sum: exact union of the data; rank: sum of within-layer ranks (compare "
                "experts of one layer: bottom, strided); global-rank: sum of model-wide ranks "
                "(compare across layers: model-wide)."
            ),
        ),
    ):
        """Combine stats files of the same model (e.g. several domains)."""
        from mlxfun.core import plugins
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.outputs import check_output_file
        from mlxfun.core.stats import MERGE_MODES, load_stats, merge_stats, save_stats

        if mode not in MERGE_MODES:
            raise MlxfunError(f"unknown --mode {mode!r}; use {', '.join(MERGE_MODES)}")
        if len(inputs) < 2:
            raise MlxfunError("give at least two stats files to merge")
        check_output_file(output, inputs=inputs)
        loaded = [load_stats(p) for p in inputs]
        scorers = {name: info.obj for name, info in plugins.registry()["scorer"].items()}
        missing = {n for s in loaded for n in s.accumulators if n not in scorers}
        if mode == "sum" and missing:
            raise MlxfunError(
                f"scorers {', '.join(sorted(missing))} are not installed; install them to merge by sum"
            )
        merged = merge_stats(loaded, scorers, mode)
        save_stats(output, merged.scores, merged.accumulators, merged.token_counts, merged.metadata)
        print(
            f"merged {len(inputs)} files ({mode}) into {output}: {', '.join(sorted(merged.scores))}"
        )


def _heatmap(scores, layers, scorer: str, path: Path, counts=None) -> None:
    """A (MoE layer x expert) picture of one statistic; padded columns (experts a layer does not
    have) are left blank. The figure grows with the array up to 24 x 16 inches (120 dpi)."""
    import numpy as np
    from mlxfun.core.errors import MlxfunError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxfunError("--plot needs matplotlib: pip install 'mlxfun-cli[plot]'") from None
    scores = np.asarray(scores, dtype=np.float64)
    num_layers, width = scores.shape
    counts = counts if counts is not None else [width] * num_layers
    padded = np.arange(width)[None, :] >= np.asarray(counts)[:, None]
    data = np.ma.masked_array(scores, mask=padded | ~np.isfinite(scores))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    size = (min(24, max(6, width * 0.3)), min(16, max(3, num_layers * 0.3)))
    fig, ax = plt.subplots(figsize=size)
    try:
        image = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        step = max(1, num_layers // 32)  # at most ~32 labels
        ticks = list(range(0, num_layers, step))
        ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
        ax.set_title(f"{scorer} per expert")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
