"""``mlxfun serve``: mlx-lm's OpenAI-compatible server with live routing statistics, jobs and
the dashboard; ``mlxfun ui``: the dashboard of a server on another machine."""

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Path = typer.Option(..., "--model", help="mlx-lm model directory to serve."),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."
        ),
        port: int = typer.Option(8080, "--port", help="TCP port."),
        api_key: str = typer.Option(
            None,
            "--api-key",
            envvar="MLXFUN_API_KEY",
            help="Bearer token every request must carry (Authorization: Bearer KEY).",
        ),
        workdir: Path = typer.Option(
            Path("."), "--workdir", help="Where jobs and saved stats may read and write."
        ),
        spec: Path = typer.Option(None, "--spec", help="Steering spec active from the start."),
        scorers: str = typer.Option(
            None, "--scorers", help="Comma-separated scorers to count (default: all installed)."
        ),
        count: bool = typer.Option(
            True, "--stats/--no-stats", help="Count routing (off: plain serving, to compare)."
        ),
        max_tokens: int = typer.Option(512, "--max-tokens", help="Default completion length."),
        prompt_cache_size: int = typer.Option(
            0,
            "--prompt-cache-size",
            help="KV caches kept between requests (0: every prompt token is run and counted).",
        ),
        log_level: str = typer.Option("WARNING", "--log-level", help="Python logging level."),
    ):
        """Serve a model (OpenAI API of mlx_lm.server) with routing statistics and a dashboard."""
        import logging

        from mlxfun.methods.serve import ServeOptions
        from mlxfun.methods.serve import serve as run_server

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
        options = ServeOptions(
            model=model,
            host=host,
            port=port,
            api_key=api_key,
            workdir=workdir,
            spec=spec,
            scorers=scorers.split(",") if scorers else None,
            max_tokens=max_tokens,
            prompt_cache_size=prompt_cache_size,
            count=count,
            log_level=log_level.upper(),
        )

        def ready(address):
            print(f"mlxfun serve: {model} on http://{address[0]}:{address[1]}/", flush=True)

        run_server(options, on_ready=ready)

    @app.command("ui")
    def ui(
        server: str = typer.Option(..., "--server", help="URL of a running mlxfun serve."),
        port: int = typer.Option(8081, "--port", help="Local port for the dashboard."),
        api_key: str = typer.Option(
            None, "--api-key", envvar="MLXFUN_API_KEY", help="The server's API key."
        ),
    ):
        """The dashboard of a remote `mlxfun serve`, on 127.0.0.1 (requests are relayed)."""
        from mlxfun.methods.dashboard_proxy import run_proxy

        def ready(address):
            print(f"mlxfun ui: {server} on http://{address[0]}:{address[1]}/", flush=True)

        run_proxy(server, port, api_key, on_ready=ready)
