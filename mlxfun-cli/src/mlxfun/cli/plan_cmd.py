"""``mlxfun plan``: a per-layer compression plan (merges, prunes, kept experts) from an
analysis, by strategy, expert count or model size."""

import json
from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        analysis: Path = typer.Option(
            None, "--analysis", help="Analysis file (mlxfun analyze -o); or --model and --stats."
        ),
        model: Path = typer.Option(None, "--model", help="mlx-lm model directory (to analyse)."),
        stats: Path = typer.Option(None, "--stats", help="Stats file of this model."),
        dataset: list[Path] = typer.Option(
            None, "--dataset", help="Calibration text for the analysis; repeatable."
        ),
        scorer: str = typer.Option("reap", "--scorer", help="Utilisation (with --model)."),
        similarity: str = typer.Option(
            "ream", "--similarity", help="Similarity for merges (with --model)."
        ),
        threshold: float = typer.Option(
            0.6, "--threshold", help="Merge only at this similarity or more (with --model)."
        ),
        strategy: str = typer.Option(
            None, "--strategy", help="conservative, balanced or aggressive."
        ),
        target_experts: int = typer.Option(
            None, "--target-experts", help="Experts every MoE layer keeps."
        ),
        target_size: str = typer.Option(
            None, "--target-size", help="Model size to reach, e.g. 12GB, 750MB, 1.5GiB."
        ),
        output: Path = typer.Option(None, "--output", "-o", help="Plan file to write (JSON)."),
        json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    ):
        """Plan which experts each layer merges, prunes and keeps."""
        from mlxfun.core.errors import MlxfunError
        from mlxfun.methods import plans

        given = [strategy, target_experts, target_size]
        if sum(v is not None for v in given) != 1:
            raise MlxfunError("pass one of --strategy, --target-experts or --target-size")
        request = plans.PlanRequest(
            strategy=strategy,
            target_experts=target_experts,
            target_size=None if target_size is None else plans.parse_size(target_size),
        )
        if output is not None:
            from mlxfun.core.outputs import check_output_file

            check_output_file(output, inputs=[p for p in (analysis, model, stats) if p])
        result = plans.make_plan(
            _analysis(analysis, model, stats, dataset, scorer, similarity, threshold, json_output),
            request,
        )
        if output is not None:
            result.save(output)
        if json_output:
            print_json(result.as_dict())
            return
        print_plan(result)
        if output is not None:
            print(f"wrote {output}")


def _analysis(path, model, stats, dataset, scorer, similarity, threshold, quiet):
    from mlxfun.core.errors import MlxfunError
    from mlxfun.methods.analysis import Analysis, AnalyzeRequest, Thresholds, analyse

    if path is not None:
        if model is not None or stats is not None:
            raise MlxfunError("pass --analysis or --model/--stats, not both")
        if not path.is_file():
            raise MlxfunError(f"--analysis {path} does not exist")
        try:
            return Analysis.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MlxfunError(
                f"--analysis {path} is not an mlxfun analysis; write one with mlxfun analyze -o"
            ) from None
    if model is None or stats is None:
        raise MlxfunError("pass --analysis, or --model and --stats")
    request = AnalyzeRequest(
        model=model,
        stats=stats,
        dataset=dataset or [],
        scorer=scorer,
        thresholds=Thresholds(similarity=similarity, threshold=threshold),
        progress=not quiet,
    )
    return analyse(request)


def _ids(values) -> str:
    return ",".join(str(v) for v in values) or "-"


def print_plan(plan) -> None:
    rows = []
    for layer in plan.layers:
        merges = " ".join(
            f"{_ids(m.source_experts)}->{m.target_expert}({m.similarity:.0%})" for m in layer.merges
        )
        rows.append(
            {
                "layer": layer.layer,
                "experts": layer.original_num_experts,
                "kept": layer.target_num_experts,
                "merges (sources->target)": merges or "-",
                "pruned": _ids(layer.pruned_experts),
                "memory": f"-{layer.estimated_memory_reduction:.1%}",
                "impact": f"{layer.estimated_quality_impact} ({layer.impact:.3f})",
            }
        )
    print_table(rows)
    data = plan.as_dict()
    print(
        f"\n{plan.strategy}: {data['experts_before']} -> {data['experts_after']} experts, "
        f"{plan.bytes_before / 1e6:.2f} MB -> {plan.bytes_after / 1e6:.2f} MB "
        f"(-{plan.estimated_memory_reduction:.1%}); merges blend {plans_blend(plan)}, "
        f"similarity {plan.similarity} >= {plan.threshold}"
    )
    print("impact = share of utilisation removed, merged experts x min(1, 2 (1 - similarity))")
    for note in plan.notes:
        print(f"note: {note}")


def plans_blend(plan) -> str:
    return "REAM (aligned, saliency-weighted)" if plan.merges else "-"
