"""``check_compressor``: a compressor does what ``mlxfun prune`` asks of one, safely."""

import shutil
import tempfile
from pathlib import Path

import attrs

from ..errors import MlxfunError
from ..types import CompressRequest
from . import commands
from .failures import fail, plugin_label
from .plugin import check_plugin
from .plugin_state import substituted_plugin
from .selector import run_kit_step


def check_compressor(compressor, request_type=CompressRequest, **fields) -> None:
    """``compress(request)`` called as the commands call it, on a tiny Qwen3-MoE checkpoint and
    its stats, with the compressor looked up by name in the plugin registry:

    - with ``dry_run`` it returns a dict summary and writes nothing;
    - otherwise it returns a dict, writes ``request.output`` completely (no temporary
      directory left beside it) and mlxfun loads and runs the model written there;
    - an existing output without ``force`` is a clean ``MlxfunError`` and stays as it was;
    - the source model and the stats file are never modified.

    The request is ``request_type(model=..., stats=..., output=..., scorer=..., selector=...,
    n=1, **fields)`` (``mlxfun.core.types.CompressRequest`` by default; the kit's scorer and
    selector are registered); a ``dataset`` field, when the type has one, gets a calibration
    file. Needs ``mlxfun-adapters`` (the architecture) and writes into a temporary directory.
    """
    check_plugin("compressor", compressor)
    label = plugin_label("compressor", compressor)
    folder = Path(tempfile.mkdtemp(dir=commands.scratch()))
    model = folder / "model"
    shutil.copytree(run_kit_step(label, commands.checkpoint, "qwen3_moe"), model)
    stats = folder / "stats.npz"
    shutil.copy2(run_kit_step(label, commands.stats, "qwen3_moe"), stats)
    before = commands.files_of(model), commands.files_of(stats)
    output = folder / "out"
    base = dict(
        model=model,
        stats=stats,
        output=output,
        scorer=commands.KIT_SCORER,
        selector=commands.KIT_SELECTOR,
        n=1,
    )
    if "dataset" in attrs.fields_dict(request_type):
        base["dataset"] = [commands.calibration()]
    base.update(fields)
    name = compressor.name
    with commands.kit_plugins(), substituted_plugin("compressor", compressor):

        def compress(step: str, **changes) -> dict:
            summary = commands.run_step(
                label, step, commands.prune, request_type, name, **{**base, **changes}
            )
            if not isinstance(summary, dict):
                fail(label, f"{step}: compress() returned {type(summary).__name__}, not a dict")
            return summary

        compress(f"mlxfun {name} --dry-run", dry_run=True)
        if output.exists():
            fail(label, f"compress() with dry_run wrote {output}; a dry run writes nothing")
        compress(f"mlxfun {name}")
        commands.run_step(label, f"loading what {name} wrote", commands.load_and_run, output)
        written = commands.files_of(output)
        stray = sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{output.name}"))
        if stray:
            fail(label, f"compress() left {stray} beside its output; write atomically")
        try:
            commands.prune(request_type, name, **base)
        except MlxfunError:
            pass
        except Exception as exc:
            fail(
                label,
                f"an existing output without force raised {type(exc).__name__}: {exc}; raise "
                "MlxfunError (mlxfun.core.outputs.check_output says what to do)",
            )
        else:
            fail(label, "compress() replaced an existing output without force")
        if commands.files_of(output) != written:
            fail(label, "compress() changed an existing output without force")
    if (commands.files_of(model), commands.files_of(stats)) != before:
        fail(label, "compress() modified its inputs (the source model or the stats file)")
