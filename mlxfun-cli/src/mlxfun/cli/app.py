"""The ``mlxfun`` Typer application.

Commands live in small modules, each with ``register(app)``; heavy libraries (mlx, mlx-lm,
scipy) are imported inside the command functions, so ``mlxfun --help`` and ``mlxfun plugins``
stay fast. Plugins add commands through the ``register_commands`` hook.
"""

import importlib
import os
import sys

import typer
from mlxfun.core import __version__
from mlxfun.core.errors import MlxfunError

COMMAND_MODULES = (
    "plugins_cmd",
    "collect_cmd",
    "inspect_cmd",
    "stats_cmd",
    "prune_cmd",
    "steer_cmd",
    "amplify_cmd",
    "merge_cmd",
    "check_cmd",
    "scan_cmd",
    "serve_cmd",
    "abliterate_cmd",
    "analyze_cmd",
    "plan_cmd",
    "apply_cmd",
    "sparsify_cmd",
    "prune_neurons_cmd",
)


# --debug (or MLXFUN_DEBUG=1): a failure also prints its traceback; main() resets it per run.
_debug = False


def _set_debug(value: bool):
    global _debug
    _debug = _debug or value


def _version(value: bool):
    if value:
        typer.echo(f"mlxfun {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="mlxfun",
        help="Compress and steer Mixture-of-Experts models with MLX.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def main_callback(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Show the version."
        ),
        debug: bool = typer.Option(
            False,
            "--debug",
            callback=_set_debug,
            help="Print the traceback of a failure (also MLXFUN_DEBUG=1).",
        ),
    ):
        """Compress and steer Mixture-of-Experts models with MLX."""

    for name in COMMAND_MODULES:
        importlib.import_module(f"mlxfun.cli.{name}").register(app)

    from mlxfun.core.plugins import load_plugins, pm

    load_plugins()
    plugin_app = typer.Typer(help="Commands added by plugins.")
    pm.hook.register_commands(app=plugin_app)
    if plugin_app.registered_commands or plugin_app.registered_groups:
        for command in plugin_app.registered_commands:
            command.rich_help_panel = command.rich_help_panel or "Plugin commands"
            app.registered_commands.append(command)
        app.registered_groups.extend(plugin_app.registered_groups)
    return app


def _click_exception() -> type:
    """The ``ClickException`` of the Click that Typer runs on: the ``click`` package up to
    Typer 0.25, Typer's own copy (``typer._click``) since 0.26. Found from Typer's public
    ``BadParameter`` rather than named, so any Typer in mlxfun-cli's range is handled."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _exit_code(exc: Exception) -> int | None:
    """The exit status for Typer's (Click's) own exceptions, after printing what they say: a
    usage error shows the usage line and the error (status 2). ``None`` for anything else."""
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, _click_exception()):
        exc.show()
        return exc.exit_code
    if isinstance(exc, typer.Abort):
        print("aborted", file=sys.stderr)
        return 1
    return None


def _traceback_if_debug(exc: BaseException) -> None:
    if _debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    global _debug
    _debug = os.environ.get("MLXFUN_DEBUG") == "1"
    try:
        app = build_app()  # loads plugins: strict mode may raise here
        app(args=argv, standalone_mode=False)
    except MlxfunError as exc:
        _traceback_if_debug(exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # usage errors and the like
        code = _exit_code(exc)
        if code is not None:
            return code
        from mlxfun.core import plugins

        failed = plugins.failed_plugin(exc)  # a plugin raised: one line, not a traceback
        if failed is None:
            raise
        _traceback_if_debug(exc)
        hint = "" if _debug else " (--debug or MLXFUN_DEBUG=1 shows the traceback)"
        print(f"error: {plugins.plugin_failure_message(failed, exc)}{hint}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    sys.exit(main())
