"""What a newcomer from torch.optim meets first: torch's option names suggest ours, a CUDA
request on a machine without CUDA is one line from every entry point, and a method registered
from outside the package runs through minimize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder import ModelObjective, minimize, mlp
from secondorder.models import logistic_regression
from secondorder.objective import FunctionObjective, rosenbrock
from secondorder.solvers import Direction, MethodEntry, Option, OptionError, register, unregister

D = torch.float64


@pytest.mark.parametrize(
    "given,ours",
    [("history_size", "memory"), ("tolerance_grad", "gtol"), ("max_eval", "max_evals")],
)
def test_torch_option_names_suggest_ours(given, ours):
    with pytest.raises(OptionError, match=f"did you mean '{ours}'.*torch.optim's name"):
        minimize(rosenbrock(), torch.zeros(2, dtype=D), "lbfgs", **{given: 5})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize(
    "build",
    [
        lambda: mlp([3, 2], device="cuda"),
        lambda: logistic_regression(3, device="cuda:1"),
        lambda: FunctionObjective(lambda t: (t * t).sum(), 2, device="cuda"),
        lambda: ModelObjective(
            nn.Linear(3, 2),
            "cross_entropy",
            (torch.randn(4, 3), torch.zeros(4).long()),
            device="cuda",
        ),
    ],
    ids=["mlp", "logistic_regression", "FunctionObjective", "ModelObjective"],
)
def test_a_cuda_request_without_cuda_is_one_clear_line(build):
    with pytest.raises(
        ValueError, match=r"device='cuda(:1)?': (this PyTorch .* without CUDA|no CUDA)"
    ):
        build()


def test_a_bad_device_string_names_the_argument():
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device"):
        mlp([3, 2], device="gpu0")


class _Halved(Direction):
    """d = −g/2."""

    name = "halved-sd"

    def compute(self, it):
        return -0.5 * it.g


def test_a_method_registered_from_outside_runs_through_minimize():
    def check(arg, value):
        if value not in (1, 2):
            raise ValueError(f"{arg} must be 1 or 2")
        return value

    register(
        MethodEntry(
            "halved-sd",
            "halved steepest descent",
            lambda o: _Halved(),
            (Option("unused", 1, check),),
        )
    )
    try:
        res = minimize(rosenbrock(), torch.tensor([-1.2, 1.0], dtype=D), "halved-sd", max_iter=50)
        assert res.trace[-1]["f"] < res.trace[0]["f"]
        with pytest.raises(ValueError, match="unused must be 1 or 2"):
            minimize(rosenbrock(), torch.zeros(2, dtype=D), "halved-sd", unused=3)
    finally:
        unregister("halved-sd")


def test_optimisers_that_evaluate_more_than_once_say_why_they_need_a_closure():
    from secondorder.optim import LBFGS, NLCG, NewtonCG

    model = nn.Linear(3, 2)
    for cls in (LBFGS, NLCG, NewtonCG):
        model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(ValueError, match="needs a closure.*more than once per step"):
            cls(model.parameters()).step()
