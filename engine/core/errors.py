"""Errors a user can fix, and atomic file output.

Every mistake in user input becomes one :class:`InputError` naming the file, the field and
the reason. The CLI prints ``str(err)`` on one line and exits with code 2.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path


class InputError(Exception):
    """Bad user input: ``<file>: <field>: <reason>``."""

    def __init__(self, source: str | os.PathLike | None, field: str | None, reason: str):
        self.source = str(source) if source is not None else None
        self.field = field
        self.reason = reason
        parts = [p for p in (self.source, field) if p]
        super().__init__(": ".join(parts + [reason]))


class InfeasibleError(InputError):
    """The instance has no feasible plan (e.g. a memory cap nothing fits under)."""


def nearest(key: str, valid: tuple[str, ...] | list[str]) -> str:
    """' (did you mean X?)' for the closest valid key, or '; valid: ...'."""
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else f"; valid: {', '.join(valid)}"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A reader never sees a half-written file and a failed write leaves no file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as fb:
                fb.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as ft:
                ft.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
