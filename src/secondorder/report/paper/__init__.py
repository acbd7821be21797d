"""The study in the report: its published numbers (:mod:`.published`) and how they are set
beside ours (:mod:`.beside`)."""

from secondorder.report.paper.beside import (
    headline,
    ours,
    paper_sections,
    paper_tables,
    seed_figures,
    suite_summary,
    summary_section,
)
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
    "table",
]
