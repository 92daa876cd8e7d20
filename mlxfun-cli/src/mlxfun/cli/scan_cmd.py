"""``mlxfun safety-scan`` and ``mlxfun domain-scan``: the experts one prompt set prefers over
another, as a report that prune, merge and steering read (docs/scans.md)."""

from pathlib import Path

import typer

from .output import print_json, print_table

DEMO_DATA = Path(__file__).resolve().parents[4] / "demo" / "data"


def _default(name: str) -> Path | None:
    path = DEMO_DATA / name
    return path if path.is_file() else None


def _run(
    kind_name,
    model,
    output,
    response_tokens,
    decision_tokens,
    max_tokens,
    max_samples,
    resamples,
    top,
    threshold,
    seed,
    batch_size,
    no_chat,
    json_output,
    plot,
    **sets,
):
    """Run one scan from a command's options; ``sets`` holds the two prompt files by set name."""
    from mlxfun.core.errors import MlxfunError
    from mlxfun.methods.scan import KINDS, ScanRequest, scan

    kind = KINDS[kind_name]
    sets = tuple(sets[name] for name in kind.sets)
    for name, path in zip(kind.sets, sets):
        if path is None:
            raise MlxfunError(f"pass --{name} (a JSONL file of prompts)")
    request = ScanRequest(
        kind=kind,
        model=model,
        sets=sets,
        output=output,
        response_tokens=response_tokens,
        decision_tokens=decision_tokens,
        max_tokens=max_tokens,
        max_samples=max_samples,
        resamples=resamples,
        top=top,
        threshold=threshold,
        seed=seed,
        batch_size=batch_size,
        chat=not no_chat,
        progress=not json_output,
    )
    if plot is not None:
        _check_matplotlib()
    report = scan(request)
    if plot is not None:
        heatmap(report, plot)
    if json_output:
        print_json(report)
        return
    print_table(table_rows(report), ["group", "layer", "expert", *_columns(report)])
    print()
    print(summary_line(report))
    if output is not None:
        print(f"wrote {output}")
    if plot is not None:
        print(f"wrote {plot}")


def _columns(report) -> list[str]:
    a, b = list(report["sets"])
    return [f"freq_{a}", f"freq_{b}", "risk_diff", "selected_share"]


def table_rows(report: dict) -> list[dict]:
    """One row per selected expert of every group (a twin's share is its reversed selection)."""
    a, b = list(report["sets"])
    rows = []
    positions = {str(index): p for p, index in enumerate(report["moe_layers"])}
    for group, info in report["groups"].items():
        values = report["parts"][info["part"]]
        for layer, experts in info["experts"].items():
            p = positions[layer]
            for e in experts:
                rows.append(
                    {
                        "group": group,
                        "layer": int(layer),
                        "expert": e,
                        f"freq_{a}": values[f"frequency_{a}"][p][e],
                        f"freq_{b}": values[f"frequency_{b}"][p][e],
                        "risk_diff": values["risk_difference"][p][e],
                        "selected_share": values[info.get("selection", "selection_frequency")][p][
                            e
                        ],
                    }
                )
    return rows


def summary_line(report: dict) -> str:
    options = report["options"]
    sets = ", ".join(
        f"{name}: {info['prompts']} prompts, {info['tokens']['prompt']} prompt / "
        f"{info['tokens']['response']} response / {info['tokens'].get('decision', 0)} "
        "decision tokens"
        for name, info in report["sets"].items()
    )
    groups = ", ".join(
        f"{group} {sum(len(v) for v in info['experts'].values())}"
        for group, info in report["groups"].items()
    )
    return (
        f"{report['scan']} ({sets}); selected (top {options['top']} per layer in >= "
        f"{options['threshold']:.0%} of {options['resamples']} resamples): {groups or 'none'}"
    )


def _check_matplotlib():
    from mlxfun.core.errors import MlxfunError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MlxfunError("--plot needs matplotlib: pip install 'mlxfun-cli[plot]'") from None


def heatmap(report: dict, path: Path) -> None:
    """Risk difference per (MoE layer, expert), one panel per part, selected experts boxed
    (solid: the first set's group, dashed: its twin, which the reference set prefers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    parts = list(report["parts"])
    layers = report["moe_layers"]
    width = max(report["num_experts"])
    size = (min(24, max(7, width * 0.35)), min(16, max(3, len(layers) * 0.35)) * len(parts))
    fig, axes = plt.subplots(len(parts), 1, figsize=size, squeeze=False)
    try:
        for ax, part in zip(axes[:, 0], parts):
            rows = report["parts"][part]["risk_difference"]
            data = np.full((len(layers), width), np.nan)
            for i, row in enumerate(rows):
                data[i, : len(row)] = row
            limit = np.nanmax(np.abs(data)) or 1.0
            cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
            image = ax.imshow(
                np.ma.masked_invalid(data),
                aspect="auto",
                cmap=cmap,
                vmin=-limit,
                vmax=limit,
                interpolation="nearest",
            )
            for info in report["groups"].values():
                if info["part"] != part:
                    continue
                style = "--" if info.get("sign") == -1 else "-"
                for layer, experts in info["experts"].items():
                    y = layers.index(int(layer))
                    for e in experts:
                        box = (e - 0.5, y - 0.5)
                        ax.add_patch(plt.Rectangle(box, 1, 1, fill=False, lw=1.5, ec="k", ls=style))
            a, b = list(report["sets"])
            ax.set_title(
                f"{part} tokens: {a} - {b} (selected, boxed: {a}, dashed: {b})", fontsize=10
            )
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            step = max(1, len(layers) // 32)
            ticks = list(range(0, len(layers), step))
            ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


COMMON = dict(
    response_tokens=(
        32,
        "--response-tokens",
        "Greedy tokens generated after plain prompts (chat records use their assistant "
        "answer); 0: prompt statistics only.",
    ),
    decision_tokens=(
        1,
        "--decision-tokens",
        "The last N prompt tokens form the decision part (with a chat template: the "
        "generation prompt, whose output is the answer's first token); also counted as prompt.",
    ),
    max_tokens=(256, "--max-tokens", "Tokens per record (prompts and chat records are cut)."),
    max_samples=(None, "--max-samples", "Seeded random subsample of each set's records."),
    resamples=(200, "--resamples", "Bootstrap resamples of the prompts."),
    top=(2, "--top", "An expert counts in a resample when it ranks in its layer's top N."),
    threshold=(0.8, "--threshold", "Selected when in the top in this share of resamples."),
    seed=(0, "--seed", "Seed of the bootstrap and the subsample."),
    batch_size=(8, "--batch-size", "Sequences per forward pass."),
    no_chat=(False, "--no-chat", "Plain prompts without the chat template."),
    json_output=(False, "--json", "Print the report as JSON."),
    plot=(None, "--plot", "Write a risk-difference heatmap PNG."),
)


def _opt(name):
    default, flag, help_text = COMMON[name]
    return typer.Option(default, flag, help=help_text)


def register(app: typer.Typer) -> None:
    @app.command("safety-scan")
    def safety_scan(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory."),
        harmful: Path = typer.Option(
            _default("harmful_calib.jsonl"),
            "--harmful",
            show_default=False,
            help="Harmful prompts (JSONL; default: the shipped demo/data/harmful_calib.jsonl).",
        ),
        harmless: Path = typer.Option(
            _default("harmless_calib.jsonl"),
            "--harmless",
            show_default=False,
            help="Harmless prompts (JSONL; default: demo/data/harmless_calib.jsonl).",
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Report to write (.json)."),
        response_tokens: int = _opt("response_tokens"),
        decision_tokens: int = _opt("decision_tokens"),
        max_tokens: int = _opt("max_tokens"),
        max_samples: int = _opt("max_samples"),
        resamples: int = _opt("resamples"),
        top: int = _opt("top"),
        threshold: float = _opt("threshold"),
        seed: int = _opt("seed"),
        batch_size: int = _opt("batch_size"),
        no_chat: bool = _opt("no_chat"),
        json_output: bool = _opt("json_output"),
        plot: Path = _opt("plot"),
    ):
        """Safety experts (SAFEx): detection (harmful prompt tokens), control (responses) and
        decision (the last prompt tokens), each with its harmless_ twin."""
        _run("safety-scan", **locals())

    @app.command("domain-scan")
    def domain_scan(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory."),
        domain: Path = typer.Option(..., "--domain", help="Domain text or prompts (JSONL)."),
        general: Path = typer.Option(..., "--general", help="General text or prompts (JSONL)."),
        output: Path = typer.Option(None, "--output", "-o", help="Report to write (.json)."),
        response_tokens: int = _opt("response_tokens"),
        decision_tokens: int = _opt("decision_tokens"),
        max_tokens: int = _opt("max_tokens"),
        max_samples: int = _opt("max_samples"),
        resamples: int = _opt("resamples"),
        top: int = _opt("top"),
        threshold: float = _opt("threshold"),
        seed: int = _opt("seed"),
        batch_size: int = _opt("batch_size"),
        no_chat: bool = _opt("no_chat"),
        json_output: bool = _opt("json_output"),
        plot: Path = _opt("plot"),
    ):
        """Domain experts: domain_prompt (domain text), domain_response (its continuations) and
        domain_decision (the last prompt tokens), each with its general_ twin."""
        _run("domain-scan", **locals())
