"""``mlxfun steer spec`` (a steering spec from a scan report) and ``mlxfun steer generate``
(answers with the spec's steering, beside the unsteered ones). Definitions in
``mlxfun.methods.steer``; the spec format in docs/steering.md."""

import json
from pathlib import Path

import typer

from .output import print_json


def register(app: typer.Typer) -> None:
    steer = typer.Typer(
        name="steer",
        help="Steer experts at run time: build a spec, generate with it.",
        no_args_is_help=True,
    )
    app.add_typer(steer, name="steer")

    @steer.command("spec")
    def spec(
        report: Path = typer.Option(..., "--from", help="A scan's JSON report (with groups)."),
        group: str = typer.Option(..., "--group", help="The report's expert group to steer."),
        top: int = typer.Option(
            None, "--top", help="Only the group's first N experts (default: all)."
        ),
        mode: str = typer.Option("mask", "--mode", help="mask, force or bias."),
        bias: float = typer.Option(
            None, "--bias", help="With --mode bias: the value added to the experts' scores."
        ),
        output: Path = typer.Option(..., "--output", "-o", help="The spec file to write."),
        json_output: bool = typer.Option(False, "--json", help="Print the spec as JSON."),
    ):
        """Write a steering spec that masks, forces or biases a scan report's expert group."""
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.outputs import check_output_file
        from mlxfun.methods.steer import spec_from_report

        if mode == "bias" and bias is None:
            raise MlxfunError("--mode bias needs --bias VALUE (positive favours the experts)")
        if mode != "bias" and bias is not None:
            raise MlxfunError(f"--bias is only read with --mode bias (--mode {mode} sets its own)")
        try:
            data = json.loads(report.read_text())
        except FileNotFoundError:
            raise MlxfunError(f"--from {report} does not exist") from None
        except (OSError, ValueError) as exc:
            raise MlxfunError(f"cannot read --from {report}: {exc}") from None
        check_output_file(output, inputs=[report])
        result = spec_from_report(data, group, top, mode, bias or 0.0, where=str(report))
        result.save(output)
        if json_output:
            print_json(result.to_json())
            return
        experts = sum(len(rule.experts) for rule in result.rules)
        print(
            f"wrote {output}: {mode} {experts} experts of group {group!r} in {len(result.rules)} layers"
        )

    @steer.command("generate")
    def generate(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory."),
        spec_path: Path = typer.Option(..., "--spec", help="The steering spec (JSON)."),
        prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
        chat: bool = typer.Option(False, "--chat", help="Render prompts with the chat template."),
        compare: bool = typer.Option(
            False, "--compare", help="Also generate unsteered and print both side by side."
        ),
        max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Generate greedily with the spec's experts steered (and without, with --compare)."""
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.models import load_model
        from mlxfun.methods.steer import adapter_of, generate_pair, load_spec

        if max_tokens < 1:
            raise MlxfunError("--max-tokens must be at least 1")
        spec = load_spec(spec_path)
        loaded, tokenizer, config = load_model(model)
        adapter = adapter_of(loaded, config)
        rows = generate_pair(
            loaded, tokenizer, prompt, spec, adapter, config, max_tokens, chat, compare
        )
        if json_output:
            print_json({"model": str(model), "spec": str(spec_path), "answers": rows})
            return
        for row in rows:
            print(f"> {row['prompt']}")
            if compare:
                print(_side_by_side(row["steered"], row["plain"]))
            else:
                print(row["steered"])
            print()


def _side_by_side(left: str, right: str, width: int = 48) -> str:
    import textwrap

    a = ["steered", "-" * 7] + textwrap.wrap(left.replace("\n", " "), width)
    b = ["unsteered", "-" * 9] + textwrap.wrap(right.replace("\n", " "), width)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{width}} | {y}" for x, y in zip(a, b))
