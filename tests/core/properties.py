"""Shared by the property-based tests (hypothesis) here and in tests/."""

import numpy as np
from hypothesis import settings

# The same examples on every run (derandomize; no example database is written), few enough
# that all property tests together take seconds on a slow CI machine. To search harder for a
# counterexample locally, raise max_examples and drop derandomize for a run.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True)


def increasing_map(values: np.ndarray, steps: list[int]) -> np.ndarray:
    """A strictly increasing map of ``values`` (ties stay ties), exact in float64: the k-th
    smallest distinct value becomes ``sum(steps[: k + 1])`` (steps are positive integers, one
    per distinct value at least)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    images = np.cumsum(np.array(steps[: distinct.size], dtype=np.float64))
    return images[inverse].reshape(np.shape(values))
