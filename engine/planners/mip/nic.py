"""NIC capacity in the MIP (opt-in): cross-node transfers as tasks that cannot overlap on one NIC.

Without it a transfer is a pure delay ``c[i,j,a,b]`` (latency + bytes / route bandwidth), so any
number of transfers may pass one NIC at full rate at once. With it, every arc ``t = (i,j)`` that
carries ``bytes[t] > 0`` and whose ends may run on different nodes becomes a transfer task
(times in us, bandwidth in bytes/us):

* ``sigma[t]``: when the bytes start to move, ``sigma[t] >= s[i] + p[i]``, and
  ``s[j] >= sigma[t] + c[i,j,a,b]`` replaces ``s[i] + p[i]`` in the arc's precedence rows;
* with ``i`` on GPU ``a`` and ``j`` on GPU ``b`` of another node the task occupies the sending
  direction of ``a``'s NIC (the first NIC hop of ``cluster.route(a, b)``) and the receiving
  direction of ``b``'s NIC (the last NIC hop) during ``[sigma[t], sigma[t] + tau[t,r])`` with
  ``tau[t,r] = bytes[t] / bandwidth[r]`` (the link's effective rate from the topology). A NIC's
  two directions are separate resources ``r`` (directed links ``nic -> leaf``, ``leaf -> nic``);
* on one node or one GPU the task uses no NIC and ``sigma[t]`` may simply equal the end of ``i``.

Variables: ``sigma[t]`` in ``[ES[i] + p_min[i], LS[j] - c_min[i,j]]``; ``u[t,r]`` (task ``t``
uses link ``r``): a constant or a sum of ``x`` where an end is pinned, else a variable ``w[t,r]``
in [0,1] held up by its rows; ``q[t,t']`` in {0,1}: ``t`` before ``t'`` on every NIC link they
share (one interval per task, so one order for all links). Blocks: :func:`transfer_variables`,
:func:`transfer_precedence`, :func:`nic_use`, :func:`nic_no_overlap`; :class:`NicBlocks` adds them
to a built :class:`engine.planners.mip.model.Builder`.
"""

from __future__ import annotations

from typing import Any

import pyomo.environ as pyo

from engine.planners.mip.model import Builder
from engine.planners.mip.nic_sched import nic_semi_active
from engine.planners.mip.nic_tasks import Arc, Link, NicTasks


class NicBlocks:
    """The NIC-capacity blocks on a built :class:`engine.planners.mip.model.Builder`'s model, with
    their own state (memoised uses, shared-link pairs, counts). The builder must leave the task
    arcs' precedence to these blocks (``Builder(..., transfer_arcs=frozenset(nic.uses))``). The
    block functions below take a ``NicBlocks`` as ``b``: it reads the builder's model, windows and
    variables through it."""

    def __init__(self, builder: Builder, nic: NicTasks):
        self.builder = builder
        self.nic = nic
        self.memo: dict[tuple[Arc, Link], Any] = {}
        self.link_index = {r: k for k, r in enumerate(sorted(nic.bandwidth))}
        self.shared: dict[tuple[Arc, Arc], list[Link]] = {}
        self.stats: dict[str, int] = {}

    inst = property(lambda self: self.builder.inst)
    m = property(lambda self: self.builder.m)
    info = property(lambda self: self.builder.info)
    sp = property(lambda self: self.builder.sp)
    tol = property(lambda self: self.builder.tol)

    def p(self, i: int):
        return self.builder.p(i)

    def x(self, i: int, d: int):
        return self.builder.x(i, d)

    def add(self) -> "NicBlocks":
        """Every NIC block (after the builder has built its model)."""
        self.m.nic_w = pyo.Var(pyo.Any, bounds=(0, 1), dense=False)
        self.m.nic_rows = pyo.ConstraintList()
        transfer_variables(self, self.nic)
        transfer_precedence(self, self.nic)
        nic_no_overlap(self, self.nic)
        return self


# -- model blocks ------------------------------------------------------------------------------------

def sigma_window(b, t: Arc) -> tuple[float, float]:
    """``[ES[i] + p_min[i], LS[j] - c_min[i,j]]``: where ``sigma[t]`` can lie in a plan of makespan <= H."""
    i, j = t
    lo = b.info.es[i] + b.inst.pmin(i)
    return lo, max(lo, b.info.ls[j] - b.inst.min_delay(i, j))


def transfer_variables(b, nic: NicTasks) -> None:
    """``sigma[t]`` for every task, bounded by :func:`sigma_window`."""
    b.m.sigma = pyo.Var(nic.arcs(), domain=pyo.NonNegativeReals, bounds=lambda _m, i, j: sigma_window(b, (i, j)))


def transfer_precedence(b, nic: NicTasks) -> None:
    """For every task ``t = (i,j)`` and every ``a in D(i)``:

    ``sigma[t] >= s[i] + p[i]``,
    ``s[j] >= sigma[t] + sum_b c[i,j,a,b] x[j,b] - M_a (1 - x[i,a])``, ``M_a = max_b c[i,j,a,b]``,
    and, where ``i`` is flexible, ``s[j] >= sigma[t] + c_min[i,j]`` (for the LP relaxation).

    These replace the arc's rows of :meth:`engine.planners.mip.model.Builder.precedence`.
    """
    inst, m = b.inst, b.m
    m.nic_prec = pyo.ConstraintList()
    for t in nic.arcs():
        i, j = t
        m.nic_prec.add(m.sigma[t] >= m.s[i] + b.p(i))
        delays = inst.edges.get(t, {})
        if delays:
            for a in inst.devices[i]:
                row = {d: delays.get((a, d), 0.0) for d in inst.devices[j]}
                big = max(row.values())
                delay = sum(c * b.x(j, d) for d, c in row.items() if c > 0)
                m.nic_prec.add(m.s[j] >= m.sigma[t] + delay - big * (1 - b.x(i, a)))
        if len(inst.devices[i]) > 1 or not delays:
            m.nic_prec.add(m.s[j] >= m.sigma[t] + inst.min_delay(i, j))


def nic_use(b, nic: NicTasks, t: Arc, r: Link):
    """``u[t,r]``, 1 when task ``t`` occupies link ``r`` (memoised per ``(t, r)``).

    Pinned ends make it a constant or ``sum`` of the other end's ``x``. With both ends flexible
    it is a variable ``w[t,r]`` in [0,1] with, for each group ``G`` of source GPUs that reach
    ``r`` towards the same set ``B`` of sink GPUs (or the same grouped by sink, whichever side
    gives fewer rows): ``w[t,r] >= sum_{a in G} x[i,a] + sum_{b in B} x[j,b] - 1``. Each sum is
    0 or 1, so ``w`` is forced to 1 exactly when the placement uses ``r``.
    """
    memo = b.memo
    if (t, r) in memo:
        return memo[(t, r)]
    inst, m = b.inst, b.m
    i, j = t
    pl = [(a, d) for (a, d), links in sorted(nic.uses[t].items())
          if r in links and a in inst.devices[i] and d in inst.devices[j]]
    fi, fj = inst.fixed_device(i), inst.fixed_device(j)
    if not pl:
        out: Any = 0
    elif fi is not None and fj is not None:
        out = 1
    elif fi is not None:
        out = sum(b.x(j, d) for _, d in pl)
    elif fj is not None:
        out = sum(b.x(i, a) for a, _ in pl)
    else:
        by_src: dict[int, set[int]] = {}
        by_dst: dict[int, set[int]] = {}
        for a, d in pl:
            by_src.setdefault(a, set()).add(d)
            by_dst.setdefault(d, set()).add(a)
        src_groups = _groups(by_src)
        dst_groups = [(other, own) for own, other in _groups(by_dst)]
        groups = src_groups if len(src_groups) <= len(dst_groups) else dst_groups
        key = (i, j, b.link_index[r])
        m.nic_w[key] = 0
        out = m.nic_w[key]
        for srcs, dsts in groups:
            m.nic_rows.add(out >= sum(b.x(i, a) for a in srcs) + sum(b.x(j, d) for d in dsts) - 1)
    memo[(t, r)] = out
    return out


def _groups(by_key: dict[int, set[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Keys grouped by equal value sets: ``[(keys, values)]``, sorted."""
    inv: dict[tuple[int, ...], list[int]] = {}
    for k, vals in sorted(by_key.items()):
        inv.setdefault(tuple(sorted(vals)), []).append(k)
    return sorted((tuple(ks), vs) for vs, ks in inv.items())


def dag_order(b, t: Arc, u: Arc) -> int | None:
    """1 if arcs put ``t`` before ``u``, 0 if ``u`` before ``t``, else None. Arcs decide when
    ``j ⪯ i'`` (``t = (i,j)``, ``u = (i',j')``): ``sigma[u] >= s[i'] + p[i'] >= s[j] >=
    sigma[t] + c``, so ``u`` starts after ``t`` and, sharing a link, must wait for ``t``'s end."""
    inst = b.inst
    (i1, j1), (i2, j2) = t, u
    if j1 == i2 or inst.ordered(j1, i2):
        return 1
    if j2 == i1 or inst.ordered(j2, i1):
        return 0
    return None


def window_order(b, t: Arc, u: Arc) -> int | None:
    """With ``tight_big_m``: 1 (resp. 0) if only ``t`` first (resp. ``u`` first) fits the
    windows on a shared link, i.e. ``lo(u) + min_r tau[u,r] > hi(t)`` but not the reverse."""
    if not b.sp["tight_big_m"]:
        return None
    shared = b.shared[(t, u)]
    t_ok = sigma_window(b, t)[0] + min(b.nic.tau(t, r) for r in shared) <= sigma_window(b, u)[1] + b.tol
    u_ok = sigma_window(b, u)[0] + min(b.nic.tau(u, r) for r in shared) <= sigma_window(b, t)[1] + b.tol
    if t_ok and not u_ok:
        return 1
    if u_ok and not t_ok:
        return 0
    return None


def implied(b, t: Arc, r: Link) -> bool:
    """True if, arcs putting ``t`` first (:func:`dag_order`), ``sigma[t'] >= sigma[t] + tau[t,r]``
    already follows: every placement of ``t`` that uses ``r`` has ``c >= tau[t,r]``."""
    inst, nic = b.inst, b.nic
    i, j = t
    delays = inst.edges.get(t, {})
    return all(delays.get(ab, 0.0) >= nic.tau(t, r) for ab, links in nic.uses[t].items()
               if r in links and ab[0] in inst.devices[i] and ab[1] in inst.devices[j])


def nic_no_overlap(b, nic: NicTasks) -> None:
    """For tasks ``t < t'`` that may share a link ``r``, with ``k = 2 - u[t,r] - u[t',r]``
    (0 exactly when both use ``r``):

    ``sigma[t'] >= sigma[t] + tau[t,r] - M (1 - q[t,t']) - M k``, ``M = hi(t) + tau[t,r] - lo(t')``,
    ``sigma[t] >= sigma[t'] + tau[t',r] - M' q[t,t'] - M' k``, ``M' = hi(t') + tau[t',r] - lo(t)``,

    with ``[lo, hi]`` the windows of :func:`sigma_window`. Where arcs (:func:`dag_order`) or
    windows (:func:`window_order`) decide, ``q`` is that constant (no binary) and only the
    forced row is kept; an arc-forced row is dropped when the arcs already imply it
    (:func:`implied`).
    """
    m = b.m
    by_link: dict[Link, list[Arc]] = {}
    for t in nic.arcs():
        for r in nic.links(t, b.inst):
            by_link.setdefault(r, []).append(t)
    shared: dict[tuple[Arc, Arc], list[Link]] = {}
    for r, ts in sorted(by_link.items()):
        for k, t in enumerate(ts):
            for u in ts[k + 1:]:
                shared.setdefault((t, u), []).append(r)
    b.shared = shared
    dag = {pair: dag_order(b, *pair) for pair in sorted(shared)}
    fixed = {pair: (v if v is not None else window_order(b, *pair)) for pair, v in dag.items()}
    open_pairs = [t + u for (t, u), v in sorted(fixed.items()) if v is None]
    m.nic_q = pyo.Var(open_pairs, domain=pyo.Binary)
    m.nic_seq = pyo.ConstraintList()
    for (t, u), links in sorted(shared.items()):
        q = fixed[(t, u)]
        if q is None:
            q = m.nic_q[t + u]
        lo_t, hi_t = sigma_window(b, t)
        lo_u, hi_u = sigma_window(b, u)
        for r in links:
            k = 2 - nic_use(b, nic, t, r) - nic_use(b, nic, u, r)
            tau_t, tau_u = nic.tau(t, r), nic.tau(u, r)
            if fixed[(t, u)] != 0 and not (dag[(t, u)] == 1 and implied(b, t, r)):
                big = hi_t + tau_t - lo_u
                if big > 0:
                    m.nic_seq.add(m.sigma[u] >= m.sigma[t] + tau_t - big * (1 - q) - big * k)
            if fixed[(t, u)] != 1 and not (dag[(t, u)] == 0 and implied(b, u, r)):
                big = hi_u + tau_u - lo_t
                if big > 0:
                    m.nic_seq.add(m.sigma[t] >= m.sigma[u] + tau_u - big * q - big * k)
    b.info.n_binaries += len(open_pairs)
    b.stats = {"nic_tasks": len(nic.arcs()), "nic_pairs": len(shared), "nic_binaries": len(open_pairs),
                   "nic_dag_pairs": sum(v is not None for v in dag.values()),
                   "nic_window_pairs": sum(dag[p] is None and fixed[p] is not None for p in fixed)}


# -- warm start and solution ------------------------------------------------------------------------

def warm_values(b, sched) -> dict[int, float]:
    """Values of the NIC variables (by ``id``) in ``sched``: its transfer starts (``sched.sigma``
    for tasks that cross nodes, else the end of the source), uses and orders."""
    inst, m, nic = b.inst, b.m, b.nic
    dev, start = sched
    sigma = getattr(sched, "sigma", None)
    if sigma is None:  # a schedule without transfer times: each as early as its NIC allows
        done = nic_semi_active(inst, nic, sched)
        sigma = done.sigma if done is not None else {}
    end = [start[i] + inst.dur[i][dev[i]] for i in range(len(inst))]
    sig = {t: float(sigma.get(t, end[t[0]])) for t in nic.arcs()}
    rank = {i: k for k, i in enumerate(inst.topo())}
    key = {t: (sig[t], rank[t[0]], rank[t[1]]) for t in nic.arcs()}
    links = sorted(nic.bandwidth)
    vals: dict[int, float] = {}
    for t, v in m.sigma.items():
        vals[id(v)] = sig[t]
    for (i, j, k), v in m.nic_w.items():
        vals[id(v)] = 1.0 if links[k] in nic.used((i, j), dev[i], dev[j]) else 0.0
    for (i1, j1, i2, j2), v in m.nic_q.items():
        vals[id(v)] = 1.0 if key[(i1, j1)] < key[(i2, j2)] else 0.0
    return vals


def extract_sigma(b, dev: list[int]) -> dict[Arc, float]:
    """The solver's transfer starts (us) of the tasks that cross nodes in placement ``dev``."""
    return {t: float(pyo.value(b.m.sigma[t])) for t in b.nic.arcs() if b.nic.used(t, dev[t[0]], dev[t[1]])}
