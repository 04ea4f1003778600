"""Megatron's 1F1B iteration of a ``transformer`` workload: the plan, and its time in closed form.

:func:`one_f_one_b_order` orders the ops of :func:`engine.workloads.transformer.build_transformer` the way
Megatron-LM runs them without virtual stages: on pipeline rank ``p`` of ``pp``, ``pp - p - 1``
warm-up forwards, then one forward / one backward until the forwards run out, then the remaining
backwards; each forward is followed by its epilogue after the TP all-reduce, each backward by its
weight gradient and then its epilogue; after the last backward the DP reduction, the tied
embedding all-reduce and the optimizer step. Times are the semi-active schedule of that order
(every op as early as its stream order, its inputs and the comm delays allow).

:func:`iteration_time_1f1b` is the closed form of the same schedule: with ``F'_s = F_s + ar_F``
and ``B'_s = B_s + max(W_s, ar_B)`` (``B_s + W_s`` without TP) per stage, and ``c`` the send time,

    T_pipe = sum_s (F'_s + B'_s) + (m - 1) max_s (F'_s + B'_s) + 2 (pp - 1) c

rank ``s`` ends its last backward at ``T_pipe - sum_{s' < s} (B'_s' + c)``, then the DP reduction,
the embedding all-reduce (after both ends are ready) and the optimizer step. Exact for uniform
stages; a test and the calibration bench compare it with the semi-active plan and the simulator.
Times in us.

:func:`transformer_schedule_plan` is the ``schedule:1f1b`` planner of a transformer scenario (what
``plansim simulate`` runs by default), memory cap checked.
"""

from __future__ import annotations

from typing import Any, Sequence

from engine.core.cluster import ClusterView, DelayModel
from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.core.ir import Placement, Plan, Workload
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.schedules.gpipe_1f1b import one_f_one_b_sequence
from engine.planners.schedules.library import check_fits, check_name
from engine.workloads.transformer import StageTimes, StepEnd, TransformerSpec, gpu_of, spec_from_dict

STEP_END_PHASES = ("DP", "EMB", "OPT", "AG")


def iteration_time_1f1b(times: Sequence[StageTimes], end: StepEnd, microbatches: int, send_us: float) -> float:
    """Closed-form 1F1B iteration time (us) from per-stage times (one stage per rank)."""
    p = len(times)
    fwd = [t.F + t.ar_F for t in times]
    bwd = [t.B + (max(t.W, t.ar_B) if t.ar_B > 0 else t.W) for t in times]
    slot = [f + b for f, b in zip(fwd, bwd)]
    pipe = sum(slot) + (microbatches - 1) * max(slot) + 2 * (p - 1) * send_us
    ready = []
    done = pipe
    for s in range(p):
        ready.append(done + end.dp[s])
        done -= bwd[s] + send_us
    if end.emb_ranks is not None:
        a, b = end.emb_ranks
        e = max(ready[a], ready[b]) + end.emb
        ready[a] = ready[b] = e
    return max(r + o for r, o in zip(ready, end.opt))


def one_f_one_b_order(spec: TransformerSpec, workload: Workload) -> dict[int, list[str]]:
    """Per GPU, its ops in Megatron's 1F1B order (collectives on their group's first GPU)."""
    par = spec.parallelism
    if par.vpp != 1:
        raise InputError(None, "workload.parallelism.vpp", "the 1F1B order here has no virtual stages (vpp must be 1)")
    m, tp, dp, pp = spec.microbatches, par.tp, par.dp, par.pp
    ops = workload.ops
    order: dict[int, list[str]] = {}

    def put(op_id: str) -> None:
        if op_id in ops:
            op = ops[op_id]
            if op.collective is not None:
                dev = op.collective.group[0]
            else:
                assert op.devices is not None  # the transformer builder pins every op to its GPU
                dev = op.devices[0]
            if op_id not in order.setdefault(dev, []):
                order[dev].append(op_id)

    for d in range(dp):
        for p in range(pp):
            seq = one_f_one_b_sequence(min(pp - p - 1, m), m, lambda i: ("F", i), lambda i: ("B", i))
            dsfx = f".d{d}" if dp > 1 else ""
            for r in range(tp):
                sfx = (f".t{r}" if tp > 1 else "") + dsfx
                for phase, mb in seq:
                    base = f"{phase}{mb}.s{p}"
                    put(base + sfx)
                    if phase == "B":
                        put(f"W{mb}.s{p}{sfx}")
                    if tp > 1:
                        put(f"{base}.ar{dsfx}")
                        put(f"{base}.end{sfx}")
    for op_id in sorted(o for o in ops if o.startswith("DP."))+ sorted(o for o in ops if o.startswith("EMB.")) + \
            sorted(o for o in ops if o.startswith("OPT.")) + sorted(o for o in ops if o.startswith("AG.")):
        put(op_id)
    missing = sorted(set(ops) - {o for lst in order.values() for o in lst})
    if missing:
        raise InputError(None, "workload", f"ops outside the 1F1B order: {missing[:4]}")
    return order


def semi_active_plan(workload: Workload, order: dict[int, list[str]], cluster: ClusterView, comm: DelayModel,
                     planner: str = "1f1b") -> Plan:
    """The semi-active plan of ``order``: each op starts when the previous op of every stream it
    occupies (a collective: the comm stream of every GPU of its group) has ended and its inputs
    have arrived (``comm.delay``)."""
    ops = workload.ops
    ids = sorted(ops)
    index = {o: k for k, o in enumerate(ids)}
    dur = [ops[o].duration_on(cluster.gpu_model) for o in ids]
    device = {o: dev for dev, seq in order.items() for o in seq}
    arcs = [(index[u], index[v], dur[index[u]] + comm.delay(u, v, device[u], device[v], nbytes))
            for u, v, nbytes in workload.graph.edges(data="bytes")]
    # a collective joins the comm stream of every GPU of its group where its lead GPU has it:
    # members of a group run the same sequence, so the lead's position is theirs
    chains: dict[tuple[int, str], list[tuple[int, int, str]]] = {}
    for dev, seq in order.items():
        for i, o in enumerate(seq):
            op = ops[o]
            late = 1 if op.phase in STEP_END_PHASES else 0
            for g in (op.collective.group if op.collective is not None else (dev,)):
                chains.setdefault((g, op.kind), []).append((late, i, o))
    for chain in chains.values():
        chain.sort()
        arcs += [(index[a], index[b], dur[index[a]]) for (_, _, a), (_, _, b) in zip(chain, chain[1:])]
    try:
        times = earliest_times(len(ids), arcs)
    except OrderCycle:
        raise InputError(None, "order", "the order waits on itself (deadlock)") from None
    start = {o: times[k] for k, o in enumerate(ids)}
    end = {o: times[k] + dur[k] for k, o in enumerate(ids)}
    placements = {o: Placement(device[o], start[o], end[o]) for o in sorted(ops)}
    return Plan(workload.name, placements, planner, status="schedule", order={d: list(v) for d, v in sorted(order.items())})


def transformer_schedule_plan(scenario: Any, name: str) -> Plan:
    """The ``schedule:<name>`` plan of ``scenario``'s transformer workload: for ``1f1b``
    Megatron's 1F1B order, semi-active. Refused in one line: an unknown name, a name other than
    the ``parallelism.schedule`` the workload was built for (its gradient edges follow that
    schedule), a schedule whose transformer order is not built yet, and a plan over the memory
    cap (:class:`InfeasibleError`)."""
    check_name(name, scenario.path)
    built_for = scenario.workload.meta["parallelism"]["schedule"]
    if name != built_for:
        raise InputError(scenario.path, "solver.planner",
                         f"schedule:{name} on a transformer workload built for {built_for} "
                         "(workload.parallelism.schedule): set that field instead")
    if name != "1f1b":
        raise InputError(scenario.path, "workload.parallelism.schedule",
                         f"schedule {name} is not built for transformer workloads yet (1f1b is); to run another "
                         "plan, write one (plansim plan --planner heuristic -o plan.json) and pass --plan plan.json")
    workload = scenario.workload
    order = one_f_one_b_order(spec_from_dict(scenario.raw["workload"]), workload)
    plan = semi_active_plan(workload, order, scenario.cluster, scenario.comm, planner=f"schedule:{name}")
    check_fits(plan, scenario, name)
    return plan


def send_time_us(spec: TransformerSpec, cluster: ClusterView, comm: CommModel, send_bytes: int) -> float:
    """Delay of one pipeline send between consecutive ranks (0 with one stage)."""
    if spec.parallelism.pp < 2:
        return 0.0
    return comm.route_delay(gpu_of(spec, 0, 0, 0), gpu_of(spec, 0, 1, 0), send_bytes)
