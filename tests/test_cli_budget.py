"""``plan.check_budget``: any real number type is a budget (numpy scalars, 0-d tensors); bools, NaN,
non-numbers and values outside (0, 1] are refused with the same exception types as before."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tokenprune.plan import check_budget, keep_count


@pytest.mark.parametrize("value", [
    0.25, 1, Fraction(1, 4), np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(1),
    np.array(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), torch.tensor(1),
    torch.tensor(0.25, dtype=torch.bfloat16),
])
def test_real_number_types_are_budgets(value):
    out = check_budget(value)
    assert type(out) is float
    assert out == pytest.approx(float(value))
    # the float it returns is usable where a budget is: the same count as the plain float
    assert keep_count(out, 196) == keep_count(float(value), 196)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True), "0.5", None, [0.5],
                                   torch.tensor([0.5]), np.array([0.5]), complex(0.5, 0)])
def test_non_numbers_are_type_errors(value):
    with pytest.raises(TypeError, match="budget must be a number"):
        check_budget(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, np.float32("nan"), np.float64(2.0),
                                   torch.tensor(0.0), torch.tensor(float("nan")), torch.tensor(1.01)])
def test_out_of_range_and_nan_are_value_errors(value):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        check_budget(value)
