"""Opening annotation CSV files with one set of error messages.

Every reader of EK-100-style CSVs (class lists, segments, video info) turns the same operating
system and encoding failures into a DataError that names the file; this is that translation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from malmm_ros.errors import DataError

__all__ = ['open_csv']


@contextlib.contextmanager
def open_csv(path: Path, what: str) -> Iterator[TextIO]:
    """The file opened for csv.reader; failures while opening or reading it (inside the
    `with` block too) become a DataError starting with `what`."""
    try:
        # utf-8-sig drops a byte-order mark that spreadsheet tools like to add.
        with path.open('r', encoding='utf-8-sig', newline='') as handle:
            yield handle
    except FileNotFoundError:
        raise DataError(f'{what} not found') from None
    except IsADirectoryError:
        raise DataError(f'{what} is a directory, expected a CSV file') from None
    except UnicodeDecodeError as exc:
        raise DataError(f'{what} is not valid UTF-8: {exc.reason} at byte {exc.start}') from None
    except OSError as exc:
        raise DataError(f'{what} cannot be read: {exc.strerror or exc}') from None
