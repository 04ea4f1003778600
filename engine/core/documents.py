"""Reading the files users hand us (scenarios, graphs, plans, profiles, results): one reader.

Every file is read as UTF-8, parsed, and checked before any field is looked at: nesting at most
:data:`MAX_DEPTH` deep, every number finite and of magnitude at most :data:`MAX_MAGNITUDE`
(no duration, byte count or time in a plan comes near it; 1e308 durations would overflow sums
into infinities). Each failure is one :class:`engine.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from engine.core.errors import InputError

MAX_DEPTH = 64
MAX_MAGNITUDE = 1e18


def read_text(path: str | os.PathLike) -> str:
    """The file's text (UTF-8)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, None, "is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise InputError(path, None, f"not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number plansim accepts")


def parse_json(text: str, source: str | os.PathLike | None) -> Any:
    """Parsed and checked JSON (NaN and Infinity refused)."""
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InputError(source, f"line {e.lineno}", f"invalid JSON: {e.msg}") from None
    except ValueError as e:
        raise InputError(source, None, f"invalid JSON: {e}") from None
    except RecursionError:
        raise InputError(source, None, f"nested deeper than {MAX_DEPTH} levels") from None
    check_document(data, source)
    return data


def parse_yaml(text: str, source: str | os.PathLike | None, loader: Callable[[str], Any] = yaml.safe_load) -> Any:
    """Parsed and checked YAML (``loader`` parses; default ``yaml.safe_load``)."""
    try:
        data = loader(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise InputError(source, where, f"invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise InputError(source, None, f"nested deeper than {MAX_DEPTH} levels") from None
    check_document(data, source)
    return data


def load_json(path: str | os.PathLike) -> Any:
    return parse_json(read_text(path), path)


def load_yaml(path: str | os.PathLike) -> Any:
    return parse_yaml(read_text(path), path)


def check_document(data: Any, source: str | os.PathLike | None) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and numbers that are not finite or are
    beyond :data:`MAX_MAGNITUDE` (the error names the dotted field)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(source, where or None, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if isinstance(node, float) and not math.isfinite(node):
                raise InputError(source, where or None, f"must be a finite number, got {node!r}")
            if abs(node) > MAX_MAGNITUDE:
                raise InputError(source, where or None, f"{node:g} is beyond {MAX_MAGNITUDE:g}, out of any sane range")
