"""MLX call hooks and the observer on a hand-written MoE model; needs only mlxfun-core (MLX)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU
from mlxfun.core import testing
from mlxfun.core.adapter import MoEAdapter
from mlxfun.core.hooks import call_hooks
from mlxfun.core.observe import Observer


def top2_softmax(block, logits):
    k = block.top_k
    indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    return indices, mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1)


class Block(nn.Module):
    """An MoE block: top-k of the router logits, softmax over the k (Mixtral-style)."""

    def __init__(self, dim=16, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = SwitchGLU(dim, 24, experts)

    def __call__(self, x):
        indices, weights = top2_softmax(self, self.router(x))
        return (self.experts(x, indices) * weights[..., None]).sum(axis=-2)


class Layer(nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.moe = Block() if moe else nn.Linear(16, 16)

    def __call__(self, x):
        return x + self.moe(x)


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = [Layer(moe=i % 2 == 1) for i in range(4)]  # MoE at layers 1 and 3

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return x


ADAPTER = MoEAdapter(
    name="tiny_moe",
    model_types=("tiny_moe",),
    description="a hand-written test MoE",
    experts_attr="experts",
    router_attr="router",
    route=top2_softmax,
)


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    model = TinyMoE()
    mx.eval(model.parameters())
    return model


def tokens():
    return mx.array(np.random.default_rng(0).integers(0, 32, (2, 8)))


def test_hooks_restore_the_class_and_leave_outputs_alone(model):
    linear = model.layers[0].moe
    cls = type(linear)
    seen = []

    def wrapper(module, call, x):
        seen.append(x.shape)
        return call(x)

    plain = model(tokens())
    with call_hooks([(linear, wrapper)]):
        assert type(linear) is not cls and isinstance(linear, cls)
        hooked = model(tokens())
    assert type(linear) is cls
    assert seen == [(2, 8, 16)]
    assert mx.array_equal(plain, hooked).item()


def test_hooks_restore_the_class_on_error_and_refuse_a_wrapper_twice(model):
    block = model.layers[1].moe
    cls = type(block)
    with pytest.raises(RuntimeError, match="boom"):
        with call_hooks([(block, lambda m, call, x: call(x))]):
            raise RuntimeError("boom")
    assert type(block) is cls and not getattr(block, "_mlxfun_hooked", False)
    same = lambda m, c, x: c(x)  # noqa: E731
    with pytest.raises(RuntimeError, match="already hooked"):
        with call_hooks([(block, same), (block, same)]):
            pass
    assert type(block) is cls


def test_hooks_on_one_module_chain_last_installed_outermost(model):
    """Two users hooking one block (observation and steering) share one hooked class."""
    block = model.layers[1].moe
    cls = type(block)
    order = []

    def first(module, call, x):
        order.append("first")
        return call(x) + 1.0

    def second(module, call, x):
        order.append("second")
        return call(x) * 2.0

    plain = block(mx.ones((1, 16)))
    with call_hooks([(block, first)]):
        hooked_class = type(block)
        with call_hooks([(block, second)]):
            assert type(block) is hooked_class
            both = block(mx.ones((1, 16)))
        assert type(block) is hooked_class
        one = block(mx.ones((1, 16)))
    assert type(block) is cls
    assert order == ["second", "first", "first"]
    assert mx.allclose(both, (plain + 1.0) * 2.0).item()
    assert mx.allclose(one, plain + 1.0).item()


def test_the_adapter_finds_strided_moe_layers(model):
    layers = ADAPTER.moe_layers(model)
    assert [(layer.position, layer.index, layer.path) for layer in layers] == [
        (0, 1, "layers.1.moe"),
        (1, 3, "layers.3.moe"),
    ]
    assert all(layer.num_experts == 4 and layer.top_k == 2 for layer in layers)


def test_observations_match_the_blocks_routing(model):
    observations = testing.check_adapter(ADAPTER, model, "tiny_moe", commands=False)
    with Observer(model, ADAPTER, {"selected", "weights"}) as observer:
        model(tokens())
    mask = np.ones((2, 8), dtype=bool)
    mask[0, 5:] = False
    masked = observer.observations(mask)
    assert [o.num_tokens for o in masked] == [13, 13]
    assert [o.num_tokens for o in observations] == [24, 24]
    for obs in masked:
        np.testing.assert_allclose(obs.weights.sum(-1), 1.0, rtol=1e-5)
        assert obs.norms is None and obs.outputs is None  # only what was asked for
