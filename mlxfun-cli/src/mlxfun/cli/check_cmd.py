"""``mlxfun smoke-test`` and ``mlxfun eval``: does a (pruned) model still work, and how close is
it to the original? Definitions in ``mlxfun.methods.evaluate``."""

import sys
from pathlib import Path

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("smoke-test")
    def smoke_test(
        model: Path = typer.Argument(..., help="mlx-lm model directory."),
        prompt: list[str] = typer.Option(
            None, "--prompt", "-p", help="Prompt to generate from (repeatable; default: three)."
        ),
        max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens to generate per prompt."),
        raw: bool = typer.Option(
            False, "--raw", help="Use the prompts as they are, without the chat template."
        ),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Load the model with mlx-lm, generate from a few prompts, flag degenerate output.

        Exits with status 1 when any output is degenerate (empty, or one token repeated)."""
        from mlxfun.core.errors import MlxfunError
        from mlxfun.core.models import load_model
        from mlxfun.methods.evaluate import DEFAULT_PROMPTS
        from mlxfun.methods.evaluate import smoke_test as run_smoke_test

        if max_tokens < 1:
            raise MlxfunError("--max-tokens must be at least 1")
        loaded, tokenizer, _ = load_model(model)
        rows = run_smoke_test(
            loaded, tokenizer, prompt or DEFAULT_PROMPTS, max_tokens=max_tokens, chat=not raw
        )
        bad = [row for row in rows if row["degenerate"]]
        if json_output:
            print_json({"model": str(model), "prompts": rows, "degenerate": len(bad)})
        else:
            for row in rows:
                flag = f"  DEGENERATE: {row['reason']}" if row["degenerate"] else ""
                print(f"> {row['prompt']}")
                print(f"{row['text']!r}")
                print(f"  {row['tokens']} tokens, {row['tokens_per_s']:.1f} tokens/s{flag}\n")
            print(
                f"{len(rows) - len(bad)} of {len(rows)} outputs look healthy"
                + (f"; {len(bad)} degenerate" if bad else "")
            )
        if bad:
            # SystemExit, not typer.Exit: main() runs the app with standalone_mode=False, where
            # click returns an Exit's code instead of raising it
            raise SystemExit(1)

    @app.command("eval")
    def evaluate(
        model: list[Path] = typer.Option(
            ..., "--model", help="Model directory (repeatable); the first is the reference."
        ),
        dataset: list[Path] = typer.Option(
            ..., "--dataset", help="JSONL, text file or directory (repeatable)."
        ),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per sample."),
        max_samples: int = typer.Option(
            None, "--max-samples", help="Seeded random subsample of the samples."
        ),
        batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward pass."),
        prompt_tokens: int = typer.Option(
            16, "--prompt-tokens", help="Sample tokens that prompt the greedy continuations."
        ),
        gen_tokens: int = typer.Option(
            16, "--gen-tokens", help="Tokens of each greedy continuation."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for subsampling."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Perplexity of each model on the same tokens, and agreement with the first model."""
        from mlxfun.methods.evaluate import evaluate as run_evaluate

        result = run_evaluate(
            model,
            dataset,
            max_tokens=max_tokens,
            max_samples=max_samples,
            batch_size=batch_size,
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            seed=seed,
            progress=None if json_output else lambda text: print(text, file=sys.stderr),
        )
        if json_output:
            print_json(result)
            return
        columns = [
            "model",
            "perplexity",
            "nll",
            "top1_agreement",
            "greedy_agreement",
            "greedy_prefix",
            "seconds",
        ]
        print_table(result["models"], columns)
        print(
            f"\n{result['tokens']} tokens from {result['samples']} samples; greedy: "
            f"{result['gen_tokens']} tokens after {result['prompt_tokens']}-token prompts; "
            "agreement is against the first model"
        )
