"""Study ``preconditioning``: the study's third open question (section 5.1).

Newton-CG, NLCG and L-BFGS, each without a preconditioner and with the eq.-14 diagonal,
|diag H|, diag G and K-FAC (section 2.1, eqs. 7-14), on each problem of the run. What the
rules read, per problem and method:

- **the target** T: the best configuration c* is the one with the lowest final f (the training
  objective: full batch, so f is the whole training loss with its L2 term); T is the f that c*
  had reached at half its iterations, f_{c*}(⌊K*/2⌋). Every configuration is timed to the first
  iteration with f ≤ T (iterations, and ``solver_time`` seconds at that row);
- **the winner** by iterations (by seconds) is the configuration reaching T in the fewest
  iterations (seconds), ties broken by the other count;
- **slower than none**: a preconditioner that misses T while "none" reaches it, or reaches it
  later in seconds;
- **the block structure** (Appendix B): from the ``layer_block_structure`` metric, the fraction
  ‖diag B_l‖_F/‖B_l‖_F a diagonal keeps of each exact layer block B_l (H_l or G_l), so that
  the diagonal's relative error is √(1 − ρ²), set against K-FAC's ‖G_l − G^K⊗A‖_F/‖G_l‖_F,
  at θ₀ and at every run's θ_end.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from secondorder._format import format_number
from secondorder.report.rundata import CellRun, RunData
from secondorder.report.studies import (
    Conclusion,
    StudyContext,
    conclusions_table,
    inside_study_suite,
)
from secondorder.report.studies import preconditioning_figures as figs
from secondorder.report.text import md_table

__all__ = [
    "Config",
    "ToTarget",
    "block_values",
    "configs",
    "kfac_closer",
    "sections",
    "slower_than_none",
    "target_level",
    "to_target",
    "winner",
]

#: the preconditioners in table order, with their labels
PRECONDITIONERS = {
    "none": "none",
    "eq14": "eq. 14",
    "hessian-diag": "|diag H|",
    "ggn-diag": "diag G",
    "kfac": "K-FAC",
}
DIAGONALS = ("eq14", "hessian-diag", "ggn-diag")
METHODS = {"newton-cg": "Newton-CG", "nlcg": "NLCG", "lbfgs": "L-BFGS"}
#: the metric columns of ``layer_block_structure``
BLOCK_KEYS = ("diag_fraction_h", "diag_fraction_ggn", "kfac_error_ggn", "kfac_error_h")

T_ITER = "Table P1: iterations and seconds to the target loss"
T_BLOCK = "Table P2: what each preconditioner's form keeps of the layer blocks"
F_BLOCK = "Figure P2: distance of the diagonal and K-FAC forms from the layer blocks"


def _f_loss(title: str) -> str:
    return f"Figure P1 ({title}): training loss against iterations and seconds"


# -- reading the runs -------------------------------------------------------------------------
@dataclass
class Config:
    """One solver run, reduced to what the rules read: (k, f, seconds) along the run."""

    name: str
    method: str
    preconditioner: str
    ks: list[int]
    fs: list[float]
    ts: list[float]
    status: str = "done"

    @property
    def final(self) -> float:
        return self.fs[-1] if self.fs else math.inf

    @property
    def per_iteration(self) -> float | None:
        return self.ts[-1] / self.ks[-1] if self.ks and self.ks[-1] > 0 else None


def configs(cell: CellRun) -> list[Config]:
    """The cell's solvers of the study's methods, with their preconditioner."""
    out = []
    for s in cell.solvers:
        if s.method not in METHODS:
            continue
        ks, fs, ts = [], [], []
        for r in s.rows:
            f, t = r.get("f"), r.get("solver_time", r.get("time"))
            if _finite(f) and _finite(t):
                ks.append(int(r.get("k", len(ks))))
                fs.append(float(f))
                ts.append(float(t))
        pre = s.options.get("preconditioner") or "none"
        status = str(s.summary.get("status", "done"))
        out.append(Config(s.name, s.method, str(pre), ks, fs, ts, status))
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- the rules --------------------------------------------------------------------------------
@dataclass
class ToTarget:
    """One configuration against its method's target T."""

    method: str
    preconditioner: str
    target: float
    iterations: int | None
    seconds: float | None
    final: float
    per_iteration: float | None

    @property
    def reached(self) -> bool:
        return self.iterations is not None


def target_level(cfgs: Sequence[Config]) -> float:
    """T: the f the configuration with the lowest final f had at half its iterations."""
    runs = [c for c in cfgs if c.fs]
    if not runs:
        return math.nan
    best = min(runs, key=lambda c: c.final)
    half = best.ks[-1] // 2
    return min(f for k, f in zip(best.ks, best.fs) if k <= half)


def _first_reach(c: Config, target: float) -> tuple[int | None, float | None]:
    for k, f, t in zip(c.ks, c.fs, c.ts):
        if f <= target:
            return k, t
    return None, None


def none_level(cfgs: Sequence[Config]) -> float:
    """T_none: the final f of the unpreconditioned run (nan without one)."""
    none = [c for c in cfgs if c.preconditioner == "none" and c.fs]
    return none[0].final if none else math.nan


def to_target(cfgs: Sequence[Config], level=target_level) -> dict[str, list[ToTarget]]:
    """Per method, every configuration's iterations and seconds to the method's target
    ``level(configurations of the method)`` (:func:`target_level` or :func:`none_level`)."""
    out: dict[str, list[ToTarget]] = {}
    for method in _ordered({c.method for c in cfgs}, METHODS):
        mine = sorted(
            (c for c in cfgs if c.method == method), key=lambda c: _rank(c.preconditioner)
        )
        target = level(mine)
        rows = []
        for c in mine:
            k, t = _first_reach(c, target)
            rows.append(ToTarget(method, c.preconditioner, target, k, t, c.final, c.per_iteration))
        out[method] = rows
    return out


def _rank(pre: str) -> int:
    keys = list(PRECONDITIONERS)
    return keys.index(pre) if pre in keys else len(keys)


def _ordered(items, order: dict) -> list[str]:
    keys = list(order)
    return sorted(items, key=lambda m: (keys.index(m) if m in keys else len(keys), m))


def winner(rows: Sequence[ToTarget], by: str) -> ToTarget | None:
    """The configuration reaching T first ``by`` "iterations" or "seconds" (None if none
    reaches it); ties go to the other count, then to the lower final f."""
    reached = [r for r in rows if r.reached]
    if not reached:
        return None
    other = "seconds" if by == "iterations" else "iterations"
    return min(reached, key=lambda r: (getattr(r, by), getattr(r, other), r.final))


def slower_than_none(rows: Sequence[ToTarget]) -> list[tuple[str, str]]:
    """(preconditioner, why) for each that misses T while "none" reaches it, or reaches T
    later in seconds than "none". When "none" misses T too, those that also miss it and end
    at a higher f than "none" ("ends above none"). [] without a "none" run."""
    none = next((r for r in rows if r.preconditioner == "none"), None)
    if none is None:
        return []
    out = []
    for r in rows:
        if r.preconditioner == "none":
            continue
        if not none.reached:
            if not r.reached and r.final > none.final:
                out.append((r.preconditioner, "ends above none"))
        elif not r.reached:
            out.append((r.preconditioner, "misses the target"))
        elif r.seconds > none.seconds:
            fewer = r.iterations < none.iterations
            why = "fewer iterations but more seconds" if fewer else "more seconds"
            out.append((r.preconditioner, why))
    return out


def block_values(cell: CellRun) -> dict[str, dict[str, list]]:
    """Per metric of ``layer_block_structure``: its value at θ₀ (``"start"``, the first
    recorded row) and at every run's θ_end (``"end"``, one value per run)."""
    out: dict[str, dict[str, list]] = {}
    for key in (*BLOCK_KEYS, "layer_block_fraction"):
        start, end = None, []
        for s in cell.solvers:
            vals = [r[key] for r in s.rows if key in r]
            if not vals:
                continue
            start = vals[0] if start is None else start
            end.append(vals[-1])
        if start is not None:
            out[key] = {"start": [start], "end": end}
    return out


def _per_layer_median(values: list) -> list[float]:
    """Layer by layer, the median over runs of per-layer lists."""
    return [statistics.median(v[i] for v in values) for i in range(len(values[0]))]


def kfac_closer(blocks: dict[str, dict[str, list]], where: str) -> tuple[int, int]:
    """(layers where K-FAC's G^K⊗A is closer to the Gauss–Newton block G_l than G_l's
    diagonal, layers) at ``where`` ("start" or "end", the median over runs): K-FAC's error
    ‖G_l − G^K⊗A‖/‖G_l‖ against the diagonal's √(1 − ρ_l²)."""
    rho = _per_layer_median(blocks["diag_fraction_ggn"][where])
    kfac = _per_layer_median(blocks["kfac_error_ggn"][where])
    closer = sum(e < math.sqrt(max(0.0, 1 - r * r)) for r, e in zip(rho, kfac))
    return closer, len(rho)


# -- the report -------------------------------------------------------------------------------
@dataclass
class Problem:
    """One problem (a cell) of the run and what the rules found on it."""

    title: str
    slug: str
    cell: CellRun
    results: dict[str, list[ToTarget]] = field(default_factory=dict)
    #: the same against T_none, the unpreconditioned run's final f
    vs_none: dict[str, list[ToTarget]] = field(default_factory=dict)
    figure: Path | None = None


def _problems(run: RunData) -> list[tuple[str, CellRun]]:
    if run.is_suite:
        return [
            (name if len(p.cells) == 1 else f"{name}, {c.label}", c)
            for name, p in run.parts
            for c in p.cells
        ]
    return [(run.name if len(run.cells) == 1 else c.label, c) for c in run.cells]


def _describe(cell: CellRun) -> str:
    spec = cell.spec
    data, model = spec.get("data") or {}, spec.get("model") or {}
    kind = {"fashion-mnist": "Fashion-MNIST", "random": "random data"}.get(
        data.get("kind"), str(data.get("kind"))
    )
    n = data.get("n_train")
    hidden = "-".join(str(h) for h in model.get("hidden", []))
    size = f"{format_number(int(n))} samples, " if n else ""
    return f"{kind}, hidden widths {hidden or '—'}, {size}{spec.get('max_iter')} iterations"


def sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The study's sections: conclusions, then per problem its table and figure, then the
    layer-block structure."""
    if inside_study_suite(run, ctx, "preconditioning"):
        return []
    problems = []
    for title, cell in _problems(run):
        cfgs = configs(cell)
        p = Problem(title, _slug(title), cell, to_target(cfgs), to_target(cfgs, none_level))
        if p.results:
            problems.append(p)
    if not problems:
        return [f"{ctx.h} Preconditioning\n\nNo runs of Newton-CG, NLCG or L-BFGS to compare.\n"]
    for p in problems:
        path = ctx.figure(f"precond-{p.slug}-loss")
        p.figure = figs.loss_figure(p, configs(p.cell), PRECONDITIONERS, METHODS, path)
    blocks = next(
        ((p, b) for p in problems if (b := block_values(p.cell)).get("diag_fraction_ggn")), None
    )
    block_fig = figs.block_figure(blocks[1], ctx.figure("precond-blocks")) if blocks else None
    items = _conclusions(problems, blocks, run)
    out = [f"{ctx.h} Preconditioning (open question 3)\n", conclusions_table(items, ctx.h + "#")]
    out.append(_target_rule(ctx))
    for p in problems:
        out.append(f"{ctx.h}# {T_ITER}: {p.title}\n\n{_describe(p.cell)}.\n")
        out.append(_iteration_table(p))
        out.append(ctx.link(p.figure, _f_loss(p.title)))
    if blocks:
        out.append(f"{ctx.h}# {T_BLOCK} ({blocks[0].title})\n")
        out.append(figs.block_table(blocks[1]))
        out.append(ctx.link(block_fig, F_BLOCK))
    return out


def _slug(title: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")


def _target_rule(ctx: StudyContext) -> str:
    return (
        "**The target.** Per problem and method, the configuration with the lowest final "
        "training loss f sets it: T is the f it had reached at half its iterations. Each "
        "configuration is timed to its first iteration with f ≤ T (iterations, and solver "
        'seconds at that row, preconditioner updates included); "—" means it never got '
        "there.\n"
    )


def _cell(v, digits: int = 3) -> str:
    return "—" if v is None else format_number(v, digits)


def _iteration_table(p: Problem) -> str:
    rows = []
    for method, res in p.results.items():
        none = next((r for r in res if r.preconditioner == "none"), None)
        for r, v in zip(res, p.vs_none.get(method, [None] * len(res))):
            cost = (
                r.per_iteration / none.per_iteration
                if none and r.per_iteration and none.per_iteration
                else None
            )
            rows.append(
                [
                    METHODS.get(method, method),
                    _label(r.preconditioner).replace("|", "\\|"),
                    format_number(r.target, 4),
                    _cell(r.iterations),
                    _cell(r.seconds),
                    "—" if v is None else _cell(v.iterations),
                    "—" if v is None else _cell(v.seconds),
                    format_number(r.final, 4),
                    _cell(r.per_iteration),
                    "—" if cost is None else f"×{format_number(cost, 3)}",
                ]
            )
    header = ["method", "preconditioner", "target T", "iterations to T", "seconds to T"]
    header += ["iterations to T_none", "seconds to T_none", "final f"]
    header += ["seconds / iteration", "cost / iteration vs none"]
    return md_table(header, rows, "llrrrrrrrr")


# -- conclusions ------------------------------------------------------------------------------
def _label(pre: str) -> str:
    return PRECONDITIONERS.get(pre, pre)


def _strength(p: Problem, run: RunData) -> str:
    """What weakens one problem's evidence: one seed, a small subset, a short run, a loaded
    machine for the seconds."""
    spec = p.cell.spec
    bits = ["one seed"]
    n = (spec.get("data") or {}).get("n_train")
    if n is not None and int(n) < 5000:
        bits.append(f"few samples ({format_number(int(n))})")
    if int(spec.get("max_iter", 0)) < 50:
        bits.append(f"short run ({spec.get('max_iter')} iterations)")
    return ", ".join(bits)


def _timing_note(run: RunData) -> str:
    envs = [run.environment] + [part.environment for _, part in run.parts]
    loads = [
        (e.get("load_average") or [0])[0] / max(1, int(e.get("cpu_count") or 1)) for e in envs if e
    ]
    if loads and max(loads) > 1:
        return f"; seconds from a loaded machine (load {format_number(max(loads), 2)} per core)"
    return "; seconds from one run"


def _winner_text(p: Problem, by: str) -> str:
    bits = []
    for method, res in p.results.items():
        w = winner(res, by)
        if w is None:
            bits.append(f"{METHODS.get(method, method)}: none reaches T")
            continue
        amount = f"{w.iterations} it." if by == "iterations" else f"{_cell(w.seconds)} s"
        bits.append(f"{METHODS.get(method, method)}: {_label(w.preconditioner)} ({amount})")
    return f"{p.title}: " + "; ".join(bits)


def _slower_text(p: Problem) -> str:
    bits = []
    for method, res in p.vs_none.items():
        slow = slower_than_none(res)
        none = next((r for r in res if r.preconditioner == "none"), None)
        name = METHODS.get(method, method)
        if none is None:
            bits.append(f"{name}: no unpreconditioned run")
        elif slow:
            bits.append(f"{name}: " + ", ".join(f"{_label(pre)} ({why})" for pre, why in slow))
        else:
            bits.append(f"{name}: no")
        if none is not None and not none.reached:
            bits[-1] += " (none misses T itself)"
    return f"{p.title}: " + "; ".join(bits)


def _cost_text(p: Problem) -> str:
    ratios: dict[str, list[float]] = {}
    for res in p.results.values():
        none = next((r for r in res if r.preconditioner == "none"), None)
        if none is None or not none.per_iteration:
            continue
        for r in res:
            if r.preconditioner != "none" and r.per_iteration:
                ratios.setdefault(r.preconditioner, []).append(r.per_iteration / none.per_iteration)
    bits = [
        f"{_label(pre)} ×{format_number(statistics.median(v), 3)}"
        for pre, v in sorted(ratios.items(), key=lambda kv: _rank(kv[0]))
    ]
    return f"{p.title}: " + (", ".join(bits) if bits else "no unpreconditioned run to compare")


def _kfac_beats_diagonals(res: Sequence[ToTarget]) -> bool:
    """K-FAC reaches T in fewer iterations than every diagonal (a diagonal that misses T
    counts as slower); when no one reaches T, K-FAC's final f is the lowest."""
    kfac = next((r for r in res if r.preconditioner == "kfac"), None)
    diags = [r for r in res if r.preconditioner in DIAGONALS]
    if kfac is None or not diags:
        return False
    if not kfac.reached:
        return not any(d.reached for d in diags) and all(kfac.final < d.final for d in diags)
    return all(not d.reached or kfac.iterations < d.iterations for d in diags)


def _conclusions(problems: list[Problem], blocks, run: RunData) -> list[Conclusion]:
    timing = _timing_note(run)
    items = []
    for p in problems:
        fig = f"{T_ITER}: {p.title}; {_f_loss(p.title)}"
        strength = _strength(p, run)
        items += [
            Conclusion(
                "Which preconditioner reaches the target in the fewest iterations?",
                _winner_text(p, "iterations"),
                fig,
                strength,
            ),
            Conclusion(
                "Which reaches it in the fewest seconds?",
                _winner_text(p, "seconds"),
                fig,
                strength + timing,
            ),
            Conclusion(
                "Is any preconditioner slower than none (seconds to T_none, the final loss "
                "of the unpreconditioned run)?",
                _slower_text(p),
                fig,
                strength + timing,
            ),
            Conclusion(
                "What does a preconditioner cost per iteration (median over methods, × none)?",
                _cost_text(p),
                f"{T_ITER}: {p.title}",
                strength + timing,
            ),
        ]
    if blocks:
        items += _block_conclusions(problems, *blocks)
    return items


def _span(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    if format_number(lo, 2) == format_number(hi, 2):
        return format_number(lo, 2)
    return f"{format_number(lo, 2)}–{format_number(hi, 2)}"


def _block_conclusions(problems: list[Problem], where: Problem, blocks) -> list[Conclusion]:
    rho0 = _per_layer_median(blocks["diag_fraction_h"]["start"])
    rho1 = _per_layer_median(blocks["diag_fraction_h"]["end"])
    g0 = _per_layer_median(blocks["diag_fraction_ggn"]["start"])
    g1 = _per_layer_median(blocks["diag_fraction_ggn"]["end"])
    c0, n_layers = kfac_closer(blocks, "start")
    c1, _ = kfac_closer(blocks, "end")
    n_runs = len(blocks["diag_fraction_h"]["end"])
    strength = f"one small network ({where.title}), {n_layers} layers, θ_end of {n_runs} runs"
    diag_text = (
        f"‖diag H_l‖/‖H_l‖ = {_span(rho0)} over the layers at θ₀ and {_span(rho1)} at θ_end "
        f"(median over runs); for G_l {_span(g0)} and {_span(g1)}: a diagonal drops "
        f"√(1−ρ²) = {_span([math.sqrt(max(0.0, 1 - r * r)) for r in rho0 + rho1])} of each "
        "block, the couplings Σ_i (x_i x_iᵀ) ⊗ H_Z⁽ⁱ⁾ of eq. 78 between a unit's inputs"
    )
    kfac_text = f"in {c0} of {n_layers} layers at θ₀ and {c1} of {n_layers} at θ_end"
    if "layer_block_fraction" in blocks:
        lb = blocks["layer_block_fraction"]
        kfac_text += (
            f"; the layer blocks hold {_span(lb['start'])} of ‖H‖_F at θ₀ and "
            f"{_span(lb['end'])} at θ_end (the rest is cross-layer)"
        )
    closer_majority = 2 * (c0 + c1) > 2 * n_layers
    agree = []
    for p in problems:
        wins = sum(_kfac_beats_diagonals(res) for res in p.results.values())
        agree.append(f"{p.title}: K-FAC beats every diagonal in {wins} of {len(p.results)}")
    votes = [
        2 * sum(_kfac_beats_diagonals(res) for res in p.results.values()) > len(p.results)
        for p in problems
    ]
    verdict = (
        "consistent"
        if closer_majority and all(votes)
        else "partly consistent"
        if closer_majority and any(votes)
        else "not borne out"
    )
    return [
        Conclusion(
            "Appendix B: how much of a layer's Hessian block does a diagonal hold?",
            diag_text,
            T_BLOCK + "; " + F_BLOCK,
            strength,
        ),
        Conclusion(
            "Is K-FAC's Kronecker form (eq. 78 with H_Z and x x ᵀ averaged apart) closer to "
            "the Gauss–Newton block than its diagonal?",
            kfac_text,
            T_BLOCK + "; " + F_BLOCK,
            strength,
        ),
        Conclusion(
            "Do the runs agree with the block structure (a preconditioner that keeps the "
            "within-layer couplings needs fewer iterations)?",
            f"{verdict}: " + "; ".join(agree) + " methods (iterations to T)",
            T_ITER + "; " + T_BLOCK,
            "one seed per problem; the block analysis on the small network only",
        ),
    ]
