"""Outputs written safely: checks that an output destroys no input, temporary names, and
directories moved into place only when complete (leftovers of killed runs removed)."""

import glob
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import MlxfunError

# How an mlxfun model output was made (method, source, options, versions).
PROVENANCE_FILE = "mlxfun.json"
# Every mlxfun model output has it; config.json alone is any model.
MODEL_OUTPUT_MARKERS = (PROVENANCE_FILE,)
_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>\w+)-(?P<pid>\d+)(?:\.npz|\.probe)?")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def run_tag() -> str:
    """``HOST-PID`` for temporary names: a pid means something only on its own machine (an
    output folder may be shared between machines), so only this host's leftovers are judged."""
    return f"{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def remove_stale_siblings(output) -> list[Path]:
    """Remove what killed runs of this machine left next to ``output``:
    ``.<name>.tmp-<host>-<pid>`` (and ``.old-``, ``.tmp-...npz``) whose process is no longer
    running; other machines' leftovers are left alone.
    A run still going (its pid alive) is left alone, and so is an ``.old`` directory while
    ``output`` is missing (a run killed between its two renames). Returns what was removed."""
    output = Path(output)
    removed = []
    try:
        siblings = list(output.parent.glob(f".{glob.escape(output.name)}.*-*"))
    except OSError:
        return removed
    for path in siblings:
        match = _STALE.fullmatch(path.name)
        if not match or match["name"] != output.name or match["host"] != _host():
            continue
        if _pid_alive(int(match["pid"])):
            continue
        if ".old-" in path.name and not (output.exists() or output.is_symlink()):
            continue  # killed while replacing: this is the only copy of the previous output
        try:
            _remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _same(a: Path, b: Path) -> bool:
    """The same file or folder: by identity where both exist (case-insensitive file systems,
    bind mounts and links make different strings name one folder), else by resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _inside(path: Path, directory: Path) -> bool:
    """``path`` is ``directory`` or lies below it (both resolved)."""
    return any(_same(p, directory) for p in (path, *path.parents))


def _check_not_an_input(output: Path, inputs) -> None:
    where = output.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if _inside(source, where):
            what = "is" if _same(source, where) else "contains"
            raise MlxfunError(
                f"--output {output} {what} the input {item}; mlxfun never modifies its inputs "
                "(nor deletes them with --force): choose an --output outside them"
            )
        if _inside(where, source):
            raise MlxfunError(
                f"--output {output} is inside the input {item}; mlxfun never modifies its "
                "inputs: choose an --output outside them"
            )


def check_output(output, force: bool = False, inputs=()) -> Path:
    """Refuse (one line) an ``--output`` that would destroy an input or something that is not
    a previous model output:

    - an input (model, stats, dataset) may not be the output, lie inside it or contain it;
    - an existing output is replaced only with ``force``, and only if it is a directory that
      is a previous mlxfun model output (has ``mlxfun.json``).
    """
    output = Path(output)
    _check_not_an_input(output, inputs)
    if output.exists() or output.is_symlink():
        if not force:
            raise MlxfunError(f"{output} already exists; choose another --output or pass --force")
        if output.is_symlink() or not output.is_dir():
            raise MlxfunError(
                f"{output} exists and is not a model directory; --force only replaces a "
                "previous model output: remove it yourself or choose another --output"
            )
        if not any((output / name).is_file() for name in MODEL_OUTPUT_MARKERS):
            raise MlxfunError(
                f"{output} exists and is not an mlxfun output (no mlxfun.json); --force only "
                "replaces a previous mlxfun output: remove it yourself or choose another --output"
            )
    return output


def check_output_file(path, what: str = "--output", inputs=()) -> Path:
    """Refuse (one line) an output file that cannot be written, before hours of work: an input
    (model, dataset, stats file) or a file inside one, a directory, or a folder where no file
    can be created (probed with a temporary file)."""
    path = Path(path)
    _check_not_an_input(path, inputs)
    if path.is_dir():
        raise MlxfunError(f"{what} {path} is a directory; pass a file name")
    probe = path.parent / f".{path.name}.tmp-{run_tag()}.probe"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MlxfunError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path


@contextmanager
def atomic_output_dir(output, force: bool = False, inputs=()):
    """Yield a temporary directory next to ``output``; move it into place only on success.

    ``check_output`` runs first (``inputs``: the paths the run reads, which must survive).
    An interrupted run leaves only a ``.<name>.tmp-<pid>`` directory, never something that
    looks like a finished model; later runs writing the same output remove such leftovers
    whose process is gone (``remove_stale_siblings``).
    """
    output = check_output(output, force, inputs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(output)
        tmp = output.parent / f".{output.name}.tmp-{run_tag()}"
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise MlxfunError(f"cannot write --output {output}: {exc}") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise MlxfunError(f"{output} was not written: {exc}") from None
        try:
            if output.exists() or output.is_symlink():
                check_output(output, force, inputs)  # it may have appeared meanwhile
                old = output.parent / f".{output.name}.old-{run_tag()}"
                os.replace(output, old)
                os.replace(tmp, output)
            else:
                old = None
                os.replace(tmp, output)
        except OSError as exc:
            raise MlxfunError(f"cannot write --output {output}: {exc}") from None
        if old is not None:
            try:
                _remove(old)
            except OSError:
                pass  # a later run removes it (remove_stale_siblings)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
