"""The example plugin's own tests: mlxfun's conformance kit plus what is specific to it."""

import mlx.core as mx
import numpy as np
from mlxfun.core import testing
from mlxfun.core.observe import Observer
from mlxfun.core.stats import StatsCollector
from mlxfun.core.types import LayerObservation
from mlxfun_example_plugin import example_moe
from mlxfun_example_plugin.adapter import EXAMPLE_MOE
from mlxfun_example_plugin.scorer import TokenShare
from mlxfun_example_plugin.selector import ExampleBottom

# A tiny example_moe model, built by the package's own model module (example_moe.py).
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    vocab_size=64,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


class TestTokenShareConformance(testing.PluginConformance):
    plugin_kind = "scorer"
    plugin_object = TokenShare()


class TestExampleMoEConformance(testing.PluginConformance):
    plugin_kind = "adapter"
    plugin_object = EXAMPLE_MOE

    def make_model(self):
        return testing.build_tiny_model("example_moe", TINY, module=example_moe), "example_moe"


def test_token_share_is_the_fraction_of_tokens():
    scorer = TokenShare()
    acc = scorer.init(1, 4)
    selected = np.array([[0, 1], [0, 2], [0, 1], [1, 2]])
    scorer.update(acc, LayerObservation(0, 4, selected, np.full(selected.shape, 0.5)))
    np.testing.assert_allclose(scorer.finalize(acc), [[3 / 4, 3 / 4, 2 / 4, 0.0]])


def test_token_shares_of_a_real_forward_sum_to_top_k():
    model = testing.build_tiny_model("example_moe", TINY, module=example_moe, seed=1)
    tokens = mx.array(np.random.default_rng(0).integers(0, 64, (2, 10)))
    collector = StatsCollector([TokenShare()], num_layers=2, num_experts=6)
    with Observer(model, EXAMPLE_MOE) as observer:
        model(tokens)
    collector.update(observer.observations())
    np.testing.assert_allclose(collector.scores()["token_share"].sum(axis=1), [2.0, 2.0])


class TestExampleBottomConformance(testing.PluginConformance):
    plugin_kind = "selector"
    plugin_object = ExampleBottom()


def test_example_bottom_removes_targets_then_the_lowest():
    scores = np.array([[0.5, 0.1, 0.9, 0.3, 0.2, 0.8], [0.4, 0.4, 0.1, 0.7, 0.6, 0.0]])
    selection = ExampleBottom().select(
        scores,
        top_k=[2, 2],
        min_keep=[2, 2],
        num_experts=[6, 5],  # layer 1 has 5 experts: the last column is not one of its
        protect={0: [1]},
        target={1: [3]},
        layer_indices=[1, 2],
        n=2,
    )
    assert selection.removed == {0: [3, 4], 1: [2, 3]}
    assert selection.keep == {0: [0, 1, 2, 5], 1: [0, 1, 4]}
    assert selection.num_experts == [6, 5]
