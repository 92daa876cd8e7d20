"""Layer-sequential runs: every calibration batch through one decoder layer at a time.

``capture`` runs the model's own forward once per batch with every decoder layer (up to the last
one needed) replaced by a recorder: it keeps the arguments the model passes to that layer
(the hidden state first, then masks, position data, per-layer inputs, a ``None`` cache) and hands
the hidden state back unchanged, so no layer computes and the forward stops at the last layer
needed, before the final norm and the LM head. A forward that does anything to the hidden state
between two layers (the next layer is not handed what the previous one returned) cannot be
stepped through, and is refused. ``LayerRunner.run(i)`` then applies decoder layer ``i`` to
every batch, its outputs the inputs of layer ``i + 1``: the same calls, with the same
arguments, as the model's forward makes, without a KV cache.

The hidden states live in a ``MemoryBuffer`` or, with a spill directory, in a float32 disk
memmap (``SpillBuffer``). ``release`` drops a module's weights after its layer ran, so that a
lazily loaded model (``load_model(..., lazy=True)``) holds about one layer at a time.
"""

import os
import tempfile
from pathlib import Path

import attrs
import numpy as np

from .adapter import get_path, has_path
from .errors import MlxfunError
from .hooks import call_hooks


class _Stop(Exception):
    pass


class _NotSequential(Exception):
    pass


@attrs.define
class LayerCall:
    """What the model passed to one decoder layer, after the hidden state."""

    args: tuple
    kwargs: dict


def decoder_layers(model, moe_layers) -> tuple[str, list]:
    """``(path, layers)``: the list of decoder layers that holds every MoE block."""
    paths = set()
    for layer in moe_layers:
        parts = layer.path.split(".")
        found = None
        for j in range(len(parts) - 1, 0, -1):
            if parts[j].isdigit() and int(parts[j]) == layer.index:
                parent = ".".join(parts[:j])
                if isinstance(get_path(model, parent), list):
                    found = parent
                    break
        if found is None:
            return "", []
        paths.add(found)
    if len(paths) != 1:
        return "", []
    path = paths.pop()
    return path, get_path(model, path)


def all_decoder_layers(model) -> tuple[str, list]:
    """``(path, layers)``: the decoder layer list of a model with no MoE layer to find it by
    (a dense mlx-lm model: ``model.layers``), or ``("", [])``."""
    for path in ("model.layers", "layers", "model.model.layers", "language_model.model.layers"):
        if has_path(model, path):
            layers = get_path(model, path)
            if isinstance(layers, list) and layers:
                return path, layers
    return "", []


def refusal(model_type, why: str) -> MlxfunError:
    return MlxfunError(
        f"{model_type}: cannot run it one decoder layer at a time ({why}); collect without --stream"
    )


def _recorders(layers, stop: int, calls: list, state: dict):
    def recorder(index):
        def wrapper(module, call, *args, **kwargs):
            if not args or index != state.get("next", 0):
                raise _NotSequential
            hidden = args[0]
            if index > 0 and hidden is not state.get("last"):
                raise _NotSequential
            if index == 0:
                state["first"] = hidden
            state["last"] = hidden
            calls[index] = LayerCall(tuple(args[1:]), dict(kwargs))
            state["next"] = index + 1
            if index == stop:
                raise _Stop
            return hidden

        return wrapper

    return [(layers[i], recorder(i)) for i in range(stop + 1)]


def capture(model, layers, stop: int, tokens, model_type=""):
    """One batch: ``(hidden state entering layer 0, [LayerCall per layer 0..stop])``."""
    import mlx.core as mx

    calls = [None] * (stop + 1)
    state: dict = {}
    try:
        with call_hooks(_recorders(layers, stop, calls, state)):
            model(tokens)
    except _Stop:
        pass
    except _NotSequential:
        raise refusal(
            model_type, "its forward does not call its decoder layers one after another"
        ) from None
    except Exception:
        if "first" not in state:  # failed before reaching the decoder layers: not ours
            raise
        # the forward choked on the recorder's hand-back (e.g. unpacked it as a tuple)
        raise refusal(
            model_type, "its forward does not hand each decoder layer's output to the next"
        ) from None
    if any(c is None for c in calls):
        raise refusal(model_type, "its forward does not call its decoder layers one after another")
    mx.eval(state["first"], [(c.args, c.kwargs) for c in calls])
    return state["first"], calls


class MemoryBuffer:
    """Hidden states, one per batch, kept in memory."""

    def __init__(self):
        self.items: list = []

    def append(self, hidden) -> None:
        self.items.append(hidden)

    def get(self, batch: int):
        return self.items[batch]

    def set(self, batch: int, hidden) -> None:
        self.items[batch] = hidden

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        self.items = []


def spill_file(directory) -> tuple[int, str]:
    """A new temporary file in ``directory``, or a one-line error saying why it cannot be."""
    directory = Path(directory)
    try:
        return tempfile.mkstemp(prefix=".mlxfun-spill-", suffix=".f32", dir=directory)
    except OSError as exc:
        raise MlxfunError(
            f"--spill {directory}: cannot write there ({exc.strerror or exc}); "
            "pass a writable directory"
        ) from None


class SpillBuffer:
    """Hidden states in a float32 memmap in ``directory`` (one slot per batch, sized by the
    hidden state entering the first layer); each is read back in its own dtype. The file is
    removed by ``close``."""

    def __init__(self, directory, sizes: list[int]):
        fd, self.path = spill_file(directory)
        os.close(fd)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shapes: list = [None] * len(sizes)
        self.dtypes: list = [None] * len(sizes)
        try:
            self.data = np.memmap(
                self.path, np.float32, "w+", shape=(max(int(self.offsets[-1]), 1),)
            )
        except OSError as exc:
            os.unlink(self.path)
            raise MlxfunError(
                f"--spill {directory}: cannot write {self.offsets[-1] * 4} bytes there "
                f"({exc.strerror or exc}); pass a directory with room"
            ) from None
        self.filled = 0

    def append(self, hidden) -> None:
        self.set(self.filled, hidden)
        self.filled += 1

    def get(self, batch: int):
        import mlx.core as mx

        begin, end = self.offsets[batch], self.offsets[batch + 1]
        values = np.array(self.data[begin:end]).reshape(self.shapes[batch])
        return mx.array(values).astype(self.dtypes[batch])

    def set(self, batch: int, hidden) -> None:
        import mlx.core as mx

        begin, end = self.offsets[batch], self.offsets[batch + 1]
        if hidden.size != end - begin:
            raise MlxfunError(
                f"a decoder layer changed the hidden state's size ({hidden.shape}); "
                "collect without --spill"
            )
        self.data[begin:end] = np.array(hidden.astype(mx.float32)).reshape(-1)
        self.shapes[batch] = hidden.shape
        self.dtypes[batch] = hidden.dtype

    def __len__(self) -> int:
        return self.filled

    def close(self) -> None:
        self.data = None
        if os.path.exists(self.path):
            os.unlink(self.path)


def release(module) -> None:
    """Drop a module's weights (replaced by empty arrays): it must not run again."""
    import mlx.core as mx
    from mlx.utils import tree_map

    empty = mx.zeros((0,))
    module.update(tree_map(lambda _: empty, module.parameters()), strict=False)


def release_outside(model, prefix: str) -> None:
    """Drop every weight of ``model`` outside ``prefix`` (the embeddings, final norm, LM head
    once the first layer's inputs are captured)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    empty = mx.zeros((0,))
    outside = [
        (name, empty)
        for name, _ in tree_flatten(model.parameters())
        if not name.startswith(prefix + ".")
    ]
    model.update(tree_unflatten(outside), strict=False)


class LayerRunner:
    """The decoder layers ``0..stop`` of ``model`` applied to ``token_batches`` one layer at a
    time. ``spill``: a directory for the hidden states (else they stay in memory).
    ``decoder``: ``(path, layers)`` given by the caller (``all_decoder_layers`` for a dense
    model, ``adapter`` then None) instead of the list that holds the MoE blocks; ``stop``
    defaults to the last MoE layer, or with ``decoder`` to the last layer."""

    def __init__(
        self,
        model,
        adapter,
        token_batches,
        stop: int | None = None,
        spill=None,
        decoder: tuple[str, list] | None = None,
    ):
        model_type = getattr(getattr(model, "args", None), "model_type", "") or getattr(
            adapter, "name", ""
        )
        self.moe_layers = adapter.moe_layers(model) if adapter is not None else []
        if decoder is None:
            self.path, self.layers = decoder_layers(model, self.moe_layers)
        else:
            self.path, self.layers = decoder
        if not self.layers:
            raise refusal(model_type, "its MoE blocks are not in one list of decoder layers")
        if stop is None:
            moe = [layer.index for layer in self.moe_layers]
            stop = max(moe) if decoder is None else len(self.layers) - 1
        self.stop = stop
        self.calls: list[list[LayerCall]] = []
        firsts = []
        for tokens in token_batches:
            first, calls = capture(model, self.layers, self.stop, tokens, model_type)
            firsts.append(first)
            self.calls.append(calls)
        if spill is None:
            self.hidden = MemoryBuffer()
        else:
            self.hidden = SpillBuffer(spill, [int(h.size) for h in firsts])
        for first in firsts:
            self.hidden.append(first)

    def run(self, index: int, on_batch=None, keep: bool = True) -> None:
        """Apply decoder layer ``index`` to every batch; ``on_batch(batch)`` after each (the
        output evaluated); with ``keep`` the outputs replace the hidden states."""
        import mlx.core as mx

        layer = self.layers[index]
        for batch in range(len(self.hidden)):
            call = self.calls[batch][index]
            out = layer(self.hidden.get(batch), *call.args, **call.kwargs)
            mx.eval(out)
            if on_batch is not None:
                on_batch(batch)
            if keep:
                self.hidden.set(batch, out)

    def module_inputs(self, index: int, module) -> list:
        """The first argument ``module`` (a part of decoder layer ``index``) receives on every
        batch, evaluated; the layer stops there and the hidden states stay as they are."""
        import mlx.core as mx

        seen = []

        def stop(_, call, x, *args, **kwargs):
            seen.append(x)
            raise _Stop

        layer = self.layers[index]
        with call_hooks([(module, stop)]):
            for batch in range(len(self.hidden)):
                call = self.calls[batch][index]
                try:
                    layer(self.hidden.get(batch), *call.args, **call.kwargs)
                except _Stop:
                    mx.eval(seen[-1])
                else:
                    raise MlxfunError(f"decoder layer {index} did not call {type(module).__name__}")
        return seen

    def close(self) -> None:
        self.hidden.close()
        self.calls = []
