"""Results files of sweeps (``whatif``, ``search``): rows of finished work, rewritten atomically.

A results file is one JSON object: a header (what was swept, how many rows of how many) and
``rows``, each identified by a mapping of the settings that made it (``row[key]``). It is
rewritten through :func:`engine.core.errors.write_atomic` after every finished row, so an
interrupted sweep leaves a valid file and a re-run skips every row already in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from engine.core.documents import load_json
from engine.core.errors import InputError, write_atomic


def row_key(settings: dict[str, Any]) -> str:
    """The identity of a row: its settings as canonical JSON."""
    return json.dumps(settings, sort_keys=True)


def load_rows(path: Path, key: str, kind: str, hint: str, header: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) sweep, by :func:`row_key` of ``row[key]``; ``{}``
    when ``path`` does not exist. A file that is not a ``kind`` results file, or whose ``header``
    fields differ (another sweep's file), is refused naming ``hint`` (the option to change)."""
    if not path.exists():
        return {}
    try:
        data = load_json(path)
        rows = {row_key(row[key]): row for row in data["rows"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(path, "rows", f"not a plansim {kind} results file; remove it or name another with {hint}") from None
    for field, value in (header or {}).items():
        if data.get(field) != value:
            raise InputError(path, field, f"the file holds a {kind} with {field} {data.get(field)!r}, not {value!r}; "
                                          f"remove it or name another with {hint}")
    return rows


def save_rows(path: Path, header: dict[str, Any], rows: Iterable[dict[str, Any]], key: str) -> None:
    """Write ``header`` and ``rows`` (sorted by their key) to ``path`` atomically."""
    ordered = sorted(rows, key=lambda r: row_key(r[key]))
    write_atomic(path, json.dumps({**header, "done": len(ordered), "rows": ordered}, indent=1, sort_keys=True) + "\n")
