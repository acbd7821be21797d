"""The study's first hypothesis: second-order information *together with* mini-batch sampling
beats mini-batch gradient descent (``secondorder run studies/minibatch``).

Each cell of the run is one batch construction (eq. 28: the full objective, fixed batches,
a fresh mini-batch per iteration); each solver is a first-order method (gradient descent,
SGD with momentum, Adam, Muon, whose orthogonalised momentum uses the gradient alone:
:data:`FIRST_ORDER`) or one that uses curvature (L-BFGS, SQN, Hessian-free, K-FAC, ...).
The measure is the solver time (``solver_time``: the solver's clock without the metrics)
and the epochs (``epochs``: samples the accepted steps drew, over m) at the first record with
test accuracy ≥ the target; the verdict compares the best of each class under moving
mini-batches (:func:`hypothesis_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

from secondorder._format import format_number, format_spec_value
from secondorder.report.figures import _figure, save
from secondorder.report.rundata import RunData, SolverRun, final_value
from secondorder.report.studies import Conclusion, StudyContext, conclusions_table
from secondorder.report.styles import Distinct, series_style
from secondorder.report.text import md_table

__all__ = [
    "FIRST_ORDER",
    "LEVEL",
    "MOVING",
    "TARGET",
    "Reach",
    "choose_target",
    "hypothesis_rule",
    "reach",
    "sections",
]

#: methods that use the gradient only
FIRST_ORDER = frozenset({"gd", "sgd", "adam", "muon", "torch:SGD", "torch:Adam"})
#: samplers whose function changes between iterations (mini-batch training)
MOVING = frozenset({"epoch", "reshuffled"})
#: the test accuracy the times are measured to
TARGET = 0.80
#: a ratio within [1/LEVEL, LEVEL] is a tie
LEVEL = 1.25

T_REACH = "Table: time and epochs to the target"
F_TIME = "Figure: test accuracy against solver time"
F_EPOCHS = "Figure: test accuracy against epochs"


@dataclass
class Reach:
    """One solver in one cell: when it first reached the target, and how far it got."""

    solver: str
    method: str
    sampler: str
    time: float | None
    epochs: float | None
    best: float | None
    final: float | None
    total_epochs: float | None
    total_time: float | None
    run: SolverRun | None = None
    seed: int = 0

    @property
    def first_order(self) -> bool:
        return self.method in FIRST_ORDER


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reach(s: SolverRun, sampler: str, target: float, seed: int = 0) -> Reach:
    """Solver time and epochs at the first row with test accuracy ≥ ``target``."""
    hit_t = hit_e = None
    best = None
    for r in s.rows:
        a = r.get("test_accuracy")
        if not _num(a):
            continue
        best = a if best is None else max(best, a)
        if hit_t is None and a >= target:
            hit_t, hit_e = r.get("solver_time"), r.get("epochs")
    return Reach(
        s.name,
        s.method,
        sampler,
        hit_t if _num(hit_t) else None,
        hit_e if _num(hit_e) else None,
        best,
        final_value(s.rows, "test_accuracy"),
        final_value(s.rows, "epochs"),
        final_value(s.rows, "solver_time"),
        s,
        seed,
    )


def choose_target(best: float | None, target: float = TARGET) -> float:
    """``target`` when some run reached it; otherwise 97% of the best accuracy, rounded down
    to 0.01 (a short or small run still compares the methods at a level some reached)."""
    if best is None or best >= target:
        return target
    return math.floor(0.97 * best * 100) / 100


def _reaches(run: RunData, target: float) -> list[Reach]:
    out = []
    for cell in run.cells:
        kind = (cell.spec.get("sampler") or {}).get("kind", "full")
        out += [reach(s, kind, target, cell.seed) for s in cell.solvers]
    return out


def _best(rs: Sequence[Reach], key: str) -> Reach | None:
    hit = [r for r in rs if getattr(r, key) is not None]
    return min(hit, key=lambda r: getattr(r, key)) if hit else None


def _ratio_word(ratio: float | None) -> str:
    if ratio is None:
        return "undecided"
    if ratio < 1 / LEVEL:
        return "second-order faster"
    if ratio > LEVEL:
        return "first-order faster"
    return "level"


def hypothesis_rule(rs: Sequence[Reach], samplers: frozenset[str] = MOVING) -> dict[str, Any]:
    """The hypothesis on the runs under ``samplers``: for time and for epochs, the best
    second-order run's value to the target over the best first-order run's. A ratio below
    1/:data:`LEVEL` supports the hypothesis, above :data:`LEVEL` refutes it, between is a tie;
    when only one class reaches the target, that class wins outright. ``verdict`` is
    ``"supported"`` when both measures favour second order, ``"refuted"`` when both favour
    first order, ``"untested"`` when neither class reaches it, else ``"mixed"``."""
    pool = [r for r in rs if r.sampler in samplers]
    first = [r for r in pool if r.first_order]
    second = [r for r in pool if not r.first_order]
    out: dict[str, Any] = {"n_first": len(first), "n_second": len(second)}
    words = []
    for key in ("time", "epochs"):
        b1, b2 = _best(first, key), _best(second, key)
        out[f"first_{key}"], out[f"second_{key}"] = b1, b2
        if b1 is None and b2 is None:
            word, ratio = "undecided", None
        elif b1 is None:
            word, ratio = "second-order faster", 0.0
        elif b2 is None:
            word, ratio = "first-order faster", math.inf
        else:
            ratio = getattr(b2, key) / getattr(b1, key) if getattr(b1, key) > 0 else math.inf
            word = _ratio_word(ratio)
        out[f"{key}_ratio"], out[f"{key}_word"] = ratio, word
        words.append(word)
    if all(w == "undecided" for w in words):
        out["verdict"] = "untested"
    elif all(w == "second-order faster" for w in words):
        out["verdict"] = "supported"
    elif all(w == "first-order faster" for w in words):
        out["verdict"] = "refuted"
    else:
        out["verdict"] = "mixed"
    return out


# ------------------------------------------------------------------------------------------
# Tables and figures
# ------------------------------------------------------------------------------------------
def _n(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else format_number(v, digits)


def _reach_table(rs: Sequence[Reach]) -> str:
    marks: set[int] = set()
    for kind in dict.fromkeys(r.sampler for r in rs):
        for fo in (True, False):
            b = _best([r for r in rs if r.sampler == kind and r.first_order == fo], "time")
            if b is not None:
                marks.add(id(b))
    seeds = len({r.seed for r in rs}) > 1  # a column for the seed only when there are several
    header = ["batches", *(["seed"] if seeds else []), "solver", "class", "best test acc"]
    header += ["final test acc", "s to target", "epochs to target", "epochs run", "solver s"]
    rows = [
        [
            r.sampler,
            *([str(r.seed)] if seeds else []),
            r.solver + (" ★" if id(r) in marks else ""),
            "first-order" if r.first_order else "curvature",
            _n(r.best),
            _n(r.final),
            _n(r.time),
            _n(r.epochs),
            _n(r.total_epochs),
            _n(r.total_time),
        ]
        for r in rs
    ]
    return md_table(header, rows, ("llll" if seeds else "lll") + "r" * 6)


def _curves_figure(rs: Sequence[Reach], key: str, ctx: StudyContext, target: float) -> str:
    title, name, xlabel = {
        "solver_time": (F_TIME, "minibatch-accuracy-time", "solver time (s, log scale)"),
        "epochs": (F_EPOCHS, "minibatch-accuracy-epochs", "epochs (log scale)"),
    }[key]
    samplers = list(dict.fromkeys(r.sampler for r in rs))
    solvers = list(dict.fromkeys(r.solver for r in rs))
    fig = _figure(len(samplers), width=max(4.6, 12.0 / len(samplers)), height=4.2)
    axes = fig.subplots(1, len(samplers), squeeze=False)[0]
    for ax, kind in zip(axes, samplers):
        apart = Distinct()
        for r in rs:
            if r.sampler != kind or r.run is None:
                continue
            xs, ys = r.run.xy(key, "test_accuracy")
            pts = [(x, y) for x, y in zip(xs, ys) if x > 0]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            st = series_style(solvers.index(r.solver))
            ls = "-" if r.first_order else "--"
            style = {"color": st["color"], "ls": ls, "marker": st["marker"], "ms": 3, "lw": 1.4}
            ax.plot(xs, ys, **{**style, **apart.style(xs, ys)})
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        # a panel spanning less than a decade would label every minor tick, and they overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
        ax.set_ylim(bottom=max(0.0, min(0.5, target - 0.3)))
        ax.set_title(f"{kind} batches", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (eq. 30)")
        ax.grid(True, alpha=0.3)
    for i, sv in enumerate(solvers):
        st = series_style(i)
        fo = next(r.first_order for r in rs if r.solver == sv)
        axes[0].plot(
            [], [], color=st["color"], ls="-" if fo else "--", marker=st["marker"], label=sv
        )
    fig.legend(loc="outside lower center", ncol=min(5, len(solvers)), fontsize=8)
    fig.suptitle(
        f"{title[8:]} (solid: first-order, dashed: curvature; dotted: target "
        f"{format_spec_value(target)})",
        fontsize=10,
    )
    return ctx.link(save(fig, ctx.figure(name)), title)


# ------------------------------------------------------------------------------------------
# Conclusions
# ------------------------------------------------------------------------------------------
def _who(r: Reach | None, key: str) -> str:
    if r is None:
        return "none reached it"
    unit = " s" if key == "time" else " epochs"
    return f"{r.solver} ({_n(getattr(r, key))}{unit})"


def _ratio(v: float | None) -> str:
    """A ratio of two measured values ("—" when one class never reached the target)."""
    return "—" if v is None or v == 0 or math.isinf(v) else _n(v)


def _hypothesis_text(h: dict[str, Any], target: float) -> str:
    words = {
        "supported": "supported",
        "refuted": "not supported: first-order methods got there first",
        "mixed": "mixed",
        "untested": "not tested: no run reached the target",
    }
    bits = []
    for key in ("time", "epochs"):
        bits.append(
            f"{key} to {format_spec_value(target)}: best curvature {_who(h[f'second_{key}'], key)}"
            f", best first-order {_who(h[f'first_{key}'], key)}, ratio "
            f"{_ratio(h[f'{key}_ratio'])} ({h[f'{key}_word']})"
        )
    return f"{words[h['verdict']]}: " + "; ".join(bits)


def _strength(run: RunData, epochs_only: bool = False) -> str:
    spec = run.cells[0].spec if run.cells else run.spec
    n = (spec.get("data") or {}).get("n_train")
    bits = [f"{len(run.spec.get('seeds') or [0])} seed(s)"]
    if n:
        bits.append(f"a training subset of {n:,} images")
    if not epochs_only:
        bits.append("times from one run on a possibly shared machine (epochs are exact)")
    return "weak: " + ", ".join(bits)


def _lbfgs_conclusion(rs: Sequence[Reach], weak: str) -> Conclusion | None:
    moving = [r for r in rs if r.sampler in MOVING and r.method == "lbfgs"]
    faithful = [r for r in moving if "faithful" in r.solver.lower()]
    robust = [r for r in moving if "robust" in r.solver.lower()]
    if not faithful or not robust:
        return None
    f, rb = faithful[0], robust[0]
    diff = None if f.best is None or rb.best is None else rb.best - f.best
    word = "yes" if diff is not None and diff > 0.01 else "no"
    return Conclusion(
        "Does L-BFGS on moving mini-batches need curvature pairs formed on one function?",
        f"{word}: best test accuracy robust {_n(rb.best)} against faithful {_n(f.best)} "
        f"(difference {_n(diff)}; 'yes' above 0.01)",
        F_EPOCHS,
        weak,
    )


def _conclusions(run: RunData, rs: list[Reach], target: float) -> list[Conclusion]:
    weak, weak_e = _strength(run), _strength(run, epochs_only=True)
    out = []
    kinds = {r.sampler for r in rs}
    h = hypothesis_rule(rs)
    out.append(
        Conclusion(
            "Do second-order methods with mini-batches beat mini-batch first-order methods "
            "(the study's first hypothesis)?",
            _hypothesis_text(h, target),
            f"{T_REACH}; {F_TIME}; {F_EPOCHS}",
            weak,
        )
    )
    if "full" in kinds:
        hf = hypothesis_rule(rs, frozenset({"full"}))
        out.append(
            Conclusion(
                "And without sampling (the full objective every iteration)?",
                _hypothesis_text(hf, target),
                f"{T_REACH}; {F_TIME}",
                weak,
            )
        )
        full2 = _best([r for r in rs if r.sampler == "full" and not r.first_order], "time")
        mov2 = _best([r for r in rs if r.sampler in MOVING and not r.first_order], "time")
        if full2 is not None and mov2 is not None:
            ratio = mov2.time / full2.time if full2.time else None
            out.append(
                Conclusion(
                    "Does mini-batch sampling speed up the curvature methods themselves?",
                    f"{'yes' if ratio is not None and ratio < 1 / LEVEL else 'no'}: best on "
                    f"moving batches {_who(mov2, 'time')} against full batch "
                    f"{_who(full2, 'time')} (ratio {_ratio(ratio)}; 'yes' below "
                    f"{format_number(1 / LEVEL, 2)})",
                    F_TIME,
                    weak,
                )
            )
    if "fixed" in kinds and "full" in kinds:
        bf = max((r.best for r in rs if r.sampler == "fixed" and r.best is not None), default=None)
        bu = max((r.best for r in rs if r.sampler == "full" and r.best is not None), default=None)
        if bf is not None and bu is not None:
            out.append(
                Conclusion(
                    "What do fixed batches that cover part of the data cost?",
                    f"the best test accuracy under fixed batches is {_n(bf)} against {_n(bu)} "
                    f"on the full objective (difference {_n(bf - bu)})",
                    T_REACH,
                    weak_e,
                )
            )
    lb = _lbfgs_conclusion(rs, weak_e)
    if lb is not None:
        out.append(lb)
    return out


def sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The study's sections: conclusions, the table of times to the target, two figures."""
    h = ctx.h
    # the target is set by the runs the hypothesis is about (moving batches), when any
    first = _reaches(run, TARGET)
    pool = [r for r in first if r.sampler in MOVING] or first
    best = max((r.best for r in pool if r.best is not None), default=None)
    target = choose_target(best)
    rs = _reaches(run, target)
    out = [f"{h} Second-order methods with mini-batches\n"]
    out.append(conclusions_table(_conclusions(run, rs, target), h + "#"))
    note = (
        f"The target is test accuracy {format_spec_value(target)}"
        + (
            ""
            if target == TARGET
            else f" (no run on moving batches reached {format_spec_value(TARGET)}: 97% of "
            f"their best, {_n(best)})"
        )
        + ". Times are solver seconds without the metrics; epochs count the samples the "
        "accepted steps drew over m (line-search trials and curvature products are not "
        "counted, but their cost is in the time). ★ marks the fastest of each class per "
        "batch construction. Learning rates: the first-order methods run at several rates (one "
        "row each); the verdict takes the best run of each class.\n"
    )
    out.append(f"{h}# {T_REACH}\n")
    out.append(note)
    out.append(_reach_table(rs))
    if rs:
        out.append(f"{h}# {F_TIME}\n")
        out.append(_curves_figure(rs, "solver_time", ctx, target))
        out.append(f"{h}# {F_EPOCHS}\n")
        out.append(_curves_figure(rs, "epochs", ctx, target))
    return out
