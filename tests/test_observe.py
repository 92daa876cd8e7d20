"""The observer's hooks: outputs untouched, model restored, wrong adapters caught, bf16 on CPU."""

import attrs
import mlx.core as mx
import numpy as np
import pytest
from mlxfun.core import plugins
from mlxfun.core.models import load_model
from mlxfun.core.observe import Observer, RoutingMismatch

from .adapters.harness import build_tiny
from .adapters.test_examples import QWEN3_MOE
from .model_dirs import write_model_dir


@pytest.fixture(scope="module")
def model():
    return build_tiny("qwen3_moe", QWEN3_MOE)


def tokens():
    return mx.array(np.random.default_rng(0).integers(0, 256, (2, 16)))


def test_hooks_restore_the_model_even_on_error(model):
    adapter = plugins.get_adapter("qwen3_moe")
    classes = [type(m) for _, m in model.named_modules()]
    with pytest.raises(ValueError, match="boom"):
        with Observer(model, adapter):
            model(tokens())
            raise ValueError("boom")
    assert [type(m) for _, m in model.named_modules()] == classes
    assert not any(getattr(m, "_mlxfun_hooked", False) for _, m in model.named_modules())


def test_padding_is_masked_out(model):
    adapter = plugins.get_adapter("qwen3_moe")
    mask = np.ones((2, 16), dtype=bool)
    mask[1, 10:] = False
    with Observer(model, adapter) as observer:
        model(tokens())
    observations = observer.observations(mask)
    assert all(o.num_tokens == 26 for o in observations)


def test_an_adapter_with_the_wrong_routing_is_caught(model):
    good = plugins.get_adapter("qwen3_moe")

    def lowest(block, logits):  # picks the least likely experts: not what the block does
        inds = mx.argpartition(logits, kth=1, axis=-1)[..., :2]
        return inds, mx.ones(inds.shape)

    wrong = attrs.evolve(good, name="wrong", route=lowest)
    with Observer(model, wrong) as observer:
        model(tokens())
    with pytest.raises(RoutingMismatch, match="differs from the block's"):
        observer.observations()


def test_bf16_experts_run_in_float32_on_cpu(tmp_path, capsys, monkeypatch):
    import mlx.nn as nn
    from mlxfun.core import models

    monkeypatch.setattr(models, "_said_float32", False)  # said once per process: say it here

    path = write_model_dir(tmp_path / "bf16", "qwen3_moe", QWEN3_MOE)
    reference, _, _ = load_model(path)
    # rewrite the weights in bfloat16, as shipped models are
    from mlx.utils import tree_flatten

    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(reference.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    capsys.readouterr()
    model, _, _ = load_model(path)
    if mx.default_device() == mx.cpu:
        assert "float32" in capsys.readouterr().err
        assert model.model.layers[0].mlp.switch_mlp.gate_proj.weight.dtype == mx.float32
    out = model(tokens())
    assert not mx.isnan(out).any().item()
    assert isinstance(model.model.layers[0].mlp.gate, nn.Linear)


def test_several_forwards_scored_in_one_finish_equal_one_by_one(model):
    """``concat_pending`` + ``finish`` (what ``mlxfun serve`` does every 64 tokens) gives, token
    for token, the observations of each forward on its own."""
    adapter = plugins.get_adapter("qwen3_moe")
    needs = {"selected", "weights", "norms", "logits", "outputs"}
    rng = np.random.default_rng(1)
    batches = [mx.array(rng.integers(0, 256, shape)) for shape in ((1, 7), (1, 1), (2, 3))]
    with Observer(model, adapter, needs) as observer:
        one_by_one = []
        for batch in batches:
            model(batch)
            one_by_one.append(observer.observations())
        pending = []
        for batch in batches:
            model(batch)
            pending.append(observer.pending())
        together = observer.finish(observer.concat_pending(pending))
    for position, layer in enumerate(together):
        assert layer.num_tokens == 7 + 1 + 6
        for field in ("selected", "weights", "norms", "logits", "outputs"):
            expected = np.concatenate([getattr(obs[position], field) for obs in one_by_one])
            np.testing.assert_array_equal(getattr(layer, field), expected)
