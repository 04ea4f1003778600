"""The Pyomo model of the flexible distributed job-shop (one function per block of constraints).

Notation (times in us, sizes in bytes): ops ``i``; eligible GPUs ``D(i)``; duration ``p[i,d]``;
arcs ``(i,j)`` with delay ``c[i,j,a,b]`` when ``i`` runs on ``a`` and ``j`` on ``b`` (0 on the
same GPU); earliest / latest start ``ES[i]``, ``LS[i]`` for a horizon ``H``; ``Cmax`` the
makespan. Variables:

* ``x[i,d]`` in {0,1}: op ``i`` runs on GPU ``d`` (a constant where ``|D(i)| = 1``);
* ``s[i]`` in [ES[i], LS[i]]: start;
* ``y[i,j]`` in {0,1} (``i < j``): ``i`` before ``j`` if they share a stream; only for pairs that
  may share a (device, stream) and that no chain of arcs already orders;
* ``z[i,j]`` in [0,1]: forced to 1 when ``i`` and ``j`` share a stream;
* memory: ``st[a,o]`` (``a`` started by ``s[o]``), ``rl[a,o]`` (``a``'s allocation not yet freed
  at ``s[o]``) in {0,1}, and ``w[a,o,d] >= 0`` (``a`` live on ``d`` at ``s[o]``);
* ``peak`` for the memory objectives.

Memory enters the model in units of the largest single allocation (``Builder.mem_unit`` bytes)
so that its coefficients stay near 1 (HiGHS warns about, and slows on, byte-sized numbers).

The duration of ``i`` is the expression ``p[i] = sum_d p[i,d] x[i,d]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyomo.environ as pyo

from engine.planners.mip.instance import Instance

DEFAULT_SPEEDUPS = {"tight_big_m": True, "symmetry": True, "dag_pairs": True, "load_cut": True,
                    "warm_start": True, "tie_break": False, "lns": True}
EPS_US = 1e-3  # "strictly after" margin for the memory indicators


@dataclass
class ModelInfo:
    """What the builder decided, for warm starts and reports."""

    horizon: float
    lower_bound: float
    es: list[float]
    ls: list[float]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    fixed_pairs: dict[tuple[int, int], int] = field(default_factory=dict)
    share: dict[tuple[int, int], Any] = field(default_factory=dict)
    tie_weight: float = 0.0
    memory_devices: dict[int, bool] = field(default_factory=dict)
    n_binaries: int = 0


class Builder:
    """Builds the Pyomo model of an :class:`Instance` block by block."""

    def __init__(self, inst: Instance, horizon: float, speedups: dict[str, bool], objective: str = "makespan",
                 makespan_bound: float | None = None, memory_weight: float = 0.0,
                 transfer_arcs: frozenset[tuple[int, int]] = frozenset()):
        self.inst = inst
        # arcs whose precedence rows another block writes (NIC transfer tasks, engine.planners.mip.nic)
        self.transfer_arcs = transfer_arcs
        self.sp = {**DEFAULT_SPEEDUPS, **speedups}
        self.objective = objective
        self.makespan_bound = makespan_bound
        self.memory_weight = memory_weight  # us per byte
        self.mem_unit = float(max(inst.alloc, default=0) or 1)
        n = len(inst)
        lb = inst.lower_bound()
        self.H = max(horizon, lb)
        # window tests decide only with this margin (us): ES/LS are sums of floats, and a tie
        # (a free ending exactly at a start) must stay open, not be rounded into "live"
        self.tol = 1e-9 * max(1.0, self.H)
        if self.sp["tight_big_m"]:
            es, ls = inst.windows(self.H)
        else:
            es, ls = [0.0] * n, [self.H] * n
        self.info = ModelInfo(horizon=self.H, lower_bound=lb, es=es, ls=ls)
        self.m = pyo.ConcreteModel(name="plansim")

    # -- helpers -------------------------------------------------------------------------
    def x(self, i: int, d: int):
        """``x[i,d]``: a Pyomo variable, or the constant 1/0 for an op with one GPU."""
        if len(self.inst.devices[i]) == 1:
            return 1 if d == self.inst.devices[i][0] else 0
        return self.m.x[i, d]

    def p(self, i: int):
        """Duration of ``i`` (us) as a linear expression of the assignment."""
        inst = self.inst
        if len(inst.devices[i]) == 1 or len(set(inst.dur[i].values())) == 1:
            return inst.pmin(i)
        return sum(inst.dur[i][d] * self.m.x[i, d] for d in inst.devices[i])

    def big_m(self, i: int, j: int) -> float:
        """Largest possible ``s[i] + p[i] - s[j]``: the big-M of "j after i"."""
        if not self.sp["tight_big_m"]:
            return self.H
        info = self.info
        return max(0.0, info.ls[i] + self.inst.pmax(i) - info.es[j])

    # -- variables -----------------------------------------------------------------------
    def variables(self) -> None:
        """``x``, ``s``, ``Cmax`` with bounds ``ES[i] <= s[i] <= LS[i]``, ``LB <= Cmax <= H``."""
        inst, m, info = self.inst, self.m, self.info
        flex = [(i, d) for i in range(len(inst)) if len(inst.devices[i]) > 1 for d in inst.devices[i]]
        m.x = pyo.Var(flex, domain=pyo.Binary)
        m.s = pyo.Var(range(len(inst)), domain=pyo.NonNegativeReals,
                      bounds=lambda _m, i: (info.es[i], info.ls[i]))
        cmax_lb = info.lower_bound if self.sp["load_cut"] else 0.0
        cmax_ub = self.H if self.makespan_bound is None else min(self.H, self.makespan_bound)
        m.cmax = pyo.Var(domain=pyo.NonNegativeReals, bounds=(cmax_lb, max(cmax_lb, cmax_ub)))
        self.info.n_binaries += len(flex)

    def assignment(self) -> None:
        """Each op runs on exactly one eligible GPU: ``sum_{d in D(i)} x[i,d] = 1``."""
        inst, m = self.inst, self.m
        flex = [i for i in range(len(inst)) if len(inst.devices[i]) > 1]
        m.assign = pyo.Constraint(flex, rule=lambda _m, i: sum(m.x[i, d] for d in inst.devices[i]) == 1)

    def precedence(self) -> None:
        """For every arc (i,j) and every ``a in D(i)``:

        ``s[j] >= s[i] + p[i] + sum_b c[i,j,a,b] x[j,b] - M_a (1 - x[i,a])``, ``M_a = max_b c[i,j,a,b]``.

        When ``i`` runs on ``a`` this is the delay to wherever ``j`` runs (0 on the same GPU);
        otherwise the right side drops below ``s[i] + p[i]``, which the arc also enforces
        (zero-delay arcs reduce to ``s[j] >= s[i] + p[i]``).
        """
        inst, m = self.inst, self.m
        m.prec = pyo.ConstraintList()
        for i, j in inst.arcs():
            if (i, j) in self.transfer_arcs:
                continue  # a transfer task: rows through sigma (engine.planners.mip.nic)
            delays = inst.edges.get((i, j), {})
            if not delays:
                m.prec.add(m.s[j] >= m.s[i] + self.p(i))
                continue
            for a in inst.devices[i]:
                row = {b: delays.get((a, b), 0.0) for b in inst.devices[j]}
                big = max(row.values())
                delay = sum(t * self.x(j, b) for b, t in row.items() if t > 0)
                m.prec.add(m.s[j] >= m.s[i] + self.p(i) + delay - big * (1 - self.x(i, a)))
            if len(inst.devices[i]) > 1:  # plain precedence, for the LP relaxation
                m.prec.add(m.s[j] >= m.s[i] + self.p(i))

    def makespan(self) -> None:
        """``Cmax >= s[i] + p[i]`` for every op without successors."""
        inst, m = self.inst, self.m
        succ = inst.succs()
        sinks = [i for i in range(len(inst)) if not succ[i]]
        m.end = pyo.Constraint(sinks, rule=lambda _m, i: m.cmax >= m.s[i] + self.p(i))

    def _sequencing_pairs(self) -> None:
        """Pairs that may share a stream, minus (with ``dag_pairs``) those arcs already order and
        (with ``tight_big_m``) those whose windows allow one order only (then fixed)."""
        inst, info = self.inst, self.info
        res = inst.resource_ops()
        candidates = set()
        for ops in res.values():
            for k, i in enumerate(ops):
                for j in ops[k + 1:]:
                    candidates.add((min(i, j), max(i, j)))
        for i, j in sorted(candidates):
            if self.sp["dag_pairs"] and (inst.ordered(i, j) or inst.ordered(j, i)):
                continue
            share = self._share(i, j)
            if share is False:
                continue
            info.share[(i, j)] = share
            if self.sp["tight_big_m"]:
                i_first_ok = info.es[i] + inst.pmin(i) <= info.ls[j] + self.tol
                j_first_ok = info.es[j] + inst.pmin(j) <= info.ls[i] + self.tol
                if not j_first_ok and i_first_ok:
                    info.fixed_pairs[(i, j)] = 1
                    continue
                if not i_first_ok and j_first_ok:
                    info.fixed_pairs[(i, j)] = 0
                    continue
            info.pairs.append((i, j))

    def _share(self, i: int, j: int):
        """True if i and j always share a stream, False if never, else the device pairs
        ``(a, b)`` on which they do."""
        inst = self.inst
        both = []
        for a in inst.devices[i]:
            ra = set(inst.resources(i, a))
            for b in inst.devices[j]:
                if ra & set(inst.resources(j, b)):
                    both.append((a, b))
        if not both:
            return False
        if len(both) == len(inst.devices[i]) * len(inst.devices[j]):
            return True
        return tuple(both)

    def no_overlap(self) -> None:
        """Disjunctive constraints on every stream, for each sequencing pair (i,j):

        ``z[i,j] >= x[i,a] + x[j,b] - 1`` for every placement (a,b) where they share a stream,
        ``s[j] >= s[i] + p[i] - M_ij (1 - y[i,j]) - M_ij (1 - z[i,j])``,
        ``s[i] >= s[j] + p[j] - M_ji y[i,j] - M_ji (1 - z[i,j])``,

        with ``M_ij = LS[i] + p_max[i] - ES[j]`` (tight) or ``H`` (plain). Pairs whose windows
        allow one order only get that order without a binary.
        """
        self._sequencing_pairs()
        m, info = self.m, self.info
        m.y = pyo.Var(info.pairs, domain=pyo.Binary)
        self.info.n_binaries += len(info.pairs)
        flex_pairs = sorted(k for k, v in info.share.items() if v is not True)
        m.z = pyo.Var(flex_pairs, bounds=(0, 1))
        m.seq = pyo.ConstraintList()
        for (i, j), share in sorted(info.share.items()):
            if share is True:
                z = 1
            else:
                z = m.z[i, j]
                for a, b in share:
                    m.seq.add(z >= self.x(i, a) + self.x(j, b) - 1)
            y = info.fixed_pairs.get((i, j))
            if y is None:
                y = m.y[i, j]
            if not (isinstance(y, int) and y == 0):
                mij = self.big_m(i, j)
                m.seq.add(m.s[j] >= m.s[i] + self.p(i) - mij * (1 - y) - mij * (1 - z))
            if not (isinstance(y, int) and y == 1):
                mji = self.big_m(j, i)
                m.seq.add(m.s[i] >= m.s[j] + self.p(j) - mji * y - mji * (1 - z))

    def order_var(self, i: int, j: int):
        """``1`` if ``i`` runs before ``j`` on their shared stream (a y, a constant or None)."""
        if i == j:
            return None
        a, b = min(i, j), max(i, j)
        if (a, b) in self.info.fixed_pairs:
            v = self.info.fixed_pairs[(a, b)]
        elif (a, b) in self.info.pairs:
            v = self.m.y[a, b]
        else:
            return None
        if self.info.share.get((a, b)) is not True:
            return None
        return v if i == a else 1 - v

    def load_cut(self) -> None:
        """Per stream ``r`` of GPU ``d``: ``Cmax >= min_head_r + sum_i p[i,d] x[i,d] + min_tail_r``
        over the ops that may use it (the per-device load bound, linear in the assignment)."""
        if not self.sp["load_cut"]:
            return
        inst, m = self.inst, self.m
        head, tail = inst.heads(), inst.tails()
        m.load_cut = pyo.ConstraintList()
        for (d, _stream), ops in inst.resource_ops().items():
            if len(ops) < 2:
                continue
            work = []
            for i in ops:
                places = [a for a in inst.devices[i] if (d, _stream) in inst.resources(i, a)]
                work.append(sum(inst.dur[i][a] * self.x(i, a) for a in places))
            m.load_cut.add(m.cmax >= min(head[i] for i in ops) + sum(work) + min(tail[i] for i in ops))

    # -- memory ----------------------------------------------------------------------------
    def _live_status(self, a: int, o: int):
        """Whether allocation ``a`` is live at ``s[o]``: (started, not_released), each True,
        False or None (undecided)."""
        inst, info = self.inst, self.info
        if inst.ordered(a, o) or info.ls[a] < info.es[o]:
            started = True
        elif (inst.ordered(o, a) and inst.pmin(o) > 0) or info.es[a] > info.ls[o] + EPS_US:
            started = False
        else:
            started = None
        rel = inst.releasers(a)
        if all(inst.ordered(r, o) or info.ls[r] + inst.pmax(r) <= info.es[o] for r in rel):
            live = False
        elif any(((r == o or inst.ordered(o, r)) and inst.pmin(r) > 0) or
                 info.es[r] + inst.pmin(r) > info.ls[o] + self.tol for r in rel):
            live = True
        else:
            live = None
        return started, live

    def memory(self, with_peak: bool) -> None:
        """Memory at the start of every allocating op ``o``, on each GPU ``d in D(o)``:

        ``static[d] + m[o] + sum_a m[a] w[a,o,d] <= cap[d] + BIG (1 - x[o,d])``
        ``w[a,o,d] >= st[a,o] + rl[a,o] + x[a,d] - 2``
        ``s[a] >= s[o] + eps - M (st[a,o])``            (not started: strictly after)
        ``s[r] + p[r] <= s[o] + M rl[a,o]``  for r releasing a  (released: all ended)

        ``st``/``rl`` are constants where arcs or windows decide them, and reuse ``y`` where
        ``a`` (resp. ``a``'s single releaser) shares ``o``'s stream. Memory only grows at op
        starts, so checking there bounds the peak. With ``with_peak`` the same sums bound
        ``peak`` instead of (as well as) the cap. GPUs where everything fits are skipped.
        """
        inst, m, info = self.inst, self.m, self.info
        allocs = [i for i in range(len(inst)) if inst.alloc[i] > 0]
        unit = self.mem_unit
        m.mem = pyo.ConstraintList()
        m.st = pyo.Var(pyo.Any, domain=pyo.Binary, dense=False)
        m.rl = pyo.Var(pyo.Any, domain=pyo.Binary, dense=False)
        m.w = pyo.Var(pyo.Any, bounds=(0, 1), dense=False)
        if with_peak:
            m.peak = pyo.Var(domain=pyo.NonNegativeReals, bounds=(max(inst.static.values(), default=0) / self.mem_unit, None))
        for d in range(inst.n_devices):
            on_d = [i for i in allocs if d in inst.devices[i]]
            total = inst.static[d] + sum(inst.alloc[i] for i in on_d)
            binding = total > inst.cap[d]
            info.memory_devices[d] = binding
            if not on_d or not (binding or with_peak):
                continue
            for o in on_d:
                terms = []
                for a in on_d:
                    if a == o:
                        continue
                    t = self._live_term(a, o, d)
                    if t is not None:
                        terms.append(inst.alloc[a] / unit * t)
                if not terms and inst.static[d] + inst.alloc[o] <= inst.cap[d] and not with_peak:
                    continue
                used = (inst.static[d] + inst.alloc[o]) / unit + sum(terms)
                big = total / unit
                xo = self.x(o, d)
                if binding:
                    row = used <= inst.cap[d] / unit + big * (1 - xo)
                    if isinstance(row, bool):  # every term decided by arcs and windows
                        if not row:
                            m.mem.add(m.cmax <= -1)  # no plan within the horizon: infeasible
                    else:
                        m.mem.add(row)
                if with_peak:
                    m.mem.add(m.peak >= used - big * (1 - xo))
        self.info.n_binaries += len(m.st) + len(m.rl)

    def _live_term(self, a: int, o: int, d: int):
        """An expression that is >= 1 when allocation ``a`` is live on GPU ``d`` at ``s[o]``."""
        inst, m, info = self.inst, self.m, self.info
        started, live = self._live_status(a, o)
        if started is False or live is False:
            return None
        st = 1 if started else self.order_var(a, o)
        if st is None:
            if (a, o) not in m.st:
                m.st[a, o] = 0
                big = info.ls[o] + EPS_US - info.es[a]
                m.mem.add(m.s[a] >= m.s[o] + EPS_US - big * m.st[a, o])
            st = m.st[a, o]
        rels = inst.releasers(a)
        rl = 1 if live else None
        if rl is None and len(rels) == 1:
            before = self.order_var(rels[0], o)
            rl = None if before is None else 1 - before
        if rl is None:
            if (a, o) not in m.rl:
                m.rl[a, o] = 1
                for r in rels:
                    big = info.ls[r] + inst.pmax(r) - info.es[o]
                    m.mem.add(m.s[r] + self.p(r) <= m.s[o] + big * m.rl[a, o])
            rl = m.rl[a, o]
        xa = self.x(a, d)
        if isinstance(st, int) and isinstance(rl, int) and isinstance(xa, int):
            return 1 if st + rl + xa == 3 else None
        if isinstance(xa, int) and (isinstance(st, int) or isinstance(rl, int)):
            return rl if isinstance(st, int) else st  # the other one is the constant 1
        key = (a, o, d)
        m.w[key] = 0
        m.mem.add(m.w[key] >= st + rl + xa - 2)
        return m.w[key]

    # -- objective -----------------------------------------------------------------------
    def objective_block(self) -> None:
        """``makespan``: min ``Cmax + eps sum_i s[i]`` (eps so small the tie-break never beats
        one us of makespan); ``min_peak_memory``: min ``peak`` with ``Cmax <= bound``;
        ``weighted``: min ``Cmax + lambda peak``."""
        inst, m, info = self.inst, self.m, self.info
        n = max(1, len(inst))
        info.tie_weight = 1e-4 / n if self.sp["tie_break"] else 0.0
        tie = info.tie_weight * sum(m.s[i] for i in range(len(inst))) if info.tie_weight else 0
        if self.objective == "makespan":
            m.obj = pyo.Objective(expr=m.cmax + tie, sense=pyo.minimize)
        elif self.objective == "min_peak_memory":
            m.obj = pyo.Objective(expr=m.peak + 1e-4 / max(self.H, 1e-9) * m.cmax, sense=pyo.minimize)
        elif self.objective == "weighted":
            m.obj = pyo.Objective(expr=m.cmax + self.memory_weight * self.mem_unit * m.peak + tie, sense=pyo.minimize)
        else:
            raise ValueError(f"unknown objective {self.objective!r}")

    def build(self, memory: bool = True):
        """The whole model: variables, assignment, precedence (but for ``transfer_arcs``),
        makespan, no-overlap, load cut, memory, objective."""
        self.variables()
        self.assignment()
        self.precedence()
        self.makespan()
        self.no_overlap()
        self.load_cut()
        with_peak = self.objective in ("min_peak_memory", "weighted")
        if memory or with_peak:
            self.memory(with_peak)
        self.objective_block()
        return self.m, self.info
