"""Read GPU kernels from a Kineto / Chrome-trace JSON (PyTorch profiler output).

Kineto writes ``{"traceEvents": [...], ...}`` (plain Chrome traces may be a bare list of events;
``.gz`` files are read too). GPU work is ``ph: "X"`` events of ``cat`` ``kernel``, ``gpu_memcpy``
or ``gpu_memset`` with ``ts`` and ``dur`` in microseconds and ``args.stream`` / ``args.device``.
NCCL kernels (``ncclKernel_*`` / ``ncclDevKernel_*``) carry, when PyTorch records communication
parameters, ``Collective name``, ``In msg nelems``, ``Out msg nelems``, ``dtype`` and ``Group
size`` in ``args``; the message size in bytes is ``max(in, out) nelems x dtype size``, the
nccl-tests convention (the whole buffer; for all_gather the gathered one).

Each kernel is linked to the CPU operator that launched it through ``External id``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.errors import InputError

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")

# PyTorch's dtype names (c10::ScalarType) -> bytes per element.
DTYPE_BYTES = {
    "float": 4, "float32": 4, "double": 8, "float64": 8, "half": 2, "float16": 2, "bfloat16": 2,
    "long": 8, "int64": 8, "int": 4, "int32": 4, "short": 2, "int16": 2, "char": 1, "int8": 1,
    "byte": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1, "complexfloat": 8, "complexdouble": 16, "uint16": 2, "uint32": 4, "uint64": 8,
}

# Collective names PyTorch records -> engine.core.ir collective names.
COLLECTIVE_NAMES = {
    "allreduce": "all_reduce", "all_reduce": "all_reduce", "allreduce_coalesced": "all_reduce",
    "allgather": "all_gather", "all_gather": "all_gather", "_allgather_base": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather", "all_gather_into_tensor": "all_gather",
    "reduce_scatter": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter", "reducescatter": "reduce_scatter",
    "all_to_all": "all_to_all", "alltoall": "all_to_all", "all_to_allv": "all_to_all", "alltoall_base": "all_to_all",
    "broadcast": "broadcast", "send": "send_recv", "recv": "send_recv", "sendrecv": "send_recv",
    "reduce": "reduce", "gather": "gather", "scatter": "scatter", "barrier": "barrier",
}
# Kernel-name words -> collective names (traces without the recorded parameters).
_KERNEL_WORDS = {
    "allreduce": "all_reduce", "allgather": "all_gather", "reducescatter": "reduce_scatter",
    "alltoall": "all_to_all", "broadcast": "broadcast", "sendrecv": "send_recv", "send": "send_recv",
    "recv": "send_recv", "reduce": "reduce",
}
_NCCL_KERNEL = re.compile(r"^nccl(?:Dev)?Kernel_([A-Za-z]+)(?:_([A-Z]+))?(?:_(LL128|LL|SIMPLE|Simple))?", re.IGNORECASE)


@dataclass(frozen=True)
class KernelEvent:
    """One GPU activity. ``ts_us``/``dur_us`` in us; NCCL fields are ``None`` on other kernels.

    ``msg_bytes`` is the collective's buffer size in bytes (``None`` when the trace lacks the
    element counts or the dtype is unknown); ``op`` is the launching CPU operator, if found.
    """

    name: str
    category: str
    device: int | None
    stream: int | None
    ts_us: float
    dur_us: float
    correlation: int | None
    external_id: int | None
    op: str | None = None
    collective: str | None = None
    algorithm: str | None = None
    protocol: str | None = None
    in_nelems: int | None = None
    out_nelems: int | None = None
    dtype: str | None = None
    group_size: int | None = None
    msg_bytes: int | None = None

    @property
    def is_nccl(self) -> bool:
        return self.collective is not None

    @property
    def end_us(self) -> float:
        return self.ts_us + self.dur_us


@dataclass
class KinetoTrace:
    """The GPU activities of one trace, sorted by (device, stream, start)."""

    source: str
    kernels: list[KernelEvent]
    world_size: int | None = None
    rank: int | None = None
    device_names: tuple[str, ...] = ()

    def nccl(self) -> list[KernelEvent]:
        return [k for k in self.kernels if k.is_nccl]

    def streams(self) -> list[tuple[int | None, int | None]]:
        return sorted({(k.device, k.stream) for k in self.kernels}, key=lambda x: (x[0] or -1, x[1] or -1))


def _load(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, None, "is a directory, not a trace file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputError(path, None, f"corrupt gzip file: {e}") from None
    try:
        return json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno}", f"invalid JSON: {e.msg}") from None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def read_kineto(path: str | Path) -> KinetoTrace:
    """Parse a Kineto / Chrome-trace JSON file into its GPU activities."""
    path = Path(path)
    data = _load(path)
    if isinstance(data, list):
        events, meta = data, {}
    elif isinstance(data, dict):
        if "traceEvents" not in data:
            raise InputError(path, "traceEvents", "missing: not a Chrome/Kineto trace (expected an object with 'traceEvents')")
        events, meta = data["traceEvents"], data
    else:
        raise InputError(path, None, "a trace must be a JSON object with 'traceEvents' or a list of events")
    if not isinstance(events, list):
        raise InputError(path, "traceEvents", "must be a list of events")

    cpu_ops: dict[int, str] = {}
    for e in events:
        if isinstance(e, dict) and e.get("cat") == "cpu_op" and isinstance(e.get("args"), dict):
            ext = _int(e["args"].get("External id"))
            if ext is not None:
                cpu_ops.setdefault(ext, str(e.get("name")))

    kernels = []
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "X" or e.get("cat") not in GPU_CATEGORIES:
            continue
        raw_args = e.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        try:
            ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        except (KeyError, TypeError, ValueError):
            continue
        ext = _int(args.get("External id"))
        k = dict(name=str(e.get("name", "")), category=e["cat"], device=_int(args.get("device")),
                 stream=_int(args.get("stream", e.get("tid"))), ts_us=ts, dur_us=dur,
                 correlation=_int(args.get("correlation")), external_id=ext, op=cpu_ops.get(ext) if ext is not None else None)
        k.update(_nccl_fields(k["name"], args))
        kernels.append(KernelEvent(**k))
    kernels.sort(key=lambda k: (k.device if k.device is not None else -1, k.stream if k.stream is not None else -1,
                                k.ts_us, k.name))
    raw_dist = meta.get("distributedInfo")
    dist: dict[str, Any] = raw_dist if isinstance(raw_dist, dict) else {}
    names = tuple(str(d.get("name")) for d in meta.get("deviceProperties", []) if isinstance(d, dict))
    return KinetoTrace(str(path), kernels, _int(dist.get("world_size")), _int(dist.get("rank")), names)


def _nccl_fields(name: str, args: dict) -> dict:
    """The NCCL fields of a kernel (empty for a non-NCCL kernel)."""
    m = _NCCL_KERNEL.match(name)
    recorded = args.get("Collective name")
    if m is None and recorded is None:
        return {}
    out: dict[str, Any] = {}
    if m is not None:
        out["algorithm"] = m.group(2).upper() if m.group(2) else None
        out["protocol"] = m.group(3).upper() if m.group(3) else None
    if recorded is not None:
        out["collective"] = COLLECTIVE_NAMES.get(str(recorded).lower(), str(recorded).lower())
    elif m is not None:  # always: with neither a match nor a recorded name we returned above
        out["collective"] = _KERNEL_WORDS.get(m.group(1).lower(), m.group(1).lower())
    nin, nout = _int(args.get("In msg nelems")), _int(args.get("Out msg nelems"))
    dtype = args.get("dtype")
    out.update(in_nelems=nin, out_nelems=nout, dtype=str(dtype) if dtype is not None else None,
               group_size=_int(args.get("Group size")))
    width = DTYPE_BYTES.get(str(dtype).lower()) if dtype is not None else None
    if width is not None and (nin is not None or nout is not None):
        out["msg_bytes"] = max(nin or 0, nout or 0) * width
    return out


OPS_CSV_COLUMNS = ("id", "name", "op", "category", "kind", "device", "stream", "start_us", "duration_us",
                   "collective", "msg_bytes", "dtype", "group_size")


def ops_csv(trace: KinetoTrace) -> str:
    """One CSV row per GPU activity: measured durations for a ``graph`` workload (``duration_us``);
    ``kind`` is ``comm`` for NCCL kernels, else ``compute``; ``start_us`` is relative to the
    trace's first GPU activity. Ids are ``k<index>`` in (device, stream, start) order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(OPS_CSV_COLUMNS)
    t0 = min((k.ts_us for k in trace.kernels), default=0.0)
    for i, k in enumerate(trace.kernels):
        w.writerow([f"k{i}", k.name, k.op or "", k.category, "comm" if k.is_nccl else "compute",
                    "" if k.device is None else k.device, "" if k.stream is None else k.stream,
                    f"{k.ts_us - t0:.3f}", f"{k.dur_us:.3f}", k.collective or "",
                    "" if k.msg_bytes is None else k.msg_bytes, k.dtype or "", "" if k.group_size is None else k.group_size])
    return buf.getvalue()

