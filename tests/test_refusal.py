import pytest
from mlxfun.methods.refusal import is_refusal


@pytest.mark.parametrize(
    "text",
    ["I can't help with that.", "Sorry, but no.", "I\u2019m sorry, I won't do this", "I CANNOT"],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text", ["Sure, here is a function:", "Paris is the capital.", "", "Cannot is a word."]
)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_marker_past_the_window_is_not_a_refusal():
    assert not is_refusal("x" * 200 + " I can't")
    assert is_refusal("x" * 200 + " I can't", window=400)
