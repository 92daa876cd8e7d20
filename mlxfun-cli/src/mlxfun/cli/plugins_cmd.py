"""``mlxfun plugins``: what is installed, from which distribution, and what failed."""

import typer

from .output import print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins(
        json_output: bool = typer.Option(False, "--json", help="Print a JSON list."),
        kind: str = typer.Option(None, "--kind", help="Only this kind (adapter, scorer, ...)."),
    ):
        """List installed plugins: kind, name, distribution, version, description."""
        from mlxfun.core.plugins import all_plugins

        rows = [info.as_dict() for info in all_plugins()]
        if kind:
            rows = [row for row in rows if row["kind"] == kind]
        if json_output:
            print_json(rows)
            return
        ok = [row for row in rows if "error" not in row]
        failed = [row for row in rows if "error" in row]
        print_table(ok, ["kind", "name", "distribution", "version", "description"])
        if failed:
            print(f"\n{len(failed)} plugin(s) failed:")
            print_table(failed, ["kind", "name", "distribution", "version", "error"])
