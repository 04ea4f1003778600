"""The event loop: one simulated run of a :class:`simulator.symmetry.Model` on SimPy.

Each (GPU, stream) is a cursor over its ops in plan order. An op class starts when everything it
waits for is done: every stream it occupies has reached it (its predecessor there ended) and every
input has arrived; ``need[c]`` counts what is still missing. Then

* a compute op runs for its duration (a SimPy timeout), or on the GPU's re-ratable compute stream
  when communication slows compute (:class:`simulator.gpu.ComputeStream`);
* a plain comm op runs for its duration on the comm stream;
* a collective is a SimPy process that moves its phases step by step through the network
  (``alpha_beta``: one timeout of its closed-form time).

When an op ends, its streams move on and its outputs leave: free on the same GPU or for zero
bytes, else as a flow (route latency + message overhead, then the bytes at the fair share;
``alpha_beta``: ``cluster.transfer_time``). Routes and collective phases are worked out in
:meth:`Engine.prepare`, before the clock starts. Times in us, sizes in bytes.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import simpy

from engine.core.errors import InputError
from simulator.collectives import CollectivePlanner
from simulator.gpu import ComputeStream
from simulator.network import Network
from simulator.symmetry import KIND_COMM, KIND_COMPUTE, Model, edge_salt

if TYPE_CHECKING:
    from hardware_profiles import Cluster


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that can say how many events it has scheduled.

    SimPy numbers every event it schedules (``_eid``, the tie-breaker of its event queue); once a
    run has emptied the queue, every scheduled event has been processed. Reading that counter
    keeps the event loop free of per-event bookkeeping."""

    def __init__(self):
        super().__init__(initial_time=0.0)  # float clock: times are floats even when every duration is 0
        self._probes = 0

    @property
    def n_events(self) -> int:
        probe = next(self._eid)  # the id the next event would get; taking it uses one up
        self._probes += 1
        return probe - (self._probes - 1)


class Engine:
    """The event loop over a :class:`Model`."""

    def __init__(self, model: Model, ops: dict[str, Any], cluster: Cluster, planner: CollectivePlanner, coll_plan,
                 mode: str, slowdown: float, timeline: bool):
        self.m = model
        self.ops = ops  # workload.ops
        self.cluster = cluster
        self.planner = planner
        self.coll_plan = coll_plan
        self.mode = mode
        self.env = env = CountingEnvironment()
        names = sorted(planner.bandwidth)
        self.net = Network(env, names, [planner.bandwidth[l] for l in names], timeline and mode == "flow")
        self.overhead = cluster.profile.comm.message_overhead_us
        n = len(model.names)
        self.need = [model.in_deps[c] + len(model.op_streams[c]) for c in range(n)]
        self.pos = [0] * len(model.streams)
        self.start = [math.nan] * n
        self.end = [math.nan] * n
        self.arrival = [math.nan] * len(model.deps)
        self.gpus = {d: ComputeStream(env, slowdown) for d in model.device_members} if slowdown > 0 else None
        self.comm_gpus = [sorted({model.streams[k][0] for k in model.op_streams[c]}) if model.kind[c] != KIND_COMPUTE
                          else [] for c in range(n)]
        self._bundles: dict[int, tuple] = {}
        self._phases: dict[int, list] = {}
        self._plan_phases: dict[int, list] = {}
        self._routes: dict[tuple[int, int, int], tuple] = {}
        self._closed_form: dict[int, float] = {}  # alpha_beta: collective class -> us
        self._closed_form_dep: dict[int, float] = {}  # alpha_beta: dep -> us
        self.spines = cluster.n_spines
        self.leaf = [cluster.leaf_of_node(cluster.node_of(g)) for g in range(cluster.n_gpus)]

    # -- setup helpers --------------------------------------------------------------------------
    def collectives_align(self) -> bool:
        """Members of every collective class move alike (else symmetry reduction is not used)."""
        for c in self.m.collectives:
            if self._class_phases(c) is None:
                return False
        return True

    def _class_phases(self, c: int):
        """Per phase of class ``c`` over all its members: (link ids, weights, bytes per sub-flow,
        latency, repeat, stand-alone rate); None if the members do not move alike."""
        hit = self._phases.get(c)
        if hit is not None:
            return hit
        plans = [self.coll_plan(self.ops[o]) for o in self.m.collectives[c]]
        if len(plans) == 1 and id(plans[0]) in self._plan_phases:
            out = self._phases[c] = self._plan_phases[id(plans[0])]
            return out
        first = plans[0]
        if any(len(p.phases) != len(first.phases) for p in plans):
            return None
        out = []
        for i, ph in enumerate(first.phases):
            weights: dict[tuple[str, str], float] = {}
            conns: dict[int, float] = {}  # private link of a capped connection -> sub-flows on it
            latency = 0.0
            for p in plans:
                q = p.phases[i]
                if q.repeat != ph.repeat or q.nbytes != ph.nbytes:
                    return None
                latency = max(latency, q.latency_us)
                for l, w in zip(q.links, q.weights):
                    weights[l] = weights.get(l, 0.0) + w
                for a, b in q.conns:
                    cid = self.net.connection(a, b, q.conn_rate)
                    conns[cid] = conns.get(cid, 0.0) + 1.0
            links = sorted(weights)
            ids = tuple(self.net.link_ids(links)) + tuple(sorted(conns))
            ws = tuple(weights[l] for l in links) + tuple(conns[c] for c in sorted(conns))
            out.append((ids, ws, ph.nbytes, latency, ph.repeat, self.net.solo_rate(ids, ws) if ids else 0.0))
        self._phases[c] = out
        if len(plans) == 1:
            self._plan_phases[id(plans[0])] = out  # plans are cached by the planner: ids are stable
        return out

    def _bundle(self, k: int):
        """(link ids, weights, latency, stand-alone rate) of dep ``k``'s flows: one sub-flow per
        concrete edge, latency = the slowest route's hops + the message overhead."""
        hit = self._bundles.get(k)
        if hit is not None:
            return hit
        edges = self.m.deps[k].edges
        routes = [self._route(du, dv, u, v) for u, v, du, dv in edges]
        if len(routes) == 1:
            hit = routes[0]
        else:
            weights: dict[int, float] = {}
            for links, _w, _lat, _solo in routes:
                for l in links:
                    weights[l] = weights.get(l, 0.0) + 1.0
            links = tuple(sorted(weights))
            ws = tuple(weights[l] for l in links)
            hit = (links, ws, max(r[2] for r in routes), self.net.solo_rate(links, ws))
        self._bundles[k] = hit
        return hit

    def _route(self, du: int, dv: int, u: str, v: str):
        """(link ids, weights, latency incl. message overhead) of one transfer ``du -> dv``.

        The ECMP salt comes from the edge, so an edge's flows spread over the spines; routes that
        stay under one leaf do not depend on it and are shared."""
        salt = edge_salt(u, v) if self.spines and self.leaf[du] != self.leaf[dv] else 0
        key = (du, dv, salt)
        hit = self._routes.get(key)
        if hit is None:
            route = self.cluster.route(du, dv, salt)
            links = tuple(sorted(self.net.link_ids(route)))
            lat = sum(self.planner.latency[l] for l in route) + self.overhead
            ones = (1.0,) * len(links)
            hit = self._routes[key] = (links, ones, lat, self.net.solo_rate(links, ones))
        return hit

    # -- the run --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Routes, collective phases and closed-form times, worked out before the clock starts."""
        for k, dep in enumerate(self.m.deps):
            if dep.flow:
                self._bundle(k)
                if self.mode == "alpha_beta":
                    self._closed_form_dep[k] = max(self.cluster.transfer_time(du, dv, dep.nbytes)
                                                   for _u, _v, du, dv in dep.edges)
        bw = self.planner.bandwidth
        for c, members in self.m.collectives.items():
            self._class_phases(c)
            if self.mode == "alpha_beta":
                self._closed_form[c] = max(self.coll_plan(self.ops[o]).time_us(bw) for o in members)

    def run(self) -> None:
        for k in range(len(self.m.streams)):
            self._advance(k)
        self.env.run()
        unfinished = [c for c in range(len(self.m.names)) if math.isnan(self.end[c])]
        if unfinished:
            c = unfinished[0]
            raise InputError(None, "plan.order", f"the plan deadlocks: op {self.m.names[c]} never starts "
                                                 f"({len(unfinished)} ops never run)")

    def _advance(self, k: int) -> None:
        """Stream ``k`` moves on to its next op: one of the things that op waits for is done."""
        seq = self.m.stream_seq[k]
        p = self.pos[k]
        if p < len(seq):
            self._ready(seq[p])

    def _ready(self, c: int) -> None:
        """One more thing op class ``c`` waits for (an input, a stream reaching it) is done."""
        need = self.need
        need[c] -= 1
        if need[c] == 0:
            self._launch(c)

    def _launch(self, c: int) -> None:
        env = self.env
        self.start[c] = env.now
        kind = self.m.kind[c]
        if kind == KIND_COMPUTE:
            if self.gpus is not None:
                self.gpus[self.m.device[c]].run(self.m.duration[c], partial(self._complete, c))
            else:
                env.timeout(self.m.duration[c]).callbacks.append(partial(self._complete, c))
            return
        self._comm_edge(c, +1)
        if kind == KIND_COMM:
            env.timeout(self.m.duration[c]).callbacks.append(partial(self._complete, c))
        elif self.mode == "alpha_beta":
            for links, weights, nbytes, _lat, repeat, _solo in self._class_phases(c):
                self._account(links, weights, nbytes * repeat)
            env.timeout(self._closed_form[c]).callbacks.append(partial(self._complete, c))
        else:
            env.process(self._collective(c))

    def _collective(self, c: int):
        """The steps of collective class ``c``, one after the other; the message overhead once."""
        first = True
        for links, weights, nbytes, latency, repeat, solo in self._class_phases(c):
            for _ in range(repeat):
                ev = self.env.event()
                self.net.transfer(links, weights, nbytes, latency + (self.overhead if first else 0.0), ev.succeed, solo)
                first = False
                yield ev
        self._complete(c)

    def _comm_edge(self, c: int, sign: int) -> None:
        if self.gpus is None:
            return
        for d in self.comm_gpus[c]:
            if sign > 0:
                self.gpus[d].comm_started()
            else:
                self.gpus[d].comm_ended()

    def _complete(self, c: int, _ev=None) -> None:
        """Op class ``c`` ends: its streams move on and its outputs leave."""
        now = self.env.now
        m = self.m
        self.end[c] = now
        if self.gpus is not None and m.kind[c] != KIND_COMPUTE:
            self._comm_edge(c, -1)
        pos, seqs, ready = self.pos, m.stream_seq, self._ready
        for k in m.op_streams[c]:
            p = pos[k] = pos[k] + 1
            if p < len(seqs[k]):
                ready(seqs[k][p])
        for k in m.out_deps[c]:
            dep = m.deps[k]
            if not dep.flow:
                self.arrival[k] = now
                ready(dep.dst)
            elif self.mode == "alpha_beta":
                links, weights, _lat, _solo = self._bundle(k)
                self._account(links, weights, dep.nbytes)
                self.env.timeout(self._closed_form_dep[k]).callbacks.append(partial(self._arrive_cb, k))
            else:
                links, weights, latency, solo = self._bundle(k)
                self.net.transfer(links, weights, dep.nbytes, latency, partial(self._arrive, k), solo)

    def _account(self, links, weights, nbytes: float) -> None:
        self.net.account(links, weights, nbytes)

    def _arrive_cb(self, k: int, _ev) -> None:
        self._arrive(k)

    def _arrive(self, k: int) -> None:
        self.arrival[k] = self.env.now
        self._ready(self.m.deps[k].dst)
