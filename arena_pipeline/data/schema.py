"""Column names of the pair tables (from ``gpu_jobs.contract.schema``) and the one error type of the data layer.

The table layout is Contract 1 in ``docs/architecture.md``: ``id``, the three text columns (each a
``json.dumps(list[str])``, one item per turn), the three one-hot label columns, ``model_a``,
``model_b``, ``source``, ``group`` and ``fold``.
"""

from __future__ import annotations

from gpu_jobs.contract.schema import (  # noqa: F401  (the column names live in the contract)
    CLASS_NAMES,
    FOLD_COLUMN,
    GROUP_COLUMN,
    ID_COLUMN,
    LABEL_COLUMNS,
    MODEL_COLUMNS,
    PROB_COLUMNS,
    PROCESSED_COLUMNS,
    SOURCE_COLUMN,
    TEXT_COLUMNS,
)


def _printable(text: str) -> str:
    """Unpaired surrogates (which cannot be written as UTF-8) as ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(text: object) -> str:
    return _printable(" ".join(str(text).split()))


class DataError(ValueError):
    """A problem with an input data file, phrased for the person who has to fix it.

    ``DataError(file, problem, row_id=..., column=..., hint=...)`` builds the one-line message
    ``"<file>: row id=<id>: column '<col>': <what is wrong>. <what to do>"``; the row and column parts
    are left out when they do not apply. The parts are also available as the attributes ``file``,
    ``row_id``, ``column``, ``problem`` and ``hint``. ``DataError("<file>: <message>")`` (one
    argument, already formatted) is accepted as well: the message is kept (on one line) and ``file``
    is the text before the first ": ".
    """

    def __init__(
        self,
        file: object,
        problem: str | None = None,
        *,
        row_id: object | None = None,
        column: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.row_id = None if row_id is None else str(row_id)
        self.column = column
        self.hint = None if hint is None else _one_line(hint)
        if problem is None:  # pre-formatted message
            message = _one_line(file)
            self.file = message.split(": ", 1)[0]
            self.problem = message
            super().__init__(message)
            return
        self.file = str(file)
        self.problem = _one_line(problem).rstrip(".")
        parts = [_printable(self.file)]
        if self.row_id is not None:
            parts.append(f"row id={_one_line(self.row_id)}")
        if column is not None:
            parts.append(f"column '{column}'")
        message = ": ".join(parts) + ": " + self.problem + "."
        if self.hint:
            message += " " + self.hint.rstrip(".") + "."
        super().__init__(message)
