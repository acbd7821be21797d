"""The study's claims, each checked against a run by an explicit rule.

A :class:`Claim` quotes one statement of the study (Veitch, "Second order optimisation methods
in Deep Learning with applications on the Fashion MNIST dataset"), names where it is made, and
carries a rule: a function of the run's cells that returns a :class:`Finding` — the numbers
we found and a verdict — or None when the run lacks what the rule needs. The verdicts are

``confirmed``
    our run shows what the study states (within the tolerance the rule states);
``not confirmed``
    our run shows the opposite, or nothing of it;
``partly``
    the rule holds for some of the solvers it names and not for the others;
``differs``
    a tie where the study states an order, or the same behaviour at another level (higher
    accuracies than the study's, a cost ratio past its "about twice");
``not comparable``
    the claim is made after a number of iterations (``Claim.iterations``) that the run's
    budget does not reach: our numbers are shown, with the two counts, but not judged. A run
    allowed more iterations is read at the claim's count, so like is set beside like.

Rules read traces only (:mod:`secondorder.report.rundata`), so every verdict is recomputed
from the run directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from secondorder.report.measures import (
    budget,
    first_k,
    group_key,
    group_label,
    last_k,
    s_per_iter,
)
from secondorder.report.paper.published import TABLES
from secondorder.report.rundata import (
    CellRun,
    RunData,
    SolverRun,
    convergence_iteration,
    final_value,
)
from secondorder.report.text import format_number as num
from secondorder.report.text import value_label

__all__ = [
    "CLAIMS",
    "CONFIRMED",
    "NOT_COMPARABLE",
    "NOT_CONFIRMED",
    "VERDICTS",
    "Claim",
    "Finding",
    "claims_for",
    "iteration_mismatch",
    "value_at",
    "verdicts",
]

CONFIRMED, NOT_CONFIRMED, PARTLY, DIFFERS = "confirmed", "not confirmed", "partly", "differs"
NOT_COMPARABLE = "not comparable"
#: every verdict, in the order the summaries count them
VERDICTS = (CONFIRMED, PARTLY, DIFFERS, NOT_CONFIRMED, NOT_COMPARABLE)


@dataclass(frozen=True)
class Finding:
    """What a rule found: our numbers in words, the verdict, and the rule that decided it."""

    ours: str
    verdict: str
    rule: str
    #: why the verdict is "not comparable" ("" otherwise)
    reason: str = ""


@dataclass(frozen=True)
class Claim:
    """A statement of the study, where it is made, and the rule that checks it."""

    id: str
    where: str
    text: str
    check: Callable[[list[CellRun], float], Finding | None]
    #: the published tables / figures whose reproduction tests it
    tested_by: tuple[str, ...]
    #: the iteration count the claim is made at (None: a claim about no particular count)
    iterations: int | None = None


# ----------------------------------------------------------------------------------------------
# Reading the cells
# ----------------------------------------------------------------------------------------------
def _solvers(cells: Sequence[CellRun], row: str, depth: int | None = None) -> list[SolverRun]:
    """Our solvers standing for the study's row ``row`` (by ``paper_row``, else by name)."""
    out = []
    for c in cells:
        if depth is not None and c.n_hidden != depth:
            continue
        out += [s for s in c.solvers if s.rows and (s.paper_row or s.name) == row]
    return out


def value_at(s: SolverRun, key: str, k: int | None = None) -> tuple[float | None, int | None]:
    """(value, iteration) of ``key`` at the last recorded iteration ≤ ``k`` (the last one when
    ``k`` is None): published values after 100 iterations are set beside ours at 100 when the
    run went that far."""
    best: tuple[float | None, int | None] = (None, None)
    for r in s.rows:
        v, rk = r.get(key), r.get("k", 0)
        if k is not None and rk > k:
            break
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            best = (float(v), int(rk))
    return best


def _span(values: Sequence[float], digits: int) -> str:
    """ "a" when the values print alike, else "lo-hi"."""
    lo, hi = num(min(values), digits), num(max(values), digits)
    return lo if lo == hi else f"{lo}-{hi}"


def _all_some(flags: Sequence[bool]) -> str:
    return CONFIRMED if all(flags) else NOT_CONFIRMED if not any(flags) else PARTLY


def _f_star(cells: Sequence[CellRun]) -> float:
    rep = cells[0].spec.get("report") or {}
    return float(rep.get("f_star", 0.0))


# ----------------------------------------------------------------------------------------------
# Figures 1-2: Rosenbrock
# ----------------------------------------------------------------------------------------------
def convergence_order(errors: Sequence[float], floor: float = 1e-14) -> float | None:
    """The order q of e_{k+1} ≈ C e_k^q from the last three errors above ``floor``:
    q = log(e₂/e₁) / log(e₁/e₀) (2 for quadratic, 1 for linear convergence)."""
    tail = [e for e in errors if e > floor]
    if len(tail) < 3:
        return None
    e0, e1, e2 = tail[-3:]
    if not (e2 < e1 < e0):
        return None
    return math.log(e2 / e1) / math.log(e1 / e0)


def _newton_quadratic(cells: list[CellRun], eps: float) -> Finding | None:
    newton = [s for s in _solvers(cells, "Newton") if s.method == "newton"]
    if not newton:
        return None
    s, f_star = newton[0], _f_star(cells)
    _, fs = s.column("f")
    q = convergence_order([f - f_star for f in fs])
    if q is None:
        return None
    k8 = first_k(s, "f", lambda v: v - f_star <= 1e-8)
    reach = f"f − f* ≤ 1e-8 at k = {k8}" if k8 is not None else "f − f* never ≤ 1e-8"
    verdict = CONFIRMED if q >= 1.8 else DIFFERS if q > 1.2 else NOT_CONFIRMED
    return Finding(
        f"order q = {num(q, 3)} over the last steps; {reach}",
        verdict,
        "q from the last three f − f* above 1e-14: ≥ 1.8 confirmed, 1.2-1.8 differs "
        "(superlinear), else not confirmed",
    )


def _gd_crawls(cells: list[CellRun], eps: float) -> Finding | None:
    f_star = _f_star(cells)
    gds = [s for c in cells for s in c.solvers if s.rows and s.method == "gd"]
    newton = [s for s in _solvers(cells, "Newton") if s.method == "newton"]
    if not gds or not newton:
        return None
    kn = first_k(newton[0], "f", lambda v: v - f_star <= 1e-8)
    if kn is None:
        return None
    bits, slow = [], []
    for s in gds:
        k = first_k(s, "f", lambda v: v - f_star <= 1e-8)
        f_end = final_value(s.rows, "f")
        if k is None and f_end is None:
            bits.append(f"{s.name}: no f recorded after {last_k(s)} it.")
        elif k is None:
            bits.append(f"{s.name}: f − f* = {num(f_end - f_star)} after {last_k(s)} it.")
        else:
            bits.append(f"{s.name}: f − f* ≤ 1e-8 at k = {k}")
        slow.append(k is None or k >= 10 * kn)
    bits.append(f"Newton: at k = {kn}")
    return Finding(
        "; ".join(bits),
        _all_some(slow),
        "each gradient-descent solver needs ≥ 10× Newton's iterations to f − f* ≤ 1e-8 "
        "(or never gets there)",
    )


# ----------------------------------------------------------------------------------------------
# Tables 1-2: logistic regression
# ----------------------------------------------------------------------------------------------
def _stop_early(cells: list[CellRun], eps: float) -> Finding | None:
    found = _solvers(cells, "L-BFGS") + _solvers(cells, "NLCG")
    if not found:
        return None
    bits, early = [], []
    for s in found:
        cap = int(s.summary.get("max_iter") or cells[0].spec.get("max_iter") or 0)
        nit = s.iterations
        stopped = s.summary.get("status") not in ("max_iter", None) and nit < cap
        early.append(stopped)
        bits.append(
            f"{s.name}: {nit} of {cap} it." + (f" ({s.summary.get('status')})" if stopped else "")
        )
    return Finding("; ".join(bits), _all_some(early), "each stops before its iteration cap")


def _poor_test(cells: list[CellRun], eps: float) -> Finding | None:
    ref = _solvers(cells, "Newton (LS)")
    found = _solvers(cells, "L-BFGS") + _solvers(cells, "NLCG")
    ref_v = value_at(ref[0], "test_accuracy")[0] if ref else None
    vals = [(s, value_at(s, "test_accuracy")[0]) for s in found]
    vals = [(s, v) for s, v in vals if v is not None]
    if ref_v is None or not vals:
        return None
    bits = [f"{s.name} {num(v, 2)}" for s, v in vals] + [f"Newton (LS) {num(ref_v, 2)}"]
    return Finding(
        "test accuracy " + ", ".join(bits),
        _all_some([v <= ref_v - 0.1 for _, v in vals]),
        "test accuracy at least 0.1 below Newton (LS)'s",
    )


def _same_optimum(cells: list[CellRun], eps: float) -> Finding | None:
    found = [s for row in ("Newton (LS)", "BFGS", "NLCG") for s in _solvers(cells, row)]
    losses = [value_at(s, "train_loss")[0] for s in found]
    accs = [value_at(s, "test_accuracy")[0] for s in found]
    if len(found) < 2 or None in losses:
        return None
    spread = max(losses) - min(losses)
    same = spread <= 1e-4 * max(1.0, abs(max(losses)))
    acc = [a for a in accs if a is not None]
    same_acc = not acc or max(acc) - min(acc) <= 0.01
    names = ", ".join(s.name for s in found)
    ours = f"{names}: train loss {_span(losses, 4)}" + (
        f", test accuracy {_span(acc, 2)}" if acc else ""
    )
    return Finding(
        ours,
        CONFIRMED if same and same_acc else NOT_CONFIRMED,
        "train losses within 1e-4 (relative) and test accuracies within 0.01",
    )


def _newton_fewest(cells: list[CellRun], eps: float) -> Finding | None:
    ref = _solvers(cells, "Newton (LS)")
    others = [
        s
        for c in cells
        for s in c.solvers
        if s.rows and s.paper_row and not s.paper_row.startswith("Newton")
    ]
    if not ref or not others:
        return None

    def k_of(s: SolverRun) -> float:
        k = convergence_iteration(s.rows, eps)
        return math.inf if k is None else k

    kn, ko = k_of(ref[0]), [k_of(s) for s in others]
    show_k = lambda k: "not reached" if math.isinf(k) else str(int(k))  # noqa: E731
    ours = f"k_ε: Newton (LS) {show_k(kn)}; " + ", ".join(
        f"{s.name} {show_k(k)}" for s, k in zip(others, ko)
    )
    best = min(ko)
    verdict = CONFIRMED if kn < best else DIFFERS if kn == best else NOT_CONFIRMED
    if math.isinf(kn):
        verdict = NOT_CONFIRMED
    tied = [s.name for s, k in zip(others, ko) if k == kn]
    if verdict == DIFFERS:
        ours += f" (a tie with {', '.join(tied)})"
    return Finding(
        ours,
        verdict,
        f"k_ε (eq. 29, ε = {value_label(eps)}) of Newton (LS) below every other method's; "
        "equal to the lowest: differs (tie)",
    )


def _nols_bias(cells: list[CellRun], eps: float) -> Finding | None:
    ls, nols = _solvers(cells, "Newton (LS)"), _solvers(cells, "Newton (noLS)")
    if not ls or not nols:
        return None
    a, b = value_at(ls[0], "train_loss")[0], value_at(nols[0], "train_loss")[0]
    if a is None or b is None:
        return None
    ka, kb = convergence_iteration(ls[0].rows, eps), convergence_iteration(nols[0].rows, eps)
    higher = b > a * (1 + 1e-3)
    return Finding(
        f"train loss noLS {num(b)} against LS {num(a)}; k_ε noLS {kb if kb else 'not reached'}"
        f" against LS {ka if ka else 'not reached'}",
        CONFIRMED if higher else NOT_CONFIRMED,
        "Newton (noLS)'s final train loss more than 0.1 % above Newton (LS)'s",
    )


# ----------------------------------------------------------------------------------------------
# Tables 3-4: Fashion-MNIST
# ----------------------------------------------------------------------------------------------
def _accuracy_level(rows: tuple[str, ...]) -> Callable[[list[CellRun], float], Finding | None]:
    """The study's train and dev accuracy of ``rows`` (1L, after 100 iterations) against ours
    at iteration 100, or at our last when the run is shorter (the finding says which)."""
    tab = TABLES["table3"]

    def check(cells: list[CellRun], eps: float) -> Finding | None:
        bits, flags, levels = [], [], []
        for row in rows:
            pub = tab.rows[f"{row} 1L"]
            for s in _solvers(cells, row, depth=1):
                tr, k = value_at(s, "train_accuracy", tab.iterations)
                dv, _ = value_at(s, "dev_accuracy", tab.iterations)
                if tr is None:
                    continue
                mine = [tr] + ([dv] if dv is not None else [])
                theirs = [pub["train_acc"]] + ([pub["dev_acc"]] if dv is not None else [])
                d = [m - t for m, t in zip(mine, theirs)]
                flags.append(all(abs(x) <= 0.02 for x in d))
                levels.append(min(d) > 0.02)
                shown = "/".join(num(m, 3) for m in mine)
                bits.append(f"{s.name} {shown} at k = {k}")
        if not bits:
            return None
        verdict = _all_some(flags)
        if verdict == NOT_CONFIRMED and all(levels):
            verdict = DIFFERS
        its = f" (the study's values are after {tab.iterations})"
        return Finding(
            "train/dev accuracy " + "; ".join(bits) + its,
            verdict,
            "train and dev accuracy within ±0.02 of the study's; all higher: differs",
        )

    return check


#: the iterations the study's Fashion-MNIST results (Table 3, Figures 6-7) are after
_FM_ITERATIONS = TABLES["table3"].iterations


def _beats_gd(cells: list[CellRun], eps: float) -> Finding | None:
    bits, flags = [], []
    for depth in sorted({c.n_hidden for c in cells if c.n_hidden}):
        gd = _solvers(cells, "Gradient", depth)
        gd_v = value_at(gd[0], "dev_accuracy", _FM_ITERATIONS)[0] if gd else None
        if gd_v is None:
            continue
        for row in ("NLCG", "L-BFGS-B"):
            for s in _solvers(cells, row, depth):
                v = value_at(s, "dev_accuracy", _FM_ITERATIONS)[0]
                if v is not None:
                    flags.append(v > gd_v)
                    bits.append(f"{depth}L {s.name} {num(v, 3)}")
        bits.append(f"{depth}L Gradient {num(gd_v, 3)}")
    if not flags:
        return None
    return Finding("dev accuracy " + "; ".join(bits), _all_some(flags), "dev accuracy above GD's")


def _nlcg_twice(cells: list[CellRun], eps: float) -> Finding | None:
    bits, ratios = [], []
    for depth in sorted({c.n_hidden for c in cells if c.n_hidden}):
        gd = _solvers(cells, "Gradient", depth)
        nl = [s for s in _solvers(cells, "NLCG", depth) if not s.method.startswith("scipy")]
        if not gd or not nl or not s_per_iter(gd[0]) or not s_per_iter(nl[0]):
            continue
        r = s_per_iter(nl[0]) / s_per_iter(gd[0])
        ratios.append(r)
        bits.append(f"{depth}L: NLCG ÷ GD seconds per iteration = {num(r, 3)}")
    if not ratios:
        return None
    ok = [1.5 <= r <= 2.5 for r in ratios]
    verdict = _all_some(ok)
    if verdict == NOT_CONFIRMED and all(r > 2.5 for r in ratios):
        verdict = DIFFERS
    return Finding(
        "; ".join(bits),
        verdict,
        "ratio in [1.5, 2.5]; all above: differs (dearer than twice); timings on a shared "
        "machine are noisy",
    )


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "newton-quadratic",
        "Figure 2, §2",
        "Newton's method converges quadratically.",
        _newton_quadratic,
        ("figure2",),
    ),
    Claim(
        "gd-crawls",
        "Figures 1-2, §5",
        "Gradient descent, with or without a line search, crawls along the curved ravine; "
        "second-order solvers greatly outperform it.",
        _gd_crawls,
        ("figure2",),
    ),
    Claim(
        "stop-early",
        "§4.1, Table 1",
        "With batches reshuffled every iteration, NLCG and L-BFGS terminate quickly.",
        _stop_early,
        ("table1",),
    ),
    Claim(
        "poor-test",
        "Table 1",
        "L-BFGS and NLCG generalise poorly (test 0.51) while Newton (LS) reaches 0.83.",
        _poor_test,
        ("table1",),
    ),
    Claim(
        "same-optimum",
        "Table 2",
        "With fixed batches every method with a line search reaches the same optimum "
        "(train loss 0.4058, test 0.83).",
        _same_optimum,
        ("table2",),
    ),
    Claim(
        "newton-fewest",
        "Table 2",
        "Newton (LS) converges in the fewest iterations (8, against BFGS 20 and NLCG 31).",
        _newton_fewest,
        ("table2",),
    ),
    Claim(
        "nols-bias",
        "Table 2",
        "Newton's method without line search shows higher bias due to early stopping "
        "(train loss 0.5617 against 0.4058).",
        _nols_bias,
        ("table2",),
    ),
    Claim(
        "second-order-083",
        "Table 3, §5",
        "After 100 iterations NLCG and L-BFGS-B reach about 0.83 train and dev accuracy "
        "with one hidden layer.",
        _accuracy_level(("NLCG", "L-BFGS-B")),
        ("table3",),
        iterations=_FM_ITERATIONS,
    ),
    Claim(
        "gd-072",
        "Table 3",
        "Gradient descent reaches about 0.72 with one hidden layer after 100 iterations.",
        _accuracy_level(("Gradient",)),
        ("table3",),
        iterations=_FM_ITERATIONS,
    ),
    Claim(
        "beats-gd",
        "§5, Figures 6-7",
        "NLCG and L-BFGS beat gradient descent.",
        _beats_gd,
        ("table3",),
        iterations=_FM_ITERATIONS,
    ),
    Claim(
        "nlcg-twice",
        "Table 4, §5",
        "An NLCG iteration costs almost twice a gradient-descent one.",
        _nlcg_twice,
        ("table4",),
    ),
)


def claims_for(run: RunData, figures: Sequence[int] = ()) -> list[Claim]:
    """The claims a run tests: those of the published tables its spec names
    (``report.paper``) and of the published figures it redraws."""
    tested = set((run.spec.get("report") or {}).get("paper") or [])
    tested |= {f"figure{n}" for n in figures}
    return [c for c in CLAIMS if tested & set(c.tested_by)]


def iteration_mismatch(claim: Claim, cells: Sequence[CellRun]) -> str:
    """Why ``cells`` cannot test ``claim``: the claim is made after ``claim.iterations`` and
    a solver set beside the study (one with a ``paper_row``; every solver when none has) was
    allowed fewer iterations, or stopped before its budget unfinished; "" when they can."""
    if claim.iterations is None:
        return ""
    found = [(c, s) for c in cells for s in c.solvers if s.rows]
    tested = [(c, s) for c, s in found if s.paper_row] or found
    counts = sorted({b for c, s in tested if (b := budget(c, s)) is not None})
    if not counts or min(counts) >= claim.iterations:
        return ""
    ours = ", ".join(map(str, counts))
    return (
        f"the study's claim is after {claim.iterations} iterations, this run's budget is "
        f"{ours} iteration{'s' if counts != [1] else ''}"
    )


def verdicts(
    run: RunData, epsilon: float, figures: Sequence[int] = ()
) -> list[tuple[Claim, str, Finding]]:
    """(claim, group label, finding) for every claim the run tests, per group of swept
    settings other than the depth (the label is "" for a run without such a sweep). A claim
    made after more iterations than the run's budget is "not comparable", whatever its rule
    found (:func:`iteration_mismatch`)."""
    groups: dict[tuple, list[CellRun]] = {}
    for cell in run.cells:
        groups.setdefault(group_key(cell), []).append(cell)
    out = []
    for claim in claims_for(run, figures):
        for cells in groups.values():
            found = claim.check(cells, epsilon)
            if found is None:
                continue
            why = iteration_mismatch(claim, cells)
            if why:
                found = replace(found, verdict=NOT_COMPARABLE, reason=why)
            out.append((claim, group_label(cells[0]), found))
    return out
