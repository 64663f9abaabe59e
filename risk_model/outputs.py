"""Output files: checked before the work, written atomically.

A command that computes for a minute and then cannot write its result loses the minute; one that
is killed half-way through writing leaves a truncated file. So commands check their output places
with ``check_writable_dir`` before they start, and write each file through ``atomic_path``: into a
temporary file beside it, renamed over the target only once complete.

Examples
--------
>>> check_writable_dir(Path("reports"))                      # doctest: +SKIP
>>> with atomic_path(Path("reports/roc.png")) as tmp:         # doctest: +SKIP
...     fig.savefig(tmp)
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

__all__ = ["atomic_path", "check_writable_dir"]


def check_writable_dir(path: Path, *, create: bool = True, what: str = "output") -> None:
    """Raise ``UsageError`` (one line, naming ``path`` and the reason) unless a file can be created in
    directory ``path``; with ``create``, missing directories are made first."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: the {what} directory is a file")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise UsageError(f"{path}: directory does not exist")
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{path}: cannot write the {what} there ({e.strerror or e.__class__.__name__})") from None


@contextmanager
def atomic_path(path: Path):
    """A temporary path beside ``path`` with the same suffix (so writers that pick a format from it
    still do); renamed over ``path`` when the block ends without error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
