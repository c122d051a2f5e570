"""The one error type the data side raises for bad user input, and the CLI guard that prints it.

Messages say where the problem is, most specific last, so a user can jump to it:
`data/train.json: record 17: field 'summary': missing target`. Record indexes count from 0 (the
position in the JSON array, or among the non-blank lines of a JSON Lines file); line numbers
count from 1, as editors do.
"""

from __future__ import annotations

import sys
from contextlib import ContextDecorator
from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be used, with a message that names the file, record and field."""

    exit_code = 2


def where(
    path: str | Path | None = None,
    index: int | None = None,
    field: str | None = None,
    line: int | None = None,
    kind: str = "record",
) -> str:
    """Location prefix for a message: `path: record 3 (line 4): field 'summary'`."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if index is not None:
        parts.append(f"{kind} {index}" + (f" (line {line})" if line is not None else ""))
    elif line is not None:
        parts.append(f"line {line}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


class exit_on_data_error(ContextDecorator):
    """Turn a DataError into `error: <message>` on stderr and exit status 2, without a traceback.

    Use as `with exit_on_data_error(): ...` or as a decorator on a CLI's `main`. Any other
    exception is a bug and keeps its traceback.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, DataError):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code)
        return False
