"""Export a pipeline plan's per-rank order in PyTorch pipelining's CSV schedule format.

``torch.distributed.pipelining`` reads a "compute only" schedule as CSV with one row per rank
(row ``r`` = pipeline rank ``r``) and one action per cell, written ``{stage}{type}{microbatch}``
with type ``F`` (forward), ``I`` (backward for inputs), ``W`` (backward for weights) or ``B``
(full backward), e.g. ``0F0``, ``3I2``, ``3W2``; an overlapped forward/backward pair is
``({stage}F{mb};{stage}B{mb})OVERLAP_F_B``. Stage indices are the workload's (virtual) stages;
rank ``r`` is the ``r``-th distinct GPU of the pipeline's ``stage_devices``.

Mapping of a plan's order: ``F`` ops -> ``F``; a ``B`` op immediately followed on its GPU by the
``W`` of the same stage and micro-batch -> one full backward ``B``; other ``B`` ops -> ``I`` when
the workload has ``W`` ops, else ``B``; ``W`` ops -> ``W``; pairs listed in
``plan.meta["overlap_pairs"]`` (adjacent in the order) -> ``OVERLAP_F_B``. A bidirectional
pipeline (DualPipe) has no equivalent there: its two directions are two model replicas, and
torch's stages form a single chain; export refuses it.
"""

from __future__ import annotations

import csv
import io

from engine.core.errors import InputError
from engine.core.ir import Plan, Workload
from engine.planners.schedules.actions import PipelineShape


def torch_actions(plan: Plan, workload: Workload) -> list[list[str]]:
    """Per pipeline rank (row), its actions as torch pipelining action strings."""
    meta = workload.meta or {}
    if meta.get("kind") != "pipeline":
        raise InputError(None, "workload.kind", "torch-csv export needs a pipeline workload")
    ops = workload.ops
    listed = [o for ids in plan.order.values() for o in ids]
    unknown = sorted(set(plan.placements) - set(ops)) or sorted(set(listed) - set(ops))
    if unknown:
        raise InputError(None, f"placements.{unknown[0]}", "op not in the scenario's workload")
    missing = sorted(set(ops) - set(listed))
    if missing or len(listed) != len(ops):
        raise InputError(None, "order", f"the plan's order must list every op of the scenario once "
                                        f"({len(missing)} missing, e.g. {missing[:2]})")
    shape = PipelineShape.of(workload, "export")
    if shape.directions != 1:
        raise InputError(None, "workload.directions",
                         "torch-csv cannot express a bidirectional pipeline (directions: 2): torch.distributed.pipelining "
                         "stages form one chain; DualPipeV is the one-direction form of DualPipe")
    pair_of: dict[str, tuple[list[str], list[str]]] = {}
    for pair in plan.meta.get("overlap_pairs", []):
        pair_of[pair["forward"][0]] = (list(pair["forward"]), list(pair["backward"]))
    rows = []
    for gpu in shape.gpus:
        seq = list(plan.order.get(gpu, []))
        cells, i = [], 0
        while i < len(seq):
            pair = pair_of.get(seq[i])
            n = len(pair[0]) + len(pair[1]) if pair else 0
            if pair and seq[i:i + n] == pair[0] + pair[1]:
                f, b = _single(pair[0], ops, shape.has_w), _single(pair[1], ops, shape.has_w)
                cells.append(f"({f};{b})OVERLAP_F_B")
                i += n
                continue
            take = 2 if _is_full_backward(seq[i:i + 2], ops) else 1
            cells.append(_single(seq[i:i + take], ops, shape.has_w))
            i += take
        rows.append(cells)
    return rows


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
