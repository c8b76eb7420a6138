"""Reading and writing files safely, one way for the whole package.

- `open_csv`: annotation CSVs with one set of error messages (every EK-100-style reader turns
  the same operating-system and encoding failures into a DataError naming the file).
- `write_atomically` / `atomic_write`: a file appears whole or not at all (a temp file in the
  same folder, fsync, os.replace), so a crash or a reader never sees half a checkpoint, cache
  entry or report; temp names are unique per call, so concurrent writers never share one.
- `json_metadata`: the JSON header our safetensors files (checkpoints, features) carry, checked
  for its format tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from malmm_ros.errors import DataError, MalmmError

__all__ = ['atomic_write', 'json_metadata', 'open_csv', 'write_atomically']


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


@contextlib.contextmanager
def write_atomically(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside `path` to write (by any writer: safetensors, json, bytes); on a clean
    exit it is synced and renamed over `path`, on an error removed.

    The file gets the usual umask permissions (mkstemp's 0600 would hide a shared cache from
    other users).
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp')
    try:
        yield tmp
        with tmp.open('rb') as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    with write_atomically(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data.encode('utf-8') if isinstance(data, str) else data)
    return path


def json_metadata(header: Mapping[str, str] | None, *, key: str, expected_format: str,
                  where: str, error: type[MalmmError], missing: str) -> dict[str, Any]:
    """The JSON object under `key` of a safetensors header, with format `expected_format`.

    Raises `error` naming `where`: no such key (`missing` says what the file then is), invalid
    JSON, or another format.
    """
    header = header or {}
    if key not in header:
        raise error(f'{where} has no malmm_ros metadata: {missing}')
    try:
        metadata = json.loads(header[key])
    except json.JSONDecodeError as exc:
        raise error(f'{where}: metadata is not valid JSON ({exc})') from None
    if not isinstance(metadata, dict) or metadata.get('format') != expected_format:
        found = metadata.get('format') if isinstance(metadata, dict) else type(metadata).__name__
        raise error(f'{where}: format {found!r}, expected {expected_format!r}')
    return metadata
