"""Read, override and validate hardware profiles.

``load_profile(name_or_path, overrides=None, source=None)`` takes a shipped profile name
(``list_profiles()``) or a path to a YAML file, applies ``overrides`` (``{dotted key: value}``
in datasheet units, e.g. ``{"node.nic_gbps": 200}``; nested mappings are accepted too), checks
every field (type, range, unknown keys with the nearest valid key) and converts to internal
units once. ``source`` is the file that named the profile (a scenario): errors about the name
and the overrides carry it, and a relative path resolves against its folder. With
``source=None`` those errors carry no file, so a caller can fill in its own.
Errors inside a profile file always name that file.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from engine.core.documents import parse_yaml, read_text
from engine.core.errors import InputError
from hardware_profiles.profile import DTYPES, FIELD_BY_PATH, FIELDS, Field, Profile, profile_from_flat

PACKAGE_DIR = Path(__file__).resolve().parent
_LEAVES = tuple(FIELD_BY_PATH)
_BRANCHES = frozenset(p.rsplit(".", i)[0] for p in _LEAVES for i in range(1, p.count(".") + 1))


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in PACKAGE_DIR.glob("*.yaml"))


def shipped_path(name: str) -> Path:
    """The file of shipped profile ``name``."""
    return PACKAGE_DIR / f"{name}.yaml"


def load_profile(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                 source: str | os.PathLike | None = None) -> Profile:
    """A validated :class:`Profile` from a shipped name or a YAML path, with ``overrides`` applied."""
    path = _resolve(name_or_path, source)
    raw = _read_yaml(path)
    if raw is None:
        raise InputError(path, None, "empty profile file")
    if not isinstance(raw, dict):
        raise InputError(path, None, f"a profile must be a YAML mapping, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    _flatten(raw, "", values, origin, path)
    values.setdefault("name", path.stem)
    origin.setdefault("name", path)
    return _finish(values, origin, overrides, source, path)


def override_profile(profile: Profile, overrides: Mapping[str, Any], source: str | os.PathLike | None = None) -> Profile:
    """``profile`` with ``overrides`` (dotted keys, datasheet units) applied and re-validated."""
    values = profile.to_flat()
    origin = {k: source for k in values}
    return _finish(values, origin, overrides, source, source)


def profile_from_dict(raw: Mapping[str, Any], source: str | os.PathLike | None = None) -> Profile:
    """A validated Profile from an already-parsed mapping (as a YAML file would hold)."""
    if not isinstance(raw, Mapping):
        raise InputError(source, None, f"a profile must be a mapping, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    _flatten(raw, "", values, origin, source)
    return _finish(values, origin, None, source, source)


def _finish(values: dict, origin: dict, overrides: Mapping[str, Any] | None, source, file) -> Profile:
    """Apply ``overrides`` (errors name ``source``), check every field, build the Profile.

    ``file`` is the profile's own file, named by errors about keys it lacks."""
    if overrides:
        if not isinstance(overrides, Mapping):
            raise InputError(source, "overrides", "must be a mapping of dotted profile keys to values")
        _flatten(overrides, "", values, origin, source, what="override key")
    checked = {}
    for f in FIELDS:
        v = values.get(f.path)
        if v is None:
            if f.required:
                unit = f" in {f.unit}" if f.unit else ""
                raise InputError(origin.get(f.path, file), f.path, f"missing: {f.doc}{unit}")
            continue
        checked[f.path] = _check(f, v, origin.get(f.path))
    if not any(f"gpu.tflops.{dt}" in checked for dt in DTYPES):
        raise InputError(file, "gpu.tflops", f"give the peak TFLOP/s of at least one of {', '.join(DTYPES)}")
    return profile_from_flat(checked)


def _resolve(name_or_path: str | os.PathLike, source) -> Path:
    text = os.fspath(name_or_path)
    is_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text
    if is_path:
        path = Path(text).expanduser()
        if not path.is_absolute() and source is not None:
            path = Path(source).parent / path
        if not path.is_file():
            raise InputError(source, "profile", f"no profile file {str(path)!r}")
        return path
    shipped = list_profiles()
    if text not in shipped:
        near = difflib.get_close_matches(text, shipped, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InputError(source, "profile", f"unknown profile {text!r}{hint}; shipped: {', '.join(shipped)}")
    return shipped_path(text)


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def _read_yaml(path: Path) -> Any:
    return parse_yaml(read_text(path), path, lambda text: yaml.load(text, Loader=_StrictLoader))


def _nearest(key: str) -> str:
    near = difflib.get_close_matches(key, _LEAVES, n=1, cutoff=0.0)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _flatten(raw: Mapping, prefix: str, out: dict, origin: dict, file, what: str = "key") -> None:
    """Copy ``raw`` into ``out`` as ``{dotted key: value}``, refusing keys no field has."""
    for key, value in raw.items():
        if not isinstance(key, str):
            raise InputError(file, prefix.rstrip(".") or None, f"{what} {key!r} is not a string")
        path = prefix + key
        if isinstance(value, Mapping):
            if path in FIELD_BY_PATH:
                raise InputError(file, path, f"expected {_kind_text(FIELD_BY_PATH[path])}, got a mapping")
            if path not in _BRANCHES:
                raise InputError(file, path, f"unknown {what}{_nearest(path)}")
            _flatten(value, path + ".", out, origin, file, what)
        elif path in FIELD_BY_PATH:
            out[path] = value
            origin[path] = file
        elif path in _BRANCHES:
            raise InputError(file, path, f"expected a mapping (a section), got {value!r}")
        else:
            raise InputError(file, path, f"unknown {what}{_nearest(path)}")


def _kind_text(f: Field) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[f.kind]


def _check(f: Field, v: Any, file) -> Any:
    """The value of field ``f`` if its type and range are right, else an InputError."""
    if f.kind == "str":
        if not isinstance(v, str) or not v.strip():
            raise InputError(file, f.path, f"expected a non-empty string, got {v!r}")
        if f.path == "description" or v == v.strip():
            return v
        raise InputError(file, f.path, f"leading or trailing spaces in {v!r}")
    if f.kind == "bool":
        if not isinstance(v, bool):
            raise InputError(file, f.path, f"expected true or false, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = ""
        if isinstance(v, str):
            try:
                float(v)
                hint = " (YAML reads numbers like 1e3 as text: write 1.0e3)"
            except ValueError:
                pass
        raise InputError(file, f.path, f"expected {_kind_text(f)}, got {v!r}{hint}")
    if f.kind == "int" and not isinstance(v, int):
        raise InputError(file, f.path, f"expected an integer, got {v!r}")
    if not math.isfinite(v):
        raise InputError(file, f.path, f"expected a finite number, got {v!r}")
    low_bad = f.lo is not None and (v <= f.lo if f.lo_open else v < f.lo)
    high_bad = f.hi is not None and (v >= f.hi if f.hi_open else v > f.hi)
    if low_bad or high_bad:
        unit = f" {f.unit}" if f.unit else ""
        raise InputError(file, f.path, f"must be {f.range_text()}, got {v!r}{unit}")
    return v


__all__ = ["load_profile", "list_profiles", "override_profile", "profile_from_dict", "shipped_path", "PACKAGE_DIR"]
