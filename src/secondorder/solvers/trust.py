"""Trust-region Newton–CG (Steihaug) and adaptive cubic regularisation (ARC).

Both build the Hessian-vector product once per point (``objective.hvp_at``) and reuse it
after a rejected step.

**trust-ncg** (Nocedal & Wright, Alg. 4.1 and 7.2): CG on the model m(p) = f + gᵀp + ½pᵀBp
inside ‖p‖ ≤ Δ, stopping at the relative residual min(0.5, sqrt(‖g‖)) (or ``cg_tol``), at
the boundary, or at a direction of non-positive curvature (followed to the boundary, to the
end that lowers the model more; recorded as negative curvature). ρ = actual / predicted
reduction; the step is taken when ρ > η; Δ ← Δ/4 when ρ < 1/4, Δ ← min(2Δ, Δ_max) when
ρ > 3/4 and the step reached the boundary.

**arc** (Cartis, Gould & Toint 2011): the model m(p) = f + gᵀp + ½pᵀBp + σ/3‖p‖³ is minimised
over a growing Krylov space by Lanczos (full reorthogonalisation): on the tridiagonal T_j
the small cubic problem is solved exactly by its secular equation λ = σ‖y(λ)‖,
y(λ) = −(T_j + λI)⁻¹‖g‖e₁, λ ≥ max(0, −λ_min(T_j)) (hard case included). Lanczos stops when
‖∇m(p)‖ ≤ κ·min(1, ‖p‖)·‖g‖ (κ = ``cg_tol``, default 0.1) or after ``cg_max_iter`` steps.
σ ← max(σ/2, σ_min) when ρ > 0.9, kept when η ≤ ρ ≤ 0.9, doubled (and the step rejected)
when ρ < η. A negative eigenvalue of T_j is recorded as negative curvature.

A diagonal preconditioner M acts as the change of variables p = M^{-1/2}p̂ (the trust region
and the cubic term then use the norm ‖M^{1/2}p‖).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder._format import format_number
from secondorder.lanczos import Lanczos
from secondorder.linalg import dot64, norm64
from secondorder.solvers.protocol import Iterate, Outcome

__all__ = ["ARC", "TrustNCG", "lanczos_extreme", "solve_cubic_tridiagonal", "steihaug"]


class _Scaled:
    """B̂ = S B S and ĝ = S g with S = M^{-1/2} (identity without a preconditioner)."""

    def __init__(self, product, precond) -> None:
        self.product = product
        self.s = None
        if precond is not None:
            if not precond.is_diagonal:
                raise ValueError("trust-ncg and arc take only a diagonal preconditioner")
            self.s = precond.diagonal.rsqrt()

    def vec(self, v: Tensor) -> Tensor:
        return v if self.s is None else self.s * v

    def __call__(self, v: Tensor) -> Tensor:
        if self.s is None:
            return self.product(v)
        return self.s * self.product(self.s * v)


@dataclass
class SteihaugResult:
    p: Tensor
    model: float  # gᵀp + ½pᵀBp
    iterations: int
    boundary: bool
    negative_curvature: bool
    curvature: float


def _to_boundary(z: Tensor, d: Tensor, radius: float) -> tuple[float, float]:
    """The two τ with ‖z + τd‖ = Δ (τ₋ ≤ 0 ≤ τ₊)."""
    a = dot64(d, d)
    b = 2.0 * dot64(z, d)
    c = dot64(z, z) - radius * radius
    disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
    # numerically stable roots
    q = -0.5 * (b + math.copysign(disc, b)) if b != 0 else -0.5 * disc
    r1 = q / a if a else 0.0
    r2 = c / q if q else -r1
    return min(r1, r2), max(r1, r2)


def steihaug(product, g: Tensor, radius: float, *, rtol: float, max_iter: int) -> SteihaugResult:
    """Steihaug–CG for min gᵀp + ½pᵀBp subject to ‖p‖ ≤ Δ (NW Alg. 7.2)."""
    z = torch.zeros_like(g)
    r = g.clone()
    d = -r
    gnorm = norm64(g)
    tol = rtol * gnorm
    rr = dot64(r, r)
    zBz = 0.0  # zᵀBz
    eps = torch.finfo(g.dtype).eps

    def model(zg: float, zbz: float) -> float:
        return zg + 0.5 * zbz

    j = 0
    while j < max_iter:
        Bd = product(d)
        dBd = dot64(d, Bd)
        dd = dot64(d, d)
        zBd = dot64(z, Bd)
        gd = dot64(g, d)
        zg = dot64(z, g)
        if dBd <= eps * dd:
            lo, hi = _to_boundary(z, d, radius)
            vals = [(model(zg + t * gd, zBz + 2 * t * zBd + t * t * dBd), t) for t in (lo, hi)]
            m, t = min(vals)
            p = z + t * d
            return SteihaugResult(p, m, j + 1, True, True, dBd / dd)
        alpha = rr / dBd
        z_next = z + alpha * d
        if norm64(z_next) >= radius:
            _, t = _to_boundary(z, d, radius)
            p = z + t * d
            m = model(zg + t * gd, zBz + 2 * t * zBd + t * t * dBd)
            return SteihaugResult(p, m, j + 1, True, False, float("nan"))
        zBz = zBz + 2 * alpha * zBd + alpha * alpha * dBd
        z = z_next
        r = r + alpha * Bd
        rr_new = dot64(r, r)
        j += 1
        if math.sqrt(rr_new) <= tol:
            break
        d = -r + (rr_new / rr) * d
        rr = rr_new
    return SteihaugResult(z, model(dot64(z, g), zBz), j, False, False, float("nan"))


class _TrustBase:
    """Shared bookkeeping: the product at the current point, the evaluation of a trial."""

    name = ""

    def __init__(self, curvature: str, cg_max_iter: int | None, cg_tol: float | None) -> None:
        self.curvature = curvature
        self.cg_max_iter = cg_max_iter
        self.cg_tol = cg_tol
        self._product = None
        self._product_key = None

    def product_at(self, it: Iterate):
        key = it.point
        if self._product is None or self._product_key != key:
            obj = it.objective
            self._product = (
                obj.hvp_at(it.theta) if self.curvature == "hessian" else obj.ggnvp_at(it.theta)
            )
            self._product_key = key
        return self._product

    def trial(self, it: Iterate, p: Tensor, evaluate) -> tuple[Tensor, float, Tensor | None]:
        x = it.theta + p
        f, g = evaluate(x)
        f = float(f)
        if not math.isfinite(f) or not bool(torch.isfinite(g).all()):
            return x, math.inf, None
        return x, f, g

    def on_change(self, it: Iterate, robust: bool) -> None:
        self._product = None


class TrustNCG(_TrustBase):
    """Steihaug–CG trust region (see module doc)."""

    name = "trust-ncg"

    def __init__(
        self,
        initial_radius: float = 1.0,
        max_radius: float = 1000.0,
        eta: float = 0.15,
        curvature: str = "hessian",
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
    ) -> None:
        super().__init__(curvature, cg_max_iter, cg_tol)
        if initial_radius > max_radius:
            raise ValueError(
                f"initial_radius ({initial_radius}) must not exceed max_radius ({max_radius})"
            )
        self.radius = initial_radius
        self.max_radius = max_radius
        self.eta = eta

    def step(self, it: Iterate, evaluate) -> Outcome:
        B = _Scaled(self.product_at(it), it.precond)
        g_hat = B.vec(it.g)
        gnorm = norm64(g_hat)
        rtol = self.cg_tol if self.cg_tol is not None else min(0.5, math.sqrt(gnorm))
        max_iter = self.cg_max_iter or min(2 * it.g.numel(), 250)
        res = steihaug(B, g_hat, self.radius, rtol=rtol, max_iter=max_iter)
        it.info["cg_iters"] = res.iterations
        it.info["radius"] = self.radius
        if res.negative_curvature:
            it.negative_curvature = (
                f"negative curvature met in CG step {res.iterations} "
                f"(dᵀBd/dᵀd = {format_number(res.curvature, 3)}); stepped to the trust-region "
                "boundary"
            )
        p = B.vec(res.p)
        x, f_new, g_new = self.trial(it, p, evaluate)
        predicted = -res.model
        actual = it.f - f_new
        rho = actual / predicted if predicted > 0 else -math.inf
        if not math.isfinite(f_new):
            rho = -math.inf
        it.info["rho"] = rho
        if rho < 0.25:
            self.radius *= 0.25
        elif rho > 0.75 and res.boundary:
            self.radius = min(2.0 * self.radius, self.max_radius)
        note = (
            "non-finite value met at trial step; trust region shrunk" if f_new == math.inf else ""
        )
        if rho > self.eta:
            return Outcome(x, f_new, g_new, 1.0, True, note=note, nonfinite=int(bool(note)))
        tiny = torch.finfo(it.g.dtype).eps * max(1.0, float(it.theta.abs().max()))
        if self.radius < tiny:
            return _rejected(
                it,
                note,
                f"trust region radius shrank to {format_number(self.radius, 3)}: no step lowers "
                "f at "
                "this precision",
            )
        return _rejected(it, note)

    def escape_length(self, lam: float) -> float:
        """The step along a negative-curvature eigenvector at a saddle: to the boundary."""
        return self.radius

    def escape_rejected(self) -> None:
        self.radius *= 0.25

    def state_dict(self) -> dict:
        return {"radius": self.radius}

    def load_state_dict(self, state: dict) -> None:
        self.radius = state.get("radius", self.radius)


# -- Lanczos and the small cubic problem --------------------------------------------------------
def lanczos_extreme(
    product, n: int, *, steps: int = 30, seed: int = 0, dtype=torch.float64, device=None
) -> tuple[float, float]:
    """(smallest, largest) Ritz value of a symmetric operator after ``steps`` Lanczos steps
    from a random start (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device)
    lz = Lanczos(lambda v: product(v.to(dtype)).to(torch.float64), q, steps).run()
    theta, _ = lz.ritz()
    return float(theta[0]), float(theta[-1])


def solve_cubic_tridiagonal(T: Tensor, beta0: float, sigma: float) -> tuple[Tensor, float]:
    """Global minimiser y of β₀e₁ᵀy + ½yᵀTy + σ/3‖y‖³ (T symmetric, small); returns
    (y, λ) with λ = σ‖y‖."""
    lam_T, V = torch.linalg.eigh(T)
    c = beta0 * V[0, :]  # Vᵀ(β₀ e₁)
    lmin = float(lam_T[0])
    lo = max(0.0, -lmin)
    scale = max(1.0, float(lam_T.abs().max()), abs(beta0))

    def ynorm(lam: float) -> float:
        den = lam_T + lam
        return float(torch.sqrt(((c / den) ** 2).sum()))

    def y_of(lam: float) -> Tensor:
        return -(V @ (c / (lam_T + lam)))

    tiny = 1e-14 * scale
    # hard case: the gradient has (almost) no component on the bottom eigenspace
    bottom = (lam_T - lmin).abs() <= 1e-12 * scale
    c_bottom = float(c[bottom].abs().max())
    if lmin < 0 and c_bottom <= 1e-12 * max(abs(beta0), 1e-300):
        keep = ~bottom
        den = lam_T[keep] + lo
        y_perp = -(V[:, keep] @ (c[keep] / den)) if bool(keep.any()) else torch.zeros_like(c)
        target = lo / sigma
        ny = float(torch.linalg.norm(y_perp))
        if ny <= target:
            t = math.sqrt(max(target * target - ny * ny, 0.0))
            return y_perp + t * V[:, int(bottom.nonzero()[0, 0])], lo
    # ψ(λ) = ‖y(λ)‖ − λ/σ decreases on (lo, ∞): bracket and bisect
    a = lo + tiny if lmin <= 0 else lo
    fa = ynorm(a) - a / sigma
    if fa <= 0:
        return y_of(a), a
    b = max(2.0 * a, scale, 1.0)
    while ynorm(b) - b / sigma > 0:
        b *= 2.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if m in (a, b):
            break
        if ynorm(m) - m / sigma > 0:
            a = m
        else:
            b = m
    lam = 0.5 * (a + b)
    return y_of(lam), lam


class ARC(_TrustBase):
    """Adaptive cubic regularisation (see module doc)."""

    name = "arc"

    def __init__(
        self,
        sigma0: float = 1.0,
        eta: float = 0.1,
        curvature: str = "hessian",
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
    ) -> None:
        super().__init__(curvature, cg_max_iter, cg_tol)
        self.sigma = sigma0
        self.eta = eta
        self.sigma_min = 1e-12

    def _subproblem(self, B, g: Tensor, it: Iterate) -> tuple[Tensor, float, int, float]:
        gnorm = norm64(g)
        kappa = self.cg_tol if self.cg_tol is not None else 0.1
        max_iter = min(self.cg_max_iter or 50, g.numel())
        lz = Lanczos(lambda v: B(v.to(g.dtype)).to(torch.float64), g, max_iter)
        y = None
        while not lz.done:
            lz.step()
            T = lz.tridiagonal()
            y, _ = solve_cubic_tridiagonal(T, gnorm, self.sigma)
            ny = float(torch.linalg.norm(y))
            resid = abs(lz.residual * float(y[-1]))
            if resid <= kappa * min(1.0, ny) * gnorm or lz.residual <= 1e-14 * gnorm:
                break
        T = lz.tridiagonal()
        lam_min = float(torch.linalg.eigvalsh(T)[0])
        k = lz.m
        p = (lz.basis @ y.to(lz.basis.device)).to(dtype=g.dtype)
        # model value m(p) − f, from the small problem
        y64 = y
        model = (
            gnorm * float(y64[0])
            + 0.5 * float(y64 @ (T @ y64))
            + self.sigma / 3.0 * float(torch.linalg.norm(y64)) ** 3
        )
        return p, model, k, lam_min

    def step(self, it: Iterate, evaluate) -> Outcome:
        B = _Scaled(self.product_at(it), it.precond)
        g_hat = B.vec(it.g)
        p_hat, model, iters, lam_min = self._subproblem(B, g_hat, it)
        it.info["lanczos_iters"] = iters
        it.info["sigma"] = self.sigma
        if lam_min < 0:
            it.negative_curvature = (
                "negative curvature in the Krylov space "
                f"(smallest Ritz value {format_number(lam_min, 3)})"
            )
        p = B.vec(p_hat)
        x, f_new, g_new = self.trial(it, p, evaluate)
        predicted = -model
        rho = (it.f - f_new) / predicted if predicted > 0 and math.isfinite(f_new) else -math.inf
        it.info["rho"] = rho
        note = "non-finite value met at trial step; σ increased" if f_new == math.inf else ""
        if rho >= self.eta:
            if rho > 0.9:
                self.sigma = max(0.5 * self.sigma, self.sigma_min)
            return Outcome(x, f_new, g_new, 1.0, True, note=note, nonfinite=int(bool(note)))
        self.sigma *= 2.0
        if self.sigma > 1e30 or not math.isfinite(self.sigma):
            return _rejected(
                it,
                note,
                f"cubic regularisation σ grew to {format_number(self.sigma, 3)}: no step lowers "
                "f at "
                "this precision",
            )
        return _rejected(it, note)

    def escape_length(self, lam: float) -> float:
        """The step along a unit eigenvector of λ < 0 at a saddle: the minimiser −λ/σ of the
        cubic model ½λt² + σ/3·t³."""
        return -lam / self.sigma

    def escape_rejected(self) -> None:
        self.sigma *= 2.0

    def state_dict(self) -> dict:
        return {"sigma": self.sigma}

    def load_state_dict(self, state: dict) -> None:
        self.sigma = state.get("sigma", self.sigma)


def _rejected(it, note: str, stalled: str | None = None) -> Outcome:
    """A rejected step: stay at the current iterate; ``stalled`` (a message) ends the run."""
    if stalled is None:
        return Outcome(it.theta, it.f, it.g, 0.0, False, note=note, nonfinite=int(bool(note)))
    return Outcome.stop(it, "stalled", stalled, nonfinite=int(bool(note)))
