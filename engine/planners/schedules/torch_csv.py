"""Export a pipeline plan's per-rank order in PyTorch pipelining's CSV schedule format, and read it back.

``torch.distributed.pipelining`` reads a "compute only" schedule as CSV with one row per rank
(row ``r`` = pipeline rank ``r``) and one action per cell, written ``{stage}{type}{microbatch}``
with type ``F`` (forward), ``I`` (backward for inputs), ``W`` (backward for weights) or ``B``
(full backward), e.g. ``0F0``, ``3I2``, ``3W2``; an overlapped forward/backward pair is
``({stage}F{mb};{stage}B{mb})OVERLAP_F_B`` (``_Action.from_str`` and
``PipelineScheduleMulti._load_csv`` in ``torch/distributed/pipelining/schedules.py``; the loader
infers which rank holds each stage from the rows, ``_validate_schedule``).

Which GPUs are the ranks:

* a ``pipeline`` workload: rank ``r`` is the ``r``-th distinct GPU of its ``stage_devices``;
* a ``transformer`` workload: rank ``p`` is pipeline rank ``p`` of data-parallel replica 0, TP
  rank 0 (the GPU of its stages' ``F0`` ops); its passes are the ``F{mb}.s{v}``, ``B{mb}.s{v}``
  and ``W{mb}.s{v}`` compute ops (the TP all-reduces, epilogues and step-end ops are not pipeline
  actions). Every other GPU of the pipeline rank (TP ranks, replicas) must run its passes in the
  same order, since torch runs one order per pipeline rank; a plan where they differ is refused.

Mapping of a plan's order: ``F`` ops -> ``F``; a ``B`` op immediately followed on its GPU (among
its passes) by the ``W`` of the same stage and micro-batch -> one full backward ``B``; other
``B`` ops -> ``I`` when the workload has ``W`` ops, else ``B``; ``W`` ops -> ``W``; pairs listed
in ``plan.meta["overlap_pairs"]`` (adjacent in the order) -> ``OVERLAP_F_B``. A bidirectional
pipeline (DualPipe) has no equivalent there: its two directions are two model replicas, and
torch's stages form a single chain; export refuses it.
"""

from __future__ import annotations

import csv
import io
import re

from engine.core.errors import InputError
from engine.core.ir import Op, Plan, Workload
from engine.planners.schedules.actions import PipelineShape

# one torch action (stage, type, micro-batch) and a cell: one action, or an overlapped pair
TorchAction = tuple[int, str, int]
Cell = tuple[TorchAction, ...]
_ACTION = re.compile(r"(\d+)(F|I|W|B)(\d+)")
_PAIR = re.compile(r"\((\d+F\d+);(\d+B\d+)\)OVERLAP_F_B")


def torch_actions(plan: Plan, workload: Workload) -> list[list[str]]:
    """Per pipeline rank (row), its actions as torch pipelining action strings."""
    kind = (workload.meta or {}).get("kind")
    if kind not in ("pipeline", "transformer"):
        raise InputError(None, "workload.kind", f"torch-csv export needs a pipeline or transformer workload, got {kind!r}")
    ops = workload.ops
    listed = [o for ids in plan.order.values() for o in ids]
    unknown = sorted(set(plan.placements) - set(ops)) or sorted(set(listed) - set(ops))
    if unknown:
        raise InputError(None, f"placements.{unknown[0]}", "op not in the scenario's workload")
    missing = sorted(set(ops) - set(listed))
    if missing or len(listed) != len(ops):
        raise InputError(None, "order", f"the plan's order must list every op of the scenario once "
                                        f"({len(missing)} missing, e.g. {missing[:2]})")
    if kind == "pipeline":
        shape = PipelineShape.of(workload, "export")
        if shape.directions != 1:
            raise InputError(None, "workload.directions",
                             "torch-csv cannot express a bidirectional pipeline (directions: 2): torch.distributed.pipelining "
                             "stages form one chain; DualPipeV is the one-direction form of DualPipe")
        sequences = [list(plan.order.get(gpu, [])) for gpu in shape.gpus]
        has_w = shape.has_w
    else:
        sequences = transformer_pass_orders(plan, workload)
        has_w = True
    pair_of: dict[str, tuple[list[str], list[str]]] = {}
    for pair in plan.meta.get("overlap_pairs", []):
        pair_of[pair["forward"][0]] = (list(pair["forward"]), list(pair["backward"]))
    return [_cells(seq, ops, pair_of, has_w) for seq in sequences]


def _cells(seq: list[str], ops: dict[str, Op], pair_of: dict[str, tuple[list[str], list[str]]], has_w: bool) -> list[str]:
    cells, i = [], 0
    while i < len(seq):
        pair = pair_of.get(seq[i])
        n = len(pair[0]) + len(pair[1]) if pair else 0
        if pair and seq[i:i + n] == pair[0] + pair[1]:
            f, b = _single(pair[0], ops, has_w), _single(pair[1], ops, has_w)
            cells.append(f"({f};{b})OVERLAP_F_B")
            i += n
            continue
        take = 2 if _is_full_backward(seq[i:i + 2], ops) else 1
        cells.append(_single(seq[i:i + take], ops, has_w))
        i += take
    return cells


def is_pass(op_id: str, op: Op) -> bool:
    """Whether ``op_id`` is a transformer pass ``F{mb}.s{v}`` / ``B{mb}.s{v}`` / ``W{mb}.s{v}``
    (with its rank suffixes), not an epilogue, collective or step-end op."""
    parts = op_id.split(".")
    return (op.kind == "compute" and op.collective is None and op.phase in ("F", "B", "W")
            and parts[:2] == [f"{op.phase}{op.microbatch}", f"s{op.stage}"] and "end" not in parts[2:])


def transformer_pass_orders(plan: Plan, workload: Workload) -> list[list[str]]:
    """Per pipeline rank, the pass op ids of its lead GPU (replica 0, TP rank 0) in plan order
    (module docstring); refused when another GPU of the rank runs its passes in another order."""
    ops = workload.ops
    meta = workload.meta
    ranks = meta["stage_ranks"]
    tag = (".t0" if meta["parallelism"]["tp"] > 1 else "") + (".d0" if meta["parallelism"]["dp"] > 1 else "")
    lead: dict[int, int] = {}
    for v, p in enumerate(ranks):
        dev = ops[f"F0.s{v}{tag}"].devices
        assert dev is not None  # the transformer builder pins every compute op to its GPU
        lead.setdefault(p, dev[0])
    orders: dict[int, list[tuple[str, int, int]]] = {}
    ids: dict[int, list[str]] = {}
    for gpu, seq in plan.order.items():
        passes = [o for o in seq if is_pass(o, ops[o])]
        orders[gpu] = [(ops[o].phase or "", int(ops[o].stage or 0), int(ops[o].microbatch or 0)) for o in passes]
        ids[gpu] = passes
    rank_of_stage = dict(enumerate(ranks))
    for gpu, actions in sorted(orders.items()):
        if not actions:
            continue
        p = rank_of_stage[actions[0][1]]
        if actions != orders[lead[p]]:
            raise InputError(None, "order", f"GPU {gpu} runs the passes of pipeline rank {p} in another order than "
                                            f"GPU {lead[p]}: torch pipelining runs one order per pipeline rank")
    return [ids[lead[p]] for p in range(len(lead))]


def _is_full_backward(ids: list[str], ops) -> bool:
    if len(ids) != 2:
        return False
    a, b = ops[ids[0]], ops[ids[1]]
    return a.phase == "B" and b.phase == "W" and (a.stage, a.microbatch) == (b.stage, b.microbatch)


def _single(ids: list[str], ops, has_w: bool) -> str:
    """One action string for one op, or for a B followed by its W (full backward)."""
    op = ops[ids[0]]
    if len(ids) == 2 or (op.phase == "B" and not has_w):
        kind = "B"
    else:
        kind = {"F": "F", "B": "I", "W": "W"}[op.phase]
    return f"{op.stage}{kind}{op.microbatch}"


def torch_csv(plan: Plan, workload: Workload) -> str:
    """The CSV text (``\\n`` line ends) of :func:`torch_actions`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in torch_actions(plan, workload):
        writer.writerow(row)
    return buf.getvalue()


def read_torch_csv(text: str, source=None) -> list[list[Cell]]:
    """Parse a compute-only torch pipelining CSV: per rank (row), per cell its actions
    ``(stage, type, micro-batch)`` (two for an overlapped pair, forward first). A cell that is
    not such an action is one :class:`InputError` naming row and column."""
    rows: list[list[Cell]] = []
    for r, row in enumerate(csv.reader(io.StringIO(text))):
        cells: list[Cell] = []
        for c, cell in enumerate(row):
            pair = _PAIR.fullmatch(cell.strip())
            parts = [pair.group(1), pair.group(2)] if pair else [cell.strip()]
            acts = [_ACTION.fullmatch(part) for part in parts]
            if not all(acts):
                raise InputError(source, f"row {r}, column {c}", f"not a torch pipelining action: {cell!r}")
            cells.append(tuple((int(a.group(1)), a.group(2), int(a.group(3))) for a in acts if a))
        rows.append(cells)
    return rows
