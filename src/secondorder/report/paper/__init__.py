"""The seed study in the report: its published numbers (:mod:`.published`) and how they are set
beside ours (:mod:`.beside`)."""

from secondorder.report.paper.beside import (
    headline,
    ours,
    paper_sections,
    paper_tables,
    seed_figures,
)
from secondorder.report.paper.published import (
    FIGURES,
    HEADLINES,
    TABLES,
    Column,
    Headline,
    PaperFigure,
    PaperTable,
    paper_row_key,
    table,
)

__all__ = [
    "FIGURES",
    "HEADLINES",
    "TABLES",
    "Column",
    "Headline",
    "PaperFigure",
    "PaperTable",
    "headline",
    "ours",
    "paper_row_key",
    "paper_sections",
    "paper_tables",
    "seed_figures",
    "table",
]
