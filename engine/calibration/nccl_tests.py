"""Read nccl-tests logs (``all_reduce_perf`` and friends) into plain rows.

A log holds one or more tests, each a header (version, ``# Collective test starting: X_perf``,
``# nThread .. nGpus ..``, one ``#  Rank  r Group g Pid p on HOST device d [bus] NAME`` line per
rank), a column header and result rows::

    size  count  type  redop  root  | time algbw busbw #wrong | time algbw busbw #wrong
    (B)   (elements)                  | out-of-place (us, GB/s) | in-place

Units as printed: size in bytes, time in microseconds, algbw/busbw in GB/s (1e9 B/s). Older
nccl-tests print no ``root`` column; the column header says which layout a block has.

Tolerated and recorded in :attr:`NcclLog.skipped`: NCCL INFO/WARN lines, blank lines, truncated
rows (a row whose in-place half is cut keeps its out-of-place half; a row cut before its
out-of-place busbw is skipped). A file with no result row at all is an :class:`InputError`.

Ranks come from the ``Rank`` lines; when a log has none (``mpirun`` with a quiet rank 0) they are
recovered from busbw/algbw (2(n-1)/n for all_reduce, (n-1)/n for all_gather, reduce_scatter and
alltoall), and nodes / GPUs per node from an ``N<nodes>_G<gpus>`` file name when there are no
host names (the naming of the nccl-tests-cluster scripts); otherwise they stay ``None``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from engine.core.errors import InputError

# nccl-tests binary name -> collective name (engine.core.ir's names where it has one).
PERF_NAMES = {
    "all_reduce": "all_reduce", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
    "alltoall": "all_to_all", "sendrecv": "send_recv", "broadcast": "broadcast", "reduce": "reduce",
    "gather": "gather", "scatter": "scatter", "hypercube": "hypercube",
}
PLACEMENTS = ("out-of-place", "in-place")

_START = re.compile(r"^#\s*Collective test starting:\s*(\S+?)(?:_perf)?\s*$")
_THREAD = re.compile(r"^#\s*nThread\s+(\d+)\s+nGpus\s+(\d+)")
_RANK = re.compile(r"^#\s*Rank\s+(\d+)(?:\s+Group\s+(\d+))?\s+Pid\s+(\d+)\s+on\s+(\S+)\s+device\s+(\d+)\s+\[[^\]]*\]\s*(.*)$")
_VERSION = re.compile(r"^#\s*nccl-tests version\s+(\S+)(?:.*nccl-library=(\d+))?")
_AVG = re.compile(r"^#\s*Avg bus bandwidth\s*:\s*([0-9.eE+-]+)")
_FILE_NG = re.compile(r"N(\d+)_G(\d+)")


@dataclass(frozen=True)
class NcclMeasure:
    """One timing of a row: ``time_us`` (us), ``algbw_gbs`` and ``busbw_gbs`` (GB/s), ``wrong``
    (the #wrong column as printed, e.g. ``"0"`` or ``"N/A"``; ``None`` when cut off)."""

    time_us: float
    algbw_gbs: float
    busbw_gbs: float
    wrong: str | None


@dataclass(frozen=True)
class NcclRow:
    """One result row of one test. ``size`` in bytes (for all_gather / reduce_scatter: the whole
    gathered buffer), ``count`` in elements; ``in_place`` is ``None`` for a truncated row."""

    collective: str
    size: int
    count: int
    dtype: str
    redop: str
    root: int | None
    out_of_place: NcclMeasure
    in_place: NcclMeasure | None
    ranks: int | None
    nodes: int | None
    source: str
    line: int

    def measure(self, placement: str = "out-of-place") -> NcclMeasure | None:
        return self.out_of_place if placement == "out-of-place" else self.in_place

    @property
    def gpus_per_node(self) -> int | None:
        if self.ranks is None or not self.nodes or self.ranks % self.nodes:
            return None
        return self.ranks // self.nodes


@dataclass
class NcclTest:
    """One test block: the collective, the header facts and its rows."""

    collective: str
    ranks: int | None = None
    nodes: int | None = None
    hosts: tuple[str, ...] = ()
    gpu_name: str | None = None
    version: str | None = None
    nccl_version: str | None = None
    threads: int | None = None
    gpus_per_thread: int | None = None
    avg_busbw_gbs: float | None = None
    rows: list[NcclRow] = field(default_factory=list)
    start_line: int = 0


@dataclass
class NcclLog:
    """A parsed log: its tests in file order and the lines skipped as ``(line number, reason)``."""

    source: str
    tests: list[NcclTest]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def rows(self) -> list[NcclRow]:
        return [r for t in self.tests for r in t.rows]

    def collectives(self) -> list[str]:
        return sorted({t.collective for t in self.tests})


def out_of_place_times(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{collective: [(size bytes, out-of-place time us)]}`` of a log, collectives named as in
    :data:`PERF_NAMES` (``sendrecv`` -> ``send_recv``)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in read_nccl_tests(path).rows:
        out.setdefault(row.collective, []).append((row.size, row.out_of_place.time_us))
    return out


def bus_factor(collective: str, ranks: int) -> float:
    """nccl-tests' busbw / algbw factor (doc/PERFORMANCE.md)."""
    if collective == "all_reduce":
        return 2.0 * (ranks - 1) / ranks
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (ranks - 1) / ranks
    return 1.0


def ranks_from_busbw(collective: str, rows: Iterable[NcclRow]) -> int | None:
    """Recover the rank count from busbw/algbw of the largest rows (``None`` if it cannot)."""
    if collective not in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        return None
    best = sorted(rows, key=lambda r: -r.out_of_place.algbw_gbs)[:3]
    guesses = []
    for r in best:
        m = r.out_of_place
        if m.algbw_gbs <= 0:
            continue
        f = m.busbw_gbs / m.algbw_gbs
        gap = (2.0 - f) if collective == "all_reduce" else (1.0 - f)
        if gap <= 1e-6:
            continue
        n = (2.0 if collective == "all_reduce" else 1.0) / gap
        guesses.append(round(n))
    if not guesses:
        return None
    n = max(set(guesses), key=guesses.count)
    return n if n >= 2 else None


def read_nccl_tests(path: str | Path, text: str | None = None) -> NcclLog:
    """Parse the nccl-tests log at ``path`` (or ``text`` with ``path`` as its name)."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise InputError(path, None, "file not found") from None
        except IsADirectoryError:
            raise InputError(path, None, "is a directory, not an nccl-tests log") from None
    log = NcclLog(source=str(path), tests=[])
    test: NcclTest | None = None
    has_root = True
    pending_version: tuple[str | None, str | None] = (None, None)

    def current() -> NcclTest:
        nonlocal test
        if test is None:
            test = NcclTest(collective=_collective_from_name(path.name))
            test.version, test.nccl_version = pending_version
            log.tests.append(test)
        return test

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if m := _VERSION.match(line):
                pending_version = (m.group(1), m.group(2))
            elif m := _START.match(line):
                test = NcclTest(collective=PERF_NAMES.get(m.group(1), m.group(1)), start_line=lineno)
                test.version, test.nccl_version = pending_version
                log.tests.append(test)
            elif m := _THREAD.match(line):
                t = current()
                if t.rows:  # an older log without "test starting" lines: a new block begins
                    test = None
                    t = current()
                t.threads, t.gpus_per_thread = int(m.group(1)), int(m.group(2))
            elif m := _RANK.match(line):
                t = current()
                t.ranks = max(t.ranks or 0, int(m.group(1)) + 1)
                if m.group(4) not in t.hosts:
                    t.hosts = t.hosts + (m.group(4),)
                t.gpu_name = m.group(6).strip() or t.gpu_name
            elif m := _AVG.match(line):
                current().avg_busbw_gbs = float(m.group(1))
            elif "size" in line and "count" in line and "type" in line:
                has_root = "root" in line.split()
            continue
        row, reason = _parse_row(line, has_root)
        if row is None:
            log.skipped.append((lineno, reason))
            continue
        t = current()
        t.rows.append(NcclRow(collective=t.collective, source=str(path), line=lineno, ranks=None, nodes=None, **row))

    log.tests = [t for t in log.tests if t.rows]
    if not log.tests:
        raise InputError(path, None, "no nccl-tests result rows (expected lines 'size count type redop root "
                                     "time algbw busbw #wrong time algbw busbw #wrong')")
    _fill_ranks(log, path)
    return log


def _parse_row(line: str, has_root: bool) -> tuple[dict | None, str]:
    """A result row as keyword arguments of :class:`NcclRow`, or ``(None, reason)``."""
    tok = line.split()
    if not tok or not tok[0].isdigit():
        return None, "not a result row"
    lead = 5 if has_root else 4
    if len(tok) < lead + 3:
        return None, "truncated result row (no out-of-place time/algbw/busbw)"
    try:
        size, count = int(tok[0]), int(tok[1])
        root = int(tok[4]) if has_root else None
        oop = _measure(tok[lead:lead + 4])
    except ValueError:
        return None, "malformed result row"
    if oop is None:
        return None, "malformed result row"
    ip = None
    if len(tok) >= lead + 7:
        try:
            ip = _measure(tok[lead + 4:lead + 8])
        except ValueError:
            ip = None
    return dict(size=size, count=count, dtype=tok[2], redop=tok[3], root=root, out_of_place=oop, in_place=ip), ""


def _measure(tok: list[str]) -> NcclMeasure | None:
    time_us, algbw, busbw = (float(x) for x in tok[:3])
    if not all(math.isfinite(v) and v >= 0 for v in (time_us, algbw, busbw)) or time_us <= 0:
        return None
    return NcclMeasure(time_us, algbw, busbw, tok[3] if len(tok) > 3 else None)


def _collective_from_name(name: str) -> str:
    """A collective named in the file name (``all_reduce_perf.log``), else ``unknown``."""
    low = name.lower()
    for key in sorted(PERF_NAMES, key=len, reverse=True):
        if key in low:
            return PERF_NAMES[key]
    return "unknown"


def _fill_ranks(log: NcclLog, path: Path) -> None:
    """Give every test and row its rank and node counts (see the module docstring)."""
    m = _FILE_NG.search(path.name)
    file_nodes: int | None = None
    file_ranks: int | None = None  # nodes x GPUs per node, from the file name
    if m:
        file_nodes = int(m.group(1))
        file_ranks = file_nodes * int(m.group(2))
    for t in log.tests:
        if t.ranks is None:
            t.ranks = ranks_from_busbw(t.collective, t.rows)
        if t.hosts:
            t.nodes = len(t.hosts)
    known = [t.ranks for t in log.tests if t.ranks]
    for t in log.tests:
        if t.ranks is None and known:
            t.ranks = max(set(known), key=known.count)  # one job per file: the others tell
        if t.ranks is None and file_nodes:
            t.ranks = file_ranks
        if t.nodes is None and file_nodes and (t.ranks is None or t.ranks == file_ranks):
            t.nodes = file_nodes
        t.rows = [replace(r, ranks=t.ranks, nodes=t.nodes) for r in t.rows]
