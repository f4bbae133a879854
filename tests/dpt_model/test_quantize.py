import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpt_model.quantize import DEPTH_LEVELS, dequantize_depth, quantize_depth

finite_depth = arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.floats(-1e4, 1e4, width=32),
)


@settings(max_examples=200, deadline=None)
@given(finite_depth)
@example(np.array([[0.0, 1e-45]], dtype=np.float32))  # a subnormal range once overflowed
def test_round_trip_error_is_at_most_one_step(depth):
    levels, depth_min, depth_max = quantize_depth(torch.from_numpy(depth))
    assert levels.dtype == np.uint16
    restored = dequantize_depth(levels, depth_min, depth_max)
    step = (depth_max - depth_min) / DEPTH_LEVELS
    # half a step from rounding, plus float32 representation error of the values
    tolerance = step * 0.5 + np.abs(depth).max() * 1e-6 + 1e-6
    assert np.abs(restored - depth).max() <= tolerance
    assert levels.min() == 0 and (depth_max == depth_min or levels.max() == DEPTH_LEVELS)


def test_constant_depth_is_all_zero_levels():
    levels, depth_min, depth_max = quantize_depth(torch.full((3, 4), 2.5))
    assert (levels == 0).all() and depth_min == depth_max == 2.5


def test_non_finite_depth_is_refused():
    depth = torch.ones(2, 2)
    depth[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_depth(depth)
