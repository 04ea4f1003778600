"""Read vTrain's measured data: all-reduce look-up tables and Megatron iteration times.

* ``AR_GPU<n>_..._LUT.csv``: ``size(B), count, type, time(ns), busbw(GB/s), time(ns),
  busbw(GB/s)`` (out-of-place, then in-place), one row per message size. Times are converted to
  us here.
* ``ground_truth_single.csv`` (UTF-8 with a BOM, CRLF line ends): ``# GPUs, global batch, micro
  batch, hidden size, attention heads, # layers, sequence length, tensor parallelism, data
  parallelism, pipeline parallelism, iteration time (ms)``; converted to us here.

Columns are found by name (case, spaces and the BOM ignored), so their order may change; a
missing column is an :class:`InputError` naming the file and the columns it lacks.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import InputError

_GPUS_IN_NAME = re.compile(r"GPU(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class LutRow:
    """One all-reduce measurement: ``size`` bytes over ``gpus`` GPUs; times in us, busbw in GB/s."""

    size: int
    count: int
    dtype: str
    time_us: float
    busbw_gbs: float
    time_us_in_place: float | None
    busbw_gbs_in_place: float | None
    gpus: int | None
    source: str
    line: int


@dataclass(frozen=True)
class VtrainRun:
    """One measured Megatron training iteration on one node (``iter_us`` in us)."""

    gpus: int
    global_batch: int
    micro_batch: int
    hidden: int
    heads: int
    layers: int
    seq_len: int
    tp: int
    dp: int
    pp: int
    iter_us: float
    line: int

    @property
    def microbatches(self) -> int:
        """Micro-batches per iteration per pipeline: global / (micro x dp)."""
        return self.global_batch // (self.micro_batch * self.dp)


GROUND_TRUTH_COLUMNS = {
    "gpus": "# gpus", "global_batch": "global batch", "micro_batch": "micro batch", "hidden": "hidden size",
    "heads": "attention heads", "layers": "# layers", "seq_len": "sequence length",
    "tp": "tensor parallelism", "dp": "data parallelism", "pp": "pipeline parallelism",
    "iter_ms": "iteration time (ms)",
}


def _norm(name: str) -> str:
    return " ".join(name.replace("\ufeff", "").strip().lower().split())


def _read_rows(path: Path) -> list[list[str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, None, "is a directory, not a CSV file") from None
    text = data.decode("utf-8-sig", errors="replace")
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)]
    if not rows:
        raise InputError(path, None, "empty CSV file")
    return rows


def read_ar_lut(path: str | Path, gpus: int | None = None) -> list[LutRow]:
    """Rows of a vTrain all-reduce LUT; ``gpus`` defaults to the ``GPU<n>`` in the file name."""
    path = Path(path)
    rows = _read_rows(path)
    header = [_norm(c) for c in rows[0]]
    need = ["size(b)", "count", "type", "time(ns)", "busbw(gb/s)"]
    missing = [c for c in need if c not in header]
    if missing:
        raise InputError(path, "header", f"missing column(s) {', '.join(missing)} "
                                         f"(expected size(B), count, type, time(ns), busbw(GB/s)[, time(ns), busbw(GB/s)])")
    i_size, i_count, i_type = header.index("size(b)"), header.index("count"), header.index("type")
    times = [i for i, c in enumerate(header) if c == "time(ns)"]
    bws = [i for i, c in enumerate(header) if c == "busbw(gb/s)"]
    if gpus is None:
        m = _GPUS_IN_NAME.search(path.name)
        gpus = int(m.group(1)) if m else None
    out = []
    for lineno, r in enumerate(rows[1:], start=2):
        try:
            t_oop, bw_oop = float(r[times[0]]) / 1e3, float(r[bws[0]])
            size, count = int(r[i_size]), int(r[i_count])
        except (ValueError, IndexError):
            raise InputError(path, f"line {lineno}", f"malformed row {','.join(r)!r}") from None
        t_ip = bw_ip = None
        if len(times) > 1 and len(bws) > 1 and len(r) > max(times[1], bws[1]):
            try:
                t_ip, bw_ip = float(r[times[1]]) / 1e3, float(r[bws[1]])
            except ValueError:
                t_ip = bw_ip = None
        if size <= 0 or t_oop <= 0:
            raise InputError(path, f"line {lineno}", f"size and time must be > 0, got {size} B, {t_oop} us")
        out.append(LutRow(size, count, r[i_type].strip(), t_oop, bw_oop, t_ip, bw_ip, gpus, str(path), lineno))
    if not out:
        raise InputError(path, None, "no data rows after the header")
    return out


def read_ground_truth(path: str | Path) -> list[VtrainRun]:
    """Rows of vTrain's ``ground_truth_single.csv`` (iteration time converted to us)."""
    path = Path(path)
    rows = _read_rows(path)
    header = [_norm(c) for c in rows[0]]
    missing = [name for name in GROUND_TRUTH_COLUMNS.values() if name not in header]
    if missing:
        raise InputError(path, "header", f"missing column(s): {', '.join(repr(m) for m in missing)}")
    idx = {k: header.index(v) for k, v in GROUND_TRUTH_COLUMNS.items()}
    out = []
    for lineno, r in enumerate(rows[1:], start=2):
        try:
            ms = float(r[idx["iter_ms"]])
            vals = {k: int(r[i]) for k, i in idx.items() if k != "iter_ms"}
        except (ValueError, IndexError):
            raise InputError(path, f"line {lineno}", f"malformed row {','.join(r)!r}") from None
        run = VtrainRun(iter_us=ms * 1e3, line=lineno, **vals)
        if run.tp * run.dp * run.pp != run.gpus:
            raise InputError(path, f"line {lineno}", f"tp x dp x pp = {run.tp * run.dp * run.pp} != # GPUs {run.gpus}")
        if run.global_batch % (run.micro_batch * run.dp):
            raise InputError(path, f"line {lineno}", "global batch is not a multiple of micro batch x dp")
        if ms <= 0:
            raise InputError(path, f"line {lineno}", f"iteration time must be > 0, got {ms}")
        out.append(run)
    if not out:
        raise InputError(path, None, "no data rows after the header")
    return out
