"""``torch.optim.Optimizer`` faces of the solvers: :class:`LBFGS`, :class:`NLCG`, :class:`NewtonCG`
(and :class:`~secondorder.optim_kfac.KFAC` and :class:`~secondorder.optim_kfac.KFACPreconditioner`,
K-FAC for networks of Linear and convolution layers, defined in :mod:`secondorder.optim_kfac` and
exported here).

LBFGS, NLCG and NewtonCG take an iterable of parameters (any number of tensors, flattened
internally into one vector in the order given) and a ``step(closure)`` like
``torch.optim.LBFGS``: the closure re-evaluates the model and returns the loss. One ``step``
runs up to ``max_iter`` iterations.

Closure contract
----------------
- :class:`LBFGS` and :class:`NLCG`: the closure may call ``loss.backward()`` (as for
  ``torch.optim.LBFGS``, after ``optimizer.zero_grad()``) or not; when the parameters have no
  ``.grad`` after the call, the gradient of the returned loss is taken here.
- :class:`NewtonCG` differentiates the loss twice, so its closure must return the loss
  **without** calling ``backward()`` (the graph has to stay alive). A closure that calls
  ``backward()`` is refused with a clear error, unless it used ``create_graph=True``.

Every step starts by calling the closure at the current parameters (the loss it returns is
what ``step`` returns), so a closure that draws a new mini-batch per call is seen as a new
function at every ``step``.

:class:`LBFGS` reproduces ``torch.optim.LBFGS`` step for step (same first step
min(1, 1/‖g‖₁)·lr, curvature test yᵀs > 1e-10, tolerances, and strong-Wolfe search with
c1 = 1e-4, c2 = 0.9 and the same interpolation), except where torch would stall for good. That
happens when a step leaves the parameters bit-for-bit unchanged (typically ``max_iter=1``, whose
default ``max_eval=1`` leaves the line search no trial to backtrack with, so a rejected unit
step is repeated identically at every later call), or when a direction is not a descent
direction beyond ``tolerance_change`` while the gradient is not small. Then it warns
(``RuntimeWarning``) and, with ``on_stall="reset"`` (default), forgets its memory and continues
from steepest descent with the first-iteration step; ``on_stall="warn"`` only warns, keeping
torch's behaviour exactly. When that steepest-descent step is rejected as well (memory already
empty: e.g. a first step that overshoots with a single line-search trial, or one too short to
change θ in float32), it rescales the first step — ÷10 when the trial raised f, ×10 when it
changed nothing — and retries at the next call instead of repeating it for good (warned once
per run of stalls). ``stalls`` counts these events.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder._validation import check_choice, check_positive_int
from secondorder.optim_kfac import KFAC, KFACPreconditioner
from secondorder.solvers import minimize
from secondorder.solvers.closure import ClosureObjective, FlatParams, loss_and_grad
from secondorder.solvers.directions import NLCG_VARIANTS
from secondorder.solvers.line import LineFunction
from secondorder.solvers.quasinewton import two_loop
from secondorder.solvers.wolfe import strong_wolfe_search

__all__ = ["KFAC", "KFACPreconditioner", "LBFGS", "NLCG", "NewtonCG"]


def _single_group(opt: torch.optim.Optimizer, name: str) -> list[Tensor]:
    if len(opt.param_groups) != 1:
        raise ValueError(f"{name} does not support parameter groups (per-group options)")
    return opt.param_groups[0]["params"]


def _check_line_search_fn(line_search_fn: str | None, allowed: str) -> None:
    if line_search_fn not in (None, allowed):
        raise ValueError(f"line_search_fn must be None or {allowed!r}, got {line_search_fn!r}")


def _loop_defaults(
    lr: float, max_iter: int, max_eval: int, tolerance_grad: float, tolerance_change: float
) -> dict:
    """The options every optimizer here shares, under torch.optim.LBFGS's names."""
    return {
        "lr": lr,
        "max_iter": max_iter,
        "max_eval": max_eval,
        "tolerance_grad": tolerance_grad,
        "tolerance_change": tolerance_change,
    }


class LBFGS(torch.optim.Optimizer):
    """L-BFGS with the options of ``torch.optim.LBFGS`` (see module doc).

    Args:
        params: iterable of parameters (one group).
        lr: step length scale (first step min(1, 1/‖g‖₁)·lr, then lr).
        max_iter: iterations per ``step``.
        max_eval: closure calls per ``step`` (default ``max_iter * 5 // 4``).
        tolerance_grad: stop when ‖g‖∞ ≤ tolerance_grad.
        tolerance_change: stop when a step or the change of the loss is below it.
        history_size: number of curvature pairs kept.
        line_search_fn: ``None`` (fixed step lr) or ``"strong_wolfe"``.
        on_stall: ``"reset"`` (forget the memory and continue; default) or ``"warn"`` (warn
            only, as torch.optim.LBFGS would stall) when no progress is possible (module doc).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        on_stall: str = "reset",
    ) -> None:
        check_choice("on_stall", on_stall, ("reset", "warn"))
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_line_search_fn(line_search_fn, "strong_wolfe")
        check_positive_int("history_size", history_size)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            **_loop_defaults(lr, max_iter, max_eval, tolerance_grad, tolerance_change),
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        self._flat = FlatParams(_single_group(self, "LBFGS"))
        self.on_stall = on_stall
        self.stalls = 0

    def _stall(self, state: dict, why: str) -> bool:
        """Warn about a stall; with on_stall="reset" forget the memory. True when reset."""
        self.stalls += 1
        if self.on_stall == "warn":
            if not state.get("stall_warned"):
                warnings.warn(
                    f"L-BFGS made no progress ({why}); torch.optim.LBFGS repeats this step "
                    "unchanged from now on (on_stall='warn'); use on_stall='reset' to continue",
                    RuntimeWarning,
                    stacklevel=3,
                )
            state["stall_warned"] = True
            return False
        state["old_dirs"], state["old_stps"], state["ro"] = [], [], []
        state["H_diag"] = 1.0
        state["stall_warned"] = True
        warnings.warn(
            f"L-BFGS made no progress ({why}); memory reset, continuing from steepest descent "
            f"(stall {self.stalls})",
            RuntimeWarning,
            stacklevel=3,
        )
        return True

    def _rescale(self, state: dict, trial_f: float | None, f0: float) -> None:
        """A steepest-descent step (memory empty) was rejected: its first trial raised f (or
        was not finite) → too long, ÷10; it left f or θ unchanged → too short for this
        precision, ×10. Warned once per run of stalls; ``stalls`` counts each."""
        self.stalls += 1
        too_long = trial_f is not None and not trial_f <= f0
        factor = 0.1 if too_long else 10.0
        state["restart_scale"] = state.get("restart_scale", 1.0) * factor
        if not state.get("stall_warned"):
            warnings.warn(
                "L-BFGS made no progress from steepest descent either (the step was "
                f"{'too long' if too_long else 'too short to change θ or f at this precision'}); "
                f"rescaling its first step by {format_number(factor, 3)} and retrying "
                f"(stall {self.stalls})",
                RuntimeWarning,
                stacklevel=3,
            )
        state["stall_warned"] = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One optimisation step of up to ``max_iter`` iterations; returns the first loss.
        It evaluates the loss several times (the line search), so it needs the closure.

        It mirrors ``torch.optim.LBFGS.step`` step by step (the same updates, tests and
        order of operations, so that the iterates agree bit for bit), which is why it stays
        one long function; the departures are the stall handling of the module doc."""
        if closure is None:
            raise ValueError(
                "LBFGS.step needs a closure that re-evaluates the loss: its line search "
                "evaluates it more than once per step, so the gradient of your own backward() "
                "is not enough (KFAC is the optimiser that steps from it)"
            )
        group = self.param_groups[0]
        lr = float(group["lr"])
        max_iter = group["max_iter"]
        max_eval = group["max_eval"]
        tol_grad = group["tolerance_grad"]
        tol_change = group["tolerance_change"]
        history = group["history_size"]
        wolfe = group["line_search_fn"] == "strong_wolfe"
        flat = self._flat

        state = self.state[flat.params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss, g = loss_and_grad(flat, closure, "LBFGS")
        loss = float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        if float(g.abs().max()) <= tol_grad:
            return orig_loss

        d = state.get("d")
        t = state.get("t")
        S = state.get("old_stps")
        Y = state.get("old_dirs")
        ro = state.get("ro")
        H_diag = state.get("H_diag")
        g_prev = state.get("prev_flat_grad")
        loss_prev = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = g.neg()
                S, Y, ro, H_diag = [], [], [], 1.0
                first = True
            else:
                y = g.sub(g_prev)
                s = d.mul(t)
                ys = float(y.dot(s))
                if ys > 1e-10:
                    if len(Y) == history:
                        Y.pop(0)
                        S.pop(0)
                        ro.pop(0)
                    Y.append(y)
                    S.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / float(y.dot(y))
                d = two_loop(g.neg(), S, Y, ro, H_diag)
                first = False
            g_prev = g.clone()
            loss_prev = loss

            # the first step (again after a reset: times the scale learnt from stalls)
            restart = min(1.0, 1.0 / float(g.abs().sum())) * lr * state.get("restart_scale", 1.0)
            t = restart if state["n_iter"] == 1 else lr
            gtd = float(g.dot(d))
            if gtd > -tol_change:
                if first or not S or -float(g.dot(g)) > -tol_change:
                    break  # nothing to gain, as torch.optim.LBFGS decides
                state.update(old_dirs=Y, old_stps=S, ro=ro, H_diag=H_diag)
                if not self._stall(state, f"∇fᵀd = {format_number(gtd, 3)} ≥ −tolerance_change"):
                    break
                S, Y, ro, H_diag = state["old_stps"], state["old_dirs"], state["ro"], 1.0
                d = g.neg()
                t = restart if state["n_iter"] == 1 else min(1.0, 1.0 / float(g.abs().sum())) * lr
                gtd = float(g.dot(d))

            x0 = flat.get()
            if wolfe:

                def evaluate(x: Tensor) -> tuple[float, Tensor]:
                    flat.set(x)
                    f_, g_ = loss_and_grad(flat, closure, "LBFGS")
                    return float(f_), g_

                phi = LineFunction(evaluate, x0, d, loss, g, gtd, step_fn=flat.add)
                ls = strong_wolfe_search(
                    phi,
                    t,
                    c1=1e-4,
                    c2=0.9,
                    max_ls=max_eval - evals,
                    xtol=1e-9,
                    d_norm=float(d.abs().max()),
                    strict=False,
                )
                ls_evals = ls.calls
                trial_f = ls.trials[0][1] if ls.trials else loss
                if ls.g is None:  # no finite trial point: stay (the stall rule below decides)
                    flat.set(x0)
                    opt_cond = False
                else:
                    t = ls.alpha
                    loss, g = ls.f, ls.g
                    flat.set(flat.add(x0, d, t))
                    opt_cond = float(g.abs().max()) <= tol_grad
            else:
                trial_f = None  # not evaluated: θ unchanged means the step was too short
                flat.set(flat.add(x0, d, t))
                ls_evals = 0
                opt_cond = False
                if n_iter != max_iter:
                    f_, g = loss_and_grad(flat, closure, "LBFGS")
                    loss = float(f_)
                    opt_cond = float(g.abs().max()) <= tol_grad
                    ls_evals = 1
            evals += ls_evals
            state["func_evals"] += ls_evals

            if not opt_cond and torch.equal(flat.get(), x0):
                state.update(old_dirs=Y, old_stps=S, ro=ro, H_diag=H_diag)
                if S or self.on_stall == "warn":
                    if self._stall(state, "the step left the parameters unchanged"):
                        S, Y, ro, H_diag = state["old_stps"], state["old_dirs"], state["ro"], 1.0
                        state["n_iter"] = 0  # the next iteration starts like the first
                else:  # steepest descent itself made no progress: rescale its first step
                    self._rescale(state, trial_f, loss_prev)
                    state["n_iter"] = 0
            else:
                state["stall_warned"] = False

            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if float(d.mul(t).abs().max()) <= tol_change:
                break
            if abs(loss - loss_prev) < tol_change:
                break

        state.update(
            d=d,
            t=t,
            old_dirs=Y,
            old_stps=S,
            ro=ro,
            H_diag=H_diag,
            prev_flat_grad=g_prev,
            prev_loss=loss_prev,
        )
        return orig_loss


class _MinimizeOptimizer(torch.optim.Optimizer):
    """Runs :func:`secondorder.solvers.minimize` for ``max_iter`` iterations per ``step``,
    keeping the solver's state between steps."""

    _method = ""
    _label = ""

    def _options(self, group: dict) -> tuple[str | None, dict]:
        raise NotImplementedError

    @staticmethod
    def _loop_options(group: dict) -> dict:
        """The options every method shares, from torch.optim's names to minimize's."""
        return {
            "lr": group["lr"],
            "max_iter": group["max_iter"],
            "max_evals": group["max_eval"],
            "gtol": group["tolerance_grad"],
            "ftol": group["tolerance_change"],
        }

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        self._flat = FlatParams(_single_group(self, self._label))
        self.last_result = None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Up to ``max_iter`` iterations of the method; returns the loss at the start. The
        method evaluates the loss (and its curvature) more than once per step, so it needs the
        closure; ``step()`` after your own ``backward()`` is refused, saying so."""
        if closure is None:
            raise ValueError(
                f"{self._label}.step needs a closure that re-evaluates the loss: the method "
                "evaluates it more than once per step, so the gradient of your own backward() "
                "is not enough (KFAC is the optimiser that steps from it)"
            )
        group = self.param_groups[0]
        flat = self._flat
        obj = ClosureObjective(flat, closure, self._label)
        state = self.state[flat.params[0]]
        theta = flat.get()
        loss, g = loss_and_grad(flat, closure, self._label)
        prev = state.get("minimize") or {"method": self._method, "k": 0}
        start = dict(prev)
        start.update(
            theta=theta.clone(),
            f=float(loss),
            g=g.clone(),
            nfev=prev.get("nfev", 0) + 1,
            ngev=prev.get("ngev", 0) + 1,
        )
        state["minimize"] = start
        state["func_evals"] = start["nfev"]
        if float(g.abs().max()) <= group["tolerance_grad"]:
            return loss
        line_search, options = self._options(group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(
                obj,
                theta,
                method=self._method,
                line_search=line_search,
                initial_state=start,
                **options,
            )
        flat.set(res.theta)
        state["minimize"] = res.state
        state["func_evals"] = res.nfev
        state["n_iter"] = res.nit
        self.last_result = res
        return loss


class NLCG(_MinimizeOptimizer):
    """Nonlinear conjugate gradients (``variant`` "fr", "pr+", "hs" or "dy").

    Args mirror :class:`LBFGS`: ``lr`` scales the first trial step, ``max_iter`` iterations and
    ``max_eval`` closure calls per ``step``, ``tolerance_grad`` on ‖g‖∞, ``tolerance_change``
    on |Δloss| (eq. 29), ``line_search_fn`` "strong_wolfe" (default; c2 = 0.1) or None (fixed
    step lr). The solver's state (previous direction) carries over between steps; after each
    step ``last_result`` holds the :class:`~secondorder.solvers.Result` of its iterations.
    """

    _method = "nlcg"
    _label = "NLCG"

    def __init__(
        self,
        params,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        variant: str = "pr+",
        line_search_fn: str | None = "strong_wolfe",
    ) -> None:
        _check_line_search_fn(line_search_fn, "strong_wolfe")
        check_choice("variant", variant, NLCG_VARIANTS)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = _loop_defaults(lr, max_iter, max_eval, tolerance_grad, tolerance_change)
        super().__init__(params, {**defaults, "variant": variant, "line_search_fn": line_search_fn})

    def _options(self, group):
        ls = "wolfe" if group["line_search_fn"] == "strong_wolfe" else None
        return ls, {**self._loop_options(group), "variant": group["variant"]}


class NewtonCG(_MinimizeOptimizer):
    """Hessian-free Newton: inner CG on Hessian-vector products of the closure's loss.

    The closure must return the loss **without** calling ``backward()`` (module doc).

    Args:
        lr: the first trial step (1 = the full Newton step).
        max_iter: outer Newton iterations per ``step`` (default 1).
        max_eval: closure calls per ``step`` (default ``max_iter * 10``).
        tolerance_grad, tolerance_change: as for :class:`LBFGS`.
        cg_max_iter, cg_tol: inner CG limits (default min(2n, 250) steps and the
            Eisenstat–Walker relative residual min(0.5, sqrt(‖g‖))).
        damping: initial Levenberg–Marquardt λ (default 0: undamped until a step's reduction
            ratio is poor), then adapted by the reduction ratio (``docs/solvers.md``).
        line_search_fn: ``"armijo"`` (default) or None (fixed step lr).
    """

    _method = "newton-cg"
    _label = "NewtonCG"

    def __init__(
        self,
        params,
        lr: float = 1.0,
        max_iter: int = 1,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
        damping: float = 0.0,
        line_search_fn: str | None = "armijo",
    ) -> None:
        _check_line_search_fn(line_search_fn, "armijo")
        if max_eval is None:
            max_eval = max_iter * 10
        super().__init__(
            params,
            {
                **_loop_defaults(lr, max_iter, max_eval, tolerance_grad, tolerance_change),
                "cg_max_iter": cg_max_iter,
                "cg_tol": cg_tol,
                "damping": damping,
                "line_search_fn": line_search_fn,
            },
        )

    def _options(self, group):
        opts = {**self._loop_options(group), "damping": group["damping"], "check_saddle": False}
        if group["cg_max_iter"] is not None:
            opts["cg_max_iter"] = group["cg_max_iter"]
        if group["cg_tol"] is not None:
            opts["cg_tol"] = group["cg_tol"]
        return group["line_search_fn"], opts
