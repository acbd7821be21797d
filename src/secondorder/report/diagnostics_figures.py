"""Figures of the diagnostics: the Taylor tests' error curves and the Hessian spectrum of a
convexity / saddle report.

The core returns data only (:class:`secondorder.diagnostics.TaylorTest`,
:class:`secondorder.curvature.SaddleReport`); these functions draw it, on Matplotlib's Agg
canvas (no display, no pyplot state), in the format the path's suffix names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:  # annotations only: the core never needs this module to run
    from secondorder.curvature import SaddleReport
    from secondorder.diagnostics import TaylorTest

from secondorder._format import format_number

__all__ = ["plot_gradient_test", "plot_saddle_report", "slq_window"]


def slq_window(
    grid: np.ndarray, density: np.ndarray, lam_min: float, lam_max: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """The part of an SLQ density worth drawing: the grid within [λ_min − σ, λ_max + σ] (the
    Gaussian smoothing of width σ spreads mass past the extreme eigenvalues, which is not
    spectrum), with values below 10⁻¹⁰ of the peak set to NaN (not drawn) rather than floored
    into a flat line on the log axis."""
    grid, density = np.asarray(grid, dtype=float), np.asarray(density, dtype=float)
    keep = (grid >= lam_min - sigma) & (grid <= lam_max + sigma)
    g, d = grid[keep], density[keep].copy()
    if d.size:
        d[d < float(np.max(d)) * 1e-10] = np.nan
    return g, d


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_gradient_test(result: TaylorTest, path: str) -> str:
    """Save a log-log plot of a Taylor test's error against ε with the reference slope
    (2 for the gradient test of eq. 31, 3 for the Hessian test); returns the path."""
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    eps = np.asarray(result.eps)
    err = np.maximum(np.asarray(result.errors), np.finfo(float).tiny)
    ax.loglog(eps, err, "o-", label=f"measured (order {format_number(result.order, 3)})")
    used = np.asarray(result.used, dtype=bool)
    if used.any():
        e0, r0 = eps[used][0], err[used][0]
        ax.loglog(
            eps,
            r0 * (eps / e0) ** result.expected_order,
            "--",
            label=f"slope {format_number(result.expected_order, 2)}",
        )
    ax.set_xlabel("ε (step along the random direction)")
    ax.set_ylabel("Taylor remainder |error|")
    ax.set_title(f"{result.kind} test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_saddle_report(
    report: SaddleReport, path: str | Path, *, bins: int = 80, n_probes: int = 8
) -> Path:
    """Save the Hessian spectrum of a saddle report — the histogram of the eigenvalues when
    they were computed densely, else an SLQ density (``n_probes`` probes) — with a log-scale
    y axis and λ_min marked; returns the path."""
    path = Path(path)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if report.eigenvalues is not None:
        ax.hist(report.eigenvalues, bins=bins, color="tab:blue", alpha=0.8, log=True)
        ax.set_ylabel("number of eigenvalues")
        kind = "eigenvalue histogram"
    else:
        sd = report.spectral_density(n_probes=n_probes)
        grid, density = slq_window(
            sd.grid, sd.density, report.lambda_min, report.lambda_max, sd.sigma
        )
        ax.plot(
            grid,
            density,
            color="tab:blue",
            label=f"Gaussian smoothing σ = {format_number(sd.sigma, 3)}",
        )
        ax.set_yscale("log")
        ax.set_ylabel("spectral density")
        ax.text(
            0.01,
            0.02,
            "drawn on [λ_min − σ, λ_max + σ]; values below 1e-10 × peak left out (no floor)",
            transform=ax.transAxes,
            fontsize=7,
            color="0.35",
        )
        kind = "SLQ spectral density"
    ax.axvline(
        report.lambda_min,
        color="tab:red",
        ls="--",
        lw=1,
        label=f"λ_min = {format_number(report.lambda_min, 3)}",
    )
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_title(f"{kind}: {report.verdict}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
