"""The opening conclusions of a report of the study's specs (``paper/...``) and of their suites
(``paper/headline``): what the run found, each measured on its traces.

Per problem (a part of a suite, a point of a sweep) the rules ask which method reaches the best
held-out accuracy within the run's budget and by how much, which reaches the lowest loss (or
f − f* ≤ 1e-8 when f* is known), which converges first (eq. 29, on a fixed objective), and
what the most accurate method's iterations cost beside the runner-up's; then how many of the
study's claims the run confirms (:mod:`secondorder.report.paper.verdicts`). Each answer is a
:class:`~secondorder.report.studies.Conclusion` naming the table or figure that shows it and
the strength of its evidence (seeds, the sampling noise of the split an accuracy is measured
on, the relative margin of a loss), strongest first within each question.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from secondorder.report.measures import (
    budget,
    f_star,
    first_k,
    last_k,
    s_per_iter,
    solver_time,
    time_at,
)
from secondorder.report.paper.beside import headline
from secondorder.report.paper.verdicts import NOT_COMPARABLE, NOT_CONFIRMED, VERDICTS, verdicts
from secondorder.report.rundata import CellRun, RunData, SolverRun, convergence_iteration
from secondorder.report.studies import Conclusion, conclusions_table
from secondorder.report.text import format_number as num
from secondorder.report.text import value_label

__all__ = [
    "STRONG",
    "accuracy_conclusion",
    "conclusions",
    "conclusions_section",
    "convergence_conclusion",
    "cost_conclusion",
    "loss_conclusion",
    "sampling_noise",
    "split_size",
]

#: a margin this many times the sampling noise (or more) is strong evidence, one noise moderate
STRONG = 3.0
#: final losses within this relative distance are one value
SAME_LOSS = 1e-4
#: the f − f* a run must reach to count as converged when f* is known
F_TOL = 1e-8
_GRADES = ("strong", "moderate", "weak")


@dataclass
class _Problem:
    """One problem of the run: the cells of one sweep point (one per seed) and where the
    report shows them."""

    where: str
    cells: list[CellRun]
    anchor: str
    figures: str
    fmt: str

    def solvers(self) -> list[list[SolverRun]]:
        """Each solver's runs over the seeds (solvers matched by name, with rows only)."""
        names = [s.name for s in self.cells[0].solvers if s.rows]
        out = []
        for name in names:
            runs = [s for c in self.cells for s in c.solvers if s.name == name and s.rows]
            out.append(runs)
        return out

    @property
    def spec(self) -> dict:
        return self.cells[0].spec

    def link(self, text: str, figure: str | None = None) -> str:
        """A link to the figure ``figure`` of this problem, else to its section."""
        if figure is None:
            return f"[{text}]({self.anchor})" if self.anchor else text
        stem = "" if self.cells[0].id == "main" else f"{self.cells[0].id}-"
        return f"[{text}]({self.figures}{stem}{figure}.{self.fmt})"


# ----------------------------------------------------------------------------------------------
# What the traces say
# ----------------------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _final(runs: Sequence[SolverRun], key: str) -> float | None:
    """A solver's last recorded ``key``, averaged over its seeds."""
    return _mean([s.column(key)[1][-1] if s.column(key)[1] else None for s in runs])


def split_size(spec: dict, key: str) -> int | None:
    """The number of samples of the split an accuracy column (``"dev_accuracy"``) is measured
    on, from the run's data table (None when the spec does not say)."""
    data = spec.get("data") or {}
    split = key.split("_", 1)[0]
    if data.get("kind") == "fashion-mnist":
        dev = int(data.get("dev_size", 10000))
        sizes = {
            "train": int(data.get("n_train") or 60000 - dev),
            "dev": dev,
            "test": int(data.get("n_test") or 10000),
        }
        return sizes.get(split) or None
    if data.get("kind") in ("two-class-2d", "random") and split in ("train", "test"):
        n = data.get(f"n_{split}")
        return int(n) if n else None
    return None


def sampling_noise(accuracy: float, n: int) -> float:
    """The 95 % half-width of an accuracy measured on ``n`` samples, 2·√(p(1 − p)/n), with p
    kept from 0 and 1 by half a sample so that a perfect score has a width too."""
    p = min(max(accuracy, 0.5 / n), 1 - 0.5 / n)
    return 2 * math.sqrt(p * (1 - p) / n)


def _seeds(p: _Problem) -> str:
    n = len(p.cells)
    if p.cells[0].n_hidden is None and f_star(p.cells[0]) is not None:
        return "one start point" if n == 1 else f"{n} start points (means)"
    return "one seed" if n == 1 else f"{n} seeds (means)"


def _tol(v: float) -> str:
    """1e-08 as 1e-8."""
    mant, _, exp = f"{v:.0e}".partition("e")
    return f"{mant}e{int(exp)}"


def _at(runs: Sequence[SolverRun], cells: Sequence[CellRun]) -> str:
    """ "at k = 25", with "(stopped early: <status>)" when the solver ended before its budget."""
    s = runs[0]
    k = last_k(s)
    cell = next(c for c in cells if s in c.solvers)
    cap = budget(cell, s)
    early = cap is not None and k < cap and s.summary.get("status")
    return f"at k = {k}" + (f" (stopped early: {s.summary['status']})" if early else "")


def _budget_text(p: _Problem) -> str:
    counts = sorted(
        {b for c in p.cells for s in c.solvers if s.rows and (b := budget(c, s)) is not None}
    )
    if not counts:
        return "in its run"
    if len(counts) == 1:
        return f"within {counts[0]} iteration{'s' if counts[0] != 1 else ''}"
    return f"within its budget ({', '.join(map(str, counts))} iterations)"


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _ranked(p: _Problem, key: str, higher: bool) -> list[tuple[str, float, list[SolverRun]]]:
    """(solver, value averaged over seeds, its runs), best first."""
    vals = [(runs[0].name, _final(runs, key), runs) for runs in p.solvers()]
    kept = [(n, v, r) for n, v, r in vals if v is not None]
    return sorted(kept, key=lambda t: -t[1] if higher else t[1])


# ----------------------------------------------------------------------------------------------
# The questions
# ----------------------------------------------------------------------------------------------
def accuracy_conclusion(p: _Problem) -> tuple[Conclusion, str] | None:
    """Which method reaches the best held-out accuracy (dev, else test) within the budget, by
    how much over the next, and whether the test split agrees; graded by the margin against
    the sampling noise of the split."""
    key = next(
        (k for k in ("dev_accuracy", "test_accuracy") if len(_ranked(p, k, True)) >= 2), None
    )
    if key is None:
        return None
    ranked = _ranked(p, key, True)
    split = key.split("_", 1)[0]
    (best, v0, runs0), (_, v1, _) = ranked[0], ranked[1]
    shown = [(n, num(v, 3)) for n, v, _ in ranked]
    tied = [n for n, text in shown if text == shown[0][1]]
    if len(tied) > 1:
        head = f"no single one: {_names(tied)} all reach {shown[0][1]}"
    else:
        head = f"**{best}**: {split} accuracy {shown[0][1]} {_at(runs0, p.cells)}, "
        head += f"{num(v0 - v1, 3)} above {ranked[1][0]}'s {shown[1][1]}"
    rest = [f"{n} {t}" for n, t in shown if n not in tied and n != ranked[1][0]]
    if len(tied) > 1:
        rest = [f"{n} {t}" for n, t in shown if n not in tied]
    finding = head + ("; then " + ", ".join(rest) if rest else "")
    if key == "dev_accuracy":
        test = _ranked(p, "test_accuracy", True)
        if len(test) >= 2:
            if test[0][0] == best and len(tied) == 1:
                finding += f" (test accuracy {num(test[0][1], 3)}, also the best)"
            else:
                finding += f" (on test accuracy {test[0][0]} leads with {num(test[0][1], 3)})"
    n = split_size(p.spec, key)
    margin = v0 - v1 if len(tied) == 1 else 0.0
    bits = [_seeds(p)]
    if n:
        noise = sampling_noise(v0, n)
        grade = 0 if margin >= STRONG * noise else 1 if margin >= noise else 2
        width = f"±{num(noise, 2)}, the 95 % sampling width of {n:,} {split} samples"
        if len(tied) > 1:
            bits.insert(0, f"weak: a tie, and differences within {width} would not show")
        else:
            bits.insert(0, f"{_GRADES[grade]}: margin {num(margin, 2)} against {width}")
    else:
        grade = 2
        bits.insert(0, f"weak: margin {num(margin, 2)}, the {split} split's size unknown")
    question = f"{p.where}: which method reaches the best {split} accuracy {_budget_text(p)}?"
    evidence = p.link("results table") + "; " + p.link("accuracy figure", "accuracy")
    return Conclusion(question, finding, evidence, "; ".join(bits)), _GRADES[grade]


def _loss_key(p: _Problem) -> str:
    runs = [s for rs in p.solvers() for s in rs]
    return "train_loss" if any(s.column("train_loss")[0] for s in runs) else "f"


def loss_conclusion(p: _Problem) -> tuple[Conclusion, str] | None:
    """With a known f*: which methods reach f − f* ≤ 1e-8 and how soon; otherwise which
    reaches the lowest training loss, a tie when every final loss is within 1e-4 (relative)."""
    fs = f_star(p.cells[0])
    evidence = p.link("results table") + "; " + p.link("loss figure", "loss")
    if fs is not None:
        reached, missed = [], []
        for runs in p.solvers():
            s = runs[0]
            k = first_k(s, "f", lambda v, fs=fs: v - fs <= F_TOL)
            end = s.column("f")[1]
            if k is not None:
                reached.append((k, s.name))
            elif end:
                missed.append((end[-1] - fs, s.name, last_k(s)))
        if not reached and not missed:
            return None
        reached.sort()
        missed.sort()
        bits = [
            f"**{n}** at k = {k}" if i == 0 else f"{n} at k = {k}"
            for i, (k, n) in enumerate(reached)
        ]
        bits += [f"{n} not in {k} (f − f* = {num(d, 3)})" for d, n, k in missed]
        finding = ("; ".join(bits)) if reached else "none: " + "; ".join(bits)
        question = f"{p.where}: which method reaches f − f* ≤ {_tol(F_TOL)}, and how soon?"
        strength = "strong: f* is known and the run is deterministic; " + _seeds(p)
        return Conclusion(question, finding, evidence, strength), "strong"
    key = _loss_key(p)
    ranked = _ranked(p, key, False)
    if len(ranked) < 2:
        return None
    what = "training loss" if key == "train_loss" else "objective f"
    (best, v0, _), (second, v1, _) = ranked[0], ranked[1]
    spread = (ranked[-1][1] - v0) / max(abs(v0), 1e-300)
    question = f"{p.where}: which method reaches the lowest {what} {_budget_text(p)}?"
    if spread <= SAME_LOSS:
        finding = (
            f"all {len(ranked)} reach the same {what}, {num(v0, 4)} (within "
            f"{_tol(SAME_LOSS)}, relative)"
        )
        return Conclusion(question, finding, evidence, "strong: " + _seeds(p)), "strong"
    rel = (v1 - v0) / max(abs(v0), 1e-300)
    others = ", ".join(f"{n} {num(v, 4)}" for n, v, _ in ranked[2:])
    finding = f"**{best}** {num(v0, 4)}, then {second} {num(v1, 4)}" + (
        f", {others}" if others else ""
    )
    grade = 0 if rel >= 0.1 else 1 if rel >= 0.01 else 2
    lead = f"{num(1 + rel, 3)}×" if rel >= 1 else f"{num(100 * rel, 2)} % above"
    strength = f"{_GRADES[grade]}: {second}'s {what} is {lead} the best's; "
    return Conclusion(question, finding, evidence, strength + _seeds(p)), _GRADES[grade]


def convergence_conclusion(p: _Problem, eps: float) -> tuple[Conclusion, str] | None:
    """On a fixed objective without a known f*: which method meets eq. 29 first."""
    kind = (p.spec.get("sampler") or {}).get("kind", "full")
    if f_star(p.cells[0]) is not None or kind not in ("full", "fixed"):
        return None
    found = []
    for runs in p.solvers():
        k = convergence_iteration(runs[0].rows, eps)
        found.append((math.inf if k is None else k, runs[0].name, last_k(runs[0])))
    if len(found) < 2 or all(math.isinf(k) for k, _, _ in found):
        return None
    found.sort()
    first = [n for k, n, _ in found if k == found[0][0]]
    bits = [f"**{_names(first)}** at k = {found[0][0]}"]
    bits += [
        f"{n} {'not in ' + str(last) if math.isinf(k) else 'at ' + str(k)}"
        for k, n, last in found
        if n not in first
    ]
    question = (
        f"{p.where}: which method converges first (eq. 29, |f_k − f_k−1| ≤ {value_label(eps)})?"
    )
    strength = f"moderate: k_ε depends on ε (here {value_label(eps)}); " + _seeds(p)
    return Conclusion(question, "; ".join(bits), p.link("results table"), strength), "moderate"


def cost_conclusion(p: _Problem) -> tuple[Conclusion, str] | None:
    """What the most accurate method's iterations cost beside the runner-up's, and how soon in
    seconds it passed the runner-up's final accuracy (when it costs more per iteration)."""
    key = next(
        (k for k in ("dev_accuracy", "test_accuracy") if len(_ranked(p, k, True)) >= 2), None
    )
    if key is None:
        return None
    ranked = _ranked(p, key, True)
    (best, v0, runs0), (second, v1, runs1) = ranked[0], ranked[1]
    a, b = runs0[0], runs1[0]
    spi_a, spi_b = s_per_iter(a), s_per_iter(b)
    if spi_a is None or spi_b is None or spi_a <= spi_b or v0 <= v1:
        return None
    k = first_k(a, key, lambda v: v >= v1)
    t = time_at(a, k) if k is not None else None
    total_b = solver_time(b)
    split = key.split("_", 1)[0]
    finding = (
        f"{best} costs {num(spi_a, 3)} s per iteration, {num(spi_a / spi_b, 2)}× {second}'s "
        f"{num(spi_b, 3)} s"
    )
    if k is not None and t is not None and total_b:
        finding += (
            f"; it passed {second}'s final {split} accuracy {num(v1, 3)} at k = {k}, after "
            f"{num(t, 3)} s, where {second} used {num(total_b, 3)} s for its {last_k(b)} "
            f"iterations ({'faster' if t < total_b else 'slower'} to the same accuracy)"
        )
    every = p.spec.get("metrics_every", 1)
    strength = "moderate: seconds from one run on a possibly shared machine"
    if every and every > 1:
        strength += f"; accuracies recorded every {every} iterations, so k is the first recorded"
    question = f"{p.where}: what does the most accurate method cost?"
    evidence = p.link("results table") + "; " + p.link("loss figure (against time)", "loss")
    return Conclusion(question, finding, evidence, strength + "; " + _seeds(p)), "moderate"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _problems(run: RunData, fmt: str) -> list[tuple[RunData, list[_Problem]]]:
    """The run's problems (per part of a suite, per sweep point), each with its links."""
    parts = run.parts if run.is_suite else [("", run)]
    out = []
    for name, part in parts:
        groups: dict[tuple, list[CellRun]] = {}
        for c in part.cells:
            groups.setdefault(tuple((k, repr(v)) for k, v in c.point.items()), []).append(c)
        probs = []
        for cells in groups.values():
            label = cells[0].label if len(groups) > 1 else ""
            label = ", ".join(b for b in label.split(", ") if not b.startswith("seed "))
            where = ", ".join(x for x in (name or part.name, label) if x)
            figures = f"figures/{name}/" if name else "figures/"
            probs.append(_Problem(where, cells, f"#{name}" if name else "", figures, fmt))
        out.append((part, probs))
    return out


def _verdict_conclusion(run: RunData, epsilon: float | None) -> Conclusion | None:
    """How many of the study's claims the run confirms, and which it does not."""
    parts = run.parts if run.is_suite else [("", run)]
    found = []
    for name, part in parts:
        eps = _epsilon(part, epsilon)
        claim = headline(part)
        for c, g, f in verdicts(part, eps, claim.figures if claim else ()):
            found.append((name or part.name, c, g, f))
    if not found:
        return None
    counts = {v: sum(1 for *_, f in found if f.verdict == v) for v in VERDICTS}
    finding = f"{counts['confirmed']} of {len(found)} checks confirmed" + "".join(
        f", {n} {v}" for v, n in counts.items() if n and v != "confirmed"
    )
    against = [
        f"“{c.text.rstrip('.')}” ({where})"
        for where, c, _, f in found
        if f.verdict == NOT_CONFIRMED
    ]
    if against:
        finding += "; not confirmed: " + "; ".join(against)
    apart = sorted({f.reason for *_, f in found if f.verdict == NOT_COMPARABLE})
    if apart:
        finding += "; not comparable: " + "; ".join(apart)
    links = ", ".join(f"[{n}](#{n})" for n, _ in run.parts) if run.is_suite else "the summary"
    return Conclusion(
        "How many of the study's claims does this run confirm?",
        finding,
        f"the verdict table of {links}",
        "each verdict follows from the rule printed beside it; one seed",
    )


def _epsilon(run: RunData, epsilon: float | None) -> float:
    if epsilon is not None:
        return float(epsilon)
    return float((run.spec.get("report") or {}).get("epsilon", 1e-6))


def conclusions(run: RunData, epsilon: float | None = None, fmt: str = "png") -> list[Conclusion]:
    """The conclusions a report of the study's specs opens with, measured on ``run`` (a run or
    a suite): per question, the problems' answers strongest first; the verdicts last."""
    rules: list[Callable[[_Problem, float], tuple[Conclusion, str] | None]] = [
        lambda p, e: accuracy_conclusion(p),
        lambda p, e: loss_conclusion(p),
        lambda p, e: cost_conclusion(p),
        convergence_conclusion,
    ]
    problems = _problems(run, fmt)
    out: list[Conclusion] = []
    for rule in rules:
        found = []
        for part, probs in problems:
            for p in probs:
                got = rule(p, _epsilon(part, epsilon))
                if got is not None:
                    found.append(got)
        found.sort(key=lambda cg: _GRADES.index(cg[1]))
        out += [c for c, _ in found]
    verdict = _verdict_conclusion(run, epsilon)
    if verdict is not None:
        out.append(verdict)
    return out


def _tests_the_study(run: RunData) -> bool:
    parts = [p for _, p in run.parts] if run.is_suite else [run]
    return any(headline(p) is not None or (p.spec.get("report") or {}).get("paper") for p in parts)


def conclusions_section(run: RunData, epsilon: float | None, fmt: str, h: str = "#") -> str:
    """The conclusions table a report of the study's specs (or of a suite of them) opens with
    (headings under ``h``); "" for other runs."""
    if not _tests_the_study(run):
        return ""
    return conclusions_table(conclusions(run, epsilon, fmt), h + "#")
