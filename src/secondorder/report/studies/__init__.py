"""Reports of the bundled studies (``secondorder run studies/<name>``).

A spec whose ``[report]`` table names a study (``study = "train-dev"``) gets, besides the
generic report, the sections of the module ``secondorder.report.studies.<name>`` (dashes as
underscores): a function ``sections(run, ctx) -> list[str]`` returning Markdown, drawing its
figures into ``ctx.figdir``. Every study opens with :func:`conclusions_table`: each conclusion
is measured by a rule on the run's data and points at the table or figure that shows it, with
what makes the evidence weak (one seed, a small subset) said beside it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from secondorder.experiments import rundir
from secondorder.report.rundata import RunData

__all__ = [
    "Conclusion",
    "StudyContext",
    "conclusions_table",
    "inside_study_suite",
    "study_name",
    "study_sections",
]


@dataclass
class StudyContext:
    """Where a study's figures go and how they are linked, and the report's settings."""

    figdir: Path
    fmt: str
    rel: str
    epsilon: float
    level: int = 1

    @property
    def h(self) -> str:
        """The heading prefix of the study's sections (one level below the report's)."""
        return "#" * (self.level + 1)

    def figure(self, name: str) -> Path:
        """The path of a figure called ``name`` (without suffix)."""
        self.figdir.mkdir(parents=True, exist_ok=True)
        return self.figdir / f"{name}.{self.fmt}"

    def link(self, path: Path, caption: str) -> str:
        """A Markdown image link to a figure drawn by :meth:`figure`."""
        return f"![{caption}]({self.rel}{path.name})\n"


@dataclass
class Conclusion:
    """One measured answer: the question, what the run found (with its number), the table or
    figure that shows it, and how strong the evidence is."""

    question: str
    finding: str
    evidence: str
    strength: str = ""


def conclusions_table(items: list[Conclusion], h: str = "##") -> str:
    """The study's opening table of conclusions."""
    if not items:
        return ""
    lines = [
        f"{h} Conclusions\n",
        "| question | what this run found | shown in | strength of the evidence |",
        "|---|---|---|---|",
    ]
    for c in items:
        cells = [c.question, c.finding, c.evidence, c.strength or "—"]
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    return "\n".join(lines) + "\n"


def study_name(run: RunData) -> str | None:
    """The study a run's spec names in ``[report] study``, or None."""
    name = (run.spec.get("report") or {}).get("study")
    return str(name) if name else None


def inside_study_suite(run: RunData, ctx: StudyContext, study: str) -> bool:
    """Whether ``run`` is a part drawn inside a suite that names ``study`` (the suite's own
    sections then cover the part, which draws none of its own)."""
    if run.is_suite or ctx.level < 2:
        return False
    try:
        parent = rundir.read_spec_toml(run.dir.parent)
    except Exception:  # not a run directory: draw the part's own sections
        return False
    return (parent.get("report") or {}).get("study") == study


def study_sections(run: RunData, ctx: StudyContext) -> list[str]:
    """The Markdown sections of the run's study (``[]`` for a run that names none)."""
    name = study_name(run)
    if name is None:
        return []
    module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    return list(module.sections(run, ctx))
