"""EvalResult names what it holds: ``mean`` of the metric named by ``metric`` (accuracy or MSE);
``accuracy`` reads it only for accuracy results (warns, deprecated, for another metric)."""

import math
import warnings

import pytest
import torch

from fastmeta.learners import EvalResult, confidence_interval


def test_accuracy_result():
    res = confidence_interval(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert (res.metric, res.episodes) == ("accuracy", 4)
    assert res.mean == 0.75
    assert math.isclose(res.ci95, 1.96 * 0.5 / 2)  # sample sd of [0,1,1,1] is 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert res.accuracy == res.mean
    assert str(res) == "75.00 +- 49.00 % (4 episodes)"


def test_mse_result_names_itself_and_accuracy_is_deprecated():
    res = confidence_interval(torch.tensor([0.5, 1.5]), metric="mse")
    assert (res.metric, res.mean, res.episodes) == ("mse", 1.0, 2)
    with pytest.warns(DeprecationWarning, match=r"'mse' result.*read \.mean"):
        assert res.accuracy == 1.0
    assert str(res).startswith("mse 1 +- ")


def test_positional_order_and_empty_input():
    assert EvalResult(0.5, 0.1, 10) == EvalResult(mean=0.5, ci95=0.1, episodes=10, metric="accuracy")
    with pytest.raises(ValueError, match="no episodes"):
        confidence_interval(torch.tensor([]))
