"""The figures of one cell of a run: loss, accuracy (with the study's published values where it
published some), the paths of a 2-D function, and the decision boundary of the 2-D
classification problem (the study's Figure 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secondorder.data import two_class_2d
from secondorder.report import figures as figs
from secondorder.report.measures import f_star
from secondorder.report.paper.published import TABLES, paper_row_key
from secondorder.report.plane import decision_boundary_figure
from secondorder.report.rundata import CellRun, final_theta, final_value
from secondorder.report.text import value_label

__all__ = ["cell_figures", "cell_title"]


def _series(cell: CellRun) -> list[figs.Series]:
    return [(s.name, s, figs.colour(s.index)) for s in cell.solvers if s.rows]


def _objective_differs(series: list[figs.Series]) -> bool:
    """Whether the sampled objective f differs from the full training loss anywhere."""
    for _, s, _ in series:
        for r in s.rows:
            f, t = r.get("f"), r.get("train_loss")
            if isinstance(f, float) and isinstance(t, float) and abs(f - t) > 1e-6 * max(1, abs(t)):
                return True
    return False


def _rosenbrock_fn(cell: CellRun):
    data = cell.spec.get("data") or {}
    if data.get("kind") != "rosenbrock" or len(data.get("x0", [])) != 2:
        return None
    a, b = float(data.get("a", 1.0)), float(data.get("b", 100.0))
    return (lambda X, Y: (a - X) ** 2 + b * (Y - X**2) ** 2), [a, a * a]


def cell_title(run_name: str, cell: CellRun) -> str:
    """The figure title of a cell: the run, the swept values, and for a network its depth,
    the L2 penalty and its convention, and the iteration budget."""
    title = run_name + ("" if cell.id == "main" else f" — {cell.label}")
    spec = cell.spec
    bits = []
    if cell.n_hidden:
        bits.append(f"{cell.n_hidden} hidden layer{'s' if cell.n_hidden > 1 else ''}")
    if spec.get("l2"):
        bits.append(f"λ = {value_label(spec['l2'])} ({spec.get('l2_convention', 'plain')} L2)")
    if spec.get("max_iter") and cell.n_hidden:
        bits.append(f"{spec['max_iter']} iterations")
    return title + ("\n" + ", ".join(bits) if bits else "")


def _published(cell: CellRun, series: list[figs.Series]) -> list[figs.Published]:
    """The study's accuracies for this cell's depth (tables the spec names that hold train /
    dev accuracies after a stated iteration count), one mark per solver standing for a row."""
    out: list[figs.Published] = []
    for tid in (cell.spec.get("report") or {}).get("paper") or []:
        tab = TABLES.get(tid)
        if tab is None or tab.iterations is None:
            continue
        for col in tab.columns:
            if col.ours not in ("train_accuracy", "dev_accuracy"):
                continue
            for _, s, c in series:
                key = paper_row_key(tab, s.paper_row, cell.n_hidden) if s.paper_row else None
                v = tab.rows[key].get(col.key) if key else None
                if v is not None:
                    out.append(
                        (c, col.ours, tab.iterations, v, f"{tab.title}, it. {tab.iterations}")
                    )
    return out


def _boundary(cell: CellRun, series: list[figs.Series], path: Path, title: str) -> Path | None:
    """The validation (test) points of the 2-D two-class problem with the decision boundary of
    NLCG, as in the study's Figure 3, and the other solvers' boundaries dashed."""
    data = cell.spec.get("data") or {}
    model = cell.spec.get("model") or {}
    if data.get("kind") != "two-class-2d" or model.get("kind") != "logistic":
        return None
    if not model.get("bias", True):
        return None
    splits = two_class_2d(
        n_train=int(data.get("n_train", 800)),
        n_val=int(data.get("n_test", 100)),
        seed=int(data.get("seed", 0)),
    )
    lines: list[tuple[str, Any, Any]] = []
    acc: dict[str, float] = {}
    for name, s, c in sorted(series, key=lambda t: (t[1].paper_row or t[0]) != "NLCG"):
        theta = final_theta(cell, s)
        if theta is None or len(theta) != 3:
            continue
        lines.append((name, theta, c))
        v = final_value(s.rows, "test_accuracy")
        if v is not None:
            acc[name] = v
    if not lines:
        return None
    test = splits.test
    return decision_boundary_figure(
        test.X.numpy(),
        test.y.numpy(),
        lines,
        path,
        title=f"{title}\nvalidation set ({len(test.y)} points) and decision boundaries",
        accuracy=acc,
    )


def cell_figures(
    cell: CellRun, figdir: Path, fmt: str, title: str, log_y: bool = True
) -> list[tuple[str, str, Path]]:
    """Draw a cell's figures; return (kind, caption, path) triples, kind being ``"loss"``,
    ``"accuracy"``, ``"paths"`` or ``"boundary"``."""
    out = []
    series = _series(cell)
    if not series:
        return out
    stem = "" if cell.id == "main" else f"{cell.id}-"
    fs = f_star(cell)
    sampled = (cell.spec.get("sampler") or {}).get("kind", "full") != "full"
    p = figs.loss_figure(
        series,
        figdir / f"{stem}loss.{fmt}",
        title=title,
        f_star=fs,
        log_y=log_y,
        show_objective=sampled and _objective_differs(series),
    )
    what = "f − f*" if fs is not None else "full training loss"
    out.append(("loss", f"{what} against iteration and solver time; ‖∇f‖∞ against iteration", p))
    if any(
        any(k in r for k in ("train_accuracy", "test_accuracy"))
        for _, s, _ in series
        for r in s.rows
    ):
        marks = _published(cell, series)
        p = figs.accuracy_figure(
            series, figdir / f"{stem}accuracy.{fmt}", title=title, published=marks
        )
        cap = "accuracy (eq. 30) against iteration"
        out.append(("accuracy", cap + (", with the study's values as stars" if marks else ""), p))
    ros = _rosenbrock_fn(cell)
    if ros is not None:
        fn, minimum = ros
        p = figs.paths_figure(
            series, figdir / f"{stem}paths.{fmt}", fn, title=title or "paths", minimum=minimum
        )
        out.append(("paths", "iterates in the (x, y) plane over log-spaced contours", p))
    p = _boundary(cell, series, figdir / f"{stem}boundary.{fmt}", title)
    if p is not None:
        out.append(("boundary", "validation set with the decision boundary found by NLCG", p))
    return out
