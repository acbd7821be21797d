"""The library's own error classes: one base, so a caller (the command line) can tell a
refusal by the library — bad input, a missing or corrupt file — from a bug.

Every class also derives from the built-in exception a caller would expect
(:class:`ValueError` for a bad value, :class:`TypeError` for a wrong type, :class:`MemoryError`
for a request that does not fit), so ``except ValueError`` keeps catching them.

``exit_code`` is the status the command line exits with: 2 for bad input (what the user
typed or wrote must change), 1 for a fault of the environment (a missing or corrupt file, not
enough memory).
"""

from __future__ import annotations

__all__ = [
    "DifferentProblems",
    "EnvironmentFault",
    "InvalidTypeError",
    "InvalidValueError",
    "ModeNote",
    "SecondOrderError",
]


class SecondOrderError(Exception):
    """Base of every error the library raises on purpose; the message is one readable line
    naming the argument, key or file and what was expected."""

    exit_code = 2


class InvalidValueError(SecondOrderError, ValueError):
    """An argument has the right type but a value the library cannot accept."""


class InvalidTypeError(SecondOrderError, TypeError):
    """An argument has the wrong type."""


class EnvironmentFault(SecondOrderError):
    """Not the input's fault: a file is missing, corrupt or unreadable, or memory is short."""

    exit_code = 1


class ModeNote(RuntimeWarning):
    """Not a fault: a method runs in a documented mode whose consequences the caller should
    know (L-BFGS keeping its memory across reshuffled batches); shown as a note, not an
    alarm, by the command line."""


class DifferentProblems(UserWarning):
    """Not a fault: runs set side by side (``secondorder compare``) minimise different
    functions — their data, model, loss, L2 term or sampler differ — so their numbers are not
    of one problem; the comparison still draws them, and says so at its top."""
