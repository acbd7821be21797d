"""The study's first open question (section 5.1): why are train and dev accuracy so close?

Four answers, each measured on the run (``secondorder run studies/train-dev``):

1. *Leakage.* Every image of the train, dev and test splits the run used (and of the whole
   60,000 + 10,000 images) is hashed; exact duplicates are counted within each split and
   across each pair. A dev image that is also a training image can move dev accuracy by at
   most 1/n_dev, so ``d`` shared images bound the effect of leakage by d/n_dev.
2. *Iterations, width, λ.* The gap g = train accuracy − dev accuracy (eq. 30 on each split)
   at the end and along the run, against the swept hidden width and L2 penalty.
3. *Underfitting.* Whether g opens in the runs that fit the training set (final train
   accuracy ≥ :data:`FITTED`) and stays small in those that do not (< :data:`UNDERFIT`).
4. *Batches.* The gap under the full objective, under fixed batches of eq. 28 that cover
   part of the training set, and under batches drawn afresh each iteration; for batches the
   ``batch_accuracy`` metric is the accuracy on the samples the objective sums over.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secondorder._format import format_number, format_spec_value
from secondorder.report.figures import _figure, save
from secondorder.report.rundata import CellRun, RunData, SolverRun, final_value
from secondorder.report.studies import Conclusion, StudyContext, conclusions_table
from secondorder.report.styles import series_style
from secondorder.report.text import md_table, value_label

__all__ = [
    "FITTED",
    "GAP_CLOSED",
    "GAP_OPEN",
    "UNDERFIT",
    "GapRun",
    "batches_rule",
    "content_hashes",
    "duplicate_counts",
    "fitting_rule",
    "gap_runs",
    "iterations_rule",
    "leakage_rule",
    "sections",
    "sweep_rule",
]

#: a gap above this at the end is "open" (the study's largest gap in Table 3 was 0.006)
GAP_OPEN = 0.05
#: a gap below this is "close", as the study found it
GAP_CLOSED = 0.02
#: final train accuracy from which a run fits its training set
FITTED = 0.95
#: final train accuracy below which a run underfits
UNDERFIT = 0.90
#: a change of the gap smaller than this is no change
GAP_TOL = 0.01

T_DUP = "Table: exact duplicate images"
T_GAP = "Table: train − dev gap at the end"
F_ITER = "Figure: train − dev gap against iterations"
F_FIT = "Figure: gap against training accuracy"


# ------------------------------------------------------------------------------------------
# Duplicates
# ------------------------------------------------------------------------------------------
def content_hashes(X: np.ndarray) -> list[bytes]:
    """A BLAKE2b digest of each row's bytes: equal digests ⇔ identical images."""
    rows = np.ascontiguousarray(X)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def duplicate_counts(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Exact duplicates of named splits ``{name: (X, y)}``.

    ``within[a]``: images of ``a`` equal to an earlier image of ``a`` (n − distinct);
    ``across[(a, b)]``: images of ``b`` whose content occurs in ``a`` (for a before b), and
    ``relabelled[(a, b)]``: those of them whose label differs from every copy in ``a``."""
    hashes = {k: content_hashes(X) for k, (X, _) in splits.items()}
    labels = {k: np.asarray(y).reshape(-1) for k, (_, y) in splits.items()}
    within = {k: len(h) - len(set(h)) for k, h in hashes.items()}
    across: dict[tuple[str, str], int] = {}
    relabelled: dict[tuple[str, str], int] = {}
    names = list(splits)
    for i, a in enumerate(names):
        seen: dict[bytes, set[int]] = {}
        for h, lab in zip(hashes[a], labels[a]):
            seen.setdefault(h, set()).add(int(lab))
        for b in names[i + 1 :]:
            hits = [(h, int(lab)) for h, lab in zip(hashes[b], labels[b]) if h in seen]
            across[(a, b)] = len(hits)
            relabelled[(a, b)] = sum(1 for h, lab in hits if lab not in seen[h])
    sizes = {k: len(h) for k, h in hashes.items()}
    return {"sizes": sizes, "within": within, "across": across, "relabelled": relabelled}


def _arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    return ds.X.detach().cpu().numpy(), ds.y.detach().cpu().numpy()


def _data_duplicates(cell: CellRun) -> tuple[dict | None, dict | None, str]:
    """(counts on the run's splits, counts on the whole data set, why not) from the data."""
    from secondorder.data import DataError, load_fashion_mnist
    from secondorder.experiments.problems import load_splits

    spec = dict(cell.spec)
    data = dict(spec.get("data") or {})
    if data.get("kind") != "fashion-mnist":
        return None, None, f"the run's data ({data.get('kind')}) is not Fashion-MNIST"
    data["download"] = False
    spec["data"] = data
    try:
        run_splits = load_splits(spec)
        whole = load_fashion_mnist(data.get("root"), dev_size=0, download=False, progress=False)
    except (DataError, OSError) as err:
        return None, None, f"the data could not be read ({err})"
    named = {"train": _arrays(run_splits.train)}
    if run_splits.dev is not None:
        named["dev"] = _arrays(run_splits.dev)
    if run_splits.test is not None:
        named["test"] = _arrays(run_splits.test)
    full = {"all 60,000 train": _arrays(whole.train), "all 10,000 test": _arrays(whole.test)}
    return duplicate_counts(named), duplicate_counts(full), ""


def leakage_rule(counts: dict[str, Any]) -> tuple[bool, float, int]:
    """(leakage can explain the closeness, its bound on dev accuracy, shared images).

    A held-out image that is also a training image moves held-out accuracy by at most
    1/n, so ``d`` shared images bound the effect by d/n (dev split, or test without one).
    Leakage could explain a closeness only if that bound reached :data:`GAP_CLOSED`."""
    sizes, across = counts["sizes"], counts["across"]
    held = "dev" if "dev" in sizes else "test"
    shared = sum(v for (a, b), v in across.items() if "train" in (a, b) and held in (a, b))
    bound = shared / sizes[held] if sizes.get(held) else 0.0
    return bound >= GAP_CLOSED, bound, shared


def _duplicates_table(counts: dict[str, Any], label: str) -> list[list[str]]:
    rows = []
    for k, n in counts["sizes"].items():
        rows.append([label, f"within {k}", str(n), str(counts["within"][k]), "—"])
    for (a, b), v in counts["across"].items():
        n = counts["sizes"][b]
        rows.append([label, f"{b} also in {a}", str(n), str(v), str(counts["relabelled"][(a, b)])])
    return rows


# ------------------------------------------------------------------------------------------
# Gaps
# ------------------------------------------------------------------------------------------
@dataclass
class GapRun:
    """One solver in one cell: its setting and its gaps (None where not recorded)."""

    solver: str
    width: str
    l2: float
    sampler: str
    train: float | None
    dev: float | None
    batch: float | None
    early_gap: float | None
    series: tuple[list[float], list[float]]

    @property
    def gap(self) -> float | None:
        return None if self.train is None or self.dev is None else self.train - self.dev

    @property
    def batch_gap(self) -> float | None:
        return None if self.batch is None or self.dev is None else self.batch - self.dev


def _gap_series(s: SolverRun) -> tuple[list[float], list[float]]:
    ks, gs = [], []
    for r in s.rows:
        a, d = r.get("train_accuracy"), r.get("dev_accuracy")
        if _finite(a) and _finite(d):
            ks.append(float(r.get("k", len(ks))))
            gs.append(float(a) - float(d))
    return ks, gs


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _width(cell: CellRun) -> str:
    m = cell.spec.get("model") or {}
    return value_label(m.get("hidden") or m.get("widths") or m.get("kind", "?"))


def gap_runs(run: RunData) -> list[GapRun]:
    """Every solver of every cell as a :class:`GapRun`."""
    out = []
    for cell in run.cells:
        sampler = (cell.spec.get("sampler") or {}).get("kind", "full")
        for s in cell.solvers:
            ks, gs = _gap_series(s)
            early = next((g for k, g in zip(ks, gs) if k > 0), None)
            out.append(
                GapRun(
                    s.name,
                    _width(cell),
                    float(cell.spec.get("l2", 0.0)),
                    sampler,
                    final_value(s.rows, "train_accuracy"),
                    final_value(s.rows, "dev_accuracy"),
                    final_value(s.rows, "batch_accuracy"),
                    early,
                    (ks, gs),
                )
            )
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _n(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else format_number(v, digits)


def iterations_rule(runs: Sequence[GapRun]) -> tuple[int, int, float | None, float | None]:
    """(runs whose gap grew by more than :data:`GAP_TOL` from the first recorded iteration
    to the end, runs with both, mean early gap, mean final gap) over full-batch runs."""
    both = [
        r for r in runs if r.sampler == "full" and r.early_gap is not None and r.gap is not None
    ]
    grew = sum(1 for r in both if r.gap - r.early_gap > GAP_TOL)
    return grew, len(both), _mean([r.early_gap for r in both]), _mean([r.gap for r in both])


def _width_size(w: str) -> float:
    nums = [float(x) for x in w.strip("[]").split(",") if x.strip().replace(".", "").isdigit()]
    return sum(nums) if nums else 0.0


def sweep_rule(runs: Sequence[GapRun], key: str) -> tuple[int, int, int, float | None]:
    """Pairs of full-batch runs that differ only in ``key`` (``"width"`` or ``"l2"``), the
    largest value against the smallest: (pairs whose final gap is larger by more than
    :data:`GAP_TOL` at the largest, pairs where it is smaller by more than that, pairs, mean
    difference largest − smallest)."""
    full = [r for r in runs if r.sampler == "full" and r.gap is not None]
    order = (lambda r: _width_size(r.width)) if key == "width" else (lambda r: r.l2)
    other = (lambda r: (r.solver, r.l2)) if key == "width" else (lambda r: (r.solver, r.width))
    groups: dict[Any, list[GapRun]] = {}
    for r in full:
        groups.setdefault(other(r), []).append(r)
    diffs = []
    for g in groups.values():
        if len({order(r) for r in g}) < 2:
            continue
        lo, hi = min(g, key=order), max(g, key=order)
        diffs.append(hi.gap - lo.gap)
    up = sum(1 for d in diffs if d > GAP_TOL)
    down = sum(1 for d in diffs if d < -GAP_TOL)
    return up, down, len(diffs), _mean(diffs)


def fitting_rule(runs: Sequence[GapRun]) -> dict[str, Any]:
    """Does the gap open once the model fits? Over full-batch runs: ``verdict`` is
    ``"untested"`` (no run reached :data:`FITTED`), ``"opens"`` (a fitted run's final gap
    exceeds :data:`GAP_OPEN` and at least twice the underfitted runs' mean gap),
    ``"open everywhere"`` (above :data:`GAP_OPEN`, but the underfitted runs' mean gap is at
    least half of it) or ``"stays closed"``. ``r`` is the correlation of final train accuracy
    and final gap over all full-batch runs (None for fewer than three)."""
    full = [r for r in runs if r.sampler == "full" and r.gap is not None and r.train is not None]
    fitted = [r for r in full if r.train >= FITTED]
    under = [r for r in full if r.train < UNDERFIT]
    out: dict[str, Any] = {
        "n_fitted": len(fitted),
        "n_under": len(under),
        "fitted_max": max((r.gap for r in fitted), default=None),
        "fitted_mean": _mean([r.gap for r in fitted]),
        "under_mean": _mean([r.gap for r in under]),
        "under_max": max((r.gap for r in under), default=None),
    }
    xs, ys = [r.train for r in full], [r.gap for r in full]
    spread = len(full) >= 3 and np.std(xs) > 0 and np.std(ys) > 0
    out["r"] = float(np.corrcoef(xs, ys)[0, 1]) if spread else None
    if not fitted:
        out["verdict"] = "untested"
    elif out["fitted_max"] > GAP_OPEN:
        small = out["under_mean"] is None or out["under_mean"] < out["fitted_max"] / 2
        out["verdict"] = "opens" if small else "open everywhere"
    else:
        out["verdict"] = "stays closed"
    return out


def batches_rule(runs: Sequence[GapRun]) -> dict[str, dict[str, Any]]:
    """Per batched sampler (``fixed``, ``reshuffled``, ...): the mean over matching settings
    (solver, width, λ) of its final gap minus the full-batch run's, on the whole training set
    (``train``) and on the samples its objective sums over (``batch``); ``matters`` when
    either differs by more than :data:`GAP_CLOSED`."""
    full = {(r.solver, r.width, r.l2): r for r in runs if r.sampler == "full" and r.gap is not None}
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.sampler for r in runs} - {"full"}):
        d_train, d_batch = [], []
        for r in runs:
            base = full.get((r.solver, r.width, r.l2))
            if r.sampler != kind or base is None or r.gap is None:
                continue
            d_train.append(r.gap - base.gap)
            if r.batch_gap is not None:
                d_batch.append(r.batch_gap - base.gap)
        mt, mb = _mean(d_train), _mean(d_batch)
        big = [abs(v) > GAP_CLOSED for v in (mt, mb) if v is not None]
        out[kind] = {"train": mt, "batch": mb, "n": len(d_train), "matters": any(big)}
    return out


# ------------------------------------------------------------------------------------------
# Tables and figures
# ------------------------------------------------------------------------------------------
def _gap_table(runs: Sequence[GapRun]) -> str:
    header = ["sampler", "width", "λ", "solver", "train acc", "batch acc", "dev acc"]
    header += ["gap (train − dev)", "gap on the batches", "gap at the first record"]
    rows = [
        [
            r.sampler,
            r.width,
            value_label(r.l2),
            r.solver,
            _n(r.train),
            _n(r.batch),
            _n(r.dev),
            _n(r.gap),
            _n(r.batch_gap),
            _n(r.early_gap),
        ]
        for r in runs
    ]
    return md_table(header, rows, "llll" + "r" * 6)


def _iterations_figure(runs: Sequence[GapRun], ctx: StudyContext) -> str:
    samplers = list(dict.fromkeys(r.sampler for r in runs))
    widths = sorted(dict.fromkeys(r.width for r in runs), key=_width_size)
    labels = list(dict.fromkeys(f"{r.solver}, λ = {value_label(r.l2)}" for r in runs))
    fig = _figure(len(widths), len(samplers), width=max(4.6, 9.0 / len(widths)), height=3.4)
    axes = np.atleast_2d(fig.subplots(len(samplers), len(widths), squeeze=False))
    for i, smp in enumerate(samplers):
        for j, w in enumerate(widths):
            ax = axes[i][j]
            for r in runs:
                if r.sampler != smp or r.width != w or not r.series[0]:
                    continue
                label = f"{r.solver}, λ = {value_label(r.l2)}"
                st = series_style(labels.index(label))
                ax.plot(*r.series, color=st["color"], ls=st["ls"], marker=st["marker"], ms=3)
            ax.axhline(GAP_OPEN, color="grey", lw=0.8, ls=":")
            ax.axhline(0.0, color="black", lw=0.6)
            ax.set_title(f"{smp} batches, hidden {w}", fontsize=9)
            ax.set_xlabel("iteration k")
            ax.set_ylabel("train − dev accuracy")
            ax.grid(True, alpha=0.3)
    for n, label in enumerate(labels):
        st = series_style(n)
        axes[0][0].plot([], [], color=st["color"], ls=st["ls"], marker=st["marker"], label=label)
    fig.legend(loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"{F_ITER[8:]} (dotted: {format_spec_value(GAP_OPEN)})", fontsize=10)
    path = save(fig, ctx.figure("train-dev-gap-iterations"))
    return ctx.link(path, F_ITER)


def _fit_figure(runs: Sequence[GapRun], ctx: StudyContext) -> str:
    samplers = list(dict.fromkeys(r.sampler for r in runs))
    solvers = list(dict.fromkeys(r.solver for r in runs))
    fig = _figure(1, width=6.4, height=4.6)
    ax = fig.subplots()
    for r in runs:
        if r.gap is None or r.train is None:
            continue
        c = series_style(samplers.index(r.sampler))["color"]
        mk = series_style(10 * solvers.index(r.solver))["marker"]
        ax.scatter([r.train], [r.gap], color=c, marker=mk, s=28, alpha=0.8)
    for i, smp in enumerate(samplers):
        ax.scatter([], [], color=series_style(i)["color"], marker="o", label=f"{smp} batches")
    for i, sv in enumerate(solvers):
        ax.scatter([], [], color="black", marker=series_style(10 * i)["marker"], label=sv)
    ax.axhline(GAP_OPEN, color="grey", lw=0.8, ls=":")
    ax.axhline(GAP_CLOSED, color="grey", lw=0.8, ls="--")
    ax.axvline(FITTED, color="grey", lw=0.8, ls="-.")
    ax.set_xlabel("final train accuracy (whole training subset)")
    ax.set_ylabel("final train − dev accuracy")
    ax.set_title(
        f"{F_FIT[8:]}: dotted {format_spec_value(GAP_OPEN)}, dashed "
        f"{format_spec_value(GAP_CLOSED)}, dash-dot train accuracy {format_spec_value(FITTED)}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = save(fig, ctx.figure("train-dev-gap-fit"))
    return ctx.link(path, F_FIT)


# ------------------------------------------------------------------------------------------
# Conclusions
# ------------------------------------------------------------------------------------------
def _weak(run: RunData) -> str:
    """What limits the evidence: seeds, training-set size, iterations."""
    spec = run.cells[0].spec if run.cells else run.spec
    n = (spec.get("data") or {}).get("n_train")
    bits = [f"{len(run.spec.get('seeds') or [0])} seed(s)", f"{spec.get('max_iter')} iterations"]
    if n:
        bits.append(f"a training subset of {n:,} images (the study: 50,000-60,000)")
    return "weak: " + ", ".join(bits)


def _leakage_conclusion(counts: dict | None, whole: dict | None, why: str) -> Conclusion:
    q = "Are train, dev and test disjoint (a bug that leaks training images)?"
    if counts is None:
        return Conclusion(q, f"not measured: {why}", T_DUP, "none")
    explains, bound, shared = leakage_rule(counts)
    held = "dev" if "dev" in counts["sizes"] else "test"
    cross = sum(counts["across"].values())
    text = (
        f"{cross} exact duplicate image(s) across the run's splits ({shared} of the "
        f"{counts['sizes'][held]:,} {held} images also in train): leakage moves {held} "
        f"accuracy by at most {_n(bound)}, "
        + ("enough to explain" if explains else "too little to explain")
        + f" a closeness below {format_spec_value(GAP_CLOSED)}"
    )
    if whole is not None:
        ((pair, v),) = whole["across"].items()
        text += f"; over the whole data set {v} test image(s) also occur in train"
    return Conclusion(q, text, T_DUP, "strong: exact hashes of every image")


def _conclusions(run: RunData, runs: list[GapRun], dup: tuple) -> list[Conclusion]:
    weak = _weak(run)
    out = [_leakage_conclusion(*dup)]
    grew, n, early, end = iterations_rule(runs)
    found = (
        f"it grew by more than {format_spec_value(GAP_TOL)} in {grew} of {n} full-batch runs "
        f"(mean gap {_n(early)} at the first record after the start, {_n(end)} at the end)"
        if n
        else "not tested: no full-batch run recorded train and dev accuracy"
    )
    out.append(Conclusion("Does the gap grow with the iterations?", found, F_ITER, weak))
    for key, what in (("width", "hidden width"), ("l2", "λ")):
        up, down, pairs, diff = sweep_rule(runs, key)
        found = (
            f"at the largest {what} the final gap was larger (by > "
            f"{format_spec_value(GAP_TOL)}) in {up}, smaller in {down} of {pairs} matched "
            f"pairs; mean difference largest − smallest {_n(diff)}"
            if pairs
            else f"not tested: the run has one value of {what}"
        )
        q = f"Does the gap depend on {'the ' if key == 'width' else ''}{what}?"
        out.append(Conclusion(q, found, T_GAP, weak))
    fit = fitting_rule(runs)
    verdict = {
        "opens": "yes: the gap opens once the model fits, so close accuracies mark an "
        "underfitted model, not a bug",
        "open everywhere": "the gap is large in fitted and underfitted runs alike",
        "stays closed": "no: the gap stays small even in the runs that fit",
        "untested": f"not tested: no run reached train accuracy {format_spec_value(FITTED)}",
    }[fit["verdict"]]
    out.append(
        Conclusion(
            "Does the gap open once the model stops underfitting?",
            f"{verdict} ({fit['n_fitted']} run(s) with train accuracy ≥ "
            f"{format_spec_value(FITTED)}: largest gap {_n(fit['fitted_max'])}; {fit['n_under']} "
            f"run(s) below {format_spec_value(UNDERFIT)}: mean gap {_n(fit['under_mean'])}; "
            f"correlation of train accuracy and gap over the full-batch runs {_n(fit['r'])})",
            F_FIT,
            weak,
        )
    )
    out.append(_batches_conclusion(batches_rule(runs), weak))
    return out


def _batches_conclusion(rule: dict[str, dict[str, Any]], weak: str) -> Conclusion:
    q = "Does the batch construction (eq. 28: fixed or reshuffled batches) matter?"
    if not rule:
        return Conclusion(q, "not tested: the run uses one sampler", T_GAP, weak)
    bits = []
    for kind, v in rule.items():
        bits.append(
            f"{kind}: final gap {_n(v['train'])} against the full batch on the whole training "
            f"set, {_n(v['batch'])} on the batches it fits ({v['n']} pairs)"
        )
    yes = [k for k, v in rule.items() if v["matters"]]
    head = (
        f"yes for {', '.join(yes)} (a mean difference above {format_spec_value(GAP_CLOSED)})"
        if yes
        else f"no (every mean difference within {format_spec_value(GAP_CLOSED)})"
    )
    return Conclusion(q, head + "; " + "; ".join(bits), T_GAP, weak)


def sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The study's sections: conclusions, duplicates, the gap table and its figures."""
    h = ctx.h
    runs = gap_runs(run)
    dup = _data_duplicates(run.cells[0]) if run.cells else (None, None, "the run has no cells")
    out = [f"{h} Why are train and dev accuracy so close?\n"]
    out.append(conclusions_table(_conclusions(run, runs, dup), h + "#"))
    out.append(f"{h}# {T_DUP}\n")
    counts, whole, why = dup
    if counts is None:
        out.append(f"Not measured: {why}.\n")
    else:
        rows = _duplicates_table(counts, "this run's splits")
        rows += _duplicates_table(whole, "whole data set") if whole else []
        header = ["data", "count", "images", "exact duplicates", "with another label"]
        out.append(md_table(header, rows, "llrrr"))
        out.append(
            "Each image's bytes are hashed (BLAKE2b); 'within' counts images equal to an "
            "earlier one of the same split, 'b also in a' the images of b whose content occurs "
            "in a, and the last column those of them labelled differently from every copy.\n"
        )
    out.append(f"{h}# {T_GAP}\n")
    out.append(
        "Accuracies (eq. 30) at the end of each run: train on the whole training subset, "
        "batch on the samples the objective sums over (the fixed batches, or the last "
        "iteration's), dev on the held-out split.\n"
    )
    out.append(_gap_table(runs))
    if runs:
        out.append(f"{h}# {F_ITER}\n")
        out.append(_iterations_figure(runs, ctx))
        out.append(f"{h}# {F_FIT}\n")
        out.append(_fit_figure(runs, ctx))
    return out
