"""The 2-D classification problem in the plane: the validation points and the decision
boundaries θ₁x + θ₂y + b = 0 of the fitted logistic regressions (the study's Figure 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secondorder.report.figures import _figure, save
from secondorder.report.text import format_number

__all__ = ["decision_boundary_figure"]


def decision_boundary_figure(
    X: np.ndarray,
    y: np.ndarray,
    boundaries: Sequence[tuple[str, Sequence[float], Any]],
    path: str | Path,
    *,
    title: str = "",
    accuracy: dict[str, float] | None = None,
) -> Path:
    """The points ``X`` (n × 2) coloured by class ``y`` (0 / 1) and, for each
    (label, θ = (w₁, w₂, b), colour), the line w₁x + w₂y + b = 0 where the model's
    probability is ½; the first boundary is drawn solid, later ones dashed."""
    X, y = np.asarray(X, dtype=float), np.asarray(y).astype(int).ravel()
    fig = _figure(1, width=9.0, height=5.4)
    ax = fig.subplots()
    for cls, mk, c in ((0, "o", "#1f77b4"), (1, "^", "#d62728")):
        sel = y == cls
        ax.scatter(
            X[sel, 0],
            X[sel, 1],
            marker=mk,
            s=22,
            c=c,
            edgecolors="black",
            linewidths=0.4,
            label=f"class {cls} ({int(sel.sum())} points)",
            zorder=3,
        )
    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xs = np.linspace(lo[0], hi[0], 200)
    for i, (label, theta, c) in enumerate(boundaries):
        w1, w2, b = (float(t) for t in theta[:3])
        if abs(w2) > 1e-12 * max(1.0, abs(w1)):
            ax.plot(
                xs,
                -(w1 * xs + b) / w2,
                color=c,
                lw=2.0 if i == 0 else 1.3,
                ls="-" if i == 0 else "--",
                zorder=4,
                label=_boundary_label(label, accuracy),
            )
        elif abs(w1) > 0:
            ax.axvline(
                -b / w1,
                color=c,
                lw=2.0 if i == 0 else 1.3,
                ls="-" if i == 0 else "--",
                label=_boundary_label(label, accuracy),
            )
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or "validation set and decision boundary", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save(fig, path)


def _boundary_label(label: str, accuracy: dict[str, float] | None) -> str:
    acc = (accuracy or {}).get(label)
    tail = f", accuracy {format_number(acc, 2)}" if acc is not None else ""
    return f"{label}: boundary (p = ½){tail}"
