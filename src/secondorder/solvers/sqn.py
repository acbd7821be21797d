"""The stochastic quasi-Newton method (Byrd, Hansen, Nocedal & Singer 2016) as a direction
rule of :func:`~secondorder.solvers.minimize`.

Mini-batch steps θ_{k+1} = θ_k − α_k H g_k, with H the L-BFGS inverse approximation (two-loop
recursion over the last ``memory`` pairs, H₀ = (sᵀy/yᵀy)I) and α_k = lr/(1 + decay·k). The
curvature pairs do not come from gradient differences, which on moving batches mix two
functions: every L = ``pair_every`` iterations, with θ̄_t the average of the last L iterates,

    s_t = θ̄_t − θ̄_{t−1},   y_t = B_S(θ̄_t) s_t,

where B_S is the Gauss–Newton matrix (``curvature="ggn"``) or the Hessian on the objective's
curvature samples S (its ``curvature_sampler``, else the current batch). A pair with
s_tᵀy_t ≤ √eps·‖s_t‖‖y_t‖ is skipped (the trace says so). Until the first pair, at iteration
2L, the steps are plain gradient steps −lr·g.
"""

from __future__ import annotations

from torch import Tensor

from secondorder.linalg import dot64
from secondorder.solvers.protocol import Direction, Iterate
from secondorder.solvers.quasinewton import LBFGS

__all__ = ["SQN"]


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class SQN(Direction):
    """d = −H g with curvature pairs from averaged iterates (see module doc)."""

    name = "sqn"
    restart_on_non_descent = True
    #: a mini-batch step taken as it is with the fixed step (H is positive definite, so −Hg
    #: is a descent direction for the batch anyway); on moving batches each step is then
    #: evaluated once, on the next batch, as a training loop does
    requires_descent = False

    def __init__(
        self, memory: int = 10, pair_every: int = 10, curvature: str = "ggn", decay: float = 0.0
    ) -> None:
        super().__init__()
        self.lbfgs = LBFGS(memory)  # the pairs, H₀'s scale and the two-loop recursion
        self.pair_every = pair_every
        self.curvature = curvature
        self.decay = decay
        self.total: Tensor | None = None  # Σ θ over the current window of L iterates
        self.count = 0
        self.average: Tensor | None = None  # θ̄_{t−1}, the previous window's average
        self.updates = 0

    @property
    def skipped(self) -> int:
        """Pairs skipped for failing sᵀy > √eps·‖s‖‖y‖."""
        return self.lbfgs.skipped

    def compute(self, it: Iterate) -> Tensor:
        d = self.lbfgs.compute(it)  # −g until the first pair
        theta = it.theta.detach()
        self.total = theta.clone() if self.total is None else self.total + theta
        self.count += 1
        if self.count == self.pair_every:
            average = self.total / self.pair_every
            if self.average is not None:
                self._pair(it, average)
            self.average, self.total, self.count = average, None, 0
        return d

    def _pair(self, it: Iterate, average: Tensor) -> None:
        """The pair (θ̄_t − θ̄_{t−1}, B_S(θ̄_t)s), kept unless sᵀy fails the curvature test."""
        s = average - self.average
        obj = it.objective
        product = obj.hvp_at(average) if self.curvature == "hessian" else obj.ggnvp_at(average)
        y = product(s)
        before = self.lbfgs.skipped
        self.lbfgs.update(s, y, it)
        skipped = self.lbfgs.skipped > before
        self.updates += not skipped
        it.info.update(pair_sy=dot64(s, y), pair_skipped=skipped)

    def initial_step(self, it: Iterate, d: Tensor, dphi0: float) -> float:
        return it.lr / (1.0 + self.decay * it.k)

    def reset(self) -> None:
        super().reset()
        self.lbfgs.reset()

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "lbfgs": self.lbfgs.state_dict(),
            "total": _clone(self.total),
            "count": self.count,
            "average": _clone(self.average),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lbfgs.load_state_dict(state.get("lbfgs", {}))
        self.total = _clone(state.get("total"))
        self.count = int(state.get("count", 0))
        self.average = _clone(state.get("average"))
        self.updates = int(state.get("updates", 0))
