"""The study in the report: its published numbers (:mod:`.published`), how they are set
beside ours (:mod:`.beside`), the verdicts on its claims (:mod:`.verdicts`) and the
conclusions a report opens with (:mod:`.conclusions`)."""

from secondorder.report.paper.beside import (
    headline,
    ours,
    paper_sections,
    paper_tables,
    seed_figures,
    suite_summary,
    summary_section,
)
from secondorder.report.paper.conclusions import conclusions, conclusions_section
from secondorder.report.paper.published import (
    FIGURES,
    HEADLINES,
    STUDY,
    TABLES,
    Column,
    Headline,
    Note,
    PaperFigure,
    PaperTable,
    paper_row_key,
    table,
)

__all__ = [
    "FIGURES",
    "HEADLINES",
    "STUDY",
    "TABLES",
    "Column",
    "Headline",
    "Note",
    "PaperFigure",
    "PaperTable",
    "headline",
    "ours",
    "paper_row_key",
    "paper_sections",
    "paper_tables",
    "seed_figures",
    "suite_summary",
    "summary_section",
    "conclusions",
    "conclusions_section",
    "table",
]
