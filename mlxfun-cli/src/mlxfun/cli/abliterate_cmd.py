"""``mlxfun abliterate``: find the refusal direction and remove it from the weights."""

from pathlib import Path

import typer

from .output import print_json, print_table

DEMO_DATA = Path(__file__).resolve().parents[4] / "demo" / "data"


def _default(path: Path | None, name: str, option: str, direction) -> Path | None:
    if path is not None or direction is not None:  # a saved direction needs no prompts
        return path
    shipped = DEMO_DATA / name
    if not shipped.is_file():
        from mlxfun.core.errors import MlxfunError

        raise MlxfunError(
            f"{option} not given and the demo prompt set {name} is not shipped with this "
            f"install; pass {option} FILE.jsonl"
        )
    return shipped


def _position(value: str) -> int:
    from mlxfun.core.errors import MlxfunError

    if value == "last":
        return -1
    try:
        return int(value)
    except ValueError:
        raise MlxfunError(
            f"--position {value}: pass last or a negative offset from the prompt's end (-2, ...)"
        ) from None


def register(app: typer.Typer) -> None:
    @app.command("abliterate")
    def abliterate(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory (not modified)."),
        output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
        harmful: Path = typer.Option(
            None,
            "--harmful",
            help="Prompts the model refuses (JSONL; default: demo harmful_calib).",
        ),
        harmless: Path = typer.Option(
            None, "--harmless", help="Ordinary prompts (JSONL; default: demo harmless_calib)."
        ),
        layer: str = typer.Option(
            "auto", "--layer", help="Decoder layer whose input gives the direction, or auto."
        ),
        position: str = typer.Option(
            "last", "--position", help="Prompt position: last (end of the generation prompt) or -N."
        ),
        scale: float = typer.Option(1.0, "--scale", help="How much of d to remove (1: all)."),
        skip_experts: bool = typer.Option(
            False, "--skip-experts", help="Leave the routed experts' down projections alone."
        ),
        direction: Path = typer.Option(
            None, "--direction", help="A saved direction (.npy, hidden,): skips the search."
        ),
        eval_prompts: int = typer.Option(
            16, "--eval-prompts", help="auto: held-out harmful and harmless prompts per set."
        ),
        max_tokens: int = typer.Option(
            24, "--max-tokens", help="auto: greedy answer length for the refusal rate."
        ),
        kl_threshold: float = typer.Option(
            0.1, "--kl-threshold", help="auto: candidates with a larger harmless KL come last."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the held-out draw."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
        json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Remove the refusal direction from every weight that writes the residual stream."""
        from mlxfun.methods.abliterate import AbliterateRequest, abliterate, progress_bars

        request = AbliterateRequest(
            model=model,
            output=output,
            harmful=_default(harmful, "harmful_calib.jsonl", "--harmful", direction),
            harmless=_default(harmless, "harmless_calib.jsonl", "--harmless", direction),
            layer=layer,
            position=_position(position),
            scale=scale,
            skip_experts=skip_experts,
            direction=direction,
            eval_prompts=eval_prompts,
            max_tokens=max_tokens,
            kl_threshold=kl_threshold,
            seed=seed,
            force=force,
        )
        summary = abliterate(request, progress_bars(not json_output))
        if json_output:
            print_json(summary)
        else:
            _print_summary(summary)


def _print_summary(summary: dict) -> None:
    if summary.get("candidates"):
        rows = [
            {
                "layer": r["layer"],
                "refusal_rate": "n/a" if r["refusal_rate"] is None else r["refusal_rate"],
                "kl": "n/a" if r["kl"] is None else r["kl"],
                "chosen": "*" if r["layer"] == summary["layer"] else "",
            }
            for r in summary["candidates"]
        ]
        print_table(rows, ["layer", "refusal_rate", "kl", "chosen"])
        print(
            f"\nbaseline refusal rate {summary['baseline_refusal_rate']:.3g} on "
            f"{summary['prompts']['harmful_held_out']} held-out harmful prompts; "
            f"rule: {summary['rule']}"
        )
    where = {"auto": "chosen", "given": "--layer"}.get(summary["selection"])
    if where:
        print(f"direction: input of decoder layer {summary['layer']} ({where})")
    else:
        print(f"direction: {summary['options']['direction']}")
    edit = summary["edit"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in edit["writers"].items())
    print(
        f"orthogonalised writers: {kinds}"
        + (" (untied embeddings)" if edit["untied_embeddings"] else "")
    )
    if "requantization_error" in edit:
        q = edit["requantization_error"]
        print(f"requantization added a relative error of {q['mean']:.3g} (max {q['max']:.3g})")
    print(f"wrote {summary['output']}")
