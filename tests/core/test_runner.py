"""The layer runner on toy models whose forwards are written out here: stepping one layer at a
time over every batch equals the model's own forward, the forward stops at the last layer
needed, and forwards that hand layers anything but the previous layer's output are refused."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlxfun.core.adapter import MoELayer
from mlxfun.core.errors import MlxfunError
from mlxfun.core.runner import LayerRunner, SpillBuffer, release


class Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.w = mx.array(np.random.default_rng(seed).normal(size=(8, 8)).astype(np.float32))

    def __call__(self, x):
        return mx.tanh(x @ self.w)


class Layer(nn.Module):
    calls = 0

    def __init__(self, seed):
        super().__init__()
        self.mlp = Block(seed)

    def __call__(self, h, mask, scale=1.0):
        Layer.calls += 1
        return h + self.mlp(h * mask) * scale


class Toy(nn.Module):
    """Per-layer keyword arguments (scale) and a mask computed from the tokens."""

    def __init__(self, layers=4):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = [Layer(i) for i in range(layers)]

    def hidden(self, tokens):
        return self.embed(tokens), (tokens > 3).astype(mx.float32)[..., None]

    def __call__(self, tokens):
        h, mask = self.hidden(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, scale=0.5 + i)
        return h


class Meddling(Toy):
    def __call__(self, tokens):
        h, mask = self.hidden(tokens)
        for layer in self.layers:
            h = layer(h, mask) * 2  # something between two layers
        return h


class Tupled(Toy):
    def __call__(self, tokens):
        h, mask = self.hidden(tokens)
        for layer in self.layers:
            h, _ = layer(h, mask)  # layers hand back more than the hidden state
        return h


class Adapter:
    name = "toy"

    def __init__(self, indices):
        self.indices = indices

    def moe_layers(self, model):
        return [
            MoELayer(p, i, f"layers.{i}.mlp", model.layers[i].mlp, None, 8, 1)
            for p, i in enumerate(self.indices)
        ]


BATCHES = [mx.array(np.random.default_rng(b).integers(0, 32, (2, 5 + b))) for b in range(3)]


def stepped(model, runner, upto):
    for index in range(upto + 1):
        runner.run(index)
    return [runner.hidden.get(b) for b in range(len(BATCHES))]


@pytest.mark.parametrize("spill", [False, True])
def test_stepping_equals_the_forward_and_stops_at_the_last_layer_needed(tmp_path, spill):
    model = Toy()
    mx.eval(model.parameters())
    Layer.calls = 0
    runner = LayerRunner(model, Adapter([0, 2]), BATCHES, spill=tmp_path if spill else None)
    assert Layer.calls == 0 and runner.stop == 2  # the capture computes no layer
    got = stepped(model, runner, 2)
    assert Layer.calls == 3 * len(BATCHES)  # layer 3 never ran
    model.layers = model.layers[:3]  # the forward up to layer 2 as the model computes it
    for tokens, out in zip(BATCHES, got):
        assert mx.array_equal(model(tokens), out).item()
    runner.close()
    assert list(tmp_path.iterdir()) == []


def test_module_inputs_stop_the_layer_at_the_module():
    model = Toy()
    runner = LayerRunner(model, Adapter([1]), BATCHES)
    runner.run(0)
    before = [runner.hidden.get(b) for b in range(len(BATCHES))]
    inputs = runner.module_inputs(1, model.layers[1].mlp)
    for b, tokens in enumerate(BATCHES):
        _, mask = model.hidden(tokens)
        assert mx.array_equal(inputs[b], before[b] * mask).item()
        assert runner.hidden.get(b) is before[b]


@pytest.mark.parametrize("cls", [Meddling, Tupled])
def test_forwards_that_hand_layers_something_else_are_refused_in_one_line(cls):
    with pytest.raises(MlxfunError) as caught:
        LayerRunner(cls(), Adapter([1, 3]), BATCHES)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("toy: cannot run it one decoder layer")


def test_spill_buffer_gives_back_each_dtype_exactly(tmp_path):
    values = [
        mx.array(np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)),
        mx.array(np.random.default_rng(1).normal(size=(1, 5, 4)).astype(np.float32)).astype(
            mx.bfloat16
        ),
    ]
    buffer = SpillBuffer(tmp_path, [v.size for v in values])
    for v in values:
        buffer.append(v)
    for b, v in enumerate(values):
        got = buffer.get(b)
        assert got.dtype == v.dtype and mx.array_equal(got, v).item()
    with pytest.raises(MlxfunError, match="changed the hidden state's size"):
        buffer.set(0, mx.zeros((3,)))
    buffer.close()
    assert list(tmp_path.iterdir()) == []


def test_spill_into_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(MlxfunError, match=r"^--spill .*missing: cannot write there .*writable"):
        SpillBuffer(tmp_path / "missing", [4])


def test_release_drops_the_weights():
    layer = Layer(0)
    release(layer)
    assert layer.mlp.w.size == 0
