"""ranges.py: what a numeric option accepts, its one-line refusal, its description, and the values it refuses."""
import argparse
import math

import pytest

from orpo.errors import OrpoError
from orpo.ranges import Range


@pytest.mark.parametrize("accepted, value, ok", [
    (Range(int, 1), 1, True), (Range(int, 1), 0, False), (Range(int, 1), 1.5, False), (Range(int, 1), True, False),
    (Range(int, 1), None, False), (Range(int, 1, optional=True), None, True),
    (Range(float, 0), 0.0, True), (Range(float, 0), -1e-9, False), (Range(float, 0), math.nan, False),
    (Range(float, 0), math.inf, False), (Range(float, 0, low_open=True), 0.0, False),
    (Range(float, 0, 1, high_open=True), 0.999, True), (Range(float, 0, 1, high_open=True), 1.0, False),
    (Range(int, 0, also=(-1,)), -1, True), (Range(int, 0, also=(-1,)), -2, False), (Range(int, 0), "3", False),
])
def test_accepts(accepted, value, ok):
    assert accepted.accepts(value) is ok


def test_describe_says_what_is_accepted():
    assert Range(int, 1).describe() == "an integer >= 1"
    assert Range(float, 0, low_open=True, optional=True).describe() == "a finite number > 0 or unset"
    assert Range(float, 0, 1, high_open=True).describe() == "a finite number in [0, 1)"
    assert Range(int, 0, also=(-1,), note="-1: train num_train_epochs").describe() == \
        "-1 or an integer >= 0 (-1: train num_train_epochs)"
    assert Range(float, 0, 0, note="no smoothing").describe() == "0 (no smoothing)"


def test_check_is_one_line_naming_the_flag_and_the_value():
    with pytest.raises(OrpoError, match=r"^--logprob_chunk_size -4: out of range; accepted: an integer >= 1$"):
        Range(int, 1).check("logprob_chunk_size", -4)
    with pytest.raises(OrpoError, match=r"^--beta nan: out of range; accepted: a finite number >= 0$"):
        Range(float, 0).check("beta", math.nan)
    Range(int, 1).check("n", 3)


@pytest.mark.parametrize("accepted", [Range(int, 1), Range(float, 0), Range(float, 0, 1, high_open=True),
                                      Range(int, 0, 2**32 - 1), Range(int, 0, also=(-1,)), Range(float, 0, 0)])
def test_refused_values_are_refused(accepted):
    refused = accepted.refused()
    assert refused and not any(accepted.accepts(value) for value in refused)
    if accepted.kind is float:
        assert any(isinstance(v, float) and math.isnan(v) for v in refused) and math.inf in refused


def test_as_an_argparse_type_it_parses_and_checks():
    assert Range(int, 1)("3") == 3 and Range(float, 0)("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'0' is out of range; accepted: an integer >= 1$"):
        Range(int, 1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'x' is not an integer$"):
        Range(int, 1)("x")
