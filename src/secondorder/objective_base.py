"""The base of every objective: :class:`Objective` (a scalar function of one flat θ, with
value, gradient, Hessian- and Gauss–Newton-vector products, a small dense Hessian and the
iteration protocol of the samplers) and its evaluation counters :class:`EvalCounts`.
The concrete objectives are in :mod:`secondorder.objective`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from secondorder.linalg import check_dense_fits

__all__ = ["EvalCounts", "Objective"]


@dataclass
class EvalCounts:
    """How many times each quantity was evaluated. ``value_and_grad`` counts one f and one g."""

    f: int = 0
    g: int = 0
    hv: int = 0
    ggnv: int = 0
    hessian: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def copy(self) -> EvalCounts:
        return EvalCounts(**asdict(self))

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)


class Objective:
    """Base class of every objective: a scalar function of a flat θ of ``n_params`` entries."""

    n_params: int
    dtype: torch.dtype
    device: torch.device
    #: set by :func:`secondorder.distributed.data_parallel`: this process's share of every
    #: batch and the sum over the processes (``None``: one process, every sample here)
    data_parallel = None

    def __init__(self) -> None:
        self.counts = EvalCounts()
        self._iteration = 0
        self._evaluations = 0

    # -- the function's identity under sampling -----------------------------------------------
    @property
    def version(self) -> int:
        """Identifier of the current function: while it stays equal, so does the function."""
        return 0

    @property
    def stochastic(self) -> str:
        """When the function may change: ``"never"``, ``"iteration"`` or ``"evaluation"``."""
        return "never"

    @property
    def n_samples(self) -> int | None:
        """m, the number of training samples the objective sums over (None: not a sum)."""
        return None

    @property
    def batch_size(self) -> int | None:
        """How many samples make the current function (m for the full batch; None: not a
        sum over samples). Solvers count epochs with it: samples seen / m."""
        return None

    def begin_iteration(self, k: int) -> bool:
        """Tell the objective that iteration ``k`` starts; return whether the function changed."""
        before = self.version
        self._iteration = int(k)
        return self.version != before

    def sampling_state(self) -> dict[str, int]:
        """Where the objective stands in its sampling: the iteration and the number of
        evaluations so far (samplers that draw per evaluation depend on it). Together with
        ``counts`` it is all a checkpoint needs to continue on the same functions."""
        return {"iteration": self._iteration, "evaluations": self._evaluations}

    def load_sampling_state(self, state: dict[str, int]) -> None:
        """Restore what :meth:`sampling_state` returned (missing keys are left as they are)."""
        if "iteration" in state:
            self._iteration = int(state["iteration"])
        if "evaluations" in state:
            self._evaluations = int(state["evaluations"])

    # -- evaluations ----------------------------------------------------------------------------
    def value(self, theta: Tensor) -> Tensor:
        """J(θ) as a 0-d tensor."""
        raise NotImplementedError

    def value_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(J(θ), ∇J(θ)) from one forward and one backward pass."""
        raise NotImplementedError

    def grad(self, theta: Tensor) -> Tensor:
        """∇J(θ), a vector like θ."""
        return self.value_and_grad(theta)[1]

    def hvp_at(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ ∇²J(θ) v, with the gradient's graph built once for many products."""
        raise NotImplementedError

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """∇²J(θ) v (Hessian-vector product; one double-backward pass)."""
        return self.hvp_at(theta)(v)

    def ggnvp_at(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ G(θ) v with the Gauss–Newton matrix G = Jᵀ H_loss J (+ the L2 term)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no Gauss-Newton matrix: it needs a model and a loss "
            "(use ModelObjective), or use hvp"
        )

    def ggnvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """G(θ) v (Gauss–Newton-vector product)."""
        return self.ggnvp_at(theta)(v)

    def hessian(self, theta: Tensor, *, max_bytes: int | None = None) -> Tensor:
        """The dense P×P Hessian, refused before allocation when it would not fit."""
        P = self.n_params
        check_dense_fits(
            (P, P), self.dtype, "the dense Hessian", max_bytes=max_bytes, device=self.device
        )
        self.counts.hessian += 1
        product = self.hvp_at(theta)
        before = self.counts.hv
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        H = torch.stack([product(eye[i]) for i in range(P)], dim=1)
        self.counts.hv = before
        return 0.5 * (H + H.T)

    def sum_over_shards(self, *parts: Tensor) -> tuple[Tensor, ...]:
        """Each part (a sum over this process's samples) summed over the processes of a
        data-parallel run, all in one collective; the parts themselves in one process."""
        if self.data_parallel is None:
            return parts
        return self.data_parallel.sum(parts)

    # -- helpers ---------------------------------------------------------------------------------
    def check_theta(self, theta: Tensor, arg: str = "theta") -> Tensor:
        """Validate θ's type and shape; return it in the objective's dtype and device."""
        if not isinstance(theta, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(theta).__name__}")
        if theta.ndim != 1 or theta.numel() != self.n_params:
            raise ValueError(
                f"{arg} must be a flat vector of {self.n_params} entries, got shape "
                f"{tuple(theta.shape)}"
            )
        return theta.to(dtype=self.dtype, device=self.device)

    def _count_evaluation(self) -> None:
        self._evaluations += 1
