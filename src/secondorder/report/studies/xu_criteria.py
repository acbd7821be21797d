"""Study ``xu-criteria``: Xu et al.'s six criteria for judging second-order methods (the study's
reference [20]), with Adam and SGD with momentum as the first-order references.

What the rules read:

- **sweeps**: every solver named ``"<method> · <key>=<value>"`` is one setting of that
  method's hyper-parameter sweep. The target T is test accuracy :data:`TARGET` (97% of the
  best any setting reached, rounded down to 0.01, when none reached it); each setting is
  timed to its first record with test accuracy ≥ T (``solver_time``, the solver's clock
  without the metrics, and epochs).
- **computational efficiency**: a method's fastest setting; its time over the fastest
  first-order method's.
- **robustness**: the fraction of a method's settings that reach T.
- **generalisation**: a method's best test accuracy over its sweep, and train − test
  accuracy at the end of the setting that reached it.
- **saddles** (cells on ``data.kind = "strict-saddle"``): from each start, whether a method
  reaches f* (f − f* ≤ :data:`SADDLE_TOL`·|f*|), leaves the saddle without converging (f fell
  by more than 1% of |f*|), or stays.
- **sub-sampling** (cells of solvers not in a sweep, each a choice of gradient and curvature
  samples): time to T per method and cell, against the cell with full gradient and
  curvature.
- **among second-order methods**: ranked by time to T, then by the fraction of the sweep
  reaching it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from secondorder._format import format_number, format_spec_value
from secondorder.report.rundata import RunData
from secondorder.report.studies import (
    Conclusion,
    StudyContext,
    conclusions_table,
    inside_study_suite,
)
from secondorder.report.studies import xu_criteria_figures as figs
from secondorder.report.studies.minibatch import FIRST_ORDER
from secondorder.report.studies.xu_criteria_rules import (
    SADDLE_TOL,
    TARGET,
    MethodSweep,
    SaddleOutcome,
    Setting,
    Twin,
    is_function,
    method_sweeps,
    rank_second_order,
    run_cells,
    saddle_outcomes,
    study_target,
    sub_speedups,
    subsampling_reaches,
    sweep_settings,
    twin_runs,
)
from secondorder.report.text import md_table

__all__ = [
    "F_BEST",
    "F_GRID",
    "F_SADDLE",
    "T_SADDLE",
    "T_SUB",
    "T_SUMMARY",
    "T_SWEEP",
    "sections",
]

T_SUMMARY = "Table X0: the six criteria at a glance"
T_SWEEP = "Table X1: every setting of every sweep"
T_SUB = "Table X2: full against sub-sampled gradients and curvature"
T_SADDLE = "Table X3: leaving the strict saddle"
F_BEST = figs.F_BEST
F_GRID = figs.F_GRID
F_SADDLE = figs.F_SADDLE


# -- tables -----------------------------------------------------------------------------------
def _n(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else format_number(v, digits)


def _fastest_first_order(sweeps: Sequence[MethodSweep]) -> Setting | None:
    hits = [m.fastest for m in sweeps if m.first_order and m.fastest]
    return min(hits, key=lambda s: s.reach.time) if hits else None


def _saddle_cell(outcomes: Sequence[SaddleOutcome], name: str) -> str:
    mine = [o for o in outcomes if o.solver == name]
    if not mine:
        return "—"
    return f"{sum(o.reached for o in mine)}/{len(mine)} starts"


def _sub_cell(subs: dict, name: str) -> str:
    cells = subs.get(name)
    if not cells:
        return "—"
    full, best = sub_speedups(cells)
    if best is None:
        return "no sub-sampled cell reaches T"
    if full is None or full.time is None:
        return f"only sub-sampled: {_n(best.time)} s"
    return f"{_n(best.time / full.time, 2)}× the time"


def _summary_table(sweeps, outcomes, subs) -> str:
    ref = _fastest_first_order(sweeps)
    ranks = {m.group: i + 1 for i, m in enumerate(rank_second_order(sweeps))}
    names = [m.group for m in sweeps]
    names += [o.solver for o in outcomes if o.solver not in names]
    names = list(dict.fromkeys(names + [n for n in subs if n not in names]))
    by_name = {m.group: m for m in sweeps}
    methods = {o.solver: o.method for o in outcomes}
    methods.update({n: r.method for n, cells in subs.items() for r in cells.values()})
    rows = []
    for name in names:
        m = by_name.get(name)
        eff = rob = gen = "—"
        first = m.first_order if m is not None else methods.get(name) in FIRST_ORDER
        cls = "first-order" if first else "second-order"
        if m is not None:
            f = m.fastest
            if f is None:
                eff = "never reaches T"
            else:
                ratio = f.reach.time / ref.reach.time if ref and ref.reach.time else None
                eff = f"{_n(f.reach.time)} s ({f.setting}), ×{_n(ratio, 2)}"
            rob = f"{len(m.reached)}/{len(m.settings)}"
            acc = m.most_accurate
            gen = f"{_n(acc.reach.best)} (gap {_n(m.gap, 2)})" if acc else "—"
        rank = str(ranks[name]) if name in ranks else "—"
        rows.append(
            [name, cls, eff, rob, _saddle_cell(outcomes, name), gen, _sub_cell(subs, name), rank]
        )
    header = [
        "method",
        "class",
        "1 efficiency: s to T (setting), × fastest first-order",
        "2 robustness: settings reaching T",
        "3 saddle: starts reaching f*",
        "4 generalisation: best test acc (train − test)",
        "5 sub-sampling: fastest sub-sampled cell / full",
        "6 rank among second-order",
    ]
    return md_table(header, rows, "ll" + "r" * 6)


def _sweep_table(settings: Sequence[Setting]) -> str:
    header = ["method", "setting", "part", "s to T", "epochs to T", "best test acc"]
    header += ["final test acc", "final train acc", "status"]
    rows = [
        [
            s.group,
            s.setting,
            s.part,
            _n(s.reach.time),
            _n(s.reach.epochs),
            _n(s.reach.best),
            _n(s.reach.final),
            _n(s.final_train),
            s.status,
        ]
        for s in settings
    ]
    return md_table(header, rows, "lll" + "r" * 5 + "l")


def _sub_table(subs: dict) -> str:
    keys = list(dict.fromkeys(k for cells in subs.values() for k in cells))
    header = ["method"] + [f"g: {g}, H: {h}" for g, h in keys]
    rows = []
    for name, cells in subs.items():
        row = [name]
        for k in keys:
            r = cells.get(k)
            if r is None:
                row.append("—")
            elif r.time is None:
                row.append(f"not reached (best {_n(r.best)})")
            else:
                row.append(f"{_n(r.time)} s, {_n(r.epochs)} ep.")
        rows.append(row)
    return md_table(header, rows, "l" + "r" * len(keys))


def _saddle_table(outcomes: Sequence[SaddleOutcome]) -> str:
    starts = sorted({o.start for o in outcomes})
    names = list(dict.fromkeys(o.solver for o in outcomes))
    header = ["method"] + [f"‖x₀‖ = {format_spec_value(s)}" for s in starts]
    rows = []
    for name in names:
        row = [name]
        for st in starts:
            o = next((o for o in outcomes if o.solver == name and o.start == st), None)
            row.append("—" if o is None else f"{o.word} ({o.status})")
        rows.append(row)
    return md_table(header, rows, "l" + "l" * len(starts))


# -- conclusions ------------------------------------------------------------------------------
def _weak(run: RunData, twins: Sequence[Twin] = ()) -> str:
    cell = next((c for _, c in run_cells(run) if not is_function(c)), None)
    spec = cell.spec if cell else run.spec
    data = spec.get("data") or {}
    n_seeds = len({c.seed for _, c in run_cells(run) if not is_function(c)}) or 1
    # with several seeds each (setting, seed) pair counts once in the fractions
    bits = ["one seed" if n_seeds == 1 else f"{n_seeds} seeds, each (setting, seed) counted"]
    if data.get("n_train"):
        bits.append(f"{data['n_train']:,} training images")
    if data.get("n_test"):
        se = math.sqrt(0.8 * 0.2 / data["n_test"])
        bits.append(f"{data['n_test']:,} test images (standard error ≈ {format_number(se, 1)})")
    if twins:
        worst = max(twins, key=lambda t: t.ratio)
        bits.append(
            f"timing noise: one computation timed twice differed by up to ×"
            f"{format_number(worst.ratio, 2)} ({worst.first.solver}: "
            f"{format_number(worst.first.time, 3)} s and {format_number(worst.second.time, 3)} s)"
        )
    else:
        bits.append("times from one run on a possibly shared machine")
    return "weak: " + ", ".join(bits)


def _list(ms: Sequence[MethodSweep]) -> str:
    return ", ".join(f"{m.group} {len(m.reached)}/{len(m.settings)}" for m in ms) or "none"


def _efficiency(sweeps, target, weak) -> Conclusion:
    ref = _fastest_first_order(sweeps)
    second = [m.fastest for m in sweeps if not m.first_order and m.fastest]
    best2 = min(second, key=lambda s: s.reach.time) if second else None
    if best2 is None:
        finding = "no second-order setting reaches T"
    elif ref is None:
        finding = f"only second-order settings reach T; fastest {best2.group} ({best2.setting})"
    else:
        ratio = best2.reach.time / ref.reach.time
        word = "second-order faster" if ratio < 1 else "first-order faster"
        finding = (
            f"{word}: the fastest second-order setting, {best2.group} {best2.setting}, takes "
            f"{_n(best2.reach.time)} s ({_n(best2.reach.epochs)} epochs) against "
            f"{ref.group} {ref.setting}'s {_n(ref.reach.time)} s ({_n(ref.reach.epochs)} "
            f"epochs): ×{_n(ratio, 2)}"
        )
    return Conclusion(
        f"1. Computational efficiency: which tuned method reaches test accuracy "
        f"{format_spec_value(target)} first?",
        finding,
        f"{T_SUMMARY}; {T_SWEEP}; {F_BEST}",
        weak,
    )


def _robustness(sweeps, weak) -> Conclusion:
    first = [m for m in sweeps if m.first_order]
    second = [m for m in sweeps if not m.first_order]

    def mean(ms):
        return sum(m.fraction for m in ms) / len(ms) if ms else None

    return Conclusion(
        "2. Robustness: what fraction of each method's hyper-parameter sweep reaches T?",
        f"second-order mean {_n(mean(second), 2)} ({_list(second)}); first-order mean "
        f"{_n(mean(first), 2)} ({_list(first)})",
        f"{T_SUMMARY}; {F_GRID}",
        weak,
    )


def _saddles(outcomes: Sequence[SaddleOutcome]) -> Conclusion | None:
    if not outcomes:
        return None
    names = list(dict.fromkeys(o.solver for o in outcomes))
    all_ok = [n for n in names if all(o.reached for o in outcomes if o.solver == n)]
    at0 = [o for o in outcomes if o.start == 0.0]
    stuck0 = [o.solver for o in at0 if not o.reached]
    n_starts = len({o.start for o in outcomes})
    finding = f"reach f* from all {n_starts} starts: {', '.join(all_ok) or 'none'}"
    if at0:
        finding += f"; started on the saddle itself, {', '.join(stuck0) or 'none'} stay there"
    return Conclusion(
        "3. Escaping saddle points: which methods leave a strict saddle for the minimum?",
        finding,
        f"{T_SADDLE}; {F_SADDLE}",
        "one synthetic 10-D function, one rotation; on networks see studies/depth",
    )


def _generalisation(sweeps, weak) -> Conclusion | None:
    scored = [(m, m.most_accurate) for m in sweeps if m.most_accurate]
    if not scored:
        return None
    best1 = max((a for m, a in scored if m.first_order), key=lambda a: a.reach.best, default=None)
    best2 = max(
        (a for m, a in scored if not m.first_order), key=lambda a: a.reach.best, default=None
    )
    gaps1 = [m.gap for m, _ in scored if m.first_order and m.gap is not None]
    gaps2 = [m.gap for m, _ in scored if not m.first_order and m.gap is not None]

    def who(a):
        return "—" if a is None else f"{a.group} {a.setting} {_n(a.reach.best)}"

    def mean(v):
        return sum(v) / len(v) if v else None

    return Conclusion(
        "4. Generalisation: do second-order methods reach worse test accuracy?",
        f"best test accuracy, second-order {who(best2)} against first-order {who(best1)}; "
        f"mean train − test gap at the end {_n(mean(gaps2), 2)} against {_n(mean(gaps1), 2)}",
        f"{T_SUMMARY}; {T_SWEEP}",
        weak,
    )


def _subsampling(subs, weak) -> Conclusion | None:
    bits = []
    for name, cells in subs.items():
        full, best = sub_speedups(cells)
        if best is None:
            bits.append(f"{name}: no sub-sampled cell reaches T")
        elif full is None or full.time is None:
            bits.append(f"{name}: only sub-sampled cells reach T (fastest g: {best.sampler})")
        else:
            key = next(k for k, r in cells.items() if r is best)
            bits.append(
                f"{name}: {_n(best.time / full.time, 2)}× the full cell's time "
                f"(g: {key[0]}, H: {key[1]})"
            )
    if not bits:
        return None
    return Conclusion(
        "5. Sub-sampling: does sub-sampling the gradient and the curvature pay?",
        "; ".join(bits),
        T_SUB,
        weak,
    )


def _comparison(sweeps, weak) -> Conclusion | None:
    ranked = rank_second_order(sweeps)
    if not ranked:
        return None
    text = ", ".join(
        f"{i + 1}. {m.group} ({_n(m.fastest.reach.time) + ' s' if m.fastest else 'never'}, "
        f"{len(m.reached)}/{len(m.settings)})"
        for i, m in enumerate(ranked)
    )
    return Conclusion(
        "6. Among the second-order methods, which is best here?",
        f"by time to T, then robustness: {text}",
        f"{T_SUMMARY}; {F_BEST}; {F_GRID}",
        weak,
    )


def sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The study's sections: conclusions, the six-criteria table, then each criterion's table
    and figure."""
    if inside_study_suite(run, ctx, "xu-criteria"):
        return []
    target = study_target(run)
    settings = sweep_settings(run, target)
    sweeps = method_sweeps(settings)
    outcomes = saddle_outcomes(run)
    subs = subsampling_reaches(run, target)
    weak = _weak(run, twin_runs(settings, subs))
    items = [_efficiency(sweeps, target, weak), _robustness(sweeps, weak)] if sweeps else []
    items += [c for c in (_saddles(outcomes), _generalisation(sweeps, weak)) if c]
    items += [c for c in (_subsampling(subs, weak), _comparison(sweeps, weak)) if c]
    h = ctx.h
    out = [f"{h} Xu et al.'s six criteria\n", conclusions_table(items, h + "#")]
    note = f"T is test accuracy {format_spec_value(target)}" + (
        "" if target == TARGET else f" (no setting reached {format_spec_value(TARGET)})"
    )
    if settings or subs:  # a saddle-only run has no target
        out.append(
            f"{note}. Times are solver seconds without the metrics; epochs count the samples "
            "the accepted steps drew over m. Each sweep varies one hyper-parameter of one "
            "method; Table X1 lists its values.\n"
        )
    out.append(f"{h}# {T_SUMMARY}\n")
    out.append(_summary_table(sweeps, outcomes, subs))
    if settings:
        out.append(f"{h}# {T_SWEEP}\n")
        out.append(_sweep_table(settings))
        out.append(figs.best_figure(sweeps, target, ctx))
        out.append(figs.grid_figure(sweeps, ctx))
    if subs:
        out.append(f"{h}# {T_SUB}\n")
        out.append(_sub_table(subs))
    if outcomes:
        out.append(f"{h}# {T_SADDLE}\n")
        f_star = outcomes[0].f_star
        out.append(
            f"f* = {format_number(f_star, 6)}; a start reaches it when f − f* ≤ "
            f"{format_spec_value(SADDLE_TOL)}·|f*|. The solver's status in brackets.\n"
        )
        out.append(_saddle_table(outcomes))
        out.append(figs.saddle_figure(outcomes, ctx))
    return out
