"""The figures and the block table of the ``preconditioning`` study (see
:mod:`secondorder.report.studies.preconditioning` for the rules they illustrate)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from secondorder._format import format_number
from secondorder.report.figures import _figure, save
from secondorder.report.styles import series_style
from secondorder.report.text import md_table

__all__ = ["block_figure", "block_table", "loss_figure"]

#: values at or below this are drawn at it on the log axes
_FLOOR = 1e-12


def loss_figure(problem, cfgs, labels: dict, methods: dict, path: Path) -> Path:
    """One column per method: f against iteration (top) and against solver seconds
    (bottom), one curve per preconditioner, the method's target T dotted."""
    names = list(problem.results)
    fig = _figure(len(names), 2, width=4.6, height=3.4)
    axes = np.atleast_2d(fig.subplots(2, len(names), squeeze=False))
    order = list(labels)
    for j, method in enumerate(names):
        target = problem.results[method][0].target
        mine = [c for c in cfgs if c.method == method]
        for c in sorted(mine, key=lambda c: order.index(c.preconditioner)):
            style = series_style(order.index(c.preconditioner))
            fs = [max(f, _FLOOR) for f in c.fs]
            kw = dict(color=style["color"], ls=style["ls"], lw=1.4)
            label = labels.get(c.preconditioner, c.preconditioner)
            axes[0, j].plot(c.ks, fs, label=label, **kw)
            axes[1, j].plot([max(t, 1e-4) for t in c.ts], fs, label=label, **kw)
        for i, xlabel in enumerate(("iteration", "solver seconds")):
            ax = axes[i, j]
            if math.isfinite(target):
                ax.axhline(max(target, _FLOOR), color="0.3", ls=":", lw=1, label="target T")
            ax.set_yscale("log")
            if i == 1:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss f")
            ax.grid(True, alpha=0.3)
        axes[0, j].set_title(methods.get(method, method))
        axes[0, j].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{problem.title}: loss against iterations and seconds, per preconditioner")
    return save(fig, path)


def _median_layers(values: list) -> list[float]:
    return [statistics.median(v[i] for v in values) for i in range(len(values[0]))]


def _diag_error(rho: list[float]) -> list[float]:
    return [math.sqrt(max(0.0, 1 - r * r)) for r in rho]


def block_figure(blocks: dict, path: Path) -> Path:
    """Per layer, the relative Frobenius distance of each form from the exact layer block:
    the diagonal (√(1 − ρ²)) for H_l and G_l, K-FAC's G^K⊗A for G_l and H_l, at θ₀ and at
    θ_end (median over runs)."""
    series = [
        ("diag of H_l", _diag_error, "diag_fraction_h"),
        ("diag of G_l", _diag_error, "diag_fraction_ggn"),
        ("K-FAC vs G_l", None, "kfac_error_ggn"),
        ("K-FAC vs H_l", None, "kfac_error_h"),
    ]
    fig = _figure(2, 1, width=4.8, height=3.6)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, where, title in zip(axes, ("start", "end"), ("θ₀", "θ_end (median over runs)")):
        width = 0.8 / len(series)
        for i, (label, fn, key) in enumerate(series):
            vals = _median_layers(blocks[key][where])
            vals = fn(vals) if fn else vals
            xs = np.arange(len(vals)) + (i - (len(series) - 1) / 2) * width
            bars = ax.bar(xs, vals, width, label=label, color=series_style(i)["color"])
            ax.bar_label(bars, [format_number(v, 2) for v in vals], fontsize=6, rotation=90)
        ax.set_xticks(range(len(vals)), [f"layer {k + 1}" for k in range(len(vals))])
        ax.set_ylim(0, 1.2)
        ax.set_ylabel("‖B_l − M_l‖_F / ‖B_l‖_F")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(series), fontsize=8)
    fig.suptitle("How far each preconditioner's form is from the exact layer block (lower: closer)")
    return save(fig, path)


def _pair(blocks: dict, key: str, layer: int) -> str:
    start = blocks[key]["start"][0][layer]
    ends = [v[layer] for v in blocks[key]["end"]]
    med = statistics.median(ends)
    return (
        f"{format_number(start, 3)} / {format_number(med, 3)} "
        f"[{format_number(min(ends), 2)}, {format_number(max(ends), 2)}]"
    )


def block_table(blocks: dict) -> str:
    """Per layer, each measure at θ₀ / θ_end (median [min, max] over runs)."""
    n_layers = len(blocks["diag_fraction_h"]["start"][0])
    header = ["layer", "‖diag H_l‖/‖H_l‖", "‖diag G_l‖/‖G_l‖", "K-FAC error vs G_l"]
    header.append("K-FAC error vs H_l")
    rows = []
    for layer in range(n_layers):
        row = [str(layer + 1)]
        for key in ("diag_fraction_h", "diag_fraction_ggn", "kfac_error_ggn", "kfac_error_h"):
            row.append(_pair(blocks, key, layer))
        rows.append(row)
    text = md_table(header, rows, "lrrrr")
    note = (
        "\nEach cell: θ₀ / θ_end, the median and [min, max] over every run's last iterate. "
        "ρ = ‖diag B‖_F/‖B‖_F is what a diagonal keeps of block B (its relative error is "
        "√(1 − ρ²)); K-FAC's error is ‖B − G^K⊗A‖_F/‖B‖_F with the exact-GGN Kronecker "
        "factors. Curvature of the mean loss over the training samples, without the L2 term.\n"
    )
    if "layer_block_fraction" in blocks:
        lb = blocks["layer_block_fraction"]
        ends = lb["end"]
        note += (
            f"\nThe layer blocks together hold ‖blockdiag H‖_F/‖H‖_F = "
            f"{format_number(lb['start'][0], 3)} of the whole Hessian at θ₀ and "
            f"{format_number(statistics.median(ends), 3)} (median) at θ_end.\n"
        )
    return text + note
